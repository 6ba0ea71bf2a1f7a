"""Model-shape presets and the default / quick sweeps of ``python -m profiling.sweep``.

A preset fixes the hidden size d and the number of adapted layers of a model family; the
sweep's other axes (N, E, P, K_top, tokens, placement, ...) come from the command line or,
where a flag is not given, from the defaults below, chosen for the device the sweep runs on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    layers: int
    ffn_hidden: int  # intermediate size of the (SwiGLU) FFN the adapter sits beside


PRESETS: dict[str, ModelShape] = {
    "llama-7b": ModelShape("llama-7b", 4096, 32, 11008),
    "mistral-7b": ModelShape("mistral-7b", 4096, 32, 14336),
    "tiny": ModelShape("tiny", 128, 2, 512),
}

#: MEFT's ratio at LLaMA-7B shapes (N = 65536 neurons over E = 1024 experts): 64 neurons per
#: expert. Used to derive E from N when ``--num-experts`` is not given.
DEFAULT_NEURONS_PER_EXPERT = 64

# Axis defaults per (device kind, quick?). Keys are the argparse destinations of the sweep.
# A flag given on the command line always wins over these.
_GPU_FULL = dict(
    preset=["llama-7b"], num_neurons=[8192, 16384, 32768, 65536, 131072], num_experts=None,
    experts_per_token=[8], topk=[64], tokens=[1024, 4096], placement=["gpu", "cpu"],
    transfer=["cpu_gather", "zero_copy"], backward_rows=["refetch", "keep"], dtype=["bfloat16"],
    residency=["per-micro-batch", "resident"], micro_batches=[1, 8],
    baselines=["reference", "meft-original", "dense", "lora"], repeats=10, warmup=3, max_layers=4,
    transfer_rows=[1024, 4096, 16384, 65536, 131072], threads=None,
    # a frozen FFN stand-in per layer: what placement "cpu" hides its value-row copy behind
    backbone="ffn",
)
_GPU_QUICK = dict(
    _GPU_FULL, num_neurons=[16384, 65536], tokens=[2048], repeats=5, warmup=2, max_layers=2,
    transfer_rows=[4096, 65536],
)
_CPU_FULL = dict(
    preset=["tiny"], num_neurons=[1024, 4096, 16384, 65536], num_experts=None,
    experts_per_token=[8], topk=[64], tokens=[256, 1024], placement=["gpu", "cpu"],
    transfer=["cpu_gather"], backward_rows=["refetch", "keep"], dtype=["float32"],
    residency=["per-micro-batch", "resident"], micro_batches=[1, 8],
    baselines=["reference", "meft-original", "dense", "lora"], repeats=7, warmup=2, max_layers=2,
    transfer_rows=[256, 1024, 4096, 16384, 65536],
    # One torch thread on CPU: the sweep's own worker threads (row-sparse AdamW, the CPU copy
    # engine) and any neighbour make a 2-thread OpenMP team stall for whole scheduler slices,
    # which turns sub-millisecond ops into tens of milliseconds (measured on a busy 2-core VM).
    threads=1, backbone="none",
)
_CPU_QUICK = dict(
    _CPU_FULL, num_neurons=[1024, 4096, 16384], tokens=[256], repeats=5, warmup=1, micro_batches=[1, 4],
    transfer_rows=[256, 1024, 4096, 16384],
)


def sweep_defaults(cuda: bool, quick: bool) -> dict:
    """The axis values a sweep uses where no flag overrides them."""
    if cuda:
        return dict(_GPU_QUICK if quick else _GPU_FULL)
    return dict(_CPU_QUICK if quick else _CPU_FULL)
