"""Measuring one point: a timed training step (times, memory, bytes, copy throughput) or a
transfer row, each as one output row; and the columns computed across rows."""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import traceback

import torch
from meft_triton.validation import is_out_of_memory

from .. import metrics
from ..metrics import NAN, Clock, Notes
from .columns import COLUMN_NAMES
from ..plan.routing import profile_from_dict
from ..plan.traffic import layer_traffic
from .grid import Point, Shape
from .transfer import engine_GBps, measure_transfer_rows, random_rows
from .workloads import Weights, Workload, estimate_bytes, make_workload

#: stage -> phase of the step (fwd / bwd / opt)
PHASE = {"router": "fwd", "keys": "fwd", "copy_wait": "fwd", "values": "fwd", "forward": "fwd", "backbone": "fwd",
         "backward": "bwd", "optimizer": "opt"}
#: breakdown column t_<name>_ms -> stages summed into it
BREAKDOWN = {"router": ("router",), "keys": ("keys",), "copy_wait": ("copy_wait",), "values": ("values",),
             "forward_fused": ("forward",), "backbone": ("backbone",), "backward": ("backward",),
             "optimizer": ("optimizer",)}
MACHINE_COLUMNS = ("device", "cpu", "threads", "driver", "cuda", "torch", "triton", "python")
STEP_BYTES = ("h2d_bytes_per_step", "d2h_bytes_per_step", "pcie_floor_bytes_per_step")


def isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def blank_row(point: Point, args: argparse.Namespace, mode: str, machine: dict) -> dict:
    """A point's row: its axes and the machine filled in, every measurement NaN."""
    s = point.shape
    row = dict.fromkeys(COLUMN_NAMES, NAN)
    row.update(kind=point.kind, mode=mode, preset=s.preset, hidden_size=s.hidden_size, layers=s.layers,
               layers_run=s.layers_run, dtype=s.dtype, backbone=s.backbone, impl=point.impl, placement=point.placement,
               transfer=point.transfer if point.placement == "cpu" else None,
               backward_rows=point.backward_rows if point.kind == "step" and point.placement == "cpu" else None,
               ist_ratio=point.ist_ratio if point.kind == "step" else NAN,
               micro_batches=point.micro_batches if point.kind == "step" else NAN,
               residency=point.residency if point.kind == "step" and point.placement == "cpu" else None,
               repeats=args.repeats, warmup=args.warmup, unique_rows_layers=None, adapter_counters=None, note="",
               **{k: machine.get(k) for k in MACHINE_COLUMNS})
    if point.kind == "step":
        row.update(num_neurons=s.num_neurons, num_experts=s.num_experts, experts_per_token=s.experts_per_token,
                   topk=s.topk, tokens=s.tokens)
    else:
        row.update(rows=point.rows, num_neurons=s.num_neurons)
    return row


def lora_rank_for(shape: Shape) -> int:
    """LoRA rank with the device bytes of the MEFT adapter under placement "cpu" (per layer)."""
    max_rows = min(shape.num_neurons, shape.tokens * shape.topk)
    mem = metrics.adapter_memory_bytes("cpu", num_neurons=shape.num_neurons, num_experts=shape.num_experts,
                                       hidden_size=shape.hidden_size, layers=1, row_dtype_bytes=shape.dtype_bytes,
                                       max_unique_rows=max_rows)
    return metrics.lora_rank_for_bytes(mem["gpu_bytes"], shape.hidden_size)


def measure_step(point: Point, w: Weights, args: argparse.Namespace, device: torch.device, mode: str,
                 machine: dict, nvml: metrics.NvmlMonitor) -> dict:
    """Warm-up, then ``args.repeats`` timed training steps of the point's workload."""
    s = point.shape
    cuda = device.type == "cuda"
    notes = Notes()
    row = blank_row(point, args, mode, machine)
    rank = lora_rank_for(s)
    if point.impl == "lora":
        row["lora_rank"] = rank
        if rank > s.hidden_size:
            notes.add(f"LoRA rank {rank} > d: matched memory is not low-rank")
    scale = s.layers / s.layers_run

    need = estimate_bytes(point, rank)
    avail = torch.cuda.mem_get_info()[0] if cuda else metrics.host_available_bytes()
    if not math.isnan(avail) and need > 0.85 * avail:
        notes.add(f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free")
        row["note"] = str(notes)
        return row

    workload = None
    try:
        workload = make_workload(point, w, device, notes, rank)
        metrics.reset_peak_rss()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            timed_step(workload, cuda)
        counters_before = counters(workload)
        samples, routings = [], []
        with nvml:
            for _ in range(args.repeats):
                samples.append(timed_step(workload, cuda))
                routings.append(getattr(workload, "routing", None))
        per_step = counter_delta(counters_before, counters(workload), args.repeats)
        stage_times(row, point, samples, scale, notes)
        memory(row, workload, cuda, nvml, notes)
        accounting(row, point, workload.unique_rows, scale)
        if point.placement == "cpu":
            predicted_traffic(row, point, routings, scale)
            copy_throughput(row, point, workload, per_step, scale, device, args, notes)
    except Exception as exc:  # noqa: BLE001 - one failing point must not end the sweep
        if is_out_of_memory(exc):
            notes.add("out of memory")
        else:
            notes.add(f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
            if args.verbose:
                traceback.print_exc()
    finally:
        if workload is not None:
            try:
                workload.close()
            except Exception as exc:  # noqa: BLE001
                notes.add(f"clean-up failed: {type(exc).__name__}: {str(exc)[:100]}")
        del workload
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    row["note"] = str(notes)
    return row


def timed_step(workload: Workload, cuda: bool) -> dict[str, float]:
    clock = Clock(cuda)
    clock.start()
    workload.step(clock)
    return clock.durations_ms()


def stage_times(row: dict, point: Point, samples: list[dict[str, float]], scale: float, notes: Notes) -> None:
    """Phase and step medians, tokens/s and the per-stage breakdown."""
    for phase in ("fwd", "bwd", "opt"):
        row[f"{phase}_ms"] = scale * statistics.median(
            sum(v for k, v in x.items() if PHASE[k] == phase) for x in samples)
    row["step_ms"] = scale * statistics.median(sum(x.values()) for x in samples)
    tokens = point.shape.tokens * point.micro_batches
    row["tokens_per_s"] = tokens / (row["step_ms"] * 1e-3) if row["step_ms"] > 0 else NAN
    stages = metrics.median_by_key(samples)
    for col, parts in BREAKDOWN.items():
        present = [stages[p] for p in parts if p in stages]
        row[f"t_{col}_ms"] = scale * sum(present) if present else NAN
    if point.impl == "meft":
        notes.add("MEFTAdapter forward timed whole: router/keys/values not split")


def memory(row: dict, workload: Workload, cuda: bool, nvml: metrics.NvmlMonitor, notes: Notes) -> None:
    if cuda:
        row["gpu_peak_alloc_bytes"] = float(torch.cuda.max_memory_allocated())
    row["gpu_peak_nvml_bytes"] = nvml.peak_used_bytes
    notes.add(nvml.error)
    row["pcie_tx_GBps"], row["pcie_rx_GBps"] = nvml.pcie_tx_GBps, nvml.pcie_rx_GBps
    row["host_rss_bytes"], row["host_peak_rss_bytes"] = metrics.host_rss_bytes()
    pinned, why = metrics.pinned_host_bytes()
    row["pinned_bytes"] = pinned if not math.isnan(pinned) else (workload.pinned_nbytes or NAN)
    if math.isnan(row["pinned_bytes"]):
        notes.add(why)


def counters(workload: Workload) -> dict[str, float]:
    fn = getattr(workload, "counters", None)
    return fn() if fn is not None else {}


def counter_delta(before: dict[str, float], after: dict[str, float], steps: int) -> dict[str, float]:
    """Per-step values of cumulative counters."""
    return {k: (v - before.get(k, 0.0)) / steps for k, v in after.items()}


def accounting(row: dict, point: Point, unique_rows: list[int], scale: float) -> None:
    """Memory and transfer bytes by accounting, from the shape and the active rows."""
    s = point.shape
    if unique_rows:
        row["unique_rows_per_layer"] = sum(unique_rows) / len(unique_rows)
        row["unique_rows_layers"] = ";".join(map(str, unique_rows))
    if point.impl in ("meft", "reference"):
        max_rows = max(unique_rows) if unique_rows else min(s.num_neurons, s.tokens * s.topk)
        mem = metrics.adapter_memory_bytes(point.placement, num_neurons=s.num_neurons, num_experts=s.num_experts,
                                           hidden_size=s.hidden_size, layers=s.layers,
                                           row_dtype_bytes=s.dtype_bytes, max_unique_rows=max_rows,
                                           backward_rows=point.backward_rows or "refetch")
        row["adapter_gpu_bytes"], row["adapter_host_bytes"] = mem["gpu_bytes"], mem["host_bytes"]
    else:
        per_layer = {"meft-original": (s.num_experts + 2 * s.num_neurons) * s.hidden_size,
                     "dense": 2 * s.num_neurons * s.hidden_size,
                     "lora": 2 * (row["lora_rank"] if not isnan(row["lora_rank"]) else 0) * s.hidden_size}[point.impl]
        row["adapter_gpu_bytes"] = metrics.dense_memory_bytes(per_layer, s.layers)
        row["adapter_host_bytes"] = 0
    if point.placement == "gpu":
        row.update(dict.fromkeys(STEP_BYTES, 0.0))


def predicted_traffic(row: dict, point: Point, routings: list[list[dict]], scale: float) -> None:
    """Placement "cpu": the planner's bytes per optimizer step (profiling/plan/traffic.py) for
    the routing each timed step saw (their mean), each layer's floor (every row the step touched
    once each way in the compute dtype), and the measured bytes against that floor. The budgets
    hold every row here ("auto" without device memory to share), so the planner's counts are
    exact."""
    s = point.shape
    totals = dict.fromkeys(("h2d_bytes_per_step", "d2h_bytes_per_step", "pcie_floor_bytes_per_step"), 0.0)
    touched = 0.0
    for routing in routings:
        profile = profile_from_dict({"num_neurons": s.num_neurons, "layers": routing}, layers=len(routing),
                                    num_neurons=s.num_neurons, micro_batches=point.micro_batches,
                                    source="a timed step")
        traffic = [layer_traffic(layer, policy=point.residency, hidden=s.hidden_size, key_width=s.hidden_size,
                                 es=s.dtype_bytes, backward_rows=point.backward_rows, transfer=point.transfer,
                                 id_bound=min(s.num_neurons, s.tokens * s.topk), num_neurons=s.num_neurons)
                   for layer in profile.layers]
        totals["h2d_bytes_per_step"] += sum(t.h2d for t in traffic)
        totals["d2h_bytes_per_step"] += sum(t.d2h for t in traffic)
        totals["pcie_floor_bytes_per_step"] += sum(t.floor for t in traffic)
        touched += sum(layer.per_step for layer in profile.layers) / len(profile.layers)
    row.update({k: scale * v / len(routings) for k, v in totals.items()})
    row["rows_touched_per_step"] = touched / len(routings)


def copy_throughput(row: dict, point: Point, workload: Workload, per_step: dict[str, float], scale: float,
                    device: torch.device, args: argparse.Namespace, notes: Notes) -> None:
    """Placement "cpu": the library's counters, and the step's rows copied standalone through
    its Prefetcher and copy engine (copy_ms, achieved GB/s) vs a plain memcpy of the same bytes."""
    s = point.shape
    row["adapter_counters"] = json.dumps(per_step, sort_keys=True)
    row["h2d_bytes_measured"] = per_step["bytes_to_device"] * scale
    row["d2h_bytes_measured"] = per_step["bytes_to_host"] * scale
    measured = row["h2d_bytes_measured"] + row["d2h_bytes_measured"]
    row["pcie_vs_floor"] = measured / row["pcie_floor_bytes_per_step"] if row["pcie_floor_bytes_per_step"] else NAN
    rows = max(1, round(row["unique_rows_per_layer"]))
    store = workload.adapters[0].offload.store
    repeats = max(3, args.repeats)
    h2d, d2h = engine_GBps(store, random_rows(store.num_rows, rows), s.torch_dtype, device, point.transfer, repeats)
    row["copy_ms"] = (row["h2d_bytes_per_step"] / h2d + row["d2h_bytes_per_step"] / d2h) / 1e9 * 1e3
    row["achieved_GBps"] = (row["h2d_bytes_per_step"] + row["d2h_bytes_per_step"]) / (row["copy_ms"] * 1e-3) / 1e9
    per_copy = rows * s.hidden_size * s.dtype_bytes
    if device.type == "cuda":
        row["memcpy_GBps"], why = metrics.pinned_memcpy_GBps(per_copy, "h2d", repeats=repeats)
        notes.add(why)
    else:
        notes.add("CPU compute: rows copied by the library's CPU copy engine (worker thread), no PCIe")
        row["memcpy_GBps"] = metrics.host_memcpy_GBps(per_copy, repeats=repeats)
    row["achieved_vs_memcpy"] = row["achieved_GBps"] / row["memcpy_GBps"]


def measure_transfer_point(point: Point, args: argparse.Namespace, cuda: bool, mode: str, machine: dict) -> dict:
    row = blank_row(point, args, mode, machine)
    try:
        t = measure_transfer_rows(point.shape, point.rows, max(3, args.repeats), cuda)
    except Exception as exc:  # noqa: BLE001
        row["note"] = "out of memory" if is_out_of_memory(exc) else f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        return row
    row.update(t)
    s = point.shape
    if cuda:
        row["achieved_GBps"], row["memcpy_GBps"] = t["h2d_cpu_gather_GBps"], t["pinned_h2d_GBps"]
        row["h2d_bytes_per_step"] = point.rows * s.hidden_size * s.dtype_bytes
    else:
        row["achieved_GBps"], row["memcpy_GBps"] = t["gather_GBps"], t["host_memcpy_GBps"]
        row["h2d_bytes_per_step"] = point.rows * s.hidden_size * 4
    row["achieved_vs_memcpy"] = row["achieved_GBps"] / row["memcpy_GBps"]
    row["host_rss_bytes"], row["host_peak_rss_bytes"] = metrics.host_rss_bytes()
    return row


def add_cross_row_columns(df):
    """speedup_vs_reference (the same shape's reference step / this step) and, for placement
    "cpu", the share of copy time hidden, estimated from the same shape's placement-"gpu" step."""
    keys = ["preset", "hidden_size", "num_neurons", "num_experts", "experts_per_token", "topk", "tokens", "dtype",
            "backbone"]
    steps = df[df["kind"] == "step"]
    for _, group in steps.groupby(keys, dropna=False):
        ref = group[(group["impl"] == "reference") & (group["placement"] == "gpu")]["step_ms"].dropna()
        if len(ref):
            df.loc[group.index, "speedup_vs_reference"] = float(ref.iloc[0]) / group["step_ms"]
        dev = group[(group["impl"] == "meft") & (group["placement"] == "gpu")]["step_ms"].dropna()
        if not len(dev):
            continue
        for i in group.index[(group["impl"] == "meft") & (group["placement"] == "cpu")]:
            if df.at[i, "copy_ms"] > 0:
                overhead = df.at[i, "step_ms"] - float(dev.iloc[0])
                df.at[i, "copy_hidden_share"] = min(1.0, max(0.0, 1.0 - overhead / df.at[i, "copy_ms"]))
    return df
