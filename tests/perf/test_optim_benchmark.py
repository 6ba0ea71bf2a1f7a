"""Benchmarks of the CPU optimizer step (the optimizer budget, at a CI-sized shape).

    pytest tests/perf/test_optim_benchmark.py --benchmark-enable      # timings, pytest-benchmark table
    python -m profiling.optim_bench                                   # the budget shape and ratios

With the repository default ``--benchmark-disable`` every benchmarked function runs once, so
these double as smoke tests. No test here asserts a time: the budget is read from the script's
table (``python -m profiling.optim_bench``), never enforced in CI.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from profiling import optim_bench as ob

# CI-sized: small enough to run in well under a second each; the script defaults to the
# budget shape (N=65536, d=1024, 5%).
N, D, TOUCHED = 8192, 256, 0.05


def _contender(kind: str) -> ob.Contender:
    p = ob.make_problem(N, D, TOUCHED)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "ours":
            return ob.ours(p, gen)
        if kind == "ours_torch_fallback":
            return ob.ours(p, gen, backend="torch")
        if kind == "ours_clip_weight_decay":  # global-norm clipping folded in, decoupled decay
            c = ob.ours(p, gen)
            opt = c.op.__self__
            opt.weight_decay, opt.max_grad_norm = 0.01, 1.0
            c.name += " (max_grad_norm=1, weight_decay=0.01)"
            return c
        if kind == "ours_step_async":  # the worker-thread step the offload path uses, waited for
            c = ob.ours(p, gen)
            opt = c.op.__self__
            return ob.Contender(c.name.replace(".step", ".step_async().result()"),
                                op=lambda: opt.step_async().result(), setup=c.setup)
        if kind == "dense_fused_adamw":
            return ob.dense_adamw(p, gen)
        if kind == "torch_sparse_adam":
            return ob.sparse_adam(p, gen)
        if kind == "accumulate":
            return ob.ours_accumulate(p, gen)
        if kind == "memcpy":
            return ob.memcpy(7 * p.rows * p.hidden_size * 4 // 2)  # the floor's bytes, read + written
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["ours", "ours_torch_fallback", "ours_clip_weight_decay", "ours_step_async", "dense_fused_adamw",
             "torch_sparse_adam", "accumulate", "memcpy"]
)
def test_optimizer_step_benchmark(benchmark, kind):
    c = _contender(kind)
    benchmark.group = f"cpu optimizer step N={N} d={D} touched={TOUCHED:.0%}"
    benchmark.extra_info.update(num_rows=N, hidden_size=D, touched=TOUCHED, what=c.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c.setup()
        c.op()  # warm-up (SparseAdam / fused AdamW allocate their state on the first step)
        benchmark.pedantic(c.op, setup=c.setup, rounds=10, iterations=1, warmup_rounds=1)


def test_script_table_renders():
    """The script's entry point runs end to end and reports every budget line."""
    res = ob.run(num_rows=512, hidden_size=32, touched=0.1, repeats=1, memcpy_mib=4)
    table = ob.format_table(res)
    for needle in ("ours: SparseRowAdamW.step", "SparseAdam", "AdamW(", "byte floor", "ours / byte floor"):
        assert needle in table
    assert res["problem"]["rows"] == 2 * res["problem"]["touched_neurons"]
    assert res["problem"]["floor_bytes"] == 7 * res["problem"]["rows"] * 32 * 4
    assert all(r["best"] > 0 for r in res["ratios"].values())
