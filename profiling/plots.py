"""PNG plots of a sweep's DataFrame (matplotlib, Agg backend).

Each ``plot_*`` function takes the sweep's DataFrame and a path, writes the PNG and returns
``(figure, labels)``: the names of the series (or stacked stages) it drew, so tests can check
what is in a picture. The "vs N" plots hold every other axis at its first value in the sweep
(first preset, dtype, tokens, K_top, P, micro-batches per step) so that each line varies N
alone; the PCIe plot holds N instead and varies the micro-batches per step.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_LABELS = {
    "router": "router", "keys": "keys", "copy_wait": "copy wait", "values": "values",
    "forward_fused": "forward (fused)", "backbone": "backbone FFN (frozen)", "backward": "backward",
    "optimizer": "optimizer",
}
BASELINE_LABELS = {"reference": "reference (baseline)", "meft-original": "MEFT original (dense-masked)",
                   "dense": "dense adapter, same N", "lora": "LoRA, same GPU memory"}
MAIN_IMPLS = ("meft", "reference")


def _main_impl(df) -> str:
    """The impl whose lines are "per placement": meft on CUDA, the reference path on CPU."""
    if ((df["impl"] == "meft") & (df["kind"] == "step")).any():
        return "meft"
    return "reference"


def series_label(row, main: str = "meft") -> str:
    """"<impl>, placement=..." for the MEFT adapter and the reference path, else the baseline's name."""
    if row["impl"] in MAIN_IMPLS:
        if row["placement"] == "cpu":
            if row.get("residency") == "resident":  # the backward reads the resident rows
                return f"{row['impl']}, placement=cpu (resident, {row['transfer']})"
            return f"{row['impl']}, placement=cpu ({row['residency']}, {row['transfer']}, {row['backward_rows']})"
        return f"{row['impl']}, placement=gpu"
    return BASELINE_LABELS.get(row["impl"], row["impl"])


def _style(impl: str, main: str) -> str:
    return "-o" if impl == main else ("-.^" if impl in MAIN_IMPLS else "--s")


SLICED_AXES = ("preset", "hidden_size", "dtype", "tokens", "topk", "experts_per_token", "micro_batches")


def n_slice(df, keep: str = "num_neurons"):
    """Step rows with every axis but ``keep`` (N and E by default) held at its first value in
    the sweep."""
    steps = df[df["kind"] == "step"]
    held = [c for c in SLICED_AXES if c != keep] + (["num_neurons"] if keep != "num_neurons" else [])
    for col in held:
        if len(steps):
            steps = steps[steps[col] == steps[col].iloc[0]]
    return steps


def _series(df, main: str):
    out = {}
    for _, row in df.iterrows():
        out.setdefault(series_label(row, main), []).append(row)
    return out


def _finish(fig, ax, path: Path, labels: list[str]) -> None:
    if labels:  # outside the axes, right: lines stay visible however many series there are
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _title_suffix(df) -> str:
    if not len(df):
        return ""
    r = df.iloc[0]
    return f"{r['preset']} (d={int(r['hidden_size'])}, {int(r['layers'])} layers), T={int(r['tokens'])}, " \
           f"K_top={int(r['topk'])}, P={int(r['experts_per_token'])}, {r['dtype']}, backbone={r['backbone']}, " \
           f"{r['mode']}"


def plot_tokens_per_s(df, path: Path):
    """Tokens/s vs N: a line per placement of the MEFT adapter (solid) and of the reference path
    (dash-dot), dashed baselines."""
    steps = n_slice(df)
    main = _main_impl(df)
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    labels = []
    for label, rows in _series(steps, main).items():
        pts = sorted((r["num_neurons"], r["tokens_per_s"]) for r in rows if not _nan(r["tokens_per_s"]))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], _style(rows[0]["impl"], main), label=label, markersize=4)
        labels.append(label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("adapter neurons per layer N")
    ax.set_ylabel("tokens / s (training step)")
    ax.set_title("Throughput vs adapter size\n" + _title_suffix(steps), fontsize=9)
    _finish(fig, ax, path, labels)
    return fig, labels


def plot_memory(df, path: Path, cuda: bool = False):
    """Device memory vs N: accounting per placement (and baseline), measured peaks on CUDA."""
    steps = n_slice(df)
    main = _main_impl(df)
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    labels = []
    for label, rows in _series(steps, main).items():
        acct = sorted((r["num_neurons"], r["adapter_gpu_bytes"] / 2**20) for r in rows
                      if not _nan(r["adapter_gpu_bytes"]))
        if acct:
            name = f"{label} [accounting]"
            ax.plot([p[0] for p in acct], [p[1] for p in acct], _style(rows[0]["impl"], main), label=name,
                    markersize=4)
            labels.append(name)
        measured = sorted((r["num_neurons"], r["gpu_peak_alloc_bytes"] / 2**20) for r in rows
                          if not _nan(r["gpu_peak_alloc_bytes"]))
        if measured and cuda:
            name = f"{label} [measured peak]"
            ax.plot([p[0] for p in measured], [p[1] for p in measured], ":x", label=name, markersize=5)
            labels.append(name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("adapter neurons per layer N")
    ax.set_ylabel("adapter GPU memory, MiB (all layers)")
    what = "accounting + torch allocator peak" if cuda else "accounting (no GPU here)"
    ax.set_title(f"GPU memory of the adapter vs N, {what}\n" + _title_suffix(steps), fontsize=9)
    _finish(fig, ax, path, labels)
    return fig, labels


TRANSFER_SERIES = [
    ("gather_GBps", "host gather fp32 (offload.gather.cpu_gather)"),
    ("gather_cast_GBps", "host gather + cast to compute dtype"),
    ("host_memcpy_GBps", "plain host memcpy, same bytes"),
    ("h2d_cpu_gather_GBps", "H2D cpu_gather (gather + pinned copy)"),
    ("h2d_zero_copy_GBps", "H2D zero_copy kernel"),
    ("pinned_h2d_GBps", "plain pinned memcpy H2D, same bytes"),
    ("d2h_GBps", "D2H gradient rows"),
    ("pinned_d2h_GBps", "plain pinned memcpy D2H, same bytes"),
]


def plot_transfer(df, path: Path, cuda: bool = False):
    """Achieved GB/s vs rows moved: transfer rows as lines, the sweep's placement-"cpu" steps as points."""
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    labels = []
    tr = df[df["kind"] == "transfer"]
    for col, name in TRANSFER_SERIES:
        pts = sorted((r, v) for r, v in zip(tr["rows"], tr[col]) if not _nan(v))
        if pts:
            style = "--" if "memcpy" in col else "-o"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=4)
            labels.append(name)
    steps = df[(df["kind"] == "step") & (df["placement"] == "cpu")]
    pts = [(r, v) for r, v in zip(steps["unique_rows_per_layer"], steps["achieved_GBps"]) if not _nan(v)]
    if pts:
        name = "training steps, placement=cpu (rows per layer)"
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=60, color="black", label=name, zorder=3)
        labels.append(name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows moved (per copy)")
    ax.set_ylabel("GB/s (payload)")
    d = int(tr["hidden_size"].iloc[0]) if len(tr) else None
    if cuda:
        ax.set_title(f"Achieved PCIe GB/s vs rows moved (d={d})", fontsize=9)
    else:
        ax.set_title(f"Host-side gather/packing GB/s vs rows moved (d={d}); no GPU: no PCIe here", fontsize=9)
    _finish(fig, ax, path, labels)
    return fig, labels


def plot_breakdown(df, path: Path):
    """Stacked step time per stage, a bar per (N, impl, placement) of the MEFT adapter and the
    reference path (the staged reference splits router / keys / copy wait / values)."""
    steps = n_slice(df)
    steps = steps[steps["impl"].isin(MAIN_IMPLS) & steps["step_ms"].notna()]
    steps = steps.sort_values(["num_neurons", "impl", "placement"], kind="stable")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(steps) + 2), 5.2))
    names = [f"N={int(r['num_neurons'])}\n{r['impl']}\n{r['placement']}" +
             (f"\n{r['residency']}\n{r['transfer']}" + ("" if r["residency"] == "resident" else
                                                        f"\n{r['backward_rows']}")
              if r["placement"] == "cpu" else "")
             for _, r in steps.iterrows()]
    bottom = [0.0] * len(steps)
    labels = []
    for stage, label in STAGE_LABELS.items():
        vals = [0.0 if _nan(v) else float(v) for v in steps[f"t_{stage}_ms"]]
        if not any(v > 0 for v in vals):
            continue
        ax.bar(range(len(vals)), vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
        labels.append(label)
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel("ms per training step (all layers)")
    ax.set_yscale("linear")
    ax.set_title("Step time by stage\n" + _title_suffix(steps), fontsize=9)
    _finish(fig, ax, path, labels)
    return fig, labels


def plot_pcie_bytes(df, path: Path):
    """Placement "cpu": PCIe bytes per optimizer step vs micro-batches per step at one N, a colour
    per residency policy (and transfer / backward rows): the library's counters (markers), the
    planner's prediction for the same routing (line) and the floor (black, dashed)."""
    steps = n_slice(df, keep="micro_batches")
    steps = steps[(steps["placement"] == "cpu") & steps["h2d_bytes_measured"].notna()]
    main = _main_impl(df)
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    labels = []
    for label, rows in _series(steps, main).items():
        rows = sorted(rows, key=lambda r: r["micro_batches"])
        x = [r["micro_batches"] for r in rows]
        measured = [(r["h2d_bytes_measured"] + r["d2h_bytes_measured"]) / 2**20 for r in rows]
        predicted = [(r["h2d_bytes_per_step"] + r["d2h_bytes_per_step"]) / 2**20 for r in rows]
        line, = ax.plot(x, predicted, "-", label=f"{label} [planner]")
        ax.plot(x, measured, "o", color=line.get_color(), label=f"{label} [measured]", markersize=6)
        labels += [f"{label} [planner]", f"{label} [measured]"]
    if len(steps):
        floor = sorted({(r["micro_batches"], r["pcie_floor_bytes_per_step"] / 2**20) for _, r in steps.iterrows()})
        ax.plot([p[0] for p in floor], [p[1] for p in floor], "k--", label="floor (each touched row once each way)")
        labels.append("floor (each touched row once each way)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("micro-batches per optimizer step")
    ax.set_ylabel("PCIe MiB per optimizer step (all layers)")
    n = f"N={int(steps['num_neurons'].iloc[0])}, " if len(steps) else ""
    ax.set_title("Placement cpu: bytes per optimizer step, measured vs predicted vs floor\n" + n
                 + _title_suffix(steps), fontsize=9)
    _finish(fig, ax, path, labels)
    return fig, labels


PLOTS = {
    "tokens_per_s_vs_N.png": lambda df, p, cuda: plot_tokens_per_s(df, p),
    "gpu_memory_vs_N.png": lambda df, p, cuda: plot_memory(df, p, cuda),
    "transfer_GBps_vs_rows.png": lambda df, p, cuda: plot_transfer(df, p, cuda),
    "step_breakdown.png": lambda df, p, cuda: plot_breakdown(df, p),
    "pcie_bytes_vs_micro_batches.png": lambda df, p, cuda: plot_pcie_bytes(df, p),
}


def plot_all(df, folder: Path, cuda: bool = False) -> dict[str, Path]:
    """Write every plot into ``folder``; returns {file name: path}."""
    out = {}
    for name, fn in PLOTS.items():
        path = Path(folder) / name
        fig, _ = fn(df, path, cuda)
        plt.close(fig)
        out[name] = path
    return out


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))
