"""``python -m profiling.sweep``: the flags, the run over every point, the output files."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from meft_triton.config import BACKWARD_ROWS, PLACEMENTS, RESIDENCIES, TRANSFERS
from meft_triton.validation import is_out_of_memory

from .. import metrics
from ..environment import describe_machine, results_dir
from ..presets import DEFAULT_NEURONS_PER_EXPERT, PRESETS, sweep_defaults
from .columns import COLUMN_NAMES
from .grid import (BASELINES, DTYPES, Shape, build_points, choice_list, experts_for, flatten, int_list,
                   positive_int, ratio_list)
from .measure import add_cross_row_columns, blank_row, measure_step, measure_transfer_point
from .report import GPU_ONLY_LINE, summary_markdown, write_outputs
from .transfer import transfer_store
from .workloads import Weights

DESCRIPTION = "The profiling sweep: what an adapter of N neurons costs in tokens/s, memory and PCIe traffic."
#: flags whose values, when not given, come from profiling.presets.sweep_defaults
AXES = ("preset", "num_neurons", "num_experts", "experts_per_token", "topk", "tokens", "placement", "transfer",
        "backward_rows", "residency", "micro_batches", "dtype", "baselines", "transfer_rows")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m profiling.sweep", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Axis flags take one or more values, comma or space separated.")
    ap.add_argument("--quick", action="store_true", help="a small sweep chosen for the device found (CPU: < 2 min)")
    ap.add_argument("--preset", nargs="+", type=choice_list(tuple(PRESETS)), help="model shapes: " + ", ".join(PRESETS))
    ap.add_argument("--hidden-size", type=positive_int, help="override the preset's d")
    ap.add_argument("--layers", type=positive_int, help="override the preset's number of adapted layers")
    ap.add_argument("--max-layers", type=positive_int, help="layers actually run (times scale to --layers)")
    ap.add_argument("--num-neurons", "-N", nargs="+", type=int_list(1), help="adapter neurons N per layer")
    ap.add_argument("--num-experts", "-E", nargs="+", type=int_list(1), help="experts E (default N / 64)")
    ap.add_argument("--experts-per-token", "-P", nargs="+", type=int_list(1), help="experts per token P")
    ap.add_argument("--topk", "-K", nargs="+", type=int_list(1), help="active neurons per token K_top")
    ap.add_argument("--tokens", "-T", nargs="+", type=int_list(1), help="tokens per micro-batch")
    ap.add_argument("--placement", nargs="+", type=choice_list(PLACEMENTS), help="gpu, cpu")
    ap.add_argument("--transfer", nargs="+", type=choice_list(TRANSFERS), help="transfer engines (placement cpu)")
    ap.add_argument("--backward-rows", nargs="+", type=choice_list(BACKWARD_ROWS), help="refetch, keep")
    ap.add_argument("--residency", nargs="+", type=choice_list(RESIDENCIES),
                    help="placement cpu: per-micro-batch, resident (how long rows stay on the device)")
    ap.add_argument("--micro-batches", "-M", nargs="+", type=int_list(1),
                    help="micro-batches per optimizer step (MEFT points; each with its own inputs)")
    ap.add_argument("--ist-ratio", nargs="+", type=ratio_list,
                    help="fractions of layers IST trains per step, in (0, 1] (MEFT + IST; default 1)")
    ap.add_argument("--dtype", nargs="+", type=choice_list(tuple(DTYPES)), help="compute dtypes")
    ap.add_argument("--baselines", nargs="+", type=choice_list((*BASELINES, "none")),
                    help="reference, meft-original, dense, lora, or none")
    ap.add_argument("--backbone", choices=("none", "ffn"),
                    help="frozen FFN stand-in beside each adapter (default: ffn with CUDA, none without)")
    ap.add_argument("--transfer-rows", nargs="+", type=int_list(1), help="row counts of the transfer rows")
    ap.add_argument("--repeats", type=positive_int, help="timed steps per point (median)")
    ap.add_argument("--warmup", type=int_list(0), help="untimed steps before timing")
    ap.add_argument("--threads", type=positive_int,
                    help="torch CPU threads (default: 1 without CUDA, see profiling.presets; torch's choice with CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the results here instead of profiling/results/<device>/<time>/")
    ap.add_argument("--no-plots", action="store_true", help="write no PNGs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed points")
    return ap


def parse_args(argv: Sequence[str] | None = None, cuda: bool | None = None) -> argparse.Namespace:
    """The flags, with the device's defaults (``profiling.presets``) where a flag is not given."""
    ap = make_parser()
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    defaults = sweep_defaults(cuda, args.quick)
    for key in AXES:
        value = flatten(getattr(args, key))
        setattr(args, key, defaults[key] if value is None else value)
    args.ist_ratio = flatten(args.ist_ratio) or [1.0]
    if args.warmup is not None:
        args.warmup = args.warmup[0]
    for key in ("repeats", "warmup", "max_layers", "threads", "backbone"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if "none" in args.baselines:
        if len(args.baselines) > 1:
            ap.error("argument --baselines: 'none' cannot be combined with other baselines")
        args.baselines = []
    check_combinations(ap, args)
    return args


def check_combinations(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject shapes MEFT cannot have (E must divide N, P <= E, K_top <= P x N / E)."""
    for n in args.num_neurons:
        if args.num_experts is None:
            if n % DEFAULT_NEURONS_PER_EXPERT and n > DEFAULT_NEURONS_PER_EXPERT:
                ap.error(f"argument --num-neurons: {n} is not a multiple of {DEFAULT_NEURONS_PER_EXPERT} "
                         f"(the default N / --num-experts); pass --num-experts")
        for e in experts_for(n, args.num_experts):
            if n % e:
                ap.error(f"argument --num-neurons: {n} is not divisible by --num-experts {e} "
                         f"(each expert owns N / E neurons)")
            for p in args.experts_per_token:
                if p > e:
                    ap.error(f"argument --experts-per-token: {p} > --num-experts {e}")
                for k in args.topk:
                    if k > p * (n // e):
                        ap.error(f"argument --topk: {k} > --experts-per-token x --num-neurons / --num-experts "
                                 f"= {p} x {n} / {e} = {p * (n // e)} (the candidates of a token)")


def progress(items, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional dependency
        return items
    return tqdm(items, desc="sweep", unit="point", file=sys.stderr, disable=disable, dynamic_ncols=True)


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def run_sweep(args: argparse.Namespace, cuda: bool | None = None):
    """Run every point; returns (DataFrame, meta dict)."""
    import pandas as pd

    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = torch.device("cuda" if cuda else "cpu")
    mode = "cuda" if cuda else "cpu"
    threads_before = torch.get_num_threads()
    machine = describe_machine()  # before --threads: its cpu_count is torch's default thread count
    machine["cpu_cores"] = os.cpu_count()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine["threads"] = torch.get_num_threads()
    machine["load_average_before"] = load_average()
    points, skipped = build_points(args, cuda)
    nvml = metrics.NvmlMonitor()
    rows: list[dict] = []
    weights: tuple[Shape | None, Weights | None] = (None, None)
    bar = progress(points, args.no_progress)
    try:
        for point in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(point.label())
            if point.kind == "transfer":
                weights = (None, None)
                rows.append(measure_transfer_point(point, args, cuda, mode, machine))
                continue
            if weights[0] != point.shape:
                weights = (None, None)
                gc.collect()
                try:
                    weights = (point.shape, Weights(point.shape, device, args.seed))
                except Exception as exc:  # noqa: BLE001
                    row = blank_row(point, args, mode, machine)
                    row["note"] = "out of memory (inputs)" if is_out_of_memory(exc) else f"failed: {exc}"
                    rows.append(row)
                    continue
            rows.append(measure_step(point, weights[1], args, device, mode, machine, nvml))
    finally:
        nvml.close()
        transfer_store.cache_clear()
        torch.set_num_threads(threads_before)
    df = add_cross_row_columns(pd.DataFrame(rows, columns=COLUMN_NAMES))
    machine["load_average_after"] = load_average()
    meta = {"machine": machine, "mode": mode, "points": len(points), "skipped": skipped,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "gpu_needed": None if cuda else GPU_ONLY_LINE}
    return df, meta


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    df, meta = run_sweep(args, cuda)
    folder = args.out if args.out is not None else results_dir()
    meta["wall_s_measure"] = time.perf_counter() - start
    written = write_outputs(df, meta, folder, plots=not args.no_plots)
    meta["wall_s"] = time.perf_counter() - start
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    print(summary_markdown(df))
    if not cuda:
        print(GPU_ONLY_LINE)
    if meta["skipped"]:
        print("Skipped on this device: " + "; ".join(meta["skipped"]))
    print(f"wrote {len(written)} files to {folder} in {meta['wall_s']:.1f} s")
    return 0
