"""``python -m profiling.plan``: the command line and its tables (markdown) or ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from meft_triton import MEFTConfig
from meft_triton.config import BACKWARD_ROWS, GRADIENT_FORMS, TRANSFERS

from .data_parallel import Parallel
from .inputs import DTYPE_BYTES, Batch, load_gpu, resolve_model
from .planner import GiB, Budgets, best, plan, why_nothing_fits
from .routing import load_profile, uniform_profile

GPUS = ("rtx-4090", "a100-80gb", "h100-sxm", "h100-pcie", "h200")
MEFT_FIELDS = ("num_neurons", "num_experts", "experts_per_token", "topk", "low_key_dim",
               "backward_rows", "transfer", "gradient_form")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiling.plan", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--model", required=True, help="paper-7b, scale-7b (DESIGN.md section 2) or PATH/config.json")
    p.add_argument("--gpu", required=True, choices=GPUS)
    p.add_argument("--tokens", type=int, help="tokens per micro-batch (preset default)")
    p.add_argument("--micro-batches", type=int, help="micro-batches per optimizer step (preset default)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_BYTES), help="compute dtype")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--routing", metavar="PATH", help="routing profile JSON (profiling/plan/routing.py); "
                   "default: uniform routing")
    m = p.add_argument_group("MEFT fields (preset defaults)")
    for name in ("num_neurons", "num_experts", "experts_per_token", "topk", "low_key_dim"):
        m.add_argument("--" + name.replace("_", "-"), type=int)
    m.add_argument("--backward-rows", choices=BACKWARD_ROWS, help="default: both are planned")
    m.add_argument("--transfer", choices=TRANSFERS, help="default: both are planned")
    m.add_argument("--gradient-form", choices=GRADIENT_FORMS, help="resident policy; default: both are planned")
    g = p.add_argument_group("GPU and host overrides")
    g.add_argument("--memory-gb", type=float, help="GPU memory, GiB")
    g.add_argument("--hbm-gbs", type=float, help="HBM bandwidth, GB/s")
    g.add_argument("--pcie-gbs", type=float, help="PCIe bandwidth per direction, GB/s")
    g.add_argument("--tflops", type=float, help="tensor-core rate of the compute dtype, TFLOP/s")
    g.add_argument("--host-ram-gb", type=float, help="CPU RAM for the adapter, GiB")
    g.add_argument("--host-gbs", type=float, help="CPU memory bandwidth the CPU AdamW reaches, GB/s")
    g.add_argument("--reserve-gb", type=float, default=1.0, help="GPU memory kept free (CUDA context, "
                   "allocator slack), GiB (default 1)")
    r = p.add_argument_group('resident policy budgets (default "auto": what the step needs, or what is free)')
    r.add_argument("--value-budget-gb", type=float)
    r.add_argument("--grad-budget-gb", type=float)
    d = p.add_argument_group("data parallel (meft_triton.distributed)")
    d.add_argument("--world-size", type=int, default=1, help="ranks, one GPU each; each trains --tokens x "
                   "--micro-batches per step (default 1)")
    d.add_argument("--gpus-per-node", type=int, help="ranks per node, sharing one CPU master under placement "
                   "cpu (default: the world size up to 8)")
    p.add_argument("--json", action="store_true", help="one JSON record per candidate, one per line")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    scale = {"memory_gb": ("memory_bytes", GiB), "hbm_gbs": ("hbm_bytes_per_s", 1e9),
             "pcie_gbs": ("pcie_bytes_per_s", 1e9), "host_ram_gb": ("host_ram_bytes", GiB),
             "host_gbs": ("host_bytes_per_s", 1e9)}
    for flag, (key, unit) in scale.items():
        value = getattr(args, flag)
        if value is not None:
            if not value > 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
            out[key] = value * unit
    if args.tflops is not None:
        if not args.tflops > 0:
            raise ValueError(f"--tflops must be > 0, got {args.tflops}")
        key = "tf32_tensor" if args.dtype == "fp32" else f"{args.dtype}_tensor"
        out["flops_per_s"] = {key: args.tflops * 1e12}
    return out


def _gib_or_none(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if value < 0:
        raise ValueError(f"--{name} must be >= 0, got {value}")
    return value * GiB


def run(argv: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Parse ``argv`` and plan: (records, context for the report)."""
    args = parser().parse_args(argv)
    backbone, defaults = resolve_model(args.model)
    for name in ("tokens", "micro_batches"):
        if getattr(args, name) is None and name not in defaults:
            raise ValueError(f"--{name.replace('_', '-')} is required with a config.json model")
    batch = Batch(args.tokens if args.tokens is not None else defaults["tokens"],
                  args.micro_batches if args.micro_batches is not None else defaults["micro_batches"],
                  args.dtype, args.gradient_checkpointing)
    given = {k: getattr(args, k) for k in MEFT_FIELDS if getattr(args, k) is not None}
    preset = {k: v for k, v in defaults.items() if k in MEFT_FIELDS}
    config = MEFTConfig(**{**preset, **given})
    if args.reserve_gb < 0:
        raise ValueError(f"--reserve-gb must be >= 0, got {args.reserve_gb}")
    gpu = load_gpu(args.gpu, _overrides(args))
    shape = dict(layers=backbone.layers, num_neurons=config.num_neurons, micro_batches=batch.micro_batches)
    profile = (load_profile(args.routing, **shape) if args.routing else
               uniform_profile(tokens=batch.tokens, topk=config.topk, **shape))
    budgets = Budgets(_gib_or_none("value-budget-gb", args.value_budget_gb),
                      _gib_or_none("grad-budget-gb", args.grad_budget_gb))
    parallel = Parallel(args.world_size, args.gpus_per_node)
    records = plan(gpu, backbone, batch, config, profile, fixed=set(given), reserve_bytes=args.reserve_gb * GiB,
                   budgets=budgets, parallel=parallel)
    return records, dict(gpu=gpu, backbone=backbone, batch=batch, config=config, profile=profile, json=args.json,
                         parallel=parallel)


def _fmt_gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def summary_table(records: list[dict[str, Any]]) -> str:
    head = ("| placement | policy | gradients | backward_rows | transfer | fits | adapter GPU GiB | total GPU GiB | "
            "CPU RAM GiB | PCIe GB/step | × floor | compute s | exposed PCIe s | exposed CPU s | "
            "predicted s | × compute |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        ratio = "–" if r["pcie_over_floor"] is None else f"{r['pcie_over_floor']:.2f}"
        rows.append(
            f"| {r['placement']} | {r['policy']} | {r['gradient_form'] if r['policy'] == 'resident' else '–'} | "
            f"{r['backward_rows'] if r['placement'] == 'cpu' else '–'} | "
            f"{r['transfer'] if r['placement'] == 'cpu' else '–'} | {'yes' if r['fits'] else 'no'} | "
            f"{_fmt_gib(r['adapter_gpu_bytes'])} | {_fmt_gib(r['total_gpu_bytes'])} | "
            f"{_fmt_gib(r['cpu_ram_total_bytes'])} | {r['pcie_bytes_per_step'] / 1e9:.1f} | {ratio} | "
            f"{r['compute_s']:.3f} | {r['exposed_pcie_s']:.3f} | {r['exposed_cpu_s']:.3f} | "
            f"{r['predicted_step_s']:.3f} | {r['predicted_step_s'] / r['compute_s']:.2f} |")
    return "\n".join(rows)


def data_parallel_table(records: list[dict[str, Any]]) -> str:
    """Per candidate: the CPU RAM of a node and the gradient bytes a rank sends per step."""
    head = ("| placement | policy | backward_rows | transfer | CPU RAM per node GiB | gradient MB sent per rank "
            "per step | dense all-reduce MB | keys/values reduced by |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        cpu = r["placement"] == "cpu"
        rows.append(f"| {r['placement']} | {r['policy']} | {r['backward_rows'] if cpu else '–'} | "
                    f"{r['transfer'] if cpu else '–'} | {_fmt_gib(r['cpu_ram_total_bytes'])} | "
                    f"{r['grad_bytes_sent_per_rank'] / 1e6:.1f} | {r['grad_bytes_dense_allreduce'] / 1e6:.1f} | "
                    f"{r['grad_reduction']} |")
    return "\n".join(rows)


def components_table(records: list[dict[str, Any]]) -> str:
    """GPU and CPU bytes by component, for the fastest variant of each (placement, policy,
    gradient form)."""
    groups: dict[tuple[str, str, str], dict] = {}
    for r in records:
        key = (r["placement"], r["policy"], r["gradient_form"])
        if key not in groups or r["predicted_step_s"] < groups[key]["predicted_step_s"]:
            groups[key] = r
    cols = list(groups.values())
    names: list[str] = []
    for r in cols:
        names += [k for k in r["gpu_bytes"] if k not in names]
    ram_names: list[str] = []
    for r in cols:
        ram_names += [k for k in r["cpu_ram_bytes"] if k not in ram_names]
    head = "| GiB | " + " | ".join(f"{r['placement']}, {r['policy']}" + (
        f" {r['gradient_form']}" if r["policy"] == "resident" else "") + (
        f" ({r['backward_rows']}, {r['transfer']})" if r["placement"] == "cpu" else "") for r in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for n in names:
        lines.append(f"| GPU: {n} | " + " | ".join(
            _fmt_gib(r["gpu_bytes"][n]) if n in r["gpu_bytes"] else "–" for r in cols) + " |")
    lines.append("| **GPU total** (usable: " + _fmt_gib(cols[0]["usable_gpu_bytes"]) + ") | " +
                 " | ".join(f"**{_fmt_gib(r['total_gpu_bytes'])}**" for r in cols) + " |")
    for n in ram_names:
        lines.append(f"| CPU: {n} | " + " | ".join(
            _fmt_gib(r["cpu_ram_bytes"][n]) if n in r["cpu_ram_bytes"] else "–" for r in cols) + " |")
    per_node = " per node" if cols[0]["world_size"] > 1 else ""
    lines.append(f"| **CPU RAM total{per_node}** (host: " + _fmt_gib(cols[0]["host_ram_bytes"]) + ") | " +
                 " | ".join(f"**{_fmt_gib(r['cpu_ram_total_bytes'])}**" for r in cols) + " |")
    return "\n".join(lines)


def report(records: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    gpu, backbone, batch, config, profile = (ctx[k] for k in ("gpu", "backbone", "batch", "config", "profile"))
    layer = profile.layers[0]
    head = (f"Plan (predicted, not measured): {backbone.name} ({backbone.params / 1e9:.2f} B params, "
            f"{backbone.layers} layers, d = {backbone.hidden_size}) on {gpu.device}; "
            f"N = {config.num_neurons}, E = {config.num_experts}, P = {config.experts_per_token}, "
            f"K_top = {config.topk}; {batch.tokens} tokens x {batch.micro_batches} micro-batches per step, "
            f"{batch.dtype}{', gradient checkpointing' if batch.checkpointing else ''}; routing: {profile.source} "
            f"(layer 0: {layer.per_micro_batch[0]} rows per micro-batch, {layer.per_step} per step)")
    parallel = ctx["parallel"]
    if parallel.world_size > 1:
        head += (f"; data parallel: {parallel.world_size} ranks, {parallel.gpus_per_node} per node "
                 f"({parallel.nodes} node{'s' if parallel.nodes > 1 else ''}), each with this batch")
    out = [head, "", summary_table(records), "", components_table(records), ""]
    if parallel.world_size > 1:
        out[-1:-1] = ["", data_parallel_table(records)]
    chosen = best(records)
    if chosen is None:
        out.append(why_nothing_fits(records))
    else:
        form = f", gradient_form {chosen['gradient_form']!r}" if chosen["policy"] == "resident" else ""
        out.append(f"fastest that fits: placement {chosen['placement']!r}, policy {chosen['policy']!r}{form}, "
                   f"predicted {chosen['predicted_step_s']:.3f} s per step "
                   f"({chosen['predicted_step_s'] / chosen['compute_s']:.2f}x its GPU compute)")
        out.append(chosen["meft_config"])
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        records, ctx = run(argv)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ctx["json"]:
        for r in records:
            print(json.dumps(r, sort_keys=True))
    else:
        print(report(records, ctx))
    return 0
