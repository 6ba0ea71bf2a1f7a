"""Placement "cpu": the adapter's master rows live in CPU memory, only active rows move.

Per adapted layer (docs/DESIGN.md, "Placement cpu"): the fp32 master keys and values and their
AdamW moments sit in a :class:`~meft_triton.offload.row_store.CPURowStore`; the device keeps the
router and the optional low-key projection L (normal parameters), a compute-dtype cache of the
keys ([N, r]: ``low_key_dim`` shrinks it; routing and key scores stay on the device and exact)
and shares a pool of value-row slots with the other layers through one
:class:`OffloadRuntime`. A call runs in two stages so the value-row copy overlaps the backbone's
FFN:

``start_routing``  route, score and select on the device; the unique active ids go to the
                   prefetcher, which starts copying their value rows into a free slot;
(the FFN runs)
``finish_values``  wait for the slot (an event, not a host sync), y = sum a_j V_j from it.

Under ``residency="resident"`` (the default, :mod:`.resident`) the slot carries only the rows
not yet on the device, into a per-layer value table where a row stays for the rest of the
optimizer step, forward and backward; backward's key/value gradient rows are summed on the
device (or, ``gradient_form="factors"``, kept as factors and turned into rows when the budget
is full and at the step) and sent home in the compute dtype. Under ``residency="per-micro-batch"``
every call reads all its rows from the slot, backward fetches them again (or keeps them,
``backward_rows="keep"``), and each backward sends its gradient rows home at once in fp32
(:attr:`OffloadedRows.pending_grads`). Either way dh and d router are computed on the device,
and :meth:`OffloadedRows.step` hands the rows that reached the host to the layer's row-sparse
AdamW, which updates the CPU master on a worker thread. The layer's next ``start_routing``
waits for that update and writes the touched key rows into the device cache first.
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..layer.backend import stages_for, unique_ids
from .errors import LayerUpdateError
from .key_cache import KeyCache
from .prefetcher import Ticket
from .resident import ResidentLayer, ResidentValues
from .row_store import CPURowStore
from .runtime import OffloadRuntime, RowCache


@dataclass
class RoutedTokens:
    """What ``start_routing`` hands to ``finish_values``: the selection and the copy in flight."""

    hidden: Tensor          # [T, r]: x = L h in the compute dtype (what autograd differentiates)
    expert_ids: Tensor      # [T, P]
    gate_weights: Tensor    # [T, P] fp32
    gate_lse: Tensor | None  # [T] fp32, log-sum-exp over all E logits (gate "softmax", kernels only)
    neuron_ids: Tensor      # [T, K]
    activations: Tensor     # [T, K] fp32
    local_ids: Tensor       # [T, K]: each pick's row in the slot
    ticket: Ticket | None   # None: every row came from the row cache
    output_dtype: torch.dtype
    output_shape: torch.Size
    cached: tuple[Tensor, Tensor] | None = None  # a RowCache entry this call extends
    cache: RowCache | None = None
    active: Tensor | None = None  # residency "resident": the padded distinct ids of the call
    fill: tuple[Tensor, Tensor] | None = None  # and where its fetched rows go (dest, source)
    resident_as_of: tuple[ResidentValues, int] | None = None  # the tables and their forgets then


def _sum_rows(optimizer: Any, future: Future) -> None:
    """One copy's gradient rows into ``optimizer`` (the first of a step kept as they came)."""
    grad = future.result()
    optimizer.accumulate_records(grad.row_ids, grad.rows)


class OffloadedRows:
    """The CPU side of one adapter under placement "cpu": store, device key cache, optimizer."""

    def __init__(self, adapter, runtime: OffloadRuntime, keys: Tensor, values: Tensor) -> None:
        self.adapter = adapter
        self.runtime = runtime
        self.store = CPURowStore.from_dense(keys.detach().float().cpu(), values.detach().float().cpu())
        self.key_cache = KeyCache(runtime, self.store.keys())
        self.layer = runtime.register(self)
        self.optimizer: Any = None  # the row-sparse AdamW over ``store`` (use_optimizer)
        # gradient copies home not yet given to an optimizer (none configured when they started)
        self.pending_grads: list[Future] = []
        # the others: each summed into the optimizer on its worker thread once it lands, in the
        # order sent, so their pinned host rows are freed during the step, not held until it
        self.summing: list[Future] = []
        self.pending_step: Future | None = None
        self.residency = ResidentLayer(self)  # residency "resident": tables built at the first call

    @property
    def is_resident(self) -> bool:
        return self.adapter.config.residency == "resident"

    def flush_grads(self) -> None:
        """Residency "resident": start sending the summed gradient rows home (see
        :meth:`ResidentLayer.flush`)."""
        self.residency.flush()

    # -- training state ---------------------------------------------------------------------
    def grads_sent(self, future: Future) -> None:
        """A copy of gradient rows home has started (a Future of ``GradRows``): with an optimizer,
        sum it into its accumulator on the optimizer's worker thread once it lands (the host
        work of the step's micro-batches overlaps the device's); else keep it for
        :meth:`collect_grads`."""
        if self.optimizer is None:
            self.pending_grads.append(future)
        else:
            self.summing.append(self.optimizer.run_in_order(_sum_rows, self.optimizer, future))

    def _wait_summing(self) -> None:
        """Wait for every background sum; raise the first failure (a failed copy) after all."""
        summing, self.summing = self.summing, []
        wait_futures(summing)
        for job in summing:
            job.result()

    def use_optimizer(self, optimizer: Any) -> None:
        """Train this layer's rows with ``optimizer`` (a ``SparseRowAdamW`` over :attr:`store`),
        replacing (and closing) the previous one once its update finished."""
        self.wait_for_update()
        self._wait_summing()
        if self.optimizer is not None:
            if self.optimizer.pending_rows:  # rows summed during this step: the new one steps them
                ids, records = self.optimizer.accumulated()
                optimizer.accumulate_records(ids.clone(), records.clone())
            self.optimizer.close()
        self.optimizer = optimizer

    def collect_grads(self) -> None:
        """Move finished device->host gradient rows into the optimizer's accumulator."""
        if self.optimizer is None:
            raise RuntimeError("placement='cpu' trains keys and values with a row-sparse AdamW: call "
                               "adapter.configure_optimizer(lr=...) before the first step")
        self.flush_grads()
        self._wait_summing()
        pending, self.pending_grads = self.pending_grads, []
        for future in pending:
            _sum_rows(self.optimizer, future)

    def discard_grads(self) -> None:
        """Drop this layer's gradient rows not yet stepped (in flight to the host or collected),
        as ``zero_grad`` drops a parameter's ``.grad``."""
        self.residency.clear_grads()
        pending, self.pending_grads = self.pending_grads, []
        wait_futures(pending)  # their copies land before the pinned buffers are forgotten
        summing, self.summing = self.summing, []
        wait_futures(summing)  # (a failed one added nothing)
        if self.optimizer is not None:
            self.optimizer.zero_grad()

    def step(self) -> Future:
        """Start this layer's optimizer step over the collected gradient rows (:meth:`collect_grads`)
        on its worker thread; the next forward waits for it."""
        self.wait_for_update()
        self.pending_step = self.optimizer.step_async()
        return self.pending_step

    def wait_for_update(self) -> None:
        """Finish an in-flight optimizer step and copy its updated key rows into the cache.
        A background step that failed is completed here by the optimizer's ``wait`` (it wrote
        nothing and kept its gradients), which raises ``LayerUpdateError`` naming the layer once;
        while it cannot complete, every call raises, and nothing reads the layer's stale rows."""
        future, self.pending_step = self.pending_step, None
        optimizer = self.optimizer
        if optimizer is None or (future is None and not optimizer.update_failed):
            return
        try:
            touched = optimizer.wait()
        except LayerUpdateError as exc:
            if exc.touched is not None:
                self.rows_changed(exc.touched)
            raise
        if touched is None and future is not None:  # someone else waited for it (state_dict)
            if future.exception() is not None:  # and completed it there: its ids went with the error
                self.refresh_key_cache()
                return
            touched = future.result()
        if touched is not None:
            self.rows_changed(touched)

    def rows_changed(self, row_ids: Tensor, *, elsewhere: bool = False) -> None:
        """The master rows ``row_ids`` changed: their keys to the cache, their resident values
        out. ``elsewhere``: another process's optimizer changed them (a shared row store), so
        this process's value shadow is refreshed here (its own optimizer does that itself)."""
        if elsewhere:
            self.store.refresh_shadow(row_ids)
        self.key_cache.write_back(row_ids)
        self.residency.forget(row_ids)

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
        """Every master row changed (a load, a re-initialisation): all keys again, no value
        row resident."""
        self.key_cache.refresh()
        self.store.refresh_shadow()
        self.residency.forget(None)

    # -- the two forward stages ---------------------------------------------------------------
    def start_routing(self, hidden: Tensor) -> RoutedTokens:
        cfg = self.adapter.config
        self.wait_for_update()
        flat = self.adapter.key_input(hidden.reshape(-1, hidden.shape[-1]).to(self.runtime.dtype))
        stages = stages_for(flat, cfg.backend)
        with torch.no_grad():
            router_weight = self.adapter.router.weight.to(flat.dtype)
            expert_ids, gate_weights, gate_lse = stages.route(flat, router_weight, cfg.experts_per_token, cfg.gate)
            neuron_ids, activations = stages.select(flat, self.key_cache.tensor, expert_ids, gate_weights,
                                                    cfg.num_experts, cfg.topk)
            # no host read before the backbone FFN is queued: the slot is sized by a host-known bound
            active, local_ids = unique_ids(neuron_ids, cfg.num_neurons)
        fetched = self.residency.fetch(active, "forward") if self.is_resident else None
        if fetched is not None:  # rows on the device serve every call until the step changes them
            values = self.residency.values
            return RoutedTokens(flat, expert_ids, gate_weights, gate_lse, neuron_ids, activations, local_ids,
                                fetched[0], hidden.dtype, hidden.shape, active=active, fill=fetched[1],
                                resident_as_of=(values, values.forgets))
        cache = self.runtime.row_cache if not torch.is_grad_enabled() and not self.is_resident else None
        cached = cache.get(self.layer) if cache is not None else None
        fetch = active
        if cache is not None:  # a no-grad scoring round, off the training path: exact ids
            active = fetch = active.unique_consecutive()
            if cached is not None:
                fetch = active[~torch.isin(active, cached[0])]
            self.runtime.rows_reused += active.numel() - fetch.numel()
        ticket = None
        if fetch.numel() or cache is None:
            prefetcher = self.runtime.ensure_slots(max(1, fetch.numel()))
            ticket = prefetcher.prefetch(self.layer, fetch, check_ids=False)
        return RoutedTokens(flat, expert_ids, gate_weights, gate_lse, neuron_ids, activations, local_ids,
                            ticket, hidden.dtype, hidden.shape, cached, cache)

    def abandon(self, routed: RoutedTokens) -> None:
        """``finish_values`` will not run for ``routed``: cancel its copy, free its slot."""
        if routed.fill is not None:
            self.residency.abandon(routed.ticket, routed.fill, routed.resident_as_of[0])
        elif routed.ticket is not None and self.runtime.prefetcher is not None:
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
            self.runtime.bytes_to_device += routed.ticket.copied_bytes(fresh)
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
        stages = stages_for(routed.hidden, self.adapter.config.backend)
        return stages.values(routed.activations, local_ids, rows)


class _OffloadedValues(torch.autograd.Function):
    """y from the slot rows (or the layer's resident rows); backward reads them again and ships
    the key/value gradient rows home (or sums them on the device)."""

    @staticmethod
    def forward(ctx, hidden, router_weight, rows: OffloadedRows, routed: RoutedTokens, needs_backward: bool):
        stages = stages_for(hidden, rows.adapter.config.backend)
        if routed.fill is not None:
            rows.residency.land(routed.ticket, routed.fill)
            values = routed.resident_as_of[0]
            y = stages.values(routed.activations, values.local(routed.neuron_ids), values.rows)
        else:
            prefetcher = rows.runtime.prefetcher
            slot = prefetcher.acquire(routed.ticket)
            rows.runtime.bytes_to_device += routed.ticket.copied_bytes(slot)
            try:
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
        # A frozen layer (adapter.requires_grad_(False), e.g. not chosen by IST this step) computes
        # only dh, moves no gradient rows and gives its optimizer nothing to do.
        trained = router_weight.requires_grad
        stages = stages_for(hidden, cfg.backend)

        grad_y = grad_y.to(hidden.dtype).contiguous()
        # residency "resident" with gradient_form "factors": dK, dV stay factors until the flush
        factored = trained and rows.is_resident and rows.residency.holds_factors(hidden.shape[0])

        def backward_stage(slot: Tensor):
            return stages.backward(
                grad_y, hidden, router_weight.to(hidden.dtype), rows.key_cache.tensor,
                slot, routed.expert_ids, routed.gate_weights, routed.neuron_ids, routed.activations,
                routed.local_ids, cfg.gate, routed.gate_lse, param_grads=trained, factored=factored)

        resident = routed.fill is not None and rows.residency.values is not None
        if resident:  # the forward's rows, fetched again unless surely still there
            tables, forgets = routed.resident_as_of
            if tables is not rows.residency.values or not tables.still_holds(forgets):
                rows.residency.land(*rows.residency.fetch(routed.active, "backward"))
            grads = backward_stage(rows.residency.values.gather(routed.active))
        else:
            prefetcher = runtime.prefetcher
            # The forward's own ids: a second forward (or a checkpoint's recompute) before this
            # backward would have replaced the layer's saved ids.
            ids = routed.ticket.row_ids if routed.fill is None else routed.active
            ticket = prefetcher.backward_ticket(rows.layer, ids, check_ids=False)
            slot = prefetcher.acquire(ticket)
            runtime.bytes_to_device += ticket.copied_bytes(slot)
            try:
                grads = backward_stage(slot)
            finally:
                prefetcher.release(ticket)
        grad_hidden, grad_router = grads[:2]
        if not trained:
            return grad_hidden, None, None, None, None
        if factored:
            rows.residency.keep_factors(stages, hidden, grad_y, routed.expert_ids, routed.neuron_ids, grads[2],
                                        routed.activations)
            return grad_hidden, grad_router.to(router_weight.dtype), None, None, None
        row_ids, key_rows, value_rows = grads[2:]
        grad_rows = torch.cat([key_rows, value_rows], dim=1)
        if rows.is_resident:
            rows.residency.ship(row_ids, grad_rows)
        else:
            runtime.bytes_to_host += grad_rows.numel() * grad_rows.element_size() + row_ids.numel() * 8
            rows.grads_sent(runtime.prefetcher.offload_grads(rows.layer, row_ids, grad_rows, padded=True))
        return grad_hidden, grad_router.to(router_weight.dtype), None, None, None
