"""The sweep's output columns: name -> (unit, meaning), in CSV order.

Times are ms per optimizer step (``micro_batches`` forward + backward passes and the
optimizer) of all ``layers`` layers, scaled from the ``layers_run`` layers run; bytes per step
likewise. NaN where not applicable or not measurable here, and ``note``
says why. :func:`columns_markdown` is written next to the CSV as ``columns.md``;
:func:`check_described` refuses to write a column that has no entry here.
"""

from __future__ import annotations

from typing import Iterable

#: column -> (unit, meaning); "" for a unit: a label or a category
COLUMNS: dict[str, tuple[str, str]] = {
    "kind": ("", '"step" (a training step of an adapter stack) or "transfer" (row copies)'),
    "mode": ("", '"cuda" (measured on the GPU) or "cpu" (no CUDA: the CPU subset, every impl on CPU compute)'),
    "preset": ("", "model-shape preset (llama-7b, mistral-7b, tiny)"),
    "hidden_size": ("count", "d"),
    "layers": ("count", "adapted layers of the preset (or --layers)"),
    "layers_run": ("count", "layers actually run; times and bytes are scaled by layers / layers_run"),
    "num_neurons": ("count", "N per layer (transfer rows: rows of the store copied from)"),
    "num_experts": ("count", "E"),
    "experts_per_token": ("count", "P"),
    "topk": ("count", "K_top"),
    "tokens": ("count", "tokens per micro-batch"),
    "dtype": ("", "compute dtype (masters and optimizer state are fp32)"),
    "backbone": ("", '"none" (adapter stack only) or "ffn" (a frozen SwiGLU FFN of the preset\'s size beside '
                 'every adapter: the compute placement "cpu" hides its value-row copy behind)'),
    "impl": ("", "meft | reference | meft-original | dense | lora | transfer"),
    "placement": ("", 'gpu | cpu (MEFTAdapter\'s placement; "gpu" for the baselines: everything on the '
                  "compute device)"),
    "transfer": ("", 'transfer engine (placement "cpu"): cpu_gather | zero_copy'),
    "backward_rows": ("", 'backward row policy (placement "cpu"): refetch | keep'),
    "micro_batches": ("count", "micro-batches per optimizer step (forward + backward each, one optimizer step); "
                      "times, tokens/s and bytes are per optimizer step"),
    "residency": ("", 'placement "cpu": per-micro-batch | resident (MEFTConfig.residency)'),
    "ist_ratio": ("ratio", "fraction of layers IST trains per step (meft only, uniform selection; 1 = every "
                  "layer): frozen layers move no gradient rows, run no optimizer"),
    "lora_rank": ("count", 'rank of the LoRA baseline (its device bytes = MEFT\'s under placement "cpu")'),
    "repeats": ("count", "timed steps (median)"),
    "warmup": ("count", "excluded steps before timing"),
    "fwd_ms": ("ms", "forward (router, keys, row copies, values)"),
    "bwd_ms": ("ms", "backward (incl. the backward refetch and the gradient rows sent home)"),
    "opt_ms": ("ms", "optimizer step (dense AdamW; placement \"cpu\": the row-sparse AdamW's hand-off)"),
    "step_ms": ("ms", "whole optimizer step: every micro-batch's forward and backward, and the optimizer"),
    "tokens_per_s": ("tokens/s", "tokens x micro_batches / step_ms (adapter stack, plus the frozen FFN with "
                     "--backbone ffn)"),
    "t_router_ms": ("ms", "breakdown (reference): router logits and top-P experts"),
    "t_keys_ms": ("ms", "breakdown (reference): candidate key scores and top-K_top"),
    "t_copy_wait_ms": ("ms", 'breakdown, placement "cpu" on CPU compute without the FFN: from start_routing\'s '
                       "return until the library's value-row copy is done (its ticket's handle)"),
    "t_values_ms": ("ms", "breakdown (reference): y = sum a_j V_j"),
    "t_forward_fused_ms": ("ms", 'breakdown: a forward timed whole (MEFTAdapter, baselines; placement "cpu": '
                           "start_routing + finish_values, incl. the copy wait where it is not split off)"),
    "t_backbone_ms": ("ms", "breakdown: the frozen FFN's forward (--backbone ffn)"),
    "t_backward_ms": ("ms", "breakdown: autograd backward (incl. the FFN's backward to h)"),
    "t_optimizer_ms": ("ms", "breakdown: dense AdamW, and the row-sparse AdamW's sparse_step"),
    "speedup_vs_reference": ("ratio", "step_ms of the reference (placement gpu) of the same shape / this step_ms"),
    "gpu_peak_alloc_bytes": ("bytes", "torch allocator peak during the timed steps (CUDA)"),
    "gpu_peak_nvml_bytes": ("bytes", "NVML used device memory, peak of samples during the timed steps"),
    "adapter_gpu_bytes": ("bytes", "accounting: device bytes of the adapter stack (fp32 masters, grads, AdamW)"),
    "adapter_host_bytes": ("bytes", 'accounting: host bytes (placement "cpu": master rows, moments, staging)'),
    "host_rss_bytes": ("bytes", "process RSS after the point"),
    "host_peak_rss_bytes": ("bytes", "peak RSS during the point (Linux clear_refs + VmHWM)"),
    "pinned_bytes": ("bytes", "pinned host bytes (torch's host allocator; else the row stores' pinned bytes)"),
    "unique_rows_per_layer": ("rows", "mean distinct active neurons per layer"),
    "unique_rows_layers": ("rows", 'distinct active neurons of each layer run, ";"-separated'),
    "h2d_bytes_per_step": ("bytes", 'placement "cpu", predicted: the planner\'s host -> device bytes per optimizer '
                           "step (profiling/plan/traffic.py) for the routing this step saw (value rows per the "
                           "residency policy, in the compute dtype, + the key rows the update changed). On a "
                           'machine without a GPU: the bytes placement "cpu" WOULD move. Transfer rows: the rows\' '
                           "payload"),
    "d2h_bytes_per_step": ("bytes", "predicted likewise: gradient rows device -> host with their int64 ids "
                           '(fp32 per micro-batch under "per-micro-batch"; summed on the device and sent once per '
                           'step in the compute dtype under "resident")'),
    "h2d_bytes_measured": ("bytes", "the library's own counter: OffloadRuntime.bytes_to_device per optimizer step "
                           "(value rows and the key-cache write-back)"),
    "d2h_bytes_measured": ("bytes", "likewise OffloadRuntime.bytes_to_host (gradient rows + their int64 ids)"),
    "rows_touched_per_step": ("rows", "distinct rows an optimizer step touched, mean over the layers run (the "
                              "union of its micro-batches' rows)"),
    "pcie_floor_bytes_per_step": ("bytes", "the floor: every row the step touched crosses once each way in the "
                                  "compute dtype, 2 x rows x (r + d) x element size, summed over layers"),
    "pcie_vs_floor": ("ratio", "(h2d_bytes_measured + d2h_bytes_measured) / pcie_floor_bytes_per_step"),
    "copy_ms": ("ms", "the step's rows (h2d/d2h_bytes_per_step) copied standalone through the library's Prefetcher "
                'and the copy engine placement "cpu" uses on this device (offload.default_engine): '
                "prefetch -> acquire -> release, and offload_grads"),
    "achieved_GBps": ("GB/s", "(h2d + d2h bytes) / copy_ms; transfer rows: the default path end to end "
                      "(CUDA: h2d_cpu_gather_GBps, CPU: gather_GBps)"),
    "memcpy_GBps": ("GB/s", "plain memcpy of the same bytes in the same run (pinned H2D on CUDA, host memcpy on "
                    "CPU)"),
    "achieved_vs_memcpy": ("ratio", "achieved_GBps / memcpy_GBps"),
    "copy_hidden_share": ("ratio", "share of copy time hidden behind compute: 1 - (step_ms cpu - step_ms of the "
                          "placement-gpu step) / copy_ms, clamped to [0, 1] (the library has no copy timers)"),
    "pcie_tx_GBps": ("GB/s", "NVML PCIe TX (device -> host) throughput, mean of samples while timing"),
    "pcie_rx_GBps": ("GB/s", "NVML PCIe RX (host -> device) throughput, mean of samples while timing"),
    "rows": ("rows", "transfer rows: rows copied"),
    "gather_GBps": ("GB/s", "offload.gather.cpu_gather (the cpu_gather engine's host gather; one thread here) of fp32 "
                    "value rows of a CPURowStore into a staging buffer (payload bytes / s)"),
    "gather_cast_GBps": ("GB/s", "the same gather into a buffer of the compute dtype (payload bytes written / s)"),
    "host_memcpy_GBps": ("GB/s", "plain host copy of the same fp32 payload"),
    "h2d_cpu_gather_GBps": ("GB/s", "the library's Prefetcher on CudaCopyEngine(\"cpu_gather\"): prefetch -> "
                            "acquire -> release of the rows, end to end (CUDA)"),
    "h2d_zero_copy_GBps": ("GB/s", "likewise on CudaCopyEngine(\"zero_copy\") (CUDA)"),
    "pinned_h2d_GBps": ("GB/s", "plain pinned memcpy host -> device of the same bytes (CUDA)"),
    "d2h_GBps": ("GB/s", "Prefetcher.offload_grads of fp32 gradient rows [rows, 2d] to pinned host memory (CUDA)"),
    "pinned_d2h_GBps": ("GB/s", "plain pinned memcpy device -> host of the same bytes (CUDA)"),
    "device": ("", 'CUDA device name, or "cpu"'),
    "cpu": ("", "CPU model"),
    "threads": ("count", "torch CPU threads"),
    "driver": ("", "NVIDIA driver (NVML)"),
    "cuda": ("", "CUDA version of the torch build"),
    "torch": ("", "torch version"),
    "triton": ("", "triton version"),
    "python": ("", "python version"),
    "adapter_counters": ("", "the OffloadRuntime's counters per step (bytes_to_device, bytes_to_host, "
                         "rows_reused), JSON"),
    "note": ("", "what could not be measured here, and why"),
}

COLUMN_NAMES: list[str] = list(COLUMNS)


def check_described(columns: Iterable[str]) -> None:
    """Raise ValueError naming every column that has no entry in :data:`COLUMNS`."""
    missing = [c for c in columns if c not in COLUMNS]
    if missing:
        raise ValueError(f"undescribed sweep columns: {', '.join(missing)} (add them to profiling/sweep/columns.py)")


def columns_markdown(columns: Iterable[str] = COLUMN_NAMES) -> str:
    """A markdown table of ``columns``: name, unit, meaning."""
    columns = list(columns)
    check_described(columns)
    lines = ["| column | unit | meaning |", "|---|---|---|"]
    for name in columns:
        unit, meaning = COLUMNS[name]
        lines.append(f"| {name} | {unit} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)
