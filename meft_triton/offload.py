"""Placement "cpu": the adapter's master rows live in CPU memory, only active rows move.

Per adapted layer (DESIGN.md section 3): the fp32 master keys and values and their AdamW
moments sit in a :class:`~meft_triton.row_store.CPURowStore`; the device keeps the router (a
normal parameter), a compute-dtype cache of the keys (so routing and key scores stay on the
device and exact) and shares a pool of value-row slots with the other layers through one
:class:`OffloadRuntime`. A call runs in two stages so the value-row copy overlaps the
backbone's FFN:

``start_routing``  route, score and select on the device; the unique active ids go to the
                   prefetcher, which starts copying their value rows into a free slot;
(the FFN runs)
``finish_values``  wait for the slot (an event, not a host sync), y = sum a_j V_j from it.

Backward fetches the value rows again (or keeps them, ``backward_rows="keep"``), computes
dh and d router on the device, and sends the row-sparse key/value gradients to pinned host
memory; :meth:`OffloadedRows.step` hands them to the layer's row-sparse AdamW, which updates
the CPU master on a worker thread. The layer's next ``start_routing`` waits for that update
and writes the touched key rows into the device cache first.
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from . import reference
from .optim import SparseRowAdamW
from .prefetch import CopyEngine, CudaCopyEngine, FakeCopyEngine, Prefetcher, Ticket
from .row_store import CPURowStore


class TritonStages:
    """The offloaded layer's device work on the Triton kernels."""

    @staticmethod
    def route(hidden, router_weight, experts_per_token, gate):
        from meft_triton.kernels import router_topk

        gate_logits, expert_ids = router_topk(hidden, router_weight, experts_per_token)
        return expert_ids, (gate_logits.softmax(-1) if gate == "softmax" else gate_logits)

    @staticmethod
    def select(hidden, keys, expert_ids, gate_weights, num_experts, topk):
        from meft_triton.kernels import sparse_kv_select

        return sparse_kv_select(hidden, keys, expert_ids, gate_weights, num_experts, topk, check_ids=False)

    @staticmethod
    def values(activations, local_ids, rows):
        from meft_triton.kernels import sparse_kv_values

        return sparse_kv_values(activations, local_ids, rows, check_ids=False)

    @staticmethod
    def backward(grad_y, hidden, router_weight, keys, rows, expert_ids, gate_weights, neuron_ids,
                 activations, local_ids, gate, param_grads=True):
        from meft_triton.kernels import sparse_kv_backward

        grads = sparse_kv_backward(grad_y, hidden, router_weight, keys, rows, expert_ids, gate_weights,
                                   neuron_ids, activations, gate, dense=False, check_ids=False,
                                   value_ids=local_ids, param_grads=param_grads)
        return grads.hidden, grads.router_weight, grads.row_ids, grads.key_rows, grads.value_rows


class TorchStages:
    """The same work through meft_triton.reference (CPU tensors without Triton's interpreter)."""

    @staticmethod
    def route(hidden, router_weight, experts_per_token, gate):
        _, expert_ids, gate_weights = reference.route(hidden, router_weight, experts_per_token, gate)
        return expert_ids, gate_weights.float()

    @staticmethod
    def select(hidden, keys, expert_ids, gate_weights, num_experts, topk):
        neurons_per_expert = keys.shape[0] // num_experts
        weights = gate_weights.to(hidden.dtype)
        scores = reference.candidate_scores(hidden, keys, expert_ids, weights, neurons_per_expert)
        neuron_ids = reference.select_neurons(scores, reference.candidate_ids(expert_ids, neurons_per_expert), topk)
        chosen = reference.selected_scores(hidden, keys, expert_ids, weights, neuron_ids, neurons_per_expert)
        return neuron_ids, torch.relu(chosen).float()

    @staticmethod
    def values(activations, local_ids, rows):
        return torch.einsum("tk,tkd->td", activations.to(rows.dtype), rows[local_ids])

    @staticmethod
    def backward(grad_y, hidden, router_weight, keys, rows, expert_ids, gate_weights, neuron_ids,
                 activations, local_ids, gate, param_grads=True):
        active = torch.unique(neuron_ids.long(), sorted=True)
        num_experts = router_weight.shape[0]
        neurons_per_expert = keys.shape[0] // num_experts
        with torch.enable_grad():
            h, g = hidden.detach().requires_grad_(), router_weight.detach().requires_grad_()
            key_rows = keys[active].detach().requires_grad_()
            value_rows = rows.detach().requires_grad_()
            _, _, weights = reference.route(h, g, expert_ids.shape[1], gate, expert_ids)
            owner = neuron_ids.long() // neurons_per_expert
            match = (owner[:, :, None] == expert_ids.long()[:, None, :]).to(weights.dtype)
            scores = (match * weights[:, None, :]).sum(-1) * torch.einsum("td,tkd->tk", h, key_rows[local_ids])
            y = torch.einsum("tk,tkd->td", torch.relu(scores), value_rows[local_ids])
            if not param_grads:
                return torch.autograd.grad(y, h, grad_y)[0], None, None, None, None
            dh, dg, dk, dv = torch.autograd.grad(y, (h, g, key_rows, value_rows), grad_y)
        return dh, dg, active, dk.float(), dv.float()


def stages_for(device: torch.device, backend: str):
    """Triton kernels on CUDA (or under the interpreter when asked), the reference otherwise."""
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        return TritonStages
    return TorchStages


def default_engine(device: torch.device, transfer: str) -> CopyEngine:
    """The copy engine for ``device``: CUDA streams and events on a GPU. On CPU compute (tests,
    CPU-only profiling) rows still go through the same slot schedule, copied on a worker thread."""
    if device.type == "cuda":
        return CudaCopyEngine(device, strategy=transfer)
    return FakeCopyEngine(max_delay=0.0, async_compute=False, workers=1, chunk_rows=1 << 30)


class RowCache:
    """Value rows kept on the device across forward-only passes (IST's scoring round).

    Several no-grad passes over one batch route most tokens to the same rows: each layer keeps
    the union of the rows it has fetched (sorted ids and their rows, compute dtype) and the
    next pass copies only the rows it lacks. The cache never exceeds ``budget_bytes`` of device
    memory: a layer whose grown union would not fit keeps what it had. The master rows cannot
    change while it lives (no optimizer step runs inside a scoring round) and it is dropped at
    the end of the round.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._layers: dict[int, tuple[Tensor, Tensor]] = {}

    def get(self, layer: int) -> tuple[Tensor, Tensor] | None:
        return self._layers.get(layer)

    def offer(self, layer: int, ids: Tensor, rows: Tensor) -> None:
        old = self._layers.get(layer)
        old_bytes = 0 if old is None else old[1].numel() * old[1].element_size()
        used = self.used_bytes - old_bytes + rows.numel() * rows.element_size()
        if used <= self.budget_bytes:
            self._layers[layer] = (ids, rows)
            self.used_bytes = used


class OffloadRuntime:
    """The copy engine and value-row slot pool shared by a model's CPU-placed adapters.

    Layers register in forward order. The slots are sized for the most active rows one layer
    needs in one call (``max_rows``), grown when a call needs more while nothing is in flight.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype, hidden_size: int, *,
                 transfer: str = "cpu_gather", keep_rows: bool = False, num_slots: int = 2,
                 engine: CopyEngine | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden_size = hidden_size
        self.keep_rows = keep_rows
        self.num_slots = num_slots
        if isinstance(engine, FakeCopyEngine) and engine.async_compute:
            # the layer's CPU work runs on the calling thread, not through engine.compute(): a
            # "compute stream" thread would not order it after the copies (it would read slots
            # before their rows land)
            raise ValueError("engine: OffloadRuntime needs a FakeCopyEngine with async_compute=False")
        self.engine = engine if engine is not None else default_engine(self.device, transfer)
        self.layers: list[OffloadedRows] = []
        self.prefetcher: Prefetcher | None = None
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self.rows_reused = 0
        self.row_cache: RowCache | None = None

    @contextmanager
    def reusing_rows(self, budget_bytes: int) -> Iterator[RowCache]:
        """Within the block, forward passes without autograd (``torch.no_grad``) copy only the
        value rows that an earlier such pass of the block did not already bring to the device
        (``rows_reused`` counts the others). Passes with autograd are unaffected."""
        if self.row_cache is not None:
            raise RuntimeError("reusing_rows blocks do not nest")
        self.row_cache = RowCache(budget_bytes)
        try:
            yield self.row_cache
        finally:
            self.row_cache = None

    def register(self, rows: "OffloadedRows") -> int:
        if self.prefetcher is not None:
            raise RuntimeError("register every layer before the first forward")
        self.layers.append(rows)
        return len(self.layers) - 1

    def _host_values(self, layer: int) -> Tensor:
        return self.layers[layer].store.values()

    def ensure_slots(self, rows_needed: int) -> Prefetcher:
        if self.prefetcher is not None and rows_needed <= self.prefetcher.max_rows:
            return self.prefetcher
        max_rows = max(rows_needed, 2 * (self.prefetcher.max_rows if self.prefetcher else 0))
        if self.prefetcher is not None:
            self.prefetcher.cancel_lookahead()
            if self.prefetcher.free_slots() < self.num_slots:
                raise RuntimeError(
                    f"a layer needs {rows_needed} active rows but the prefetch slots hold "
                    f"{self.prefetcher.max_rows} and are in use; run a first call with the largest "
                    "micro-batch, or create the runtime with bigger slots")
            # Gradient rows still on their way to the host were started by the old prefetcher,
            # whose close() would cancel them (losing a micro-batch's gradients): let them land.
            wait_futures([f for layer in self.layers for f in layer.pending_grads])
            self.prefetcher.close()
        self.prefetcher = Prefetcher(self.engine, self._host_values, max_rows=max_rows,
                                     num_slots=self.num_slots, width=self.hidden_size, dtype=self.dtype,
                                     keep_resident=self.keep_rows, owns_engine=False)
        return self.prefetcher

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.engine.close()


@dataclass
class RoutedTokens:
    """What ``start_routing`` hands to ``finish_values``: the selection and the copy in flight."""

    hidden: Tensor          # [T, d] in the compute dtype (what autograd differentiates)
    expert_ids: Tensor      # [T, P]
    gate_weights: Tensor    # [T, P] fp32
    neuron_ids: Tensor      # [T, K]
    activations: Tensor     # [T, K] fp32
    local_ids: Tensor       # [T, K]: each pick's row in the slot
    ticket: Ticket | None   # None: every row came from the row cache
    output_dtype: torch.dtype
    output_shape: torch.Size
    cached: tuple[Tensor, Tensor] | None = None  # a RowCache entry this call extends
    cache: RowCache | None = None


class OffloadedRows:
    """The CPU side of one adapter under placement "cpu": store, device key cache, optimizer."""

    def __init__(self, adapter, runtime: OffloadRuntime, keys: Tensor, values: Tensor) -> None:
        self.adapter = adapter
        self.runtime = runtime
        self.store = CPURowStore.from_dense(keys.detach().float().cpu(), values.detach().float().cpu())
        self.key_cache = keys.detach().to(runtime.device, runtime.dtype)
        self.layer = runtime.register(self)
        self.optimizer: SparseRowAdamW | None = None
        self.pending_grads: list[Future] = []
        self.pending_step: Future | None = None

    # -- training state ---------------------------------------------------------------------
    def configure_optimizer(self, **hyper: Any) -> SparseRowAdamW:
        """Create (or replace) the row-sparse AdamW over this layer's store."""
        self.wait_for_update()
        if self.optimizer is not None:
            self.optimizer.close()
        self.optimizer = SparseRowAdamW(self.store, **hyper)
        return self.optimizer

    def collect_grads(self) -> None:
        """Move finished device->host gradient rows into the optimizer's accumulator."""
        if self.optimizer is None:
            raise RuntimeError("placement='cpu' trains keys and values with a row-sparse AdamW: call "
                               "adapter.configure_optimizer(lr=...) before the first step")
        d = self.store.hidden_size
        pending, self.pending_grads = self.pending_grads, []
        for future in pending:
            grad = future.result()
            self.optimizer.accumulate(grad.row_ids, grad.rows[:, :d], grad.rows[:, d:])

    def discard_grads(self) -> None:
        """Drop this layer's gradient rows not yet stepped (in flight to the host or collected),
        as ``zero_grad`` drops a parameter's ``.grad``."""
        pending, self.pending_grads = self.pending_grads, []
        wait_futures(pending)  # their copies land before the pinned buffers are forgotten
        if self.optimizer is not None:
            self.optimizer.zero_grad()

    def step(self) -> Future:
        """Start this layer's optimizer step on its worker thread; the next forward waits for it."""
        self.collect_grads()
        self.wait_for_update()
        self.pending_step = self.optimizer.step_async()
        return self.pending_step

    def wait_for_update(self) -> None:
        """Finish an in-flight optimizer step and copy its updated key rows into the cache.
        A failed background step raises its exception here (the layer's next forward), once:
        the optimizer's own ``wait`` consumes it, so its next step does not raise it again."""
        if self.pending_step is None:
            return
        future, self.pending_step = self.pending_step, None
        if self.optimizer is not None and self.optimizer._pending is future:
            self.optimizer.wait()  # raises a worker error once, and forgets it
        touched = future.result()
        if touched.numel():
            fresh = self.store.keys()[touched].to(self.key_cache.device, self.key_cache.dtype)
            self.key_cache[touched.to(self.key_cache.device)] = fresh

    def close(self) -> None:
        """The adapter is being dropped: let in-flight gradient copies and the optimizer update
        finish, then stop the optimizer's worker thread (the runtime is closed by its owner)."""
        self.discard_grads()
        try:
            self.wait_for_update()
        finally:
            if self.optimizer is not None:
                self.optimizer.close()

    def refresh_key_cache(self) -> None:
        self.key_cache.copy_(self.store.keys().to(self.key_cache.device, self.key_cache.dtype))

    # -- the two forward stages ---------------------------------------------------------------
    def start_routing(self, hidden: Tensor) -> RoutedTokens:
        cfg = self.adapter.config
        self.wait_for_update()
        flat = hidden.reshape(-1, hidden.shape[-1]).to(self.runtime.dtype)
        stages = stages_for(flat.device, cfg.backend)
        with torch.no_grad():
            router_weight = self.adapter.router.weight.to(flat.dtype)
            expert_ids, gate_weights = stages.route(flat, router_weight, cfg.experts_per_token, cfg.gate)
            neuron_ids, activations = stages.select(flat, self.key_cache, expert_ids, gate_weights,
                                                    cfg.num_experts, cfg.topk)
            active, local_ids = torch.unique(neuron_ids.long(), sorted=True, return_inverse=True)
        cache = self.runtime.row_cache if not torch.is_grad_enabled() else None
        cached = cache.get(self.layer) if cache is not None else None
        fetch = active if cached is None else active[~torch.isin(active, cached[0])]
        ticket = None
        if fetch.numel() or cache is None:
            prefetcher = self.runtime.ensure_slots(max(1, fetch.numel()))
            ticket = prefetcher.prefetch(self.layer, fetch)
        self.runtime.bytes_to_device += fetch.numel() * self.runtime.hidden_size * flat.element_size()
        self.runtime.rows_reused += active.numel() - fetch.numel()
        return RoutedTokens(flat, expert_ids, gate_weights, neuron_ids, activations, local_ids,
                            ticket, hidden.dtype, hidden.shape, cached, cache)

    def abandon(self, routed: RoutedTokens) -> None:
        """``finish_values`` will not run for ``routed``: cancel its copy, free its slot."""
        if routed.ticket is not None and self.runtime.prefetcher is not None:
            self.runtime.prefetcher.release(routed.ticket)

    def finish_values(self, routed: RoutedTokens) -> Tensor:
        router_weight = self.adapter.router.weight
        if routed.cache is not None:
            y = self._values_from_cache(routed)
        else:
            # autograd records this call only if something upstream needs a gradient
            needs_backward = torch.is_grad_enabled() and (
                routed.hidden.requires_grad or router_weight.requires_grad)
            y = _OffloadedValues.apply(routed.hidden, router_weight, self, routed, needs_backward)
        return y.to(routed.output_dtype).reshape(routed.output_shape)

    def _values_from_cache(self, routed: RoutedTokens) -> Tensor:
        """A no-grad call inside ``runtime.reusing_rows``: y from the cached rows plus the ones
        this call fetched; the union goes back to the cache."""
        ids, rows = routed.cached if routed.cached is not None else (None, None)
        if routed.ticket is not None:
            prefetcher = self.runtime.prefetcher
            fresh = prefetcher.acquire(routed.ticket)
            try:
                fresh_ids, fresh = routed.ticket.row_ids.to(fresh.device), fresh.clone()
            finally:
                prefetcher.release(routed.ticket, for_backward=False)
            if ids is None:
                ids, rows = fresh_ids, fresh
            else:
                ids, order = torch.sort(torch.cat([ids, fresh_ids]))
                rows = torch.cat([rows, fresh])[order]
            routed.cache.offer(self.layer, ids, rows)
        local_ids = torch.searchsorted(ids, routed.neuron_ids.long())
        stages = stages_for(routed.hidden.device, self.adapter.config.backend)
        return stages.values(routed.activations, local_ids, rows)


class _OffloadedValues(torch.autograd.Function):
    """y from the slot rows; backward refetches them and ships key/value gradient rows home."""

    @staticmethod
    def forward(ctx, hidden, router_weight, rows: OffloadedRows, routed: RoutedTokens, needs_backward: bool):
        prefetcher = rows.runtime.prefetcher
        slot = prefetcher.acquire(routed.ticket)
        try:
            stages = stages_for(hidden.device, rows.adapter.config.backend)
            y = stages.values(routed.activations, routed.local_ids, slot)
        finally:
            prefetcher.release(routed.ticket, for_backward=needs_backward)
        ctx.rows, ctx.routed = rows, routed
        ctx.save_for_backward(hidden, router_weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        rows, routed = ctx.rows, ctx.routed
        hidden, router_weight = ctx.saved_tensors
        runtime, cfg = rows.runtime, rows.adapter.config
        prefetcher = runtime.prefetcher
        # The forward's own ids: a second forward (or a checkpoint's recompute) before this
        # backward would have replaced the layer's saved ids.
        ticket = prefetcher.backward_ticket(rows.layer, routed.ticket.row_ids)
        slot = prefetcher.acquire(ticket)
        # A frozen layer (adapter.requires_grad_(False), e.g. not chosen by IST this step) computes
        # only dh, moves no gradient rows and gives its optimizer nothing to do.
        trained = router_weight.requires_grad
        try:
            stages = stages_for(hidden.device, cfg.backend)
            grad_hidden, grad_router, row_ids, key_rows, value_rows = stages.backward(
                grad_y.to(hidden.dtype).contiguous(), hidden, router_weight.to(hidden.dtype), rows.key_cache,
                slot, routed.expert_ids, routed.gate_weights, routed.neuron_ids, routed.activations,
                routed.local_ids, cfg.gate, param_grads=trained)
        finally:
            prefetcher.release(ticket)
        if ticket.slot is not None:  # copied again (not rows kept from the forward)
            runtime.bytes_to_device += slot.numel() * slot.element_size()
        if not trained:
            return grad_hidden, None, None, None, None
        grad_rows = torch.cat([key_rows, value_rows], dim=1)
        runtime.bytes_to_host += grad_rows.numel() * grad_rows.element_size() + row_ids.numel() * 8
        rows.pending_grads.append(prefetcher.offload_grads(rows.layer, row_ids, grad_rows))
        return grad_hidden, grad_router.to(router_weight.dtype), None, None, None
