"""Command line of ``python -m profiling.aot``."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import report
from .model import load_ceilings
from .standin import TARGETS
from .workloads import DTYPES, SHAPES

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = str(ROOT / "profiling" / "results" / "static-{target}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m profiling.aot", description=__doc__)
    p.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=["sm90a", "sm80"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="results folder; '{target}' in it is replaced by the target "
                        "(default: profiling/results/static-{target})")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on a compile error, shared memory over the limit, spills in "
                        "bf16/fp16 at a preset, or a GEMM-like stage without tensor cores")
    p.add_argument("--compare", metavar="RECORDS_JSON", action="append", default=[],
                   help="a committed records.json (repeatable): exit 1 when a kernel's predicted time, "
                        "registers or spills got more than 10%% worse; refresh the baseline on purpose "
                        "by rerunning with the default --out and committing the new records.json")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="compile processes (default: min(2, CPUs))")
    return p.parse_args(argv)


def out_dir(out: str, target: str, many: bool) -> Path:
    if "{target}" in out:
        return Path(out.format(target=target))
    return Path(out) / f"static-{target}" if many else Path(out)


def run_cases(cases, jobs: int) -> list[dict]:
    from .analyze import worker_init, compile_case_star
    if jobs <= 1:
        return [r for case in cases for r in compile_case_star(case)]
    ctx = multiprocessing.get_context("spawn")
    # the compile processes must import Triton without its interpreter (they inherit this)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=worker_init) as pool:
            return [r for recs in pool.map(compile_case_star, cases) for r in recs]
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    ceilings = load_ceilings()
    # big shapes first: the pool's last tasks are then the short ones
    cases = [(t, d, s) for s in sorted(args.shapes, key=lambda s: -SHAPES[s].T)
             for t in args.targets for d in args.dtypes]
    records = run_cases(cases, args.jobs)
    order = {(t, d, s): i for i, (t, d, s) in enumerate(
        (t, d, s) for t in args.targets for d in args.dtypes for s in args.shapes)}
    records.sort(key=lambda r: order[(r["target"], r["dtype"], r["shape"])])
    wall = time.perf_counter() - t0
    failures = report.check(records, ceilings)
    regressions = [line for path in args.compare
                   for line in report.compare(records, json.loads(Path(path).read_text()))]

    for target in args.targets:
        folder = out_dir(args.out, target, len(args.targets) > 1)
        folder.mkdir(parents=True, exist_ok=True)
        mine = [r for r in records if r["target"] == target]
        (folder / "records.json").write_text(json.dumps(mine, indent=1) + "\n")
        (folder / "report.md").write_text(report.markdown(records, target, failures, wall, argv))
        print(f"\n== {target}: {len(mine)} kernels compiled on CPU -> {folder}")
        print(report.preset_table(records, target))
    print(f"\n{len(records)} records in {wall:.0f} s ({args.jobs} compile processes)")
    if failures:
        print(f"--check: {len(failures)} failure(s)" + ("" if args.check else " (not enforced without --check)"))
        for f in failures:
            print(f"  FAIL {f}")
    else:
        print("--check: all checks pass")
    if args.compare:
        print(f"--compare: {len(regressions)} regression(s)" if regressions else "--compare: nothing got worse")
        for line in regressions:
            print(f"  WORSE {line}")
    return 1 if (args.check and failures) or regressions else 0
