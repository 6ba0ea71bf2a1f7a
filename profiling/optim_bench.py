"""CPU optimizer benchmark (docs/DESIGN.md, "Performance model", "CPU side").

    python -m profiling.optim_bench                      # budget shape: N=65536, d=1024, 5%
    python -m profiling.optim_bench --num-rows 8192 --hidden-size 256 --repeats 5 --json out.json

One run measures, interleaved round by round (so a noisy neighbour hits all alike):

* ours: ``SparseRowAdamW.step()`` over the touched neurons of a ``CPURowStore`` (compiled
  row loop, and the pure-torch fallback for reference);
* torch's fused dense AdamW (``torch.optim.AdamW(fused=True)``; foreach where fused fails)
  over the whole matrix;
* ``torch.optim.SparseAdam`` on the same rows;
* memcpy bandwidth: ``Tensor.copy_`` of a large buffer (read + written bytes per second).

How rows are counted: a touched neuron has a key row and a value row, each of ``d`` fp32, and
both are updated, so ``rows = 2 x touched neurons``. Every contender works on the same numbers:
the dense baselines hold keys and values as one ``[N, 2d]`` parameter (= ``2N`` rows of ``d``),
SparseAdam gets the touched ``2d``-wide rows of it. The byte floor is
``7 x rows x d x 4`` bytes (read p, g, m, v; write p, m, v) at the measured memcpy bandwidth.

The ratios use the best time of each contender (the least disturbed run); medians are printed
too. The gradients are accumulated (untimed) before every timed step, and a 64 MiB buffer is
read before every timed operation so no contender starts with its data in cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from meft_triton.offload import cpu_rowops
from meft_triton import SparseRowAdamW
from meft_triton.offload import CPURowStore

BUDGET_VS_DENSE = 10.0  # ours at least 10x faster than fused dense AdamW
BUDGET_VS_SPARSE_ADAM = 10.0  # ours at least 10x faster than torch.optim.SparseAdam
BUDGET_VS_FLOOR = 2.0  # ours within 2x of the byte floor


@dataclass
class Contender:
    name: str
    op: Callable[[], object]
    setup: Callable[[], object] = lambda: None
    bytes_moved: int | None = None  # for memcpy: bytes read + written by one op
    times: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Problem:
    num_rows: int
    hidden_size: int
    touched_neurons: int

    @property
    def rows(self) -> int:
        """Rows of d fp32 updated per step: a key row and a value row per touched neuron."""
        return 2 * self.touched_neurons

    @property
    def floor_bytes(self) -> int:
        return 7 * self.rows * self.hidden_size * 4


def make_problem(num_rows: int, hidden_size: int, touched: float) -> Problem:
    u = max(1, round(touched * num_rows))
    return Problem(num_rows, hidden_size, min(u, num_rows))


def _sparse_grads(p: Problem, gen: torch.Generator):
    ids = torch.randperm(p.num_rows, generator=gen)[: p.touched_neurons]
    gk = torch.randn(p.touched_neurons, p.hidden_size, generator=gen)
    gv = torch.randn(p.touched_neurons, p.hidden_size, generator=gen)
    return ids, gk, gv


def ours(p: Problem, gen: torch.Generator, backend: str = "auto") -> Contender:
    """SparseRowAdamW.step() on the touched neurons; accumulate() is the (untimed) setup."""
    store = CPURowStore(p.num_rows, p.hidden_size, pin_memory="auto")
    store.records.normal_(0.0, 0.02, generator=gen)
    opt = SparseRowAdamW(store, lr=1e-3, backend=backend)
    ids, gk, gv = _sparse_grads(p, gen)
    label = cpu_rowops.backend_name() if backend == "auto" else backend
    return Contender(f"ours: SparseRowAdamW.step [{label}]", op=opt.step,
                     setup=lambda: opt.accumulate(ids, gk, gv))


def ours_bf16_records(p: Problem, gen: torch.Generator) -> Contender:
    """The step on bf16 gradient records kept as they came home (``accumulate_records``, what
    residency "resident" does): the update reads 2 B per gradient element instead of 4
    (informational: its byte floor is 26/28 of the fp32 one)."""
    store = CPURowStore(p.num_rows, p.hidden_size, pin_memory="auto")
    store.records.normal_(0.0, 0.02, generator=gen)
    opt = SparseRowAdamW(store, lr=1e-3)
    ids, gk, gv = _sparse_grads(p, gen)
    records = torch.cat([gk, gv], dim=1).to(torch.bfloat16)
    return Contender("ours: step on bf16 records as sent", op=opt.step,
                     setup=lambda: opt.accumulate_records(ids, records))


def ours_accumulate(p: Problem, gen: torch.Generator) -> Contender:
    """One micro-batch's accumulate() of all-new ids (informational: not in the step budget)."""
    opt = SparseRowAdamW(CPURowStore(p.num_rows, p.hidden_size, pin_memory=False))
    ids, gk, gv = _sparse_grads(p, gen)
    return Contender("ours: accumulate (1 micro-batch)", op=lambda: opt.accumulate(ids, gk, gv),
                     setup=opt.zero_grad)


def dense_adamw(p: Problem, gen: torch.Generator) -> Contender:
    param = torch.nn.Parameter(torch.empty(p.num_rows, 2 * p.hidden_size).normal_(0.0, 0.02, generator=gen))
    param.grad = torch.randn(p.num_rows, 2 * p.hidden_size, generator=gen)
    label = "fused"
    try:
        opt = torch.optim.AdamW([param], lr=1e-3, fused=True)
        opt.step()
    except (RuntimeError, ValueError):
        label = "foreach"
        opt = torch.optim.AdamW([param], lr=1e-3, foreach=True)
        opt.step()
    return Contender(f"torch AdamW({label}=True), dense [N, 2d]", op=opt.step)


def sparse_adam(p: Problem, gen: torch.Generator) -> Contender:
    param = torch.nn.Parameter(torch.empty(p.num_rows, 2 * p.hidden_size).normal_(0.0, 0.02, generator=gen))
    ids, gk, gv = _sparse_grads(p, gen)
    grad = torch.sparse_coo_tensor(ids[None], torch.cat([gk, gv], 1), (p.num_rows, 2 * p.hidden_size),
                                   check_invariants=False)
    opt = torch.optim.SparseAdam([param], lr=1e-3)

    def setup():
        param.grad = grad

    return Contender("torch SparseAdam, same rows", op=opt.step, setup=setup)


def memcpy(nbytes: int) -> Contender:
    src = torch.ones(nbytes // 4)
    dst = torch.zeros(nbytes // 4)
    return Contender(f"memcpy ({nbytes >> 20} MiB, Tensor.copy_)", op=lambda: dst.copy_(src),
                     bytes_moved=2 * src.numel() * 4)


def measure(contenders: list[Contender], repeats: int, warmup: int = 1, flush_mib: int = 64) -> None:
    """Interleaved rounds: every contender once per round, cache flushed before each op."""
    flush = torch.ones(max(1, flush_mib << 18))
    for r in range(warmup + repeats):
        for c in contenders:
            c.setup()
            flush.sum()  # read, not written: evicts the cache without leaving dirty lines behind
            t0 = time.perf_counter()
            c.op()
            t1 = time.perf_counter()
            if r >= warmup:
                c.times.append(t1 - t0)


def run(num_rows: int = 65536, hidden_size: int = 1024, touched: float = 0.05, repeats: int = 7,
        threads: int | None = None, memcpy_mib: int = 256, include_torch_fallback: bool = True,
        seed: int = 0) -> dict:
    if threads is not None:
        torch.set_num_threads(threads)
    p = make_problem(num_rows, hidden_size, touched)
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SparseAdam's sparse-invariant notice
        mc = memcpy(memcpy_mib << 20)
        main = ours(p, gen)
        contenders = [mc, main]
        if include_torch_fallback:
            contenders.append(ours(p, gen, backend="torch"))
        contenders.append(ours_bf16_records(p, gen))
        contenders += [dense_adamw(p, gen), sparse_adam(p, gen), ours_accumulate(p, gen)]
        gc.collect()
        measure(contenders, repeats)
    by = {c.name: c for c in contenders}
    dense = contenders[-3]
    sparse = contenders[-2]
    bw_best = mc.bytes_moved / mc.best
    bw_median = mc.bytes_moved / mc.median
    floor_best = p.floor_bytes / bw_best
    floor_median = p.floor_bytes / bw_median
    ratios = {
        "dense_fused_adamw_over_ours": (dense.best / main.best, dense.median / main.median, BUDGET_VS_DENSE, ">="),
        "sparse_adam_over_ours": (sparse.best / main.best, sparse.median / main.median, BUDGET_VS_SPARSE_ADAM, ">="),
        "ours_over_floor": (main.best / floor_best, main.median / floor_median, BUDGET_VS_FLOOR, "<="),
    }
    return {
        "problem": {"num_rows": p.num_rows, "hidden_size": p.hidden_size, "touched_neurons": p.touched_neurons,
                    "touched_fraction": p.touched_neurons / p.num_rows, "rows": p.rows,
                    "floor_bytes": p.floor_bytes},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "processor": _cpu_name(), "threads": torch.get_num_threads(), "backend": cpu_rowops.backend_name(),
                "repeats": repeats},
        "memcpy_bandwidth_GBps": {"best": bw_best / 1e9, "median": bw_median / 1e9},
        "floor_ms": {"best": floor_best * 1e3, "median": floor_median * 1e3},
        "times_ms": {n: {"best": c.best * 1e3, "median": c.median * 1e3} for n, c in by.items() if c is not mc},
        "ours": main.name, "dense": dense.name, "sparse_adam": sparse.name,
        "ratios": {k: {"best": v[0], "median": v[1], "target": v[2], "op": v[3],
                       "ok": (v[0] >= v[2]) if v[3] == ">=" else (v[0] <= v[2])} for k, v in ratios.items()},
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(res: dict) -> str:
    pr, env = res["problem"], res["env"]
    lines = [
        f"CPU optimizer step  N={pr['num_rows']} neurons  d={pr['hidden_size']}  touched={pr['touched_neurons']} "
        f"neurons ({100 * pr['touched_fraction']:.1f}%) = {pr['rows']} rows of d (key + value row per neuron)",
        f"torch {env['torch']}  python {env['python']}  {env['processor']}  threads={env['threads']}  "
        f"row loop={env['backend']}  repeats={env['repeats']} (interleaved)",
        f"memcpy bandwidth (read+write bytes / s): best {res['memcpy_bandwidth_GBps']['best']:.1f} GB/s, "
        f"median {res['memcpy_bandwidth_GBps']['median']:.1f} GB/s",
        "",
        f"{'what':<46}{'best ms':>10}{'median ms':>11}",
    ]
    for name, t in res["times_ms"].items():
        lines.append(f"{name:<46}{t['best']:>10.2f}{t['median']:>11.2f}")
    fl = res["floor_ms"]
    lines.append(f"{'byte floor 7*rows*d*4 B at memcpy bandwidth':<46}{fl['best']:>10.2f}{fl['median']:>11.2f}")
    lines += ["", f"{'budget':<46}{'best':>10}{'median':>11}{'target':>10}  ok"]
    names = {"dense_fused_adamw_over_ours": "fused dense AdamW time / ours",
             "sparse_adam_over_ours": "SparseAdam time / ours",
             "ours_over_floor": "ours / byte floor"}
    for k, r in res["ratios"].items():
        lines.append(f"{names[k]:<46}{r['best']:>9.2f}x{r['median']:>10.2f}x{r['op']:>5}{r['target']:>4.0f}x  "
                     f"{'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiling.optim_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-rows", type=int, default=65536, help="neurons N (default 65536)")
    ap.add_argument("--hidden-size", type=int, default=1024, help="d: width of a key row and of a value row")
    ap.add_argument("--touched", type=float, default=0.05, help="fraction of neurons touched per step")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None, help="torch / row-loop threads (default: torch's)")
    ap.add_argument("--memcpy-mib", type=int, default=256, help="buffer size of the memcpy measurement")
    ap.add_argument("--no-torch-fallback", action="store_true", help="skip timing the pure-torch row update")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if not 0 < args.touched <= 1:
        ap.error("--touched must be in (0, 1]")
    res = run(args.num_rows, args.hidden_size, args.touched, args.repeats, args.threads, args.memcpy_mib,
              include_torch_fallback=not args.no_torch_fallback)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
