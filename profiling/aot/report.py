"""--check, the markdown tables and the stdout summary of the static report."""

from __future__ import annotations

import triton

from .model import limit_shared

PRESETS = ("paper-7b", "scale-7b")
STEP_WORKLOADS = ("router_topk", "forward", "backward")  # one adapter layer's step, summed
HALF = ("bf16", "fp16")


def check(records: list[dict], ceilings: dict) -> list[str]:
    """Every failure of --check, one line each (empty: all passed).

    Fails on: a compile error; shared memory over the target's per-block limit; local-memory
    spills in bf16/fp16 at either preset; a GEMM-like stage with no tensor-core instruction in
    bf16/fp16 (fp32 values and dx stream FMAs by design, row_gather_sum's docstring)."""
    failures = []
    for r in records:
        where = f"{r['kernel']} [{r['target']} {r['dtype']} {r['shape']}]"
        if not r.get("compiled"):
            failures.append(f"compile error: {where}: {r.get('error') or 'no kernel compiled'}")
            continue
        limit = limit_shared(ceilings[r["target"]])
        if r["shared_bytes"] > limit:
            failures.append(f"shared memory: {where}: {r['shared_bytes']} B > {limit} B per block")
        if r["dtype"] in HALF and r["shape"] in PRESETS and r["spill_bytes"] > 0:
            failures.append(f"spills: {where}: {r['spill_bytes']} B of local memory per thread "
                            f"({r['registers']} registers)")
        if r["dtype"] in HALF and r.get("gemm_like") and r["tensor_core_instructions"] == 0:
            failures.append(f"no tensor cores: {where}: GEMM-like stage, 0 HMMA/HGMMA in "
                            f"{r['sass_instructions']} SASS instructions")
    return failures


#: how much worse a kernel's prediction, registers or spills may get before --compare fails
REGRESSION_TOLERANCE = 0.10


def compare(records: list[dict], baseline: list[dict], tolerance: float = REGRESSION_TOLERANCE) -> list[str]:
    """What got worse than the committed ``baseline`` by more than ``tolerance``: each kernel's
    predicted time, registers and spill bytes, matched by (kernel, target, dtype, shape). A
    kernel the baseline has but this run lacks (or failed to compile) is a failure; a new
    kernel is not (refresh the baseline to track it)."""
    key = lambda r: (r["kernel"], r["target"], r["dtype"], r["shape"])  # noqa: E731
    now = {key(r): r for r in records}
    worse = []
    for old in baseline:
        new = now.get(key(old))
        where = "/".join(key(old))
        if old["target"] not in {r["target"] for r in records}:
            continue  # this run did not compile for that target
        if new is None or not new.get("compiled"):
            worse.append(f"{where}: in the baseline but not compiled now")
            continue
        for field in ("predicted_us", "registers", "spill_bytes"):
            was, got = old.get(field) or 0, new.get(field) or 0
            if got > was * (1 + tolerance) + (0 if field == "predicted_us" else 0.5):
                worse.append(f"{where}: {field} {was:.4g} -> {got:.4g} (more than {tolerance:.0%} worse)")
    return worse


def _num(x, fmt="{:.3g}"):
    return "-" if x is None else fmt.format(x)


def _ratio(r):
    return _num(r.get("predicted_over_floor"), "{:.2f}x")


def full_table(records: list[dict]) -> str:
    head = ("| kernel | dtype | shape | grid | warps/stages | regs | spill B | smem B | tensor-core | "
            "SASS | floor µs | predicted µs | pred/floor | bound by |")
    rows = [head, "|" + "---|" * 14]
    for r in records:
        if not r.get("compiled"):
            rows.append(f"| {r['kernel']} | {r['dtype']} | {r['shape']} | - | - | - | - | - | "
                        f"compile error | - | - | - | - | {(r.get('error') or '')[:80]} |")
            continue
        grid = "x".join(str(g) for g in r["grid"])
        tc = f"{r['tensor_core_instructions']} {r['tensor_core_kind']}" if r["tensor_core_instructions"] else "0"
        rows.append(f"| {r['kernel']} | {r['dtype']} | {r['shape']} | {grid} | {r['num_warps']}/{r['num_stages']} | "
                    f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {tc} | "
                    f"{r['sass_instructions']} | {_num(r.get('floor_us'))} | {_num(r.get('predicted_us'))} | "
                    f"{_ratio(r)} | {r.get('bound_by', '-')} |")
    return "\n".join(rows)


def preset_table(records: list[dict], target: str, dtype: str = "bf16") -> str:
    """Predicted vs floor per stage at both presets (one target, one dtype)."""
    by = {(r["kernel"], r["shape"]): r for r in records
          if r["target"] == target and r["dtype"] == dtype and r.get("compiled")}
    stages = list(dict.fromkeys(r["kernel"] for r in records if r["target"] == target))
    head = "| stage | " + " | ".join(f"{p} floor µs | {p} predicted µs | ratio | bound" for p in PRESETS) + " |"
    rows = [head, "|" + "---|" * (1 + 4 * len(PRESETS))]
    totals = {p: [0.0, 0.0] for p in PRESETS}
    for s in stages:
        in_step = any(r.get("workload") in STEP_WORKLOADS for r in by.values() if r["kernel"] == s)
        cells = []
        for p in PRESETS:
            r = by.get((s, p))
            if r is None or r.get("floor_us") is None:
                cells.append("- | - | - | -")
                continue
            if in_step:
                totals[p][0] += r["floor_us"]
                totals[p][1] += r["predicted_us"]
            cells.append(f"{r['floor_us']:.1f} | {r['predicted_us']:.1f} | {_ratio(r)} | {r['bound_by']}")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    rows.append("| **adapter step** (router + forward + backward) | " + " | ".join(
        f"{f:.1f} | {q:.1f} | {q / f:.2f}x | " if f else "- | - | - | " for f, q in totals.values()) + " |")
    return "\n".join(rows)


def markdown(records: list[dict], target: str, failures: list[str], wall_s: float, argv: list[str]) -> str:
    mine = [r for r in records if r["target"] == target]
    parts = [f"# Static GPU report: {target}", "",
             f"`python -m profiling.aot {' '.join(argv)}` ({wall_s:.0f} s). Compiled on CPU with "
             f"Triton {triton.__version__} for {target} through the real launchers; nothing ran on "
             "a GPU. Model and its limits: "
             "`profiling/aot/__init__.py`, README \"Static GPU report\".", "",
             "## bf16 at the presets: predicted vs floor", "", preset_table(records, target), "",
             "## --check", ""]
    mine_fail = [f for f in failures if f"[{target} " in f]
    parts += [f"- {f}" for f in mine_fail] or ["all checks pass"]
    parts += ["", "## Every kernel", "", full_table(mine), ""]
    notes = [(r["kernel"], r["dtype"], r["shape"], n) for r in mine for n in r.get("loop_notes") or []]
    if notes:
        parts += ["## Loop-matching notes", ""] + [f"- {k} {d} {s}: {n}" for k, d, s, n in notes] + [""]
    return "\n".join(parts)
