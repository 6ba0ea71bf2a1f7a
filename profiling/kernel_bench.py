"""Kernel benchmark: the Triton adapter vs its floors and baselines, on a CUDA GPU.

    python -m profiling.kernel_bench                     # LLaMA-7B shapes (docs/DESIGN.md, "Performance model")
    python -m profiling.kernel_bench --tokens 1024 --num-neurons 16384 --dtype float16

In one run it measures the two ceilings (HBM bandwidth: a large device copy; tensor-core
rate: a large matmul in the compute dtype), then times forward and forward+backward of

* ``triton``: router_topk + sparse_kv_forward (+ sparse_kv_backward, row-sparse grads),
* ``reference``: meft_triton.reference through autograd,
* ``meft-original``: MEFT's published dense-masked formulation (dense [T, N] scores and a
  dense [T, N] activation matmul),
* ``triton-factored``: placement "cpu"'s ``gradient_form="factors"`` on one micro-batch: the
  backward without its dK/dV GEMMs, then ``key_value_rows`` over the same tokens (a flush
  every micro-batch, the form's worst case),

and prints each time with the floor max(bytes / bandwidth, flops / tensor-core rate) of the
adapter and the ratios; then ``key_value_rows`` alone over ``--flush-micro-batches``
micro-batches' factors (a flush, ``flush_ms`` beside its static prediction in machine.json).
Beside the Triton times stand the static report's predictions for the
same target, dtype and shape (``python -m profiling.aot``, the committed records of
``profiling/results/static-<target>/``; sm_90 GPUs read sm90a, sm_80 ones sm80), so a GPU
run grades the model: ``*_vs_static`` = measured / predicted. A baseline that runs out of
memory is recorded as such. Results go to
``profiling/results/<device>/<timestamp>-kernels/kernels.csv`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from meft_triton import MEFTConfig, reference
from .environment import describe_machine, results_dir

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results"
#: GPU compute capability -> the static report's target compiled for it
STATIC_TARGETS = {(9, 0): "sm90a", (8, 0): "sm80"}
STATIC_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
#: the static report's workloads the bench's two phases run: router + forward, then + backward
STATIC_PHASES = {"fwd": ("router_topk", "forward"), "step": ("router_topk", "forward", "backward"),
                 "flush": ("factored_rows",)}  # (its records' shape_params carry the flush's micro-batches)


def static_prediction(capability: tuple[int, int], dtype: str, shape: dict[str, int],
                      results: Path = RESULTS) -> dict[str, float] | None:
    """The static report's predicted ``fwd_ms`` and ``step_ms`` (sums over the phase's
    launches) for a GPU of this compute capability, ``dtype`` (a key of DTYPES) and ``shape``
    (T, d, N, E, P, K as the records' ``shape_params`` name them); None when no committed
    record matches (another GPU or shape)."""
    target = STATIC_TARGETS.get(tuple(capability))
    if target is None or not (results / f"static-{target}" / "records.json").is_file():
        return None
    records = [r for r in json.loads((results / f"static-{target}" / "records.json").read_text())
               if r.get("dtype") == STATIC_DTYPES[dtype] and r.get("predicted_us") is not None
               and all(r["shape_params"].get(k) == v for k, v in shape.items())]
    if not records:
        return None
    return {f"{phase}_ms": sum(r["predicted_us"] for r in records if r["workload"] in workloads) / 1e3
            for phase, workloads in STATIC_PHASES.items()}


def adapter_floor(cfg: MEFTConfig, tokens: int, hidden_size: int, dtype_bytes: int,
                  unique_rows: int, unique_experts: int) -> dict[str, float]:
    """Bytes the adapter must move and FLOPs it must do, forward and forward+backward.

    Forward reads h, G, the used experts' keys and the selected value rows and writes y;
    backward also reads dy and the selected key/value rows again and writes dh, the fp32
    row-sparse key/value gradients and the fp32 router gradient.
    """
    T, d, E, P, K = tokens, hidden_size, cfg.num_experts, cfg.experts_per_token, cfg.topk
    S = cfg.neurons_per_expert
    act = T * d * dtype_bytes
    fwd_bytes = 2 * act + E * d * dtype_bytes + (unique_experts * S + unique_rows) * d * dtype_bytes
    bwd_bytes = (3 * act + E * d * dtype_bytes + 2 * unique_rows * d * dtype_bytes
                 + 2 * unique_rows * d * 4 + E * d * 4)
    fwd_flops = 2 * T * d * (E + P * S + K)
    bwd_flops = 2 * T * d * (5 * K + 2 * P)
    return {"fwd_bytes": fwd_bytes, "fwd_flops": fwd_flops,
            "step_bytes": fwd_bytes + bwd_bytes, "step_flops": fwd_flops + bwd_flops}


def adapter_problem(tokens: int, hidden_size: int, num_neurons: int, num_experts: int,
                    dtype: torch.dtype, seed: int = 0, device: str = "cuda") -> dict[str, torch.Tensor]:
    """Random inputs with MEFT's initialisation: hidden, router (expert-mean keys x 50), keys,
    values (std 0.02) and an upstream gradient, in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=gen)
    keys = torch.randn(num_neurons, hidden_size, device=device, generator=gen) * 0.02
    values = torch.randn(num_neurons, hidden_size, device=device, generator=gen) * 0.02
    router = keys.view(num_experts, -1, hidden_size).mean(1) * 50
    grad_y = torch.randn(tokens, hidden_size, device=device, generator=gen)
    return {name: t.to(dtype) for name, t in
            dict(hidden=hidden, router=router, keys=keys, values=values, grad_y=grad_y).items()}


def triton_passes(problem: dict[str, torch.Tensor], experts_per_token: int, topk: int):
    """``(forward, step, factored_step)`` closures of the Triton path on ``problem``: router
    top-k + sparse forward; the same + sparse backward (row-sparse grads); the same with the
    factored backward and key_value_rows over its own tokens."""
    from meft_triton.kernels import key_value_rows, router_topk, sparse_kv_backward, sparse_kv_forward

    hidden, router, keys, values = (problem[k] for k in ("hidden", "router", "keys", "values"))
    num_experts = router.shape[0]

    def forward():
        gate_logits, expert_ids = router_topk(hidden, router, experts_per_token)
        return (expert_ids, gate_logits, *sparse_kv_forward(hidden, keys, values, expert_ids, gate_logits,
                                                            num_experts, topk, check_ids=False))

    def step():
        expert_ids, gate_logits, _, neuron_ids, activations = forward()
        return sparse_kv_backward(problem["grad_y"], hidden, router, keys, values, expert_ids, gate_logits,
                                  neuron_ids, activations, dense=False, check_ids=False)

    def factored_step():
        expert_ids, gate_logits, _, neuron_ids, activations = forward()
        grads = sparse_kv_backward(problem["grad_y"], hidden, router, keys, values, expert_ids, gate_logits,
                                   neuron_ids, activations, dense=False, check_ids=False, factored=True)
        return key_value_rows(hidden, problem["grad_y"], expert_ids, neuron_ids, grads.pick_grads, activations,
                              keys.shape[0], num_experts, out_dtype=hidden.dtype, check_ids=False)

    return forward, step, factored_step


def flush_factors(problem: dict[str, torch.Tensor], experts_per_token: int, topk: int, micro_batches: int):
    """The factors of ``micro_batches`` micro-batches (fresh tokens each, the problem's
    weights), concatenated as a flush hands them to key_value_rows."""
    from meft_triton.kernels import router_topk, sparse_kv_backward, sparse_kv_forward

    router, keys, values = (problem[k] for k in ("router", "keys", "values"))
    parts = []
    for seed in range(micro_batches):
        gen = torch.Generator(device=keys.device).manual_seed(1000 + seed)
        hidden, grad_y = (torch.randn(problem["hidden"].shape, device=keys.device, generator=gen).to(keys.dtype)
                          for _ in range(2))
        gate_logits, expert_ids = router_topk(hidden, router, experts_per_token)
        _, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_logits,
                                                       router.shape[0], topk, check_ids=False)
        grads = sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_logits, neuron_ids,
                                   activations, dense=False, check_ids=False, factored=True)
        parts.append((hidden, grad_y, expert_ids, neuron_ids, grads.pick_grads, activations))
    return [torch.cat(p) for p in zip(*parts)]


def measure_ceilings(dtype: torch.dtype, time_ms) -> dict[str, float]:
    """HBM bytes/s of a 1 GiB device copy and dense matmul FLOP/s in ``dtype``."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    mm_ms = time_ms(lambda: a @ b)
    return {"hbm_bytes_per_s": 2 * (1 << 30) / (copy_ms * 1e-3),
            "matmul_flops_per_s": 2 * n**3 / (mm_ms * 1e-3)}


def run(args) -> tuple[pd.DataFrame, dict]:
    import triton.testing

    def time_ms(fn):
        return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

    dtype = DTYPES[args.dtype]
    cfg = MEFTConfig(num_neurons=args.num_neurons, num_experts=args.num_experts,
                     experts_per_token=args.experts_per_token, topk=args.topk)
    T, d, E, P, K = args.tokens, args.hidden_size, cfg.num_experts, cfg.experts_per_token, cfg.topk
    problem = adapter_problem(T, d, cfg.num_neurons, E, dtype)
    hidden, router, keys, values, grad_y = (problem[k] for k in ("hidden", "router", "keys", "values", "grad_y"))
    triton_forward, triton_step, triton_factored_step = triton_passes(problem, P, K)

    expert_ids, _, _, neuron_ids, _ = triton_forward()
    unique_rows = int(neuron_ids.unique().numel())
    unique_experts = int(expert_ids.unique().numel())
    ceilings = measure_ceilings(dtype, time_ms)
    floor = adapter_floor(cfg, T, d, hidden.element_size(), unique_rows, unique_experts)

    def floor_ms(phase):
        return 1e3 * max(floor[f"{phase}_bytes"] / ceilings["hbm_bytes_per_s"],
                         floor[f"{phase}_flops"] / ceilings["matmul_flops_per_s"])

    def autograd_step(forward):
        leaves = [t.detach().requires_grad_() for t in (hidden, router, keys, values)]

        def step():
            for leaf in leaves:
                leaf.grad = None
            forward(*leaves).backward(grad_y)
        return step

    contenders = {
        "triton": (triton_forward, triton_step),
        "triton-factored": (triton_forward, triton_factored_step),
        "reference": (lambda: reference.meft_forward(hidden, router, keys, values, P, K),
                      autograd_step(lambda *x: reference.meft_forward(*x, P, K))),
        "meft-original": (lambda: reference.meft_original_forward(hidden, router, keys, values, P, K),
                          autograd_step(lambda *x: reference.meft_original_forward(*x, P, K))),
    }
    rows = []
    for name, (forward, step) in contenders.items():
        row = {"impl": name}
        for phase, fn in (("fwd", forward), ("step", step)):
            try:
                torch.cuda.reset_peak_memory_stats()
                row[f"{phase}_ms"] = time_ms(fn)
                row[f"{phase}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.cuda.OutOfMemoryError:
                row[f"{phase}_ms"] = float("nan")
                row[f"{phase}_peak_gib"] = float("nan")
                row["note"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
    table = pd.DataFrame(rows)
    for phase in ("fwd", "step"):
        table[f"{phase}_floor_ms"] = floor_ms(phase)
        table[f"{phase}_vs_floor"] = table[f"{phase}_ms"] / floor_ms(phase)
        table[f"{phase}_speedup_of_triton"] = table[f"{phase}_ms"] / table.loc[0, f"{phase}_ms"]
    shape = dict(T=T, d=d, N=cfg.num_neurons, E=E, P=P, K=K)
    static = static_prediction(torch.cuda.get_device_capability(), args.dtype, shape)
    flush = flush_factors(problem, P, K, args.flush_micro_batches)
    from meft_triton.kernels import key_value_rows

    flush_ms = time_ms(lambda: key_value_rows(*flush, cfg.num_neurons, E, out_dtype=dtype, check_ids=False))
    del flush
    torch.cuda.empty_cache()
    flush_static = static_prediction(torch.cuda.get_device_capability(), args.dtype,
                                     {**shape, "flush": args.flush_micro_batches})
    for phase in ("fwd", "step"):
        predicted = float("nan") if static is None else static[f"{phase}_ms"]
        table[f"{phase}_static_ms"] = [predicted] + [float("nan")] * (len(table) - 1)  # triton only
        table[f"{phase}_vs_static"] = table[f"{phase}_ms"] / table[f"{phase}_static_ms"]
    meta = {**describe_machine(), **ceilings, **floor, "unique_rows": unique_rows,
            "unique_experts": unique_experts, "shape": vars(args), "static_prediction": static,
            "flush_ms": flush_ms, "flush_static_ms": None if flush_static is None else flush_static["flush_ms"]}
    return table, meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--num-neurons", type=int, default=65536)
    parser.add_argument("--num-experts", type=int, default=1024)
    parser.add_argument("--experts-per-token", type=int, default=8)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--flush-micro-batches", type=int, default=8,
                        help="micro-batches of factors in the timed flush (default 8: scale-7b's step, "
                             "as the static report compiles it)")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--no-save", action="store_true", help="print only, write no results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU (none found); on CPU run `python -m profiling.sweep --quick`.")
        return 0
    table, meta = run(args)
    print(json.dumps({k: meta[k] for k in ("device", "driver", "torch", "triton")}))
    print(f"HBM {meta['hbm_bytes_per_s'] / 1e9:.0f} GB/s, matmul {meta['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s, "
          f"unique rows {meta['unique_rows']}, unique experts {meta['unique_experts']}")
    print(f"flush of {args.flush_micro_batches} micro-batches' factors (key_value_rows): {meta['flush_ms']:.3f} ms "
          f"(static prediction {meta['flush_static_ms']} ms)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if not args.no_save:
        folder = results_dir("kernels")
        table.to_csv(folder / "kernels.csv", index=False)
        (folder / "machine.json").write_text(json.dumps(meta, indent=2, default=str))
        print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
