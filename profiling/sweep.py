"""The profiling sweep: what an adapter of N neurons costs in tokens/s, memory and PCIe traffic.

    python -m profiling.sweep --quick                  # small sweep for the device it finds
    python -m profiling.sweep --preset llama-7b --num-neurons 16384,65536 --tokens 4096 \\
        --placement gpu,cpu --transfer cpu_gather,zero_copy --backward-rows refetch,keep
    python -m profiling.sweep --quick --out /tmp/sweep --no-plots

Every axis flag takes one or more values (``--num-neurons 1024,4096`` or ``--num-neurons
1024 4096``); the sweep runs their product. A flag not given takes its value from the defaults
in :mod:`profiling.presets` for the device found (``--quick``: the small set). ``--num-experts``
defaults to N / 64 (MEFT's 64 neurons per expert).

What runs, per shape (preset d and layers, N, E, P, K_top, tokens, dtype):

* **with CUDA**: ``impl="meft"`` (the :class:`MEFTAdapter`: Triton kernels) once per placement
  ("gpu"; "cpu" once per transfer engine x backward row policy), then the baselines:
  ``reference`` (``meft_triton.reference`` through autograd, timed stage by stage),
  ``meft-original`` (MEFT's dense-masked formulation: dense [T, N] scores and activations),
  ``dense`` (a d -> N -> d ReLU MLP of the same N) and ``lora`` (a low-rank pair whose rank
  gives it the device memory of the MEFT adapter under placement "cpu"). Every training step
  is forward + backward + optimizer (fused AdamW for device parameters).
* **without CUDA** (the CPU subset): ``impl="reference"`` per placement, as the placement's
  host-side work would run: "gpu" = the reference path + dense AdamW over the whole adapter;
  "cpu" = the reference path reading its value rows from a :class:`CPURowStore` gather into a
  staging buffer (again for the backward with "refetch"), packing the key/value gradient rows,
  :class:`SparseRowAdamW` on the touched rows and writing the updated key rows back into the
  key cache. Plus the baselines above except the Triton adapter. "zero_copy" needs a GPU and
  is skipped. One printed line says which curves need a GPU.
* ``kind="transfer"`` rows: host gather (and gather + cast to the compute dtype) throughput of
  ``--transfer-rows`` rows from a :class:`CPURowStore` vs a plain memcpy of the same bytes;
  with CUDA also the host->device copy end to end (gather + pinned H2D), the zero-copy gather,
  device->host gradient rows, and plain pinned memcpy both ways.

No real model runs: per layer only the adapter and, with ``--backbone ffn`` (the default with
CUDA), a frozen SwiGLU FFN of the preset's size beside it, so that placement "cpu" can hide its
value-row copy behind the FFN as in a model (``start_routing`` -> FFN -> ``finish_values``).
Each layer's input requires grad (the adapter must return dh). ``--max-layers`` layers are run
(each with its own weights and its own random input); times and bytes are scaled to the
preset's layers.
Timing: warm-up steps excluded, median of ``--repeats`` steps; CUDA events on the GPU,
``time.perf_counter`` on the CPU. A point that runs out of memory, would need more memory than
is free, or fails, is kept with NaN and a ``note``; nothing that cannot be measured here (NVML,
pinned memory, ...) stops the sweep.

Output, under ``profiling/results/<device>/<timestamp>/`` (or ``--out DIR``): ``sweep.csv`` and
``sweep.json`` (one row per point, the columns below), ``meta.json`` (machine, arguments, wall
time), ``summary.md`` (the printed table) and the PNG plots of :mod:`profiling.plots`.

CSV columns (times in ms per training step of all ``layers`` layers, scaled from the
``layers_run`` layers run; bytes per step likewise; NaN where not applicable or not measurable
here, and ``note`` says why):

======================  ==============================================================================
kind                    "step" (a training step of an adapter stack) or "transfer" (row copies)
mode                    "cuda" (measured on the GPU) or "cpu" (CPU subset / host-side emulation)
preset                  model-shape preset (llama-7b, mistral-7b, tiny)
hidden_size             d
layers                  adapted layers of the preset (or ``--layers``)
layers_run              layers actually run; times and bytes are scaled by layers / layers_run
num_neurons             N per layer (transfer rows: rows of the store gathered from)
num_experts             E
experts_per_token       P
topk                    K_top
tokens                  tokens per micro-batch
dtype                   compute dtype (masters and optimizer state are fp32)
backbone                "none" (adapter stack only) or "ffn" (a frozen SwiGLU FFN of the preset's
                        size beside every adapter: the compute placement "cpu" hides copies behind)
impl                    meft | reference | meft-original | dense | lora | transfer
placement               gpu | cpu ("gpu" for the baselines: everything on the compute device)
transfer                transfer engine (placement "cpu"): cpu_gather | zero_copy
backward_rows           backward row policy (placement "cpu"): refetch | keep
ist_ratio               fraction of layers IST trains per step (meft only, uniform selection;
                        1 = every layer): frozen layers move no gradient rows, run no optimizer
lora_rank               rank of the LoRA baseline (its device bytes = MEFT's under placement "cpu")
repeats                 timed steps (median)
warmup                  excluded steps before timing
fwd_ms                  forward (router, keys, row copies, values)
bwd_ms                  backward (incl. the backward refetch and the gradient-row packing)
opt_ms                  optimizer step (incl. the key-cache refresh)
step_ms                 whole training step (sum of the three)
tokens_per_s            tokens / step_ms (adapter stack, plus the frozen FFN with --backbone ffn)
t_router_ms             breakdown: router logits and top-P experts
t_keys_ms               breakdown: candidate key scores and top-K_top
t_copy_wait_ms          breakdown: row gathers, backward refetch, gradient-row packing, key refresh
t_values_ms             breakdown: y = sum a_j V_j
t_forward_fused_ms      breakdown: a forward timed whole (MEFTAdapter, baselines; placement "cpu" with
                        the FFN: its start_routing + finish_values, i.e. incl. any copy wait)
t_backbone_ms           breakdown: the frozen FFN's forward (``--backbone ffn``)
t_backward_ms           breakdown: autograd backward (incl. the FFN's backward to h)
t_optimizer_ms          breakdown: dense AdamW / SparseRowAdamW
speedup_vs_reference    step_ms of the reference (placement gpu) of the same shape / this step_ms
gpu_peak_alloc_bytes    torch allocator peak during the timed steps (CUDA)
gpu_peak_nvml_bytes     NVML used device memory, peak of samples during the timed steps
adapter_gpu_bytes       accounting: device bytes of the adapter stack (fp32 masters, grads, AdamW)
adapter_host_bytes      accounting: host bytes (placement "cpu": master rows, moments, staging)
host_rss_bytes          process RSS after the point
host_peak_rss_bytes     peak RSS during the point (Linux clear_refs + VmHWM)
pinned_bytes            pinned host bytes (torch's host allocator; else the stores' pinned bytes)
unique_rows_per_layer   mean distinct active neurons per layer
unique_rows_layers      distinct active neurons of each layer run, ";"-separated
h2d_bytes_per_step      accounting, unique rows x row bytes: value rows for the forward (+ again for
                        the backward with "refetch") + updated key rows, in the compute dtype. On a
                        machine without a GPU: the bytes placement "cpu" WOULD move
d2h_bytes_per_step      accounting: unique rows x (key + value gradient row) x d x 4 B
h2d_rows_per_step       rows behind h2d_bytes_per_step
d2h_rows_per_step       rows behind d2h_bytes_per_step
h2d_bytes_measured      the adapter's own counters (``transfer_stats``, else its runtime's
                        ``bytes_to_device``)
d2h_bytes_measured      likewise (``bytes_to_host``)
copy_ms                 time spent copying rows (staged reference: its gather/packing stages; CUDA:
                        the adapter's copy timers, else the same rows copied standalone)
achieved_GBps           (h2d + d2h bytes) / copy_ms; transfer rows: the default path end to end
memcpy_GBps             plain memcpy of the same bytes in the same run (pinned H2D on CUDA, host
                        memcpy on CPU)
achieved_vs_memcpy      achieved_GBps / memcpy_GBps
copy_hidden_share       share of copy time hidden behind compute (CUDA: adapter timers, else
                        1 - (step_ms cpu - step_ms gpu placement) / copy_ms)
pcie_tx_GBps            NVML PCIe TX (device -> host) throughput, mean of samples while timing
pcie_rx_GBps            NVML PCIe RX (host -> device) throughput, mean of samples while timing
rows                    transfer rows: rows copied
gather_GBps             CPURowStore.gather of fp32 value rows (payload bytes / s)
gather_cast_GBps        gather + round to the compute dtype (payload bytes written / s)
host_memcpy_GBps        plain host copy of the same fp32 payload
h2d_cpu_gather_GBps     gather into pinned staging + H2D copy, end to end (CUDA)
h2d_zero_copy_GBps      zero-copy gather kernel reading pinned host rows (CUDA)
pinned_h2d_GBps         plain pinned memcpy host -> device of the same bytes (CUDA)
d2h_GBps                fp32 gradient rows [rows, 2d] device -> pinned host (CUDA)
pinned_d2h_GBps         plain pinned memcpy device -> host of the same bytes (CUDA)
device                  CUDA device name, or "cpu"
cpu                     CPU model
threads                 torch CPU threads
driver                  NVIDIA driver (NVML)
cuda                    CUDA version of the torch build
torch                   torch version
triton                  triton version
python                  python version
adapter_counters        the adapter's raw transfer counters per step, JSON
note                    what could not be measured here, and why
======================  ==============================================================================
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from meft_triton import MEFTConfig, reference
from meft_triton.config import BACKWARD_ROWS, PLACEMENTS, TRANSFERS
from . import metrics
from .environment import describe_machine, results_dir
from .metrics import NAN, Clock, Notes
from .presets import DEFAULT_NEURONS_PER_EXPERT, PRESETS, sweep_defaults

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASELINES = ("reference", "meft-original", "dense", "lora")

#: stage -> phase of the step (fwd / bwd / opt)
PHASE = {"router": "fwd", "keys": "fwd", "copy_wait": "fwd", "values": "fwd", "forward": "fwd", "backbone": "fwd",
         "refetch": "bwd", "backward": "bwd", "grad_pack": "bwd", "optimizer": "opt", "key_refresh": "opt"}
#: breakdown column -> stages summed into it
BREAKDOWN = {
    "router": ("router",),
    "keys": ("keys",),
    "copy_wait": ("copy_wait", "refetch", "grad_pack", "key_refresh"),
    "values": ("values",),
    "forward_fused": ("forward",),
    "backbone": ("backbone",),
    "backward": ("backward",),
    "optimizer": ("optimizer",),
}
COPY_STAGES = BREAKDOWN["copy_wait"]

GPU_ONLY_LINE = (
    "No CUDA device: ran the CPU subset (reference path per placement, CPU optimizer, host gather/packing "
    "vs memcpy); these need a GPU: Triton kernel times, H2D/D2H PCIe GB/s and copy time hidden behind "
    "compute, measured GPU memory (torch allocator, NVML), NVML PCIe counters, the zero_copy transfer."
)

COLUMNS = [
    "kind", "mode", "preset", "hidden_size", "layers", "layers_run", "num_neurons", "num_experts",
    "experts_per_token", "topk", "tokens", "dtype", "backbone", "impl", "placement", "transfer", "backward_rows", "ist_ratio",
    "lora_rank", "repeats", "warmup",
    "fwd_ms", "bwd_ms", "opt_ms", "step_ms", "tokens_per_s",
    *[f"t_{k}_ms" for k in BREAKDOWN], "speedup_vs_reference",
    "gpu_peak_alloc_bytes", "gpu_peak_nvml_bytes", "adapter_gpu_bytes", "adapter_host_bytes",
    "host_rss_bytes", "host_peak_rss_bytes", "pinned_bytes",
    "unique_rows_per_layer", "unique_rows_layers", "h2d_bytes_per_step", "d2h_bytes_per_step",
    "h2d_rows_per_step", "d2h_rows_per_step", "h2d_bytes_measured", "d2h_bytes_measured",
    "copy_ms", "achieved_GBps", "memcpy_GBps", "achieved_vs_memcpy", "copy_hidden_share",
    "pcie_tx_GBps", "pcie_rx_GBps",
    "rows", "gather_GBps", "gather_cast_GBps", "host_memcpy_GBps", "h2d_cpu_gather_GBps",
    "h2d_zero_copy_GBps", "pinned_h2d_GBps", "d2h_GBps", "pinned_d2h_GBps",
    "device", "cpu", "threads", "driver", "cuda", "torch", "triton", "python",
    "adapter_counters", "note",
]


# ============================================================================ points
@dataclass(frozen=True)
class Shape:
    preset: str
    hidden_size: int
    layers: int
    layers_run: int
    num_neurons: int
    num_experts: int
    experts_per_token: int
    topk: int
    tokens: int
    dtype: str
    backbone: str = "none"
    ffn_hidden: int = 0

    @property
    def neurons_per_expert(self) -> int:
        return self.num_neurons // self.num_experts

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return metrics.dtype_bytes(self.torch_dtype)


@dataclass(frozen=True)
class Point:
    shape: Shape
    impl: str
    placement: str = "gpu"
    transfer: str | None = None
    backward_rows: str | None = None
    ist_ratio: float = 1.0
    kind: str = "step"
    rows: int | None = None  # transfer points

    def label(self) -> str:
        s = self.shape
        if self.kind == "transfer":
            return f"transfer rows={self.rows} d={s.hidden_size}"
        extra = f" {self.transfer}/{self.backward_rows}" if self.placement == "cpu" else ""
        ist = f" ist={self.ist_ratio:g}" if self.ist_ratio < 1 else ""
        return f"N={s.num_neurons} T={s.tokens} {self.impl}[{self.placement}{extra}{ist}]"


def experts_for(num_neurons: int, explicit: list[int] | None) -> list[int]:
    if explicit:
        return explicit
    return [max(1, num_neurons // DEFAULT_NEURONS_PER_EXPERT)]


def build_points(args: argparse.Namespace, cuda: bool) -> tuple[list[Point], list[str]]:
    """The sweep's points in run order, and remarks about axes skipped on this device."""
    points: list[Point] = []
    skipped: list[str] = []
    for preset in args.preset:
        base = PRESETS[preset]
        d = args.hidden_size or base.hidden_size
        ffn = max(1, base.ffn_hidden * d // base.hidden_size)  # keep the preset's FFN ratio
        layers = args.layers or base.layers
        layers_run = min(layers, args.max_layers)
        for dtype in args.dtype:
            for n in args.num_neurons:
                for e in experts_for(n, args.num_experts):
                    for p in args.experts_per_token:
                        for k in args.topk:
                            for t in args.tokens:
                                shape = Shape(preset, d, layers, layers_run, n, e, p, k, t, dtype,
                                              args.backbone, ffn)
                                points += _shape_points(shape, args, cuda, skipped)
            store_rows = max([*args.num_neurons, *args.transfer_rows])
            shape = Shape(preset, d, layers, layers_run, store_rows, 1, 1, 1, 1, dtype, "none", ffn)
            points += [Point(shape, "transfer", placement="cpu", transfer="cpu_gather", kind="transfer", rows=r)
                       for r in args.transfer_rows]
    return points, sorted(set(skipped))


def _shape_points(shape: Shape, args: argparse.Namespace, cuda: bool, skipped: list[str]) -> list[Point]:
    # on CPU the staged reference runs per placement too (host-side emulation, stage breakdown)
    impls = ["meft"] if cuda else ["meft", "reference"]
    out = []
    for impl in impls:
        ratios = args.ist_ratio if impl == "meft" else [1.0]
        for placement in args.placement:
            if placement == "gpu":
                out += [Point(shape, impl, "gpu", ist_ratio=r) for r in ratios]
                continue
            for transfer in args.transfer:
                if transfer == "zero_copy" and not cuda:
                    skipped.append("transfer zero_copy (needs a GPU)")
                    continue
                for rows in args.backward_rows:
                    out += [Point(shape, impl, "cpu", transfer, rows, ist_ratio=r) for r in ratios]
    for b in args.baselines:
        if b == "reference" and not cuda:
            continue  # on CPU the reference already runs per placement above
        out.append(Point(shape, b, "gpu"))
    return out


# ============================================================================ workloads
def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def _dense_adamw(params: list[torch.Tensor], notes: Notes) -> torch.optim.Optimizer:
    """torch's fused AdamW (foreach where fused is unavailable)."""
    try:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        return opt
    except (RuntimeError, ValueError, TypeError):
        notes.add("dense AdamW: foreach (fused unavailable)")
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)


class Weights:
    """Per-shape inputs (leaves that require grad: a real adapter must return dh) and fp32 adapter
    weights of ``layers_run`` layers, shared by the impls; with ``backbone="ffn"`` also one frozen
    SwiGLU FFN in the compute dtype that every layer runs beside its adapter."""

    def __init__(self, shape: Shape, device: torch.device, seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        s, dt = shape, shape.torch_dtype
        self.hidden, self.grad_out, self.router, self.keys, self.values = [], [], [], [], []
        for _ in range(s.layers_run):
            keys = torch.randn(s.num_neurons, s.hidden_size, device=device, generator=gen) * 0.02
            self.keys.append(keys)
            self.values.append(torch.randn(s.num_neurons, s.hidden_size, device=device, generator=gen) * 0.02)
            self.router.append(keys.view(s.num_experts, -1, s.hidden_size).mean(1) * 50.0)
            self.hidden.append(torch.randn(s.tokens, s.hidden_size, device=device, generator=gen).to(dt)
                               .requires_grad_())
            self.grad_out.append(torch.randn(s.tokens, s.hidden_size, device=device, generator=gen).to(dt))
        self.ffn: tuple[torch.Tensor, ...] | None = None
        if s.backbone == "ffn":
            self.ffn = tuple((torch.randn(s.ffn_hidden, s.hidden_size, device=device, generator=gen) * 0.02).to(dt)
                             for _ in range(3))  # gate, up, down (as [F, d]); frozen

    def backbone(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.ffn
        return (torch.nn.functional.silu(hidden @ gate.T) * (hidden @ up.T)) @ down

    def reset_input_grads(self) -> None:
        for h in self.hidden:
            h.grad = None


class Workload:
    """One point's training step: ``step(clock)`` marks its stages; ``unique_rows`` holds the
    distinct active neurons of each layer after a step (empty for impls without rows)."""

    def __init__(self, point: Point, w: Weights, device: torch.device, notes: Notes) -> None:
        self.point, self.w, self.device, self.notes = point, w, device, notes
        self.unique_rows: list[int] = []
        self.pinned_nbytes = 0.0
        self.adapters: list[Any] = []

    def step(self, clock: Clock) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def beside_backbone(self, clock: Clock, layer: int, y: torch.Tensor) -> torch.Tensor:
        """FFN(h) + y with the frozen FFN stand-in (timed as "backbone"), or y without one."""
        if self.w.ffn is None:
            return y
        out = self.w.backbone(self.w.hidden[layer]) + y
        clock.mark("backbone")
        return out

    def close(self) -> None:
        pass


def _staged_scores(clock: Clock, hidden, router, keys, shape: Shape):
    """Reference steps 1-3 as separately timed stages: router, then key scores + top-K."""
    _, expert_ids, gate = reference.route(hidden, router, shape.experts_per_token)
    clock.mark("router")
    S = shape.neurons_per_expert
    with torch.no_grad():
        scores = reference.candidate_scores(hidden, keys, expert_ids, gate, S)
        ids = reference.select_neurons(scores, reference.candidate_ids(expert_ids, S), shape.topk)
        del scores
    s = reference.selected_scores(hidden, keys, expert_ids, gate, ids, S)
    clock.mark("keys")
    return ids, s


class ReferenceDevice(Workload):
    """The reference path with every parameter on the compute device (placement "gpu"):
    router, keys, values stages, autograd backward, dense AdamW over the whole adapter."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        w = self.w
        self.params = []
        for g, k, v in zip(w.router, w.keys, w.values):
            self.params += [g.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_()]
        self.opt = _dense_adamw(self.params, self.notes)

    def step(self, clock: Clock) -> None:
        s, dt = self.point.shape, self.point.shape.torch_dtype
        self.w.reset_input_grads()
        ys, uniq = [], []
        for layer in range(s.layers_run):
            g, k, v = self.params[3 * layer: 3 * layer + 3]
            ids, sc = _staged_scores(clock, self.w.hidden[layer], g.to(dt), k.to(dt), s)
            y = torch.einsum("tk,tkd->td", torch.relu(sc), v.to(dt)[ids])
            clock.mark("values")
            ys.append(self.beside_backbone(clock, layer, y))
            uniq.append(ids)
        torch.autograd.backward(ys, self.w.grad_out)
        clock.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        clock.mark("optimizer")
        self.unique_rows = [int(torch.unique(i).numel()) for i in uniq]


class ReferenceHostRows(Workload):
    """Placement "cpu" emulated on the CPU: the reference path with a compute-dtype key cache
    and the router on the "device", values gathered from a CPURowStore into a staging buffer
    (again in the backward with "refetch"), gradient rows packed, SparseRowAdamW on the touched
    rows (one worker thread per layer) and the updated key rows written back to the key cache."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        from meft_triton.optim import SparseRowAdamW
        from meft_triton.row_store import CPURowStore

        s, w, dt = self.point.shape, self.w, self.point.shape.torch_dtype
        max_rows = min(s.num_neurons, s.tokens * s.topk)
        self.stores, self.opts, self.key_cache, self.routers = [], [], [], []
        self.staging, self.staging_bwd, self.grad_rows = [], [], []
        for g, k, v in zip(w.router, w.keys, w.values):
            store = CPURowStore.from_dense(k, v, pin_memory="auto")
            if store.pin_error and not store.pinned:
                self.notes.add("pageable host rows (no pinned memory here)")
            self.stores.append(store)
            self.opts.append(SparseRowAdamW(store, lr=1e-4))
            self.key_cache.append(k.to(dt, copy=True).requires_grad_())
            self.routers.append(g.detach().requires_grad_())
            self.staging.append(store.staging_buffer(max_rows, "values", dt))
            self.staging_bwd.append(store.staging_buffer(max_rows, "values", dt))
            self.grad_rows.append(store.staging_buffer(max_rows, "both", torch.float32))
            if store.pinned:
                self.pinned_nbytes += store.nbytes + sum(
                    b.numel() * b.element_size() for b in (self.staging[-1], self.staging_bwd[-1], self.grad_rows[-1]))
        self.router_opt = _dense_adamw(self.routers, self.notes)
        self.refetch = self.point.backward_rows == "refetch"

    def step(self, clock: Clock) -> None:
        s, dt = self.point.shape, self.point.shape.torch_dtype
        self.w.reset_input_grads()
        ys, uniqs, leaves = [], [], []
        for layer in range(s.layers_run):
            ids, sc = _staged_scores(clock, self.w.hidden[layer], self.routers[layer].to(dt),
                                     self.key_cache[layer], s)
            uniq, inverse = torch.unique(ids, return_inverse=True)  # sorted: sequential reads
            rows = self.stores[layer].gather(uniq, out=self.staging[layer], part="values", sort=False).rows
            leaf = rows.detach().requires_grad_()
            clock.mark("copy_wait")
            y = torch.einsum("tk,tkd->td", torch.relu(sc), leaf[inverse])
            clock.mark("values")
            ys.append(self.beside_backbone(clock, layer, y))
            uniqs.append(uniq)
            leaves.append(leaf)
        if self.refetch:
            for layer, uniq in enumerate(uniqs):
                self.stores[layer].gather(uniq, out=self.staging_bwd[layer], part="values", sort=False)
            clock.mark("refetch")
        torch.autograd.backward(ys, self.w.grad_out)
        clock.mark("backward")
        packed = []
        for layer, uniq in enumerate(uniqs):
            buf = self.grad_rows[layer][: uniq.numel()]
            buf[:, 0].copy_(self.key_cache[layer].grad.index_select(0, uniq))
            buf[:, 1].copy_(leaves[layer].grad)
            packed.append(buf)
        clock.mark("grad_pack")
        self.router_opt.step()
        self.router_opt.zero_grad(set_to_none=True)
        futures = []
        for layer, uniq in enumerate(uniqs):
            self.opts[layer].accumulate(uniq, packed[layer][:, 0], packed[layer][:, 1])
            futures.append(self.opts[layer].step_async())
        for f in futures:
            f.result()
        clock.mark("optimizer")
        with torch.no_grad():
            for layer, uniq in enumerate(uniqs):
                cache = self.key_cache[layer]
                cache.grad = None
                cache.index_copy_(0, uniq, self.stores[layer].keys().index_select(0, uniq).to(dt))
        clock.mark("key_refresh")
        self.unique_rows = [int(u.numel()) for u in uniqs]

    def close(self) -> None:
        for opt in self.opts:
            opt.close()


class DenseBaseline(Workload):
    """Baselines with dense device parameters: forward, autograd backward, dense AdamW."""

    def __init__(self, point: Point, w: Weights, device: torch.device, notes: Notes, lora_rank: int = 0) -> None:
        super().__init__(point, w, device, notes)
        s = point.shape
        self.params: list[torch.Tensor] = []
        gen = torch.Generator(device=device).manual_seed(1)
        for layer in range(s.layers_run):
            if point.impl == "meft-original":
                self.params += [w.router[layer].detach().requires_grad_(), w.keys[layer].detach().requires_grad_(),
                                w.values[layer].detach().requires_grad_()]
            elif point.impl == "dense":  # d -> N -> d ReLU MLP
                self.params += [w.keys[layer].detach().requires_grad_(), w.values[layer].detach().requires_grad_()]
            elif point.impl == "lora":  # y = (h A^T) B, A [r, d], B [r, d]
                shape = (lora_rank, s.hidden_size)
                self.params += [(torch.randn(shape, device=device, generator=gen) * 0.02).requires_grad_(),
                                (torch.randn(shape, device=device, generator=gen) * 0.02).requires_grad_()]
            else:
                raise ValueError(f"unknown baseline {point.impl!r}")
        self.per_layer = len(self.params) // s.layers_run
        self.opt = _dense_adamw(self.params, notes)

    def _forward(self, h, params):
        s, dt = self.point.shape, self.point.shape.torch_dtype
        p = [x.to(dt) for x in params]
        if self.point.impl == "meft-original":
            return reference.meft_original_forward(h, p[0], p[1], p[2], s.experts_per_token, s.topk)
        if self.point.impl == "dense":
            return torch.relu(h @ p[0].T) @ p[1]
        return (h @ p[0].T) @ p[1]

    def step(self, clock: Clock) -> None:
        self.w.reset_input_grads()
        ys = []
        for layer in range(self.point.shape.layers_run):
            ps = self.params[self.per_layer * layer: self.per_layer * (layer + 1)]
            y = self._forward(self.w.hidden[layer], ps)
            clock.mark("forward")
            ys.append(self.beside_backbone(clock, layer, y))
        torch.autograd.backward(ys, self.w.grad_out)
        clock.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        clock.mark("optimizer")


class MeftAdapterStack(Workload):
    """The package's MEFTAdapter under the point's placement: Triton kernels on CUDA, the
    reference stages on CPU. Placement "cpu" layers share one OffloadRuntime (one copy engine
    and slot pool, as in a model); their keys/values train through ``configure_optimizer`` /
    ``sparse_step`` (row-sparse AdamW on a worker thread), the router through dense AdamW."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        from meft_triton import MEFTAdapter

        p, s = self.point, self.point.shape
        cfg = MEFTConfig(num_neurons=s.num_neurons, num_experts=s.num_experts, experts_per_token=s.experts_per_token,
                         topk=s.topk, placement=p.placement, transfer=p.transfer or "cpu_gather",
                         backward_rows=p.backward_rows or "refetch")
        self.runtime = None
        if p.placement == "cpu":
            try:
                from meft_triton.offload import OffloadRuntime

                self.runtime = OffloadRuntime(self.device, s.torch_dtype, s.hidden_size, transfer=cfg.transfer,
                                              keep_rows=cfg.backward_rows == "keep")
            except (ImportError, TypeError) as exc:
                self.notes.add(f"no shared OffloadRuntime ({type(exc).__name__}): one runtime per layer")
        loaded = True
        for layer in range(s.layers_run):
            if self.runtime is not None:
                adapter = MEFTAdapter(s.hidden_size, cfg, device=self.device, runtime=self.runtime)
            else:
                adapter = MEFTAdapter(s.hidden_size, cfg, device=self.device)
            loaded &= _load_weights(adapter, self.w.router[layer], self.w.keys[layer], self.w.values[layer])
            self.adapters.append(adapter)
        if not loaded:
            self.notes.add("adapter weights: its own initialisation (could not load the sweep's)")
        params = [q for a in self.adapters for q in a.parameters() if q.requires_grad and q.device == self.device]
        self.opt = _dense_adamw(params, self.notes) if params else None
        self.hooks = []
        if p.placement == "cpu":
            for a in self.adapters:
                if callable(getattr(a, "configure_optimizer", None)) and callable(getattr(a, "sparse_step", None)):
                    a.configure_optimizer(lr=1e-4)
                    self.hooks.append(a.sparse_step)
            if not self.hooks:
                self.notes.add("MEFTAdapter has no host-optimizer hook: only device parameters stepped")
            else:
                self.notes.add("row-sparse AdamW runs on worker threads, the next forward waits for it")
            store = getattr(getattr(self.adapters[0], "offload", None), "store", None)
            if store is not None and getattr(store, "pinned", False):
                self.pinned_nbytes = float(sum(a.offload.store.nbytes for a in self.adapters))
        self.unique_rows = [_active_unique_rows(a, self.w, layer, s) for layer, a in enumerate(self.adapters)]
        self.ist = None
        self.steps_done = 0
        if p.ist_ratio < 1:
            from meft_triton.ist import ISTConfig, ISTScheduler

            self.ist = ISTScheduler(self.adapters, ISTConfig(ratio=p.ist_ratio, mode="uniform", seed=0))

    def step(self, clock: Clock) -> None:
        self.w.reset_input_grads()
        if self.ist is not None:  # this step's trained layers; the rest are frozen
            self.ist.before_step(self.steps_done)
        self.steps_done += 1
        ys = []
        for layer, a in enumerate(self.adapters):
            h = self.w.hidden[layer]
            if self.w.ffn is not None and self.point.placement == "cpu" and hasattr(a, "start_routing"):
                # the adapter's two stages around the FFN: the value-row copy overlaps the FFN
                routed = a.start_routing(h)
                clock.mark("forward")
                f = self.w.backbone(h)
                clock.mark("backbone")
                ys.append(a.finish_values(routed) + f)
                clock.mark("forward")
            else:
                y = a(h)
                clock.mark("forward")
                ys.append(self.beside_backbone(clock, layer, y))
        torch.autograd.backward(ys, self.w.grad_out)
        clock.mark("backward")
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        for adapter, hook in zip(self.adapters, self.hooks):
            if adapter.router.weight.requires_grad:  # IST-frozen layers have nothing to step
                hook()
        clock.mark("optimizer")

    def counters(self) -> dict[str, float]:
        """The adapters' own transfer counters: ``transfer_stats`` where an adapter has them,
        else the shared runtime's cumulative ``bytes_to_device`` / ``bytes_to_host``."""
        out: dict[str, float] = {}
        for a in self.adapters:
            for k, v in metrics.read_transfer_stats(a).items():
                out[k] = out.get(k, 0.0) + v
        if not out and self.runtime is not None:
            for name, key in (("bytes_to_device", "h2d_bytes"), ("bytes_to_host", "d2h_bytes")):
                value = getattr(self.runtime, name, None)
                if isinstance(value, (int, float)):
                    out[key] = float(value)
        return out

    def close(self) -> None:
        for a in self.adapters:
            offload = getattr(a, "offload", None)
            try:
                if offload is not None:
                    offload.wait_for_update()
                    if offload.optimizer is not None:
                        offload.optimizer.close()
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        if self.runtime is not None:
            self.runtime.close()


def _load_weights(adapter, router, keys, values) -> bool:
    """Put the sweep's weights into an adapter (through its state dict, which also fills a
    placement-"cpu" master store); False when the adapter would not take them."""
    try:
        result = adapter.load_state_dict({"router.weight": router, "keys": keys, "values": values}, strict=False)
        return not result.missing_keys
    except Exception:  # noqa: BLE001
        return False


def _active_unique_rows(adapter, w: Weights, layer: int, s: Shape, chunk_bytes: int = 1 << 28) -> int:
    """Distinct neurons the reference selects for this layer's input (token chunks bound the
    [tokens, P*S, d] candidate gather)."""
    router = getattr(getattr(adapter, "router", None), "weight", None)
    keys = getattr(adapter, "keys", None)
    if not isinstance(router, torch.Tensor) or not isinstance(keys, torch.Tensor) or keys.device != w.hidden[layer].device:
        router, keys = w.router[layer], w.keys[layer]
    h = w.hidden[layer]
    dt, S = h.dtype, s.neurons_per_expert
    per_token = max(1, s.experts_per_token * S * s.hidden_size * h.element_size())
    chunk = max(1, chunk_bytes // per_token)
    seen = torch.zeros(s.num_neurons, dtype=torch.bool, device=h.device)
    with torch.no_grad():
        g, k = router.to(dt), keys.to(dt)
        for a in range(0, h.shape[0], chunk):
            hc = h[a: a + chunk]
            _, eids, gate = reference.route(hc, g, s.experts_per_token)
            scores = reference.candidate_scores(hc, k, eids, gate, S)
            seen[reference.select_neurons(scores, reference.candidate_ids(eids, S), s.topk).flatten()] = True
    return int(seen.sum())


def make_workload(point: Point, w: Weights, device: torch.device, notes: Notes, lora_rank: int) -> Workload:
    if point.impl == "meft":
        return MeftAdapterStack(point, w, device, notes)
    if point.impl == "reference":
        if point.placement == "cpu":
            return ReferenceHostRows(point, w, device, notes)
        return ReferenceDevice(point, w, device, notes)
    return DenseBaseline(point, w, device, notes, lora_rank=lora_rank)


def estimate_bytes(point: Point, lora_rank: int) -> int:
    """Rough peak bytes a workload adds on the compute device (CPU: host), to skip points that
    cannot fit instead of being killed by the OOM killer."""
    s = point.shape
    train = metrics.TRAIN_BYTES_PER_PARAM - 4  # grads + moments; the fp32 weights exist already
    # the FFN's activations kept for its backward
    extra = s.layers_run * 6 * s.tokens * s.ffn_hidden * s.dtype_bytes if s.backbone == "ffn" else 0
    return extra + _workload_bytes(point, lora_rank, train)


def _workload_bytes(point: Point, lora_rank: int, train: int) -> int:
    s = point.shape
    T, d, N, E, P, K, S, b, L = (s.tokens, s.hidden_size, s.num_neurons, s.num_experts, s.experts_per_token,
                                 s.topk, s.neurons_per_expert, s.dtype_bytes, s.layers_run)
    if point.impl == "reference":
        scores = T * P * S * d * b + L * 6 * T * K * d * b
        if point.placement == "cpu":
            return scores + L * (3 * N * 2 * d * 4 + N * d * (b + 4) + 4 * T * K * d * 4)
        return scores + L * (train * 2 * N * d + 2 * N * d * b)
    if point.impl == "meft":
        return L * (train * (E + 2 * N) * d + 8 * T * K * 4 + 4 * T * d * b)
    if point.impl == "meft-original":
        return L * (6 * T * N * b + train * (E + 2 * N) * d + 2 * N * d * b)
    if point.impl == "dense":
        return L * (4 * T * N * b + train * 2 * N * d + 2 * N * d * b)
    if point.impl == "lora":
        return L * (16 * 2 * lora_rank * d + 2 * T * lora_rank * b)
    return 0


# ============================================================================ measuring
def _machine_columns(machine: dict) -> dict:
    return {k: machine.get(k) for k in ("device", "cpu", "threads", "driver", "cuda", "torch", "triton", "python")}


def _blank_row(point: Point, args: argparse.Namespace, mode: str, machine: dict) -> dict:
    s = point.shape
    row = {c: NAN for c in COLUMNS}
    row.update(kind=point.kind, mode=mode, preset=s.preset, hidden_size=s.hidden_size, layers=s.layers,
               layers_run=s.layers_run, dtype=s.dtype, backbone=s.backbone, impl=point.impl, placement=point.placement,
               transfer=point.transfer if point.placement == "cpu" else None,
               backward_rows=point.backward_rows if point.kind == "step" and point.placement == "cpu" else None,
               ist_ratio=point.ist_ratio if point.kind == "step" else NAN,
               repeats=args.repeats, warmup=args.warmup, unique_rows_layers=None, adapter_counters=None, note="",
               **_machine_columns(machine))
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
    s = point.shape
    cuda = device.type == "cuda"
    notes = Notes()
    row = _blank_row(point, args, mode, machine)
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
        samples = []
        metrics.reset_peak_rss()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            clock = Clock(cuda)
            clock.start()
            workload.step(clock)
            clock.durations_ms()
        counters_mid = _counters(workload)
        with nvml:
            for _ in range(args.repeats):
                clock = Clock(cuda)
                clock.start()
                workload.step(clock)
                samples.append(clock.durations_ms())
        counters_after = _counters(workload)
        stages = metrics.median_by_key(samples)
        totals = [sum(x.values()) for x in samples]
        for phase, col in (("fwd", "fwd_ms"), ("bwd", "bwd_ms"), ("opt", "opt_ms")):
            phase_totals = [sum(v for k, v in x.items() if PHASE.get(k) == phase) for x in samples]
            row[col] = scale * _median(phase_totals)
        row["step_ms"] = scale * _median(totals)
        row["tokens_per_s"] = s.tokens / (row["step_ms"] * 1e-3) if row["step_ms"] > 0 else NAN
        for col, parts in BREAKDOWN.items():
            present = [stages[p] for p in parts if p in stages]
            row[f"t_{col}_ms"] = scale * sum(present) if present else NAN
        if "forward" in stages and point.impl == "meft":
            notes.add("MEFTAdapter forward timed whole: router/keys/values not split")

        # memory
        if cuda:
            row["gpu_peak_alloc_bytes"] = float(torch.cuda.max_memory_allocated())
        row["gpu_peak_nvml_bytes"] = nvml.peak_used_bytes
        if nvml.error:
            notes.add(nvml.error)
        row["pcie_tx_GBps"], row["pcie_rx_GBps"] = nvml.pcie_tx_GBps, nvml.pcie_rx_GBps
        row["host_rss_bytes"], row["host_peak_rss_bytes"] = metrics.host_rss_bytes()
        pinned, why = metrics.pinned_host_bytes()
        row["pinned_bytes"] = pinned if not math.isnan(pinned) else (workload.pinned_nbytes or NAN)
        if why and math.isnan(row["pinned_bytes"]):
            notes.add(why)

        _accounting(row, point, workload.unique_rows, scale)
        _transfer_timing(row, point, workload, stages, scale, cuda, args, notes,
                         _counter_delta(counters_mid, counters_after, args.repeats))
    except Exception as exc:  # noqa: BLE001 - one failing point must not end the sweep
        if _is_oom(exc):
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


def _median(values: Sequence[float]) -> float:
    import statistics

    return statistics.median(values) if values else NAN


def _counters(workload: Workload) -> dict[str, float]:
    fn = getattr(workload, "counters", None)
    return fn() if fn is not None else {}


def _counter_delta(before: dict[str, float], after: dict[str, float], steps: int) -> dict[str, float]:
    """Per-step counters: (after - before) / steps for cumulative counters; the last value
    where a counter did not grow (a per-step counter)."""
    out: dict[str, float] = {}
    for k, v in after.items():
        grew = v - before.get(k, 0.0)
        out[k] = grew / steps if grew > 0 else v
    return out


def _accounting(row: dict, point: Point, unique_rows: list[int], scale: float) -> None:
    s = point.shape
    is_meft = point.impl in ("meft", "reference")
    if is_meft and unique_rows:
        row["unique_rows_per_layer"] = sum(unique_rows) / len(unique_rows)
        row["unique_rows_layers"] = ";".join(map(str, unique_rows))
    max_rows = max(unique_rows) if unique_rows else min(s.num_neurons, s.tokens * s.topk)
    if is_meft:
        mem = metrics.adapter_memory_bytes(point.placement, num_neurons=s.num_neurons, num_experts=s.num_experts,
                                           hidden_size=s.hidden_size, layers=s.layers,
                                           row_dtype_bytes=s.dtype_bytes, max_unique_rows=max_rows,
                                           backward_rows=point.backward_rows or "refetch")
        row["adapter_gpu_bytes"], row["adapter_host_bytes"] = mem["gpu_bytes"], mem["host_bytes"]
    else:
        per_layer = {"meft-original": (s.num_experts + 2 * s.num_neurons) * s.hidden_size,
                     "dense": 2 * s.num_neurons * s.hidden_size,
                     "lora": 2 * (row["lora_rank"] if not _isnan(row["lora_rank"]) else 0) * s.hidden_size}[point.impl]
        row["adapter_gpu_bytes"] = metrics.dense_memory_bytes(per_layer, s.layers)
        row["adapter_host_bytes"] = 0
    if point.placement == "cpu" and unique_rows:
        acc = metrics.transfer_bytes(unique_rows, s.hidden_size, s.dtype_bytes, point.backward_rows or "refetch")
        row["h2d_bytes_per_step"] = acc["h2d_bytes"] * scale
        row["d2h_bytes_per_step"] = acc["d2h_bytes"] * scale
        row["h2d_rows_per_step"] = acc["h2d_rows"] * scale
        row["d2h_rows_per_step"] = acc["d2h_rows"] * scale
    elif point.kind == "step":
        for c in ("h2d_bytes_per_step", "d2h_bytes_per_step", "h2d_rows_per_step", "d2h_rows_per_step"):
            row[c] = 0.0


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _transfer_timing(row: dict, point: Point, workload: Workload, stages: dict, scale: float, cuda: bool,
                     args: argparse.Namespace, notes: Notes, counters: dict[str, float]) -> None:
    if point.placement != "cpu" or not workload.unique_rows:
        return
    s = point.shape
    moved = row["h2d_bytes_per_step"] + row["d2h_bytes_per_step"]
    per_layer_fwd = max(1, int(row["unique_rows_per_layer"] * s.hidden_size * s.dtype_bytes))
    if counters:
        row["adapter_counters"] = json.dumps(counters, sort_keys=True)
        row["h2d_bytes_measured"] = metrics.pick_counter(counters, "h2d", "bytes") * scale
        row["d2h_bytes_measured"] = metrics.pick_counter(counters, "d2h", "bytes") * scale
        copy = metrics.pick_counter(counters, "copy", "ms", exclude=("wait",)) * scale
        wait = metrics.pick_counter(counters, "wait", "ms") * scale
        if not _isnan(copy) and copy > 0:
            row["copy_ms"] = copy
            if not _isnan(wait):
                row["copy_hidden_share"] = min(1.0, max(0.0, 1.0 - wait / copy))
    elif point.impl == "meft":
        notes.add("MEFTAdapter exposes no transfer counters: bytes from accounting only")
    copy_stages = [stages[k] for k in COPY_STAGES if k in stages]
    if copy_stages:  # the staged reference: copies are host gathers / packing, timed on their own
        row["copy_ms"] = sum(copy_stages) * scale
    if not cuda:
        if point.impl == "reference":
            notes.add("host-side emulation: copies are synchronous host gathers/packing, no PCIe")
        else:
            notes.add("CPU compute: rows copied by the prefetcher's CPU engine (worker thread), no PCIe")
        row["memcpy_GBps"] = metrics.host_memcpy_GBps(per_layer_fwd, repeats=max(3, args.repeats))
    else:
        if _isnan(row["copy_ms"]):
            rows = max(1, int(row["unique_rows_per_layer"]))
            t = measure_transfer_rows(s, rows, repeats=max(3, args.repeats), cuda=True)
            gbps = t["h2d_zero_copy_GBps" if point.transfer == "zero_copy" else "h2d_cpu_gather_GBps"]
            if _isnan(gbps):
                notes.add(t["note"])
            else:
                notes.add("copy_ms: the same rows copied standalone (no adapter copy timers)")
                d2h = row["d2h_bytes_per_step"] / (t["d2h_GBps"] * 1e9) * 1e3 if not _isnan(t["d2h_GBps"]) else 0.0
                row["copy_ms"] = row["h2d_bytes_per_step"] / (gbps * 1e9) * 1e3 + d2h
        row["memcpy_GBps"], why = metrics.pinned_memcpy_GBps(per_layer_fwd, "h2d", repeats=max(3, args.repeats))
        notes.add(why)
    if not _isnan(row["copy_ms"]) and row["copy_ms"] > 0:
        row["achieved_GBps"] = moved / (row["copy_ms"] * 1e-3) / 1e9
    if not _isnan(row["achieved_GBps"]) and not _isnan(row["memcpy_GBps"]):
        row["achieved_vs_memcpy"] = row["achieved_GBps"] / row["memcpy_GBps"]


_STORE_CACHE: dict[tuple, Any] = {}


def _transfer_store(num_rows: int, hidden_size: int):
    from meft_triton.row_store import CPURowStore

    key = (num_rows, hidden_size)
    if key not in _STORE_CACHE:
        _STORE_CACHE.clear()
        _STORE_CACHE[key] = CPURowStore(num_rows, hidden_size, pin_memory="auto")
    return _STORE_CACHE[key]


def measure_transfer_rows(shape: Shape, rows: int, repeats: int, cuda: bool, engine: str = "cpu_gather") -> dict:
    """Gather/packing/copy throughput of ``rows`` random sorted rows of a store of
    ``max(shape.num_neurons, rows)`` neurons (payload GB/s; NaN where not measurable)."""
    notes = Notes()
    d, dt = shape.hidden_size, shape.torch_dtype
    store = _transfer_store(max(shape.num_neurons, rows), d)
    ids = torch.randperm(store.num_rows, generator=torch.Generator().manual_seed(rows))[:rows].sort().values
    out = {k: NAN for k in ("gather_GBps", "gather_cast_GBps", "host_memcpy_GBps", "h2d_cpu_gather_GBps",
                            "h2d_zero_copy_GBps", "pinned_h2d_GBps", "d2h_GBps", "pinned_d2h_GBps")}
    fp32 = store.staging_buffer(rows, "values", torch.float32)
    ms = metrics.time_op_ms(lambda: store.gather(ids, out=fp32, part="values", sort=False), repeats)
    out["gather_GBps"] = rows * d * 4 / (ms * 1e-3) / 1e9
    staged = fp32
    if dt != torch.float32:
        staged = store.staging_buffer(rows, "values", dt)
        ms = metrics.time_op_ms(lambda: store.gather(ids, out=staged, part="values", sort=False), repeats)
        out["gather_cast_GBps"] = rows * d * staged.element_size() / (ms * 1e-3) / 1e9
    out["host_memcpy_GBps"] = metrics.host_memcpy_GBps(rows * d * 4, repeats)
    if not store.pinned:
        notes.add("pageable host rows (no pinned memory here)")
    if cuda:
        dev = torch.empty(rows, d, dtype=dt, device="cuda")

        def gather_h2d():
            store.gather(ids, out=staged, part="values", sort=False)
            dev.copy_(staged, non_blocking=True)
            torch.cuda.synchronize()

        ms = metrics.time_op_ms(gather_h2d, repeats)
        out["h2d_cpu_gather_GBps"] = rows * d * staged.element_size() / (ms * 1e-3) / 1e9
        try:
            from meft_triton.prefetch import zero_copy_gather

            ids_dev = ids.cuda()
            ms = metrics.time_op_ms(lambda: zero_copy_gather(store.values(), ids_dev, dev), repeats, cuda=True)
            out["h2d_zero_copy_GBps"] = rows * d * dev.element_size() / (ms * 1e-3) / 1e9
        except Exception as exc:  # noqa: BLE001 - kernel missing or store not pinned
            notes.add(f"zero_copy not measured ({type(exc).__name__}: {str(exc)[:100]})")
        out["pinned_h2d_GBps"], why = metrics.pinned_memcpy_GBps(rows * d * staged.element_size(), "h2d", repeats)
        notes.add(why)
        grads = torch.randn(rows, 2 * d, device="cuda")
        host = store.staging_buffer(rows, "both", torch.float32).view(rows, 2 * d)
        ms = metrics.time_op_ms(lambda: host.copy_(grads, non_blocking=True), repeats, cuda=True)
        out["d2h_GBps"] = rows * 2 * d * 4 / (ms * 1e-3) / 1e9
        out["pinned_d2h_GBps"], why = metrics.pinned_memcpy_GBps(rows * 2 * d * 4, "d2h", repeats)
        notes.add(why)
    out["note"] = str(notes)
    return out


def measure_transfer_point(point: Point, args: argparse.Namespace, cuda: bool, mode: str, machine: dict) -> dict:
    row = _blank_row(point, args, mode, machine)
    try:
        t = measure_transfer_rows(point.shape, point.rows, max(3, args.repeats), cuda)
    except Exception as exc:  # noqa: BLE001
        row["note"] = "out of memory" if _is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        return row
    row["note"] = t.pop("note")
    row.update(t)
    s = point.shape
    if cuda:
        row["achieved_GBps"], row["memcpy_GBps"] = t["h2d_cpu_gather_GBps"], t["pinned_h2d_GBps"]
        row["h2d_bytes_per_step"] = point.rows * s.hidden_size * s.dtype_bytes
    else:
        row["achieved_GBps"], row["memcpy_GBps"] = t["gather_GBps"], t["host_memcpy_GBps"]
        row["h2d_bytes_per_step"] = point.rows * s.hidden_size * 4
    if not _isnan(row["achieved_GBps"]) and not _isnan(row["memcpy_GBps"]):
        row["achieved_vs_memcpy"] = row["achieved_GBps"] / row["memcpy_GBps"]
    row["h2d_rows_per_step"] = point.rows
    row["host_rss_bytes"], row["host_peak_rss_bytes"] = metrics.host_rss_bytes()
    return row


def _finish(df) -> Any:
    """Cross-row columns: speedup vs the reference, and (CUDA, no adapter counters) the share
    of copy time hidden, estimated from the same shape's placement-"gpu" step."""
    keys = ["preset", "hidden_size", "num_neurons", "num_experts", "experts_per_token", "topk", "tokens", "dtype",
            "backbone"]
    steps = df[df["kind"] == "step"]
    for _, group in steps.groupby(keys, dropna=False):
        ref = group[(group["impl"] == "reference") & (group["placement"] == "gpu")]["step_ms"]
        if len(ref) and ref.notna().any():
            df.loc[group.index, "speedup_vs_reference"] = float(ref.dropna().iloc[0]) / group["step_ms"]
        dev = group[(group["impl"] == "meft") & (group["placement"] == "gpu")]["step_ms"].dropna()
        if not len(dev):
            continue
        for i in group.index[(group["impl"] == "meft") & (group["placement"] == "cpu")]:
            if _isnan(df.at[i, "copy_hidden_share"]) and df.at[i, "copy_ms"] > 0:
                overhead = df.at[i, "step_ms"] - float(dev.iloc[0])
                df.at[i, "copy_hidden_share"] = min(1.0, max(0.0, 1.0 - overhead / df.at[i, "copy_ms"]))
    return df


# ============================================================================ CLI
def _int_list(minimum: int) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        out = []
        for part in filter(None, text.replace(" ", ",").split(",")):
            try:
                value = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be integers >= {minimum}, got {part!r}") from None
            if value < minimum:
                raise argparse.ArgumentTypeError(f"must be integers >= {minimum}, got {value}")
            out.append(value)
        if not out:
            raise argparse.ArgumentTypeError("needs at least one value")
        return out

    parse.__name__ = "int list"
    return parse


def _choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        out = [p for p in text.replace(" ", ",").split(",") if p]
        bad = [p for p in out if p not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"must be among {', '.join(choices)}; got {text!r}")
        return out

    parse.__name__ = "choice list"
    return parse


def _flat(values):
    if values is None:
        return None
    out = []
    for v in values:
        out += v if isinstance(v, list) else [v]
    return list(dict.fromkeys(out))  # dedupe, keep order


def _ratio_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in (0, 1], got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"IST ratios must lie in (0, 1], got {text!r}")
    return values


def _positive_int(text: str) -> int:
    return _int_list(1)(text)[0]


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m profiling.sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Axis flags take one or more values, comma or space separated.")
    ap.add_argument("--quick", action="store_true", help="a small sweep chosen for the device found (CPU: < 2 min)")
    ap.add_argument("--preset", nargs="+", type=_choice_list(tuple(PRESETS)), help="model shapes: " + ", ".join(PRESETS))
    ap.add_argument("--hidden-size", type=_positive_int, help="override the preset's d")
    ap.add_argument("--layers", type=_positive_int, help="override the preset's number of adapted layers")
    ap.add_argument("--max-layers", type=_positive_int, help="layers actually run (times scale to --layers)")
    ap.add_argument("--num-neurons", "-N", nargs="+", type=_int_list(1), help="adapter neurons N per layer")
    ap.add_argument("--num-experts", "-E", nargs="+", type=_int_list(1), help="experts E (default N / 64)")
    ap.add_argument("--experts-per-token", "-P", nargs="+", type=_int_list(1), help="experts per token P")
    ap.add_argument("--topk", "-K", nargs="+", type=_int_list(1), help="active neurons per token K_top")
    ap.add_argument("--tokens", "-T", nargs="+", type=_int_list(1), help="tokens per micro-batch")
    ap.add_argument("--placement", nargs="+", type=_choice_list(PLACEMENTS), help="gpu, cpu")
    ap.add_argument("--transfer", nargs="+", type=_choice_list(TRANSFERS), help="transfer engines (placement cpu)")
    ap.add_argument("--backward-rows", nargs="+", type=_choice_list(BACKWARD_ROWS), help="refetch, keep")
    ap.add_argument("--ist-ratio", nargs="+", type=_ratio_list,
                    help="fractions of layers IST trains per step, in (0, 1] (MEFT + IST; default 1)")
    ap.add_argument("--dtype", nargs="+", type=_choice_list(tuple(DTYPES)), help="compute dtypes")
    ap.add_argument("--baselines", nargs="+", type=_choice_list((*BASELINES, "none")),
                    help="reference, meft-original, dense, lora, or none")
    ap.add_argument("--backbone", choices=("none", "ffn"),
                    help="frozen FFN stand-in beside each adapter (default: ffn with CUDA, none without)")
    ap.add_argument("--transfer-rows", nargs="+", type=_int_list(1), help="row counts of the transfer rows")
    ap.add_argument("--repeats", type=_positive_int, help="timed steps per point (median)")
    ap.add_argument("--warmup", type=_int_list(0), help="untimed steps before timing")
    ap.add_argument("--threads", type=_positive_int,
                    help="torch CPU threads (default: 1 without CUDA, see profiling.presets; torch's choice with CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the results here instead of profiling/results/<device>/<time>/")
    ap.add_argument("--no-plots", action="store_true", help="write no PNGs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed points")
    return ap


def parse_args(argv: Sequence[str] | None = None, cuda: bool | None = None) -> argparse.Namespace:
    ap = make_parser()
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    defaults = sweep_defaults(cuda, args.quick)
    for key in ("preset", "num_neurons", "num_experts", "experts_per_token", "topk", "tokens", "placement",
                "transfer", "backward_rows", "dtype", "baselines", "transfer_rows"):
        value = _flat(getattr(args, key))
        setattr(args, key, defaults[key] if value is None else value)
    args.ist_ratio = _flat(args.ist_ratio) or [1.0]
    if args.warmup is not None:
        args.warmup = args.warmup[0]
    for key in ("repeats", "warmup", "max_layers", "threads", "backbone"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if "none" in args.baselines:
        if len(args.baselines) > 1:
            ap.error("argument --baselines: 'none' cannot be combined with other baselines")
        args.baselines = []
    _check_combinations(ap, args)
    return args


def _check_combinations(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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


def _progress(items, disable: bool):
    try:
        from tqdm import tqdm

        return tqdm(items, desc="sweep", unit="point", file=sys.stderr, disable=disable, dynamic_ncols=True)
    except ImportError:  # tqdm is an optional dependency
        return items


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
    try:
        machine["load_average_before"] = os.getloadavg()
    except OSError:
        pass
    points, skipped = build_points(args, cuda)
    nvml = metrics.NvmlMonitor()
    rows: list[dict] = []
    weights: tuple[Shape | None, Weights | None] = (None, None)
    bar = _progress(points, args.no_progress)
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
                    row = _blank_row(point, args, mode, machine)
                    row["note"] = "out of memory (inputs)" if _is_oom(exc) else f"failed: {exc}"
                    rows.append(row)
                    continue
            rows.append(measure_step(point, weights[1], args, device, mode, machine, nvml))
    finally:
        nvml.close()
        _STORE_CACHE.clear()
        torch.set_num_threads(threads_before)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = _finish(df)
    try:
        machine["load_average_after"] = os.getloadavg()
    except OSError:
        pass
    meta = {"machine": machine, "mode": mode, "points": len(points), "skipped": skipped,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "gpu_needed": None if cuda else GPU_ONLY_LINE}
    return df, meta


# ============================================================================ output
SUMMARY_COLUMNS = [
    ("num_neurons", "N"), ("num_experts", "E"), ("tokens", "T"), ("impl", "impl"), ("placement", "placement"),
    ("policy", "transfer/bwd"), ("step_ms", "step ms"), ("tokens_per_s", "tokens/s"),
    ("speedup_vs_reference", "x ref"), ("adapter_gpu_MiB", "GPU MiB (acct)"), ("h2d_MiB", "H2D MiB/step"),
    ("unique_rows_per_layer", "rows/layer"), ("achieved_GBps", "GB/s"), ("achieved_vs_memcpy", "vs memcpy"),
]
TRANSFER_COLUMNS = [
    ("rows", "rows"), ("hidden_size", "d"), ("gather_GBps", "gather GB/s"), ("gather_cast_GBps", "gather+cast GB/s"),
    ("host_memcpy_GBps", "host memcpy GB/s"), ("h2d_cpu_gather_GBps", "H2D cpu_gather GB/s"),
    ("h2d_zero_copy_GBps", "H2D zero_copy GB/s"), ("pinned_h2d_GBps", "pinned H2D GB/s"),
    ("achieved_vs_memcpy", "vs memcpy"),
]


def summary_markdown(df) -> str:
    steps = df[df["kind"] == "step"].copy()
    steps["policy"] = [f"{t}/{b}" if p == "cpu" else "" for t, b, p in
                       zip(steps["transfer"], steps["backward_rows"], steps["placement"])]
    steps["adapter_gpu_MiB"] = steps["adapter_gpu_bytes"] / 2**20
    steps["h2d_MiB"] = steps["h2d_bytes_per_step"] / 2**20
    parts = [metrics.markdown_table(steps.to_dict("records"), [c for c, _ in SUMMARY_COLUMNS],
                                    [h for _, h in SUMMARY_COLUMNS])]
    transfers = df[df["kind"] == "transfer"]
    if len(transfers):
        cols = [(c, h) for c, h in TRANSFER_COLUMNS if transfers[c].notna().any() or c in ("rows", "hidden_size")]
        parts.append(metrics.markdown_table(transfers.to_dict("records"), [c for c, _ in cols], [h for _, h in cols]))
    notes = sorted({n for text in df["note"].fillna("") for n in str(text).split("; ") if n})
    if notes:
        parts.append("Notes: " + " | ".join(notes))
    return "\n\n".join(parts)


def write_outputs(df, meta: dict, folder: Path, plots: bool) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "sweep.csv", folder / "sweep.json", folder / "meta.json", folder / "summary.md"]
    df.to_csv(written[0], index=False)
    df.to_json(written[1], orient="records", indent=1)
    written[2].write_text(json.dumps(meta, indent=2, default=str))
    written[3].write_text(summary_markdown(df) + "\n")
    if plots:
        try:
            from . import plots as plotting
        except ImportError as exc:  # matplotlib is an optional dependency (extra "plots")
            print(f"no plots: {exc} (pip install '.[plots]')", file=sys.stderr)
            return written
        for path in plotting.plot_all(df, folder, cuda=meta["mode"] == "cuda").values():
            written.append(path)
    return written


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


if __name__ == "__main__":
    sys.exit(main())
