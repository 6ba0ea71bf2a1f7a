"""The sweep's outputs: the printed / summary.md tables and the files of a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import metrics
from .columns import check_described, columns_markdown

GPU_ONLY_LINE = (
    "No CUDA device: ran the CPU subset (MEFTAdapter per placement on CPU compute, the library's CPU copy engine "
    "and optimizer, host gather vs memcpy); these need a GPU: Triton kernel times, H2D/D2H PCIe GB/s and copy time "
    "hidden behind compute, measured GPU memory (torch allocator, NVML), NVML PCIe counters, the zero_copy transfer."
)

SUMMARY_COLUMNS = [
    ("num_neurons", "N"), ("num_experts", "E"), ("tokens", "T"), ("micro_batches", "M"), ("impl", "impl"),
    ("placement", "placement"), ("policy", "residency transfer/bwd"), ("step_ms", "step ms"),
    ("tokens_per_s", "tokens/s"), ("speedup_vs_reference", "x ref"), ("adapter_gpu_MiB", "GPU MiB (acct)"),
    ("pcie_MiB", "PCIe MiB/step"), ("pcie_vs_floor", "PCIe / floor"), ("unique_rows_per_layer", "rows/layer"),
    ("achieved_GBps", "GB/s"), ("achieved_vs_memcpy", "vs memcpy"),
]
TRANSFER_SUMMARY_COLUMNS = [
    ("rows", "rows"), ("hidden_size", "d"), ("gather_GBps", "gather GB/s"), ("gather_cast_GBps", "gather+cast GB/s"),
    ("host_memcpy_GBps", "host memcpy GB/s"), ("h2d_cpu_gather_GBps", "H2D cpu_gather GB/s"),
    ("h2d_zero_copy_GBps", "H2D zero_copy GB/s"), ("pinned_h2d_GBps", "pinned H2D GB/s"),
    ("achieved_vs_memcpy", "vs memcpy"),
]
#: the files of a run besides the plots
FILES = ("sweep.csv", "sweep.json", "columns.md", "meta.json", "summary.md")


def summary_markdown(df) -> str:
    """The step table, the transfer table (columns measured here) and the distinct notes."""
    steps = df[df["kind"] == "step"].copy()
    steps["policy"] = [("" if p != "cpu" else f"resident {t}" if r == "resident" else f"{r} {t}/{b}")
                       for t, b, p, r in zip(steps["transfer"], steps["backward_rows"], steps["placement"],
                                             steps["residency"])]
    steps["adapter_gpu_MiB"] = steps["adapter_gpu_bytes"] / 2**20
    steps["pcie_MiB"] = (steps["h2d_bytes_measured"] + steps["d2h_bytes_measured"]) / 2**20
    parts = [metrics.markdown_table(steps.to_dict("records"), [c for c, _ in SUMMARY_COLUMNS],
                                    [h for _, h in SUMMARY_COLUMNS])]
    transfers = df[df["kind"] == "transfer"]
    if len(transfers):
        cols = [(c, h) for c, h in TRANSFER_SUMMARY_COLUMNS
                if transfers[c].notna().any() or c in ("rows", "hidden_size")]
        parts.append(metrics.markdown_table(transfers.to_dict("records"), [c for c, _ in cols], [h for _, h in cols]))
    notes = sorted({n for text in df["note"].fillna("") for n in str(text).split("; ") if n})
    if notes:
        parts.append("Notes: " + " | ".join(notes))
    return "\n\n".join(parts)


def write_outputs(df, meta: dict, folder: Path, plots: bool) -> list[Path]:
    """sweep.csv / sweep.json (a row per point), columns.md (what each column means),
    meta.json, summary.md and, with ``plots``, the PNGs of :mod:`profiling.plots`."""
    check_described(df.columns)
    folder.mkdir(parents=True, exist_ok=True)
    csv, records, columns, meta_json, summary = written = [folder / name for name in FILES]
    df.to_csv(csv, index=False)
    df.to_json(records, orient="records", indent=1)
    columns.write_text(columns_markdown(df.columns) + "\n")
    meta_json.write_text(json.dumps(meta, indent=2, default=str))
    summary.write_text(summary_markdown(df) + "\n")
    if plots:
        try:
            from .. import plots as plotting
        except ImportError as exc:  # matplotlib is an optional dependency (extra "plots")
            print(f"no plots: {exc} (pip install '.[plots]')", file=sys.stderr)
            return written
        written += plotting.plot_all(df, folder, cuda=meta["mode"] == "cuda").values()
    return written
