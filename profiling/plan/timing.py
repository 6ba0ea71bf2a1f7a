"""Predicted step time: GPU compute + exposed PCIe + exposed CPU optimizer time.

GPU compute (lower bounds: every term is a floor at the preset's peak rates):

* backbone: 2 x params x tokens FLOPs forward and 2 x params x tokens backward (the backbone is
  frozen: backward computes input gradients only, no weight gradients), plus another forward
  with gradient checkpointing, at the dtype's tensor-core rate; attention's T^2 term is left
  out (it needs the sequence length);
* adapter stages: profiling.aot's floor per stage, max(HBM bytes / bandwidth, FLOPs / rate),
  forward (router, key scores, top-K, values) and backward (score grads, dx, dK/dV, dG), at
  the layer's mean rows per micro-batch and the expected distinct experts of uniform routing
  (gradient_form "factors": dK/dV once per flush of the held tokens, see :func:`compute_time`);
* placement "gpu" also streams the adapter's fp32 parameters through HBM: the per-call cast to
  the compute dtype (4 + es B per element), the dense gradient it returns and its accumulation
  into the fp32 ``.grad`` (2 es + 8 B), and once per step the dense AdamW (28 B per element:
  read p, g, m, v; write p, m, v);
* the routers' AdamW, once per step.

PCIe: the link is full duplex, so a stretch of transfers takes max(host->device,
device->host) bytes / bandwidth. A micro-batch's value rows hide behind its own compute;
gradient rows sent home during the step queue on their own copy stream and hide behind the
micro-batches that follow (:func:`in_step_exposed`). At the step boundary:

* per-micro-batch: each backward's gradient rows are summed into the layer's accumulator on
  its optimizer's worker thread as they land (12 B per element: read the row, read and write
  the sum), during the step: what is still queued after the last micro-batch is exposed
  (:func:`in_step_exposed`). At the step all layers' AdamW run at once on worker threads
  sharing the host's bandwidth, so layer 0, which the next forward needs first, finishes with
  the rest; each layer's key rows (gathered and rounded on the CPU: 4 + es B per element) then
  go to the device before its forward, behind the forwards of the layers below it.
* resident (meft_triton/offload/resident.py): at the optimizer step every layer's summed
  gradients cross to the host in the compute dtype, are checked for non-finite values (es B
  per element) and kept as they came, every layer's AdamW runs reading them (24 + es B per
  element: ``SparseRowAdamW.accumulate_records``), and the key rows go back as above; where
  rows also crossed during the step (a gradient budget below the step's rows), those were
  summed as they landed (as under per-micro-batch), the boundary's rows join them in the fp32
  accumulators (es + 8 B per element) and the update reads those (28 B)
  (:func:`boundary_resident`: the runtime's order, the landing work beside the link; a
  pipeline over layers from each layer's last backward would hide more, but the step is
  all-or-nothing across layers).

The CPU optimizer's bandwidth is the host's (``host_bytes_per_s``), shared by every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..aot.model import STAGES, floor_us
from .inputs import GPU, Backbone, Batch
from .routing import RoutingProfile
from .traffic import FP32, ID_BYTES, LayerTraffic

FORWARD_STAGES = ("router_topk", "key_scores", "select_topk", "values")
BACKWARD_STAGES = ("score_grads", "dx", "dK_dV", "dG")
ADAMW_BYTES = 28          # fp32 AdamW per element: read p, g, m, v; write p, m, v


@dataclass(frozen=True)
class Compute:
    forward_s: float          # one micro-batch
    backward_s: float         # one micro-batch
    per_step_s: float         # once per step (optimizers on the GPU)

    def step_s(self, micro_batches: int) -> float:
        return micro_batches * (self.forward_s + self.backward_s) + self.per_step_s


def adapter_stage_s(gpu: GPU, batch: Batch, *, hidden: int, num_neurons: int, num_experts: int,
                    experts_per_token: int, topk: int, rows: float, stages: tuple[str, ...],
                    tokens: int | None = None) -> float:
    """One layer's stages at ``rows`` distinct rows of ``tokens`` (default: a micro-batch's), by
    profiling.aot's floors."""
    E, P, T = num_experts, experts_per_token, batch.tokens if tokens is None else tokens
    used_experts = E * -math.expm1(-T * P / E)
    ctx = dict(T=T, d=hidden, N=num_neurons, E=E, P=P, K=topk, S=num_neurons // E, U=rows,
               Ue=used_experts, es=batch.es)
    dtype = "fp32" if batch.dtype == "fp32" else batch.dtype
    total = 0.0
    for name in stages:
        nbytes, flops, host = STAGES[name].floor(ctx)
        total += floor_us(gpu.ceilings(), dtype, nbytes, flops, host) * 1e-6
    return total


def compute_time(gpu: GPU, backbone: Backbone, batch: Batch, profile: RoutingProfile, *, placement: str,
                 num_neurons: int, num_experts: int, experts_per_token: int, topk: int,
                 key_width: int, factor_period: int | None = None) -> Compute:
    """``factor_period`` (gradient_form "factors"): each backward runs dG alone, and every
    ``factor_period`` micro-batches (and at the step) one launch computes the held tokens'
    dK/dV rows in the compute dtype (profiling.aot's ``flush_dK_dV`` floor, at the rows
    those micro-batches touch); spread over the step's micro-batches here."""
    es, d, L = batch.es, backbone.hidden_size, backbone.layers
    rate = gpu.flops_per_s["tf32_tensor" if batch.dtype == "fp32" else f"{batch.dtype}_tensor"]
    pass_s = 2.0 * backbone.params * batch.tokens / rate
    shape = dict(hidden=d, num_neurons=num_neurons, num_experts=num_experts,
                 experts_per_token=experts_per_token, topk=topk)
    M = batch.micro_batches
    fwd = bwd = 0.0
    for layer in profile.layers:
        mean_rows = sum(layer.per_micro_batch) / len(layer.per_micro_batch)
        fwd += adapter_stage_s(gpu, batch, rows=mean_rows, stages=FORWARD_STAGES, **shape)
        if factor_period is None:
            bwd += adapter_stage_s(gpu, batch, rows=mean_rows, stages=BACKWARD_STAGES, **shape)
            continue
        bwd += adapter_stage_s(gpu, batch, rows=mean_rows, stages=("score_grads", "dx", "dG"), **shape)
        held = M - factor_period * ((M - 1) // factor_period)
        for size in [factor_period] * ((M - 1) // factor_period) + [held]:
            bwd += adapter_stage_s(gpu, batch, rows=layer.cumulative[size - 1], stages=("flush_dK_dV",),
                                   tokens=size * batch.tokens, **shape) / M
    recompute = (pass_s + fwd) if batch.checkpointing else 0.0
    per_step = L * num_experts * key_width * ADAMW_BYTES / gpu.hbm_bytes_per_s
    if placement == "gpu":
        elements = L * num_neurons * (key_width + d)
        fwd += elements * (FP32 + es) / gpu.hbm_bytes_per_s
        bwd += elements * (2 * es + 2 * FP32) / gpu.hbm_bytes_per_s
        per_step += elements * ADAMW_BYTES / gpu.hbm_bytes_per_s
    return Compute(pass_s + fwd, pass_s + bwd + recompute, per_step)


def _duration_s(gpu: GPU, traffic: list[LayerTraffic], compute: Compute, m: int) -> float:
    """Micro-batch ``m`` lasts its compute, or its value rows' host->device copies if longer
    (its compute reads them)."""
    h2d = sum(t.wire_h2d_mb[m] for t in traffic) / gpu.pcie_bytes_per_s
    return max(compute.forward_s + compute.backward_s, h2d)


def in_step_exposed(gpu: GPU, traffic: list[LayerTraffic], compute: Compute, *, hidden: int, key_width: int,
                    wire_es: int) -> tuple[float, float]:
    """``(PCIe, CPU)`` seconds of the step's in-step transfers and host work beyond its
    compute, as a pipeline. Host->device: a micro-batch's value rows are read by its own
    compute, so what exceeds it is exposed (and lengthens the micro-batch). Device->host: a
    micro-batch's gradient rows (if any) leave when its backward ends, on their own copy stream
    (the link is full duplex), behind the rows sent before; as they land each layer's optimizer
    thread sums them (``wire_es`` bytes per element on the wire: read it, read and write the
    fp32 sum; the layers share the host's bandwidth), behind the sums before. Nothing reads
    either until the step, so what is exposed is what is still queued when the last
    micro-batch ends: rows sent every micro-batch expose each one's excess over the slowest
    of the three; a few large sends drain between them."""
    per_mb = compute.forward_s + compute.backward_s
    record = (key_width + hidden) * wire_es + ID_BYTES
    exposed_h2d = now = link = host = 0.0
    for m in range(len(traffic[0].h2d_mb)):
        duration = _duration_s(gpu, traffic, compute, m)
        exposed_h2d += duration - per_mb
        now += duration
        d2h = sum(t.d2h_mb[m] for t in traffic)
        if d2h:
            link = max(link, now) + d2h / gpu.pcie_bytes_per_s
            elements = d2h / record * (key_width + hidden)
            host = max(host, link) + elements * (wire_es + 2 * FP32) / gpu.host_bytes_per_s
    return exposed_h2d + max(0.0, link - now), max(0.0, host - max(now, link))


def _keys_back_wait(start: float, traffic: list[LayerTraffic], gpu: GPU, compute: Compute) -> float:
    """From ``start`` seconds after the step's last backward, each layer's changed key rows
    cross to the device before its next forward, behind the forwards of the layers below it:
    how long the latest layer waits."""
    L = len(traffic)
    wait, link_free = 0.0, start
    for l, t in enumerate(traffic):
        link_free += t.boundary_h2d / gpu.pcie_bytes_per_s
        wait = max(wait, link_free - l * compute.forward_s / L)
    return max(0.0, wait)


def boundary_today(gpu: GPU, traffic: list[LayerTraffic], profile: RoutingProfile, compute: Compute, *,
                   hidden: int, key_width: int, es: int, include_cpu: bool = True) -> float:
    """Seconds the next step's forwards wait, per-micro-batch policy (see the module docstring)."""
    r = key_width
    cpu_bytes = 0.0
    for layer in profile.layers:  # (the rows were summed as they landed: in_step_exposed)
        cpu_bytes += layer.per_step * ((r + hidden) * ADAMW_BYTES + r * (FP32 + es))
    return _keys_back_wait(cpu_bytes / gpu.host_bytes_per_s if include_cpu else 0.0, traffic, gpu, compute)


def boundary_resident(gpu: GPU, traffic: list[LayerTraffic], profile: RoutingProfile, compute: Compute, *,
                      hidden: int, key_width: int, es: int, include_cpu: bool = True) -> float:
    """Seconds the next step's forwards wait, resident policy, as the runtime orders it: at the
    optimizer step every layer's gradient rows cross to the host (the link after the last
    backward, one layer after another), and each layer's optimizer thread takes its rows as
    they land (checked for non-finite values; where rows came home during the step too, summed
    into the fp32 accumulators: the compute-dtype row read, the fp32 sum read and written), the
    layers in parallel sharing the host's bandwidth, so that work overlaps the rest of the
    link; then every layer's AdamW runs at once on worker threads (all-or-nothing: the
    non-finite check and global-norm clipping need every layer's gradients first), then the
    key rows go back as under per-micro-batch."""
    r = key_width
    link = sum(t.boundary_d2h for t in traffic) / gpu.pcie_bytes_per_s
    landing_bytes = after_bytes = 0.0  # host work as rows land; after all have landed
    for t, layer in zip(traffic, profile.layers):
        record = (r + hidden) * es + ID_BYTES
        rows = t.boundary_d2h / record  # the rows sent home, padding included
        if sum(t.d2h_mb):  # rows came home during the step too (summed as they landed): these join them
            landing_bytes += rows * (r + hidden) * (es + 2 * FP32)
            after_bytes += layer.per_step * (r + hidden) * ADAMW_BYTES
        else:  # one batch: kept as it came, checked for non-finite values, read by the update
            landing_bytes += rows * (r + hidden) * es
            after_bytes += layer.per_step * (r + hidden) * (ADAMW_BYTES - FP32 + es)
        after_bytes += layer.per_step * r * (FP32 + es)  # key rows gathered and rounded for the device
    if not include_cpu:
        return _keys_back_wait(link, traffic, gpu, compute)
    # the first layer's rows land after its share of the link; the landing work then runs
    # beside the rest of it
    landed = max(link, link / len(traffic) + landing_bytes / gpu.host_bytes_per_s)
    return _keys_back_wait(landed + after_bytes / gpu.host_bytes_per_s, traffic, gpu, compute)
