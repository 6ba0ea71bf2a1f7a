"""One command for a machine with a GPU: tests, benchmarks, gate, kernel bench, sweep, one table.

    python -m profiling.gpu_check                       # about 9 minutes at most on an H100
    python -m profiling.gpu_check --copy-to "$OUT"      # also copy the results there (remote runs)
    python -m profiling.gpu_check --skip sweep,kernel-bench --budget-s 300

Stages, each a subprocess with its own time limit (a stage that runs past it is killed and
marked "timeout"; unused time passes on to the later stages; ``--budget-s`` is the total):

1. ``gpu-tests``: ``pytest -m gpu`` (all ``gpu``-marked tests outside ``tests/perf``);
2. ``gpu-benchmarks``: ``pytest tests/perf -m gpu --benchmark-enable`` against this device's
   baseline ``profiling/baselines/<device>/benchmarks-gpu.json`` (fail when a median is more
   than ``--fail-pct`` % slower); where the device has none yet, the run becomes its baseline
   (to be committed);
3. ``perf-gate``: the CUDA checks of ``python -m profiling.perf_gate`` (Triton kernels vs the
   reference, active-row H2D through both copy engines vs a pinned memcpy);
4. ``kernel-bench``: ``python -m profiling.kernel_bench`` (LLaMA-7B shapes) — the Triton
   kernels vs the bytes / FLOPs floor measured in the same run;
5. ``sweep``: ``python -m profiling.sweep --quick`` (when that module exists) — active-row H2D
   bandwidth vs pinned memcpy and copy time hidden behind compute.

The summary table has one row per stage and per docs/DESIGN.md, "Performance model" ratio: kernels within
1.5x of the floor, H2D active-row bandwidth >= 80% of a pinned memcpy, copy hidden >= 90%.
Everything goes to ``profiling/results/<device>/<timestamp>-gpu-check/``: ``summary.md`` /
``summary.json``, ``machine.json`` (device, driver, CUDA, torch, triton, git commit,
nvidia-smi), one log per stage, the benchmark JSON, the gate JSON, the kernel bench's CSV and
the sweep's folder. Commit that folder (and a new baseline, if one was created).

Exit codes: 0 every stage passed (a missed DESIGN target is reported in the table, not a
failure: targets are goals, regressions fail), 1 a stage failed or timed out, 0 with one line
of explanation on a machine without CUDA (``--require-cuda``: 3 there instead).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_NO_CUDA = 0, 1, 3
ROOT = Path(__file__).resolve().parent.parent

#: stage -> default seconds (its time limit; unused time passes on); the sum is the default --budget-s
STAGES = {
    "gpu-tests": 150,
    "gpu-benchmarks": 75,
    "perf-gate": 60,
    "kernel-bench": 120,
    "sweep": 135,
}
KERNEL_FLOOR_TARGET = 1.5  # docs/DESIGN.md, "Performance model": kernels within 1.5x of the larger floor
H2D_TARGET = 0.8  # active-row H2D bandwidth >= 80% of a pinned memcpy of the same bytes
HIDDEN_TARGET = 0.9  # copy time hidden behind compute >= 90%


@dataclass
class Row:
    what: str
    value: str
    target: str
    result: str  # pass / FAIL / timeout / skipped / met / MISSED / n/a / WARN
    note: str = ""


@dataclass
class Stage:
    name: str
    cmd: list[str]
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    skipped: str | None = None
    log: Path | None = None
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.rc == 0 and not self.timed_out)


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, bool, float]:
    """Run ``cmd`` in its own process group, output to ``log``; kill the group at ``timeout``."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group
            proc.wait()
            rc, timed_out = None, True
            out.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
    return rc, timed_out, time.monotonic() - t0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Parsing each stage's output into summary rows
# --------------------------------------------------------------------------------------------


def _status(stage: Stage) -> str:
    if stage.skipped is not None:
        return "skipped"
    if stage.timed_out:
        return "timeout"
    return "pass" if stage.rc == 0 else "FAIL"


def rows_tests(stage: Stage, junit: Path) -> list[Row]:
    value = f"exit {stage.rc}"
    try:
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        value = f"{n - f - e - s} passed, {f + e} failed, {s} skipped"
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError):
        pass
    return [Row("pytest -m gpu", value, "all pass", _status(stage))]


def rows_benchmarks(stage: Stage, json_out: Path, baseline_note: str) -> list[Row]:
    value = "-"
    try:
        value = f"{len(json.loads(json_out.read_text())['benchmarks'])} benchmarks"
    except (OSError, ValueError, KeyError):
        pass
    return [Row("GPU benchmarks vs this device's baseline", value, "median within +fail-pct", _status(stage),
                baseline_note)]


def rows_gate(stage: Stage, json_out: Path) -> list[Row]:
    try:
        res = json.loads(json_out.read_text())
    except (OSError, ValueError):
        return [Row("perf gate (CUDA checks)", "-", "-", _status(stage), "no results")]
    out = []
    for c in res["checks"]:
        ratio = c["ratio"]
        value = "-" if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)) else f"{ratio:.3g}"
        result = {"pass": "pass", "FAIL": "FAIL"}.get(c["status"], c["status"])
        out.append(Row(f"gate {c['name']}", value, f"<= {c['threshold']}" if c["threshold"] is not None else "-",
                       result, c.get("error") or ""))
    return out


def rows_kernels(stage: Stage, csv: Path | None) -> list[Row]:
    if csv is None or not csv.is_file():
        return [Row("kernels vs floor", "-", f"<= {KERNEL_FLOOR_TARGET}", _status(stage) if not stage.ok else "n/a",
                    "no kernels.csv")]
    import pandas as pd

    table = pd.read_csv(csv).set_index("impl")
    out = []
    for phase, what in (("fwd", "forward"), ("step", "forward+backward")):
        ratio = float(table.loc["triton", f"{phase}_vs_floor"])
        out.append(Row(f"Triton {what} / floor (LLaMA-7B shapes)", f"{ratio:.3g}", f"<= {KERNEL_FLOOR_TARGET}",
                       "met" if ratio <= KERNEL_FLOOR_TARGET else "MISSED",
                       f"{table.loc['triton', f'{phase}_ms']:.3f} ms vs floor {table.loc['triton', f'{phase}_floor_ms']:.3f} ms"))
        for base in ("reference", "meft-original"):
            if base in table.index:
                speed = float(table.loc[base, f"{phase}_speedup_of_triton"])
                out.append(Row(f"Triton {what} speedup over {base}",
                               "OOM" if math.isnan(speed) else f"{speed:.3g}x", "> 1", "info"))
    if "triton-factored" in table.index:  # gradient_form "factors", a flush every micro-batch
        ratio = float(table.loc["triton-factored", "step_ms"] / table.loc["triton", "step_ms"])
        out.append(Row("Triton factored forward+backward (flush every micro-batch) / rows form",
                       f"{ratio:.3g}", "info", "info"))
    return out


def rows_sweep(stage: Stage, folder: Path) -> list[Row]:
    csv = folder / "sweep.csv"
    if not csv.is_file():
        return [Row("H2D active rows / pinned memcpy", "-", f">= {H2D_TARGET}", "n/a", "no sweep.csv"),
                Row("copy hidden behind compute", "-", f">= {HIDDEN_TARGET}", "n/a", "no sweep.csv")]
    import pandas as pd

    df = pd.read_csv(csv)
    out = []
    tr = df[(df.get("kind") == "transfer")] if "kind" in df else df.iloc[0:0]
    if len(tr) and "pinned_h2d_GBps" in tr:
        top = tr[tr["rows"] == tr["rows"].max()].iloc[0]
        for col, engine in (("h2d_cpu_gather_GBps", "cpu_gather"), ("h2d_zero_copy_GBps", "zero_copy")):
            if col in tr and not math.isnan(float(top[col])):
                share = float(top[col]) / float(top["pinned_h2d_GBps"])
                out.append(Row(f"H2D active rows / pinned memcpy [{engine}]", f"{share:.3g}", f">= {H2D_TARGET}",
                               "met" if share >= H2D_TARGET else "MISSED",
                               f"{int(top['rows'])} rows: {float(top[col]):.1f} vs {float(top['pinned_h2d_GBps']):.1f} GB/s"))
    if not out:
        out.append(Row("H2D active rows / pinned memcpy", "-", f">= {H2D_TARGET}", "n/a", "no CUDA transfer rows"))
    steps = df[(df.get("kind") == "step") & (df.get("placement") == "cpu") & (df.get("mode") == "cuda")] \
        if {"kind", "placement", "mode"} <= set(df.columns) else df.iloc[0:0]
    if len(steps) and "copy_hidden_share" in steps:
        steps = steps[steps["num_neurons"] == steps["num_neurons"].max()]
        for _, r in steps.iterrows():
            share = float(r["copy_hidden_share"])
            if math.isnan(share):
                continue
            out.append(Row(f"copy hidden [{r.get('impl')} {r.get('transfer')}/{r.get('backward_rows')} "
                           f"N={int(r['num_neurons'])}]", f"{share:.3g}", f">= {HIDDEN_TARGET}",
                           "met" if share >= HIDDEN_TARGET else "MISSED",
                           f"in-step H2D vs memcpy {float(r.get('achieved_vs_memcpy', float('nan'))):.3g}"))
    if len(out) == 0 or not any(r.what.startswith("copy hidden") for r in out):
        out.append(Row("copy hidden behind compute", "-", f">= {HIDDEN_TARGET}", "n/a", "no CUDA placement-cpu rows"))
    return out


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def _capture(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_record() -> dict:
    import torch

    from .environment import describe_machine, device_name

    info = dict(describe_machine())
    info.update(
        device_slug=device_name(),
        gpu_count=torch.cuda.device_count(),
        gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory,
        compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        cpu_cores=os.cpu_count(),
        git_commit=_capture(["git", "rev-parse", "HEAD"]),
        git_dirty=_capture(["git", "status", "--short", "--untracked-files=no"]),
        nvidia_smi=_capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max,"
                             "pcie.link.width.max,clocks.max.sm,power.limit", "--format=csv"]),
        when=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    return info


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def format_summary(rows: list[Row], header: str) -> str:
    cols = ("what", "value", "target", "result", "note")
    data = [[getattr(r, c) for c in cols] for r in rows]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row) + " |" for row in data]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiling.gpu_check", description=__doc__.split("\n\n")[0],
                                 epilog="exit codes: 0 all stages passed (or no CUDA: nothing to do), "
                                        "1 a stage failed or timed out, 3 no CUDA with --require-cuda")
    ap.add_argument("--budget-s", type=float, default=float(sum(STAGES.values())),
                    help="total seconds for all stages (default %(default)s)")
    ap.add_argument("--skip", default="", help=f"comma list of stages to skip: {', '.join(STAGES)}")
    ap.add_argument("--fail-pct", type=float, default=30.0,
                    help="GPU benchmarks: fail when a median is this many %% slower than the baseline")
    ap.add_argument("--copy-to", type=Path, default=None,
                    help="also copy the results (and a new baseline) here, under their repository paths")
    ap.add_argument("--require-cuda", action="store_true", help="exit 3 (not 0) on a machine without CUDA")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(STAGES):
        ap.error(f"unknown stages {sorted(skip - set(STAGES))}; known: {', '.join(STAGES)}")

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              f"nothing to check. Run it on a machine with a GPU; the CPU gate is `python -m profiling.perf_gate`.")
        return EXIT_NO_CUDA if args.require_cuda else EXIT_OK

    from . import perf_gate
    from .environment import device_name, results_dir

    device = device_name()
    folder = results_dir("gpu-check")
    machine = machine_record()
    (folder / "machine.json").write_text(json.dumps(machine, indent=2, default=str))
    py = sys.executable
    deadline = time.monotonic() + args.budget_s
    scale = args.budget_s / sum(STAGES.values())
    stages: list[Stage] = []
    new_baseline: Path | None = None

    def later_reserve(name: str) -> float:
        names = list(STAGES)
        return sum(STAGES[n] * scale for n in names[names.index(name) + 1:] if n not in skip)

    def run_stage(name: str, cmd: list[str]) -> Stage:
        stage = Stage(name, cmd, log=folder / f"{name}.log")
        stages.append(stage)
        if name in skip:
            stage.skipped = "--skip"
            return stage
        timeout = deadline - time.monotonic() - later_reserve(name)
        if timeout < 10:
            stage.skipped = "no time left in --budget-s"
            return stage
        print(f"[gpu_check] {name} (limit {timeout:.0f} s): {' '.join(cmd)}", flush=True)
        stage.rc, stage.timed_out, stage.seconds = _run(cmd, stage.log, timeout)
        print(f"[gpu_check] {name}: {_status(stage)} in {stage.seconds:.0f} s", flush=True)
        if not stage.ok:
            print(_tail(stage.log), flush=True)
        return stage

    # 1. gpu-marked tests
    junit = folder / "gpu-tests.xml"
    s = run_stage("gpu-tests", [py, "-m", "pytest", "tests", "-m", "gpu", "--ignore=tests/perf", "-q",
                                "-p", "no:cacheprovider", f"--junitxml={junit}"])
    s.rows = rows_tests(s, junit) if s.skipped is None else [Row("pytest -m gpu", "-", "all pass", "skipped", s.skipped)]

    # 2. gpu benchmarks vs this device's baseline (none yet: this run becomes it)
    bench_json = folder / "benchmarks-gpu.json"
    baseline = perf_gate.benchmark_baseline("gpu", device)
    if baseline.is_file():
        cmd = perf_gate.benchmark_command("compare", bench_json, "gpu", args.fail_pct, baseline)
        note = f"compared with {perf_gate.rel(baseline)}"
    else:
        cmd = perf_gate.benchmark_command("save", bench_json, "gpu", args.fail_pct, baseline)
        note = f"no baseline for {device}: this run becomes {perf_gate.rel(baseline)} (commit it)"
    s = run_stage("gpu-benchmarks", cmd)
    if s.skipped is None and not baseline.is_file() and s.ok and bench_json.is_file():
        baseline.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bench_json, baseline)
        new_baseline = baseline
    s.rows = rows_benchmarks(s, bench_json, note if s.skipped is None else s.skipped)

    # 3. the gate's CUDA checks
    gate_json = folder / "perf_gate.json"
    s = run_stage("perf-gate", [py, "-m", "profiling.perf_gate", "--only", ",".join(perf_gate.CUDA_CHECKS),
                                "--json", str(gate_json)])
    s.rows = rows_gate(s, gate_json)

    # 4. kernel bench (it writes its own results folder; moved into ours)
    before = set((folder.parent).glob("*-kernels"))
    s = run_stage("kernel-bench", [py, "-m", "profiling.kernel_bench"])
    kernels_csv = None
    for produced in sorted(set(folder.parent.glob("*-kernels")) - before):
        target = folder / "kernel-bench"
        shutil.move(str(produced), target)
        kernels_csv = target / "kernels.csv"
    s.rows = rows_kernels(s, kernels_csv)

    # 5. quick sweep
    sweep_dir = folder / "sweep"
    if importlib.util.find_spec("profiling.sweep") is None:
        s = Stage("sweep", [], skipped="profiling.sweep does not exist")
        stages.append(s)
    else:
        s = run_stage("sweep", [py, "-m", "profiling.sweep", "--quick", "--out", str(sweep_dir)])
    s.rows = rows_sweep(s, sweep_dir)

    rows = []
    for st in stages:
        rows.append(Row(f"stage {st.name}", f"{st.seconds:.0f} s", "exit 0", _status(st), st.skipped or ""))
        rows += st.rows
    failed = [st.name for st in stages if not st.ok]
    code = EXIT_FAIL if failed else EXIT_OK
    header = (f"gpu_check on {machine.get('device')} ({device}), driver {machine.get('driver')}, CUDA "
              f"{machine.get('cuda')}, torch {machine.get('torch')}, triton {machine.get('triton')}, "
              f"commit {(machine.get('git_commit') or '?')[:10]}")
    summary = format_summary(rows, header)
    verdict = f"FAIL: {', '.join(failed)}" if failed else "PASS: every stage passed"
    missed = [r.what for r in rows if r.result == "MISSED"]
    if missed:
        verdict += f" (DESIGN targets missed: {'; '.join(missed)})"
    (folder / "summary.md").write_text(summary + f"\n\n{verdict}\n")
    (folder / "summary.json").write_text(json.dumps({
        "verdict": verdict, "exit_code": code, "machine": machine, "new_baseline": str(new_baseline or ""),
        "stages": [{"name": st.name, "cmd": st.cmd, "rc": st.rc, "seconds": st.seconds, "timed_out": st.timed_out,
                    "skipped": st.skipped} for st in stages],
        "rows": [r.__dict__ for r in rows]}, indent=2, default=str))
    print(summary)
    print(f"\n{verdict}\nresults: {perf_gate.rel(folder)}")
    if new_baseline is not None:
        print(f"new benchmark baseline: {perf_gate.rel(new_baseline)} (commit it)")
    if args.copy_to is not None:
        for src in [folder] + ([new_baseline] if new_baseline else []):
            try:
                dst = args.copy_to / src.resolve().relative_to(ROOT)
            except ValueError:  # outside the repository (a custom results folder): by name
                dst = args.copy_to / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copyfile(src, dst)
        print(f"copied to {args.copy_to}")
    return code


if __name__ == "__main__":
    sys.exit(main())
