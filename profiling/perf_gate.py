"""Performance regression gate: ratios measured inside one run vs committed thresholds.

    python -m profiling.perf_gate                 # CI (after the unit tests); exit 0 pass, 1 fail
    python -m profiling.perf_gate --quick         # smaller shapes (the gate's own test uses it)
    python -m profiling.perf_gate --runs 8 --json spread.json   # spread of 8 runs, to refresh thresholds
    python -m profiling.perf_gate --benchmarks compare [--marker gpu]   # pytest-benchmark vs this device's baseline
    python -m profiling.perf_gate --benchmarks save [--marker gpu]      # refresh this device's baseline

Why ratios: a shared CI machine is sometimes faster and sometimes slower, but it is so for
both sides of a ratio measured in the same process, round by round. Every check here is

    ratio = time of our hot path / time of a yardstick doing comparable work on the same machine

so a slowdown of our code raises the ratio, and each check fails when its ratio is above the
committed ``threshold`` of ``profiling/baselines/perf_gate.json`` (which also holds the
docs/DESIGN.md, "Performance model" ``target`` where one exists, the ``typical`` value measured when the
thresholds were set, and how they were chosen). The checks:

* ``optim_vs_dense_adamw``: ``SparseRowAdamW.step()`` on 5% of the rows vs torch's fused dense
  AdamW (foreach where fused is missing) over the whole ``[N, 2d]`` matrix;
* ``optim_vs_byte_floor``: the same step vs its byte floor (7 x rows x d x 4 B at the plain
  memcpy bandwidth measured in the same rounds);
* ``store_gather_vs_memcpy``: ``CPURowStore.gather`` of value rows (sorted ids) into a staging
  buffer vs a plain memcpy (``Tensor.copy_``) of the same bytes;
* ``cpu_gather_vs_memcpy``: ``gather.cpu_gather`` (the prefetcher's CPU engine) likewise;
* with CUDA also ``triton_router_vs_reference``, ``triton_forward_vs_reference``,
  ``triton_step_vs_reference`` (Triton kernels vs ``meft_triton.reference`` on the GPU, forward
  and forward+backward), ``h2d_gather_vs_pinned_memcpy`` and ``zero_copy_vs_pinned_memcpy``
  (active value rows to the device through the prefetcher's two engines vs a pinned memcpy of
  the same bytes).

Noise: the contenders run interleaved, round by round (each op once per round, a 64 MiB buffer
written before every CPU op so none starts with its data in cache). A check's ratio is the
smaller of two estimates: the ratio of the best times (the least disturbed runs) and the median
over the rounds of the per-round ratio; a slower hot path raises both, a disturbance seldom
does. CPU work runs on one thread by default
(``--threads``): with the other core of a 2-core machine busy, a 2-thread op waits for its
stalled half, one thread keeps its own core. A check over its threshold is measured once more
(fresh rounds) and fails only if it is over again: a real slowdown fails both times.

``MEFT_PERF_SLOWDOWN`` (``1``/``all``, or a comma list of ``optim``, ``gather``) makes a
deliberately slowed build: ``SparseRowAdamW.step`` makes needless extra passes over its touched
rows (``meft_triton/optim.py``; the step takes about 4x as long) and, for ``gather``, this gate
wraps the host row copy behind ``CPURowStore.gather`` and ``gather.cpu_gather`` so that it
copies every row three times (about 2.5-3x). ``tests/perf/test_gate.py`` proves with it that
the gate fails; results never change. (The thresholds are set so that 2x already fails, see
``profiling/baselines/perf_gate.json``; the switch is stronger so that its test never flakes.)

Absolute times (``--benchmarks``): pytest-benchmark runs ``tests/perf`` and compares with
``profiling/baselines/<device>/benchmarks[-<marker>].json``, only on the device it was saved on
(another device: skipped, exit 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from meft_triton.offload import CudaCopyEngine, gather
from meft_triton.offload import cpu_rowops
from meft_triton.optimizers.sparse_adamw import perf_slowdown
from meft_triton.offload import CPURowStore
from . import optim_bench as ob
from .environment import describe_machine, device_name

ROOT = Path(__file__).resolve().parent.parent
BASELINES = Path(__file__).resolve().parent / "baselines"
THRESHOLDS = BASELINES / "perf_gate.json"

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Profile:
    """Shapes and rounds of one gate run."""

    name: str
    num_rows: int  # N neurons of the optimizer's store
    hidden_size: int  # d
    touched: float  # fraction of neurons the optimizer step touches
    gather_store: tuple[int, int] | None  # (N, d) of the gather's own store; None: the optimizer's
    gather_rows: int  # value rows gathered per gather op
    memcpy_mib: int  # buffer of the memcpy-bandwidth measurement (byte floor)
    rounds: int  # interleaved timed rounds (after one warm-up round)
    # CUDA: (T, d, N, E, P, K_top) of the kernel checks, rows of the H2D checks
    cuda_shape: tuple[int, int, int, int, int, int] = (1024, 1024, 16384, 256, 8, 64)
    cuda_h2d: tuple[int, int, int] = (16384, 4096, 4096)  # host rows N, d, active rows


PROFILES = {
    # the optimizer budget shape (N = 65536, d = 1024, 5% touched)
    "full": Profile("full", 65536, 1024, 0.05, None, 8192, 256, 15),
    "quick": Profile("quick", 16384, 256, 0.05, (16384, 1024), 8192, 64, 15),
}


@dataclass
class Check:
    name: str
    best_ratio: float  # our best time / the yardstick's best time
    round_median: float  # median over the rounds of (our time / the yardstick's time in that round)
    detail: str  # what was compared, with the absolute times
    threshold: float | None = None
    target: float | None = None
    typical: float | None = None
    provisional: bool = False  # threshold not yet measured on such a machine: a miss only warns
    error: str | None = None
    confirmed: list[float] = field(default_factory=list)  # re-measured ratios of a miss

    @property
    def ratio(self) -> float:
        """The gated ratio (lower is better): the smaller of the two estimates. A slower hot path
        raises both; a disturbance rarely raises both (an outlier-fast yardstick round inflates
        the best ratio, a stretch of slow rounds the median)."""
        return min(self.best_ratio, self.round_median)

    @property
    def over(self) -> bool:
        return self.error is not None or self.threshold is None or not (self.ratio <= self.threshold)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "ERROR" + (" (provisional)" if self.provisional else "")
        if self.threshold is None:
            return "NO THRESHOLD"
        if not self.over:
            return "pass" if not self.confirmed else "pass (on re-measure)"
        return "WARN (provisional)" if self.provisional else "FAIL"

    @property
    def failed(self) -> bool:
        return self.over and not self.provisional


# --------------------------------------------------------------------------------------------
# The slowed build's gather (the optimizer's part lives in meft_triton/optim.py)
# --------------------------------------------------------------------------------------------


@contextmanager
def slowed_gather() -> Iterator[bool]:
    """With ``MEFT_PERF_SLOWDOWN`` naming ``gather``: every host row copy
    (``gather.cpu_gather``, behind ``CPURowStore.gather`` too) is done three times (same result)."""
    if not perf_slowdown("gather"):
        yield False
        return
    real_chunk = gather.gather_chunk

    def gather_chunk_thrice(*args, **kwargs):
        real_chunk(*args, **kwargs)
        real_chunk(*args, **kwargs)
        return real_chunk(*args, **kwargs)

    gather.gather_chunk = gather_chunk_thrice
    try:
        yield True
    finally:
        gather.gather_chunk = real_chunk


# --------------------------------------------------------------------------------------------
# CPU checks: optimizer step and host gather, interleaved in one set of rounds
# --------------------------------------------------------------------------------------------


def _ms(c: ob.Contender) -> str:
    return f"{c.best * 1e3:.3f} ms"


def measure_cpu(profile: Profile, seed: int = 0, only: set[str] | None = None) -> list[Check]:
    """The CPU checks (or those named in ``only``), measured in one set of interleaved rounds."""
    want = (lambda name: only is None or name in only)
    gen = torch.Generator().manual_seed(seed)
    p = ob.make_problem(profile.num_rows, profile.hidden_size, profile.touched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ob.ours(p, gen)  # SparseRowAdamW.step, gradients accumulated before each round
        store = ours.op.__self__.store
        contenders: dict[str, ob.Contender] = {"ours": ours}
        if want("optim_vs_dense_adamw"):
            contenders["dense"] = ob.dense_adamw(p, gen)
        if want("optim_vs_byte_floor"):
            contenders["bandwidth"] = ob.memcpy(profile.memcpy_mib << 20)
        gathers = [n for n in ("store_gather_vs_memcpy", "cpu_gather_vs_memcpy") if want(n)]
        if gathers and profile.gather_store is not None:
            store = CPURowStore(*profile.gather_store, pin_memory="auto")
            store.records.normal_(0.0, 0.02, generator=gen)
        if gathers:
            u = min(profile.gather_rows, store.num_rows)
            ids = torch.sort(torch.randperm(store.num_rows, generator=gen)[:u]).values
            nbytes = u * store.hidden_size * 4
            if "store_gather_vs_memcpy" in gathers:
                out = store.staging_buffer(u, "values")
                contenders["store_gather"] = ob.Contender(
                    "CPURowStore.gather", op=lambda: store.gather(ids, out=out))
            if "cpu_gather_vs_memcpy" in gathers:
                host_values = store.values()
                staging = store.staging_buffer(u, "values")
                contenders["cpu_gather"] = ob.Contender(
                    "gather.cpu_gather", op=lambda: gather.cpu_gather(host_values, ids, staging))
            contenders["memcpy"] = ob.memcpy(nbytes)
        gc.collect()
        ob.measure(list(contenders.values()), profile.rounds)
    c = contenders

    def pair(name: str, a: ob.Contender, b: ob.Contender, detail: str, scale: float = 1.0) -> Check:
        return Check(name, a.best / b.best * scale,
                     statistics.median(x / y for x, y in zip(a.times, b.times)) * scale, detail)

    checks = []
    if "dense" in c:
        checks.append(pair("optim_vs_dense_adamw", ours, c["dense"],
                           f"SparseRowAdamW.step {_ms(ours)} / {c['dense'].name} {_ms(c['dense'])}"))
    if "bandwidth" in c:
        bw = c["bandwidth"].bytes_moved / c["bandwidth"].best
        floor = p.floor_bytes / bw
        # floor time = floor bytes / (memcpy bytes / memcpy time): a fixed multiple of the memcpy time
        checks.append(pair("optim_vs_byte_floor", ours, c["bandwidth"],
                           f"SparseRowAdamW.step {_ms(ours)} / floor {floor * 1e3:.3f} ms "
                           f"(7 x {p.rows} rows x d={p.hidden_size} x 4 B at memcpy {bw / 1e9:.1f} GB/s)",
                           scale=c["bandwidth"].bytes_moved / p.floor_bytes))
    for key, name in (("store_gather", "store_gather_vs_memcpy"), ("cpu_gather", "cpu_gather_vs_memcpy")):
        if key in c:
            checks.append(pair(name, c[key], c["memcpy"],
                               f"{c[key].name} of {len(ids)} value rows {_ms(c[key])} / memcpy of the same "
                               f"{nbytes / 2**20:.1f} MiB {_ms(c['memcpy'])}"))
    return checks


# --------------------------------------------------------------------------------------------
# CUDA checks: Triton kernels vs the reference, active-row H2D vs pinned memcpy
# --------------------------------------------------------------------------------------------

CUDA_CHECKS = ("triton_router_vs_reference", "triton_forward_vs_reference", "triton_step_vs_reference",
               "h2d_gather_vs_pinned_memcpy", "zero_copy_vs_pinned_memcpy")
CPU_CHECKS = ("optim_vs_dense_adamw", "optim_vs_byte_floor", "store_gather_vs_memcpy", "cpu_gather_vs_memcpy")


def time_cuda_interleaved(ops: dict[str, Callable[[], object]], rounds: int,
                          min_sample_s: float = 2e-3) -> dict[str, list[float]]:
    """Seconds per call of each op in every round: interleaved rounds, each sample a loop of
    calls long enough (>= ``min_sample_s``) that launch and synchronize overheads do not matter."""
    reps = {}
    for name, fn in ops.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        reps[name] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, fn in ops.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / reps[name])
    return times


def _pair(name: str, ours: list[float], yardstick: list[float], detail: str) -> Check:
    return Check(name, min(ours) / min(yardstick), statistics.median(a / b for a, b in zip(ours, yardstick)), detail)


def _kernel_checks(profile: Profile, only) -> list[Check]:
    from meft_triton.kernels import router_topk
    from meft_triton import reference
    from .kernel_bench import adapter_problem, triton_passes

    T, d, N, E, P, K = profile.cuda_shape
    problem = adapter_problem(T, d, N, E, torch.bfloat16)
    hidden, router, keys, values, grad_y = (problem[k] for k in ("hidden", "router", "keys", "values", "grad_y"))
    tri_forward, tri_step = triton_passes(problem, P, K)

    leaves = [t.detach().requires_grad_() for t in (hidden, router, keys, values)]

    def ref_step():
        for leaf in leaves:
            leaf.grad = None
        reference.meft_forward(*leaves, P, K).backward(grad_y)

    ops = {
        "tri_router": lambda: router_topk(hidden, router, P),
        "ref_router": lambda: reference.route(hidden, router, P),
        "tri_forward": tri_forward,
        "ref_forward": lambda: reference.meft_forward(hidden, router, keys, values, P, K),
        "tri_step": tri_step,
        "ref_step": ref_step,
    }
    times = time_cuda_interleaved(ops, profile.rounds)
    shape = f"T={T} d={d} N={N} E={E} P={P} K={K} bf16"
    out = []
    for what in ("router", "forward", "step"):
        name = f"triton_{what}_vs_reference"
        if only is None or name in only:
            tri, ref = times[f"tri_{what}"], times[f"ref_{what}"]
            out.append(_pair(name, tri, ref, f"Triton {min(tri) * 1e3:.3f} ms / reference {min(ref) * 1e3:.3f} ms "
                                             f"({shape})"))
    return out


def _h2d_checks(profile: Profile, only) -> list[Check]:
    N, d, U = profile.cuda_h2d
    dt = torch.bfloat16
    records = torch.empty(N, 2, d, pin_memory=True).normal_(0.0, 0.02)
    host_values = records[:, 1]
    ids = torch.sort(torch.randperm(N)[:U]).values
    src = torch.empty(U, d, dtype=dt, pin_memory=True).normal_()
    dst = torch.empty(U, d, dtype=dt, device="cuda")
    ops: dict[str, Callable[[], object]] = {"pinned": lambda: dst.copy_(src, non_blocking=True)}
    engines = {}
    for strategy, name in (("cpu_gather", "h2d_gather_vs_pinned_memcpy"),
                           ("zero_copy", "zero_copy_vs_pinned_memcpy")):
        if only is not None and name not in only:
            continue
        engine = CudaCopyEngine(strategy=strategy)
        slot = engine.new_slot(0, U, d, dt)
        engines[name] = engine

        def op(engine=engine, slot=slot):
            engine.consume(engine.copy_in(slot, host_values, ids))

        ops[name] = op
    try:
        times = time_cuda_interleaved(ops, profile.rounds)
    finally:
        for engine in engines.values():
            engine.close()
    mib = U * d * dt.itemsize / 2**20
    return [_pair(name, times[name], times["pinned"],
                  f"{name.split('_vs_')[0]} {min(times[name]) * 1e3:.3f} ms / pinned memcpy of the same {mib:.0f} MiB "
                  f"{min(times['pinned']) * 1e3:.3f} ms ({U} of {N} rows, d={d}, bf16)") for name in engines]


def measure_cuda(profile: Profile, only: set[str] | None = None) -> list[Check]:
    out: list[Check] = []
    for part, names in ((_kernel_checks, CUDA_CHECKS[:3]), (_h2d_checks, CUDA_CHECKS[3:])):
        names = [n for n in names if only is None or n in only]
        if not names:
            continue
        try:
            out += part(profile, set(names))
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
            out += [Check(n, math.nan, math.nan, "", error=f"{type(exc).__name__}: {exc}") for n in names]
        finally:
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# Thresholds, evaluation, table
# --------------------------------------------------------------------------------------------


def load_thresholds(path: Path = THRESHOLDS) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def apply_thresholds(checks: list[Check], thresholds: dict[str, Any], profile: str) -> None:
    table = thresholds["profiles"].get(profile, {})
    for c in checks:
        entry = table.get(c.name)
        if entry is None:
            continue
        c.threshold, c.target, c.typical = entry.get("threshold"), entry.get("target"), entry.get("typical")
        c.provisional = bool(entry.get("provisional", False))


def measure(profile: Profile, only: set[str] | None = None, seed: int = 0) -> list[Check]:
    names = set(CPU_CHECKS) | (set(CUDA_CHECKS) if torch.cuda.is_available() else set())
    if only is not None:
        names &= only
    checks: list[Check] = []
    with slowed_gather():
        if names & set(CPU_CHECKS):
            checks += measure_cpu(profile, seed, names & set(CPU_CHECKS))
    if names & set(CUDA_CHECKS):
        checks += measure_cuda(profile, names & set(CUDA_CHECKS))
    return checks


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}"


def format_table(checks: list[Check], header: str) -> str:
    lines = [header, "ratio = our time / yardstick time on this machine (lower is better): the smaller of the ratio "
             "of best times and the median per-round ratio over the interleaved rounds; fail when above the "
             "threshold (twice: a miss is measured again)", ""]
    w = max([len(c.name) for c in checks] + [5])
    lines.append(f"{'check':<{w}}  {'ratio':>8}  {'threshold':>10}  {'typical':>8}  {'target':>8}  result")
    for c in checks:
        ratio = _fmt(c.ratio)
        if c.confirmed:
            ratio += f" -> {', '.join(_fmt(r) for r in c.confirmed)}"
        lines.append(f"{c.name:<{w}}  {ratio:>8}  {'<= ' + _fmt(c.threshold):>10}  {_fmt(c.typical):>8}  "
                     f"{('<= ' + _fmt(c.target)) if c.target is not None else '-':>8}  {c.status}")
    lines.append("")
    for c in checks:
        extra = f"; ratio of best times {c.best_ratio:.3g}, median of per-round ratios {c.round_median:.3g}"
        lines.append(f"  {c.name}: {c.error or c.detail + extra}")
    return "\n".join(lines)


def verdict(checks: list[Check]) -> tuple[int, str]:
    failed = [c.name for c in checks if c.failed]
    warned = [c.name for c in checks if c.over and c.provisional]
    if failed:
        return EXIT_FAIL, f"FAIL: {', '.join(failed)}" + (f" (warnings: {', '.join(warned)})" if warned else "")
    note = f" (provisional thresholds missed, not failing: {', '.join(warned)})" if warned else ""
    return EXIT_PASS, f"PASS: {len(checks)} checks{note}"


def run_gate(profile: Profile, thresholds: dict[str, Any], confirm: bool = True,
             only: set[str] | None = None) -> list[Check]:
    checks = measure(profile, only)
    apply_thresholds(checks, thresholds, profile.name)
    if confirm:
        misses = {c.name for c in checks if c.over and c.error is None and c.threshold is not None}
        if misses:
            again = {c.name: c for c in measure(profile, misses, seed=1)}
            for c in checks:
                if c.name in again:
                    c.confirmed.append(again[c.name].ratio)
                    if again[c.name].ratio <= c.threshold:  # noise the first time: passes on re-measure
                        c.best_ratio, c.round_median = again[c.name].best_ratio, again[c.name].round_median
    return checks


# --------------------------------------------------------------------------------------------
# Absolute times: pytest-benchmark against a per-device baseline
# --------------------------------------------------------------------------------------------


def rel(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def benchmark_baseline(marker: str | None = None, device: str | None = None) -> Path:
    """``profiling/baselines/<device>/benchmarks[-<marker>].json``."""
    suffix = f"-{marker}" if marker else ""
    return BASELINES / (device or device_name()) / f"benchmarks{suffix}.json"


def benchmark_command(mode: str, json_out: Path, marker: str | None = None, fail_pct: float = 30.0,
                      baseline: Path | None = None, paths: tuple[str, ...] = ("tests/perf",)) -> list[str] | None:
    """The pytest command of ``--benchmarks compare|save`` over ``paths`` (None: compare, but
    this device has no baseline, so there is nothing to compare with)."""
    baseline = baseline or benchmark_baseline(marker)
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)  # pytest-benchmark opens it at start-up
    cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", "--benchmark-enable",
           "--benchmark-only",  # the benchmarks, not the tests of the gate beside them
           "--benchmark-sort=name", f"--benchmark-json={json_out}"]
    if marker:
        cmd += ["-m", marker]
    if mode == "compare":
        if not baseline.is_file():
            return None
        cmd += [f"--benchmark-compare={baseline}", f"--benchmark-compare-fail=median:{fail_pct:g}%"]
    return cmd


def run_benchmarks(mode: str, marker: str | None, fail_pct: float, json_out: Path | None = None,
                   timeout: float | None = None) -> int:
    baseline = benchmark_baseline(marker)
    if json_out is None:
        json_out = baseline if mode == "save" else Path("/tmp") / f"meft-benchmarks-{time.time_ns()}.json"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    cmd = benchmark_command(mode, json_out, marker, fail_pct, baseline)
    if cmd is None:
        print(f"no benchmark baseline for this device ({device_name()}): {rel(baseline)} is missing; "
              f"absolute times not compared (create one with --benchmarks save)")
        return EXIT_PASS
    print(" ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    if mode == "save" and rc == 0:
        print(f"saved the baseline of {device_name()} to {json_out}; commit it")
    return rc


# --------------------------------------------------------------------------------------------
# Spread of several runs (to choose thresholds on purpose)
# --------------------------------------------------------------------------------------------


def spread(profile: Profile, runs: int) -> dict[str, dict[str, float]]:
    values: dict[str, list[float]] = {}
    for r in range(runs):
        for c in measure(profile, seed=r):
            values.setdefault(c.name, []).append(c.ratio)
            values.setdefault(c.name + " (best)", []).append(c.best_ratio)
            values.setdefault(c.name + " (round median)", []).append(c.round_median)
        print(f"run {r + 1}/{runs}: " + "  ".join(f"{k}={v[-1]:.3g}" for k, v in values.items() if "(" not in k),
              flush=True)
    return {k: {"min": min(v), "median": statistics.median(v), "max": max(v), "runs": v} for k, v in values.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiling.perf_gate", description=__doc__.split("\n\n")[0],
                                 epilog="exit codes: 0 pass, 1 a check failed, 2 usage error")
    ap.add_argument("--quick", action="store_true", help="small shapes (about 10 s; the gate's own test)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default: the profile's)")
    ap.add_argument("--threads", type=int, default=1, help="torch / row-loop CPU threads (default 1)")
    ap.add_argument("--thresholds", type=Path, default=THRESHOLDS, help="thresholds JSON (default: %(default)s)")
    ap.add_argument("--only", default=None, help="comma list of checks to run (default: all that apply here)")
    ap.add_argument("--no-confirm", action="store_true", help="fail at the first miss, no re-measure")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument("--runs", type=int, default=None, help="measure N times and print the spread of every ratio "
                    "(no pass/fail): the data for refreshing thresholds")
    ap.add_argument("--benchmarks", choices=("compare", "save"), default=None,
                    help="pytest-benchmark tests/perf against (compare) or into (save) this device's baseline")
    ap.add_argument("--marker", default=None, help="with --benchmarks: pytest -m expression, e.g. gpu")
    ap.add_argument("--fail-pct", type=float, default=30.0,
                    help="with --benchmarks compare: fail when a median is this many %% slower (default 30)")
    args = ap.parse_args(argv)
    if args.benchmarks:
        return run_benchmarks(args.benchmarks, args.marker, args.fail_pct)

    profile = PROFILES["quick" if args.quick else "full"]
    if args.rounds is not None:
        if args.rounds < 1:
            ap.error("--rounds must be >= 1")
        profile = Profile(**{**profile.__dict__, "rounds": args.rounds})
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    only = None
    if args.only:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = only - set(CPU_CHECKS) - set(CUDA_CHECKS)
        if unknown:
            ap.error(f"unknown checks {sorted(unknown)}; known: {', '.join(CPU_CHECKS + CUDA_CHECKS)}")
    torch.set_num_threads(args.threads)
    machine = describe_machine()
    slowed = [p for p in ("optim", "gather") if perf_slowdown(p)]
    header = (f"perf gate: profile {profile.name}, {profile.rounds} interleaved rounds, {args.threads} CPU thread(s), "
              f"row loop {cpu_rowops.backend_name()}, device {device_name()} (torch {machine['torch']}, "
              f"cuda {machine['cuda']}, driver {machine['driver']})"
              + (f"\nSLOWED BUILD (MEFT_PERF_SLOWDOWN): {', '.join(slowed)}" if slowed else ""))
    t0 = time.perf_counter()
    if args.runs:
        res = spread(profile, args.runs)
        print(header)
        print(f"{'check':<45}{'min':>9}{'median':>9}{'max':>9}")
        for k, v in res.items():
            print(f"{k:<45}{v['min']:>9.3g}{v['median']:>9.3g}{v['max']:>9.3g}")
        if args.json:
            args.json.write_text(json.dumps({"profile": profile.name, "machine": machine, "threads": args.threads,
                                             "slowed": slowed, "spread": res}, indent=2))
        return EXIT_PASS
    try:
        thresholds = load_thresholds(args.thresholds)
    except (OSError, ValueError) as exc:
        print(f"perf gate: cannot read the thresholds {args.thresholds}: {exc}")
        return EXIT_USAGE
    checks = run_gate(profile, thresholds, confirm=not args.no_confirm, only=only)
    code, line = verdict(checks)
    print(format_table(checks, header))
    print(f"\n{line}  ({time.perf_counter() - t0:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "profile": profile.name, "machine": machine, "threads": args.threads, "slowed": slowed,
            "exit_code": code, "verdict": line,
            "checks": [{"name": c.name, "ratio": c.ratio, "threshold": c.threshold, "target": c.target,
                        "typical": c.typical, "provisional": c.provisional, "status": c.status,
                        "best_ratio": c.best_ratio, "round_median": c.round_median,
                        "remeasured": c.confirmed, "detail": c.detail, "error": c.error} for c in checks],
        }, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
