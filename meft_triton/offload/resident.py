"""Residency across micro-batches (docs/DESIGN.md, "Placement cpu"): the policy "resident".

Value rows do not change between optimizer steps, so a row copied to the device serves every
later micro-batch of the step, forward and backward; gradient rows are summed on the device
and cross to the host once per step. Both live in per-layer device tables whose bookkeeping
runs on the device, so the training thread never reads device data to decide what to copy:

* :class:`ResidentValues`: ``rows`` [C + 1, d] in the compute dtype (row C is a trash row
  that absorbs the padding's writes), ``position`` [N + 1] (each master row's position, -1:
  not on the device; entry N is the trash id), ``owner`` and ``last_use`` per position. A call
  with padded active ids (:func:`~meft_triton.layer.backend.unique_ids`, host-known length B)
  gets the missing ones, ascending and padded the same way, to hand to the copy engine, and
  the positions they go to: free positions first, then the least recently used ones that this
  call does not read (C >= B, so there are always enough). After the optimizer step the rows
  it changed are forgotten (:meth:`ResidentValues.forget`) and fetched again when next used.
* :class:`GradientSums`: fp32 sums [Cg + 1, r + d], one position per distinct row id the step's
  backwards produced (the order of first arrival), with a device count. The host knows an
  upper bound of the count (the padded ids it added); when it could pass the capacity, or at
  the step, :meth:`GradientSums.take` hands the first ``min(bound, Cg)`` positions home in the
  compute dtype, padded by repeats of the last valid id with zero rows (the padding the copy
  engines and ``offload_grads(padded=True)`` drop), and clears the sums.

* :class:`GradientFactors` (``MEFTConfig(gradient_form="factors")``): instead of sums, each
  backward's factors of its key/value gradients (its x, dy, expert ids, picks, their score
  gradients and activations: T (r + d) numbers where its rows take U (r + d), and one
  micro-batch of T tokens touches U >> T rows), appended to per-layer arenas of a capacity in
  tokens. When the next backward would not fit, or at the step, one launch of
  :func:`~meft_triton.kernels.key_value_rows` over all the held tokens computes their rows
  (the bound min(N, tokens x K_top), padded the same way) in the compute dtype, which go home.

A call whose rows are all on the device still hands the engine one row (the padded-ids
contract has no empty list); that row lands in the trash row and is counted.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _distinct(active: Tensor) -> Tensor:
    """Mask of the entries of ascending padded ids that are not a repeat of the one before."""
    first = torch.ones_like(active, dtype=torch.bool)
    first[1:] = active[1:] != active[:-1]
    return first


class ResidentValues:
    """One layer's value rows kept on the device across the micro-batches of a step."""

    def __init__(self, num_rows: int, width: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_rows, self.capacity = num_rows, capacity
        self.rows = torch.zeros(capacity + 1, width, dtype=dtype, device=device)
        self.position = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=device)
        self.owner = torch.full((capacity + 1,), num_rows, dtype=torch.int64, device=device)
        self.last_use = torch.full((capacity + 1,), -1, dtype=torch.int64, device=device)
        self.tick = 0  # calls so far: the recency of a position (host-side counter)
        self.forgets = 0  # forget calls so far (host-side)

    def still_holds(self, forgets: int) -> bool:
        """Whether every row resident when :attr:`forgets` was ``forgets`` still is (host-known:
        with room for every row nothing is evicted, so only a forget drops rows)."""
        return self.capacity >= self.num_rows and self.forgets == forgets

    @property
    def nbytes(self) -> int:
        tables = (self.rows, self.position, self.owner, self.last_use)
        return sum(t.numel() * t.element_size() for t in tables)

    def plan(self, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For ascending padded ids ``active`` [B] (B <= capacity): ``(fetch, dest, source)``,
        each [B]: the ids to copy (the missing ones ascending, padded by repeats of the last;
        one resident id when none is missing), and where slot row ``source[i]`` goes
        (``dest[i]``, the trash row for the padding). The tables already say the rows are
        here: write them (:meth:`fill`) before anything reads them."""
        self.tick += 1
        n, cap = active.numel(), self.capacity
        trash_pos = torch.full_like(active, cap)
        index = torch.arange(n, device=active.device)
        pos = self.position[active]
        hit = pos >= 0
        # positions this call reads are the most recent: never chosen to make room
        self.last_use.index_fill_(0, torch.where(hit, pos, trash_pos), self.tick)
        missing = (~hit) & _distinct(active)
        count = missing.sum()
        order = torch.argsort((~missing).to(torch.int8), stable=True)  # missing first, ascending
        last = (count - 1).clamp(min=0)
        fetch = active[order][torch.minimum(index, last)]
        victims = torch.argsort(self.last_use[:cap], stable=True)[:n]  # free (-1) first, then LRU
        taken = index < count
        dest = torch.where(taken, victims[index.clamp(max=victims.numel() - 1)], trash_pos)
        trash_id = torch.full_like(active, self.num_rows)
        # the rows evicted from the chosen positions are no longer on the device
        old = self.owner[dest]
        self.position.index_fill_(0, torch.where(taken, old, trash_id), -1)
        self.position.index_put_((torch.where(taken, fetch, trash_id),), torch.where(taken, dest, -1))
        self.position[self.num_rows] = -1
        self.owner.index_put_((dest,), torch.where(taken, fetch, trash_id))
        self.last_use.index_fill_(0, dest, self.tick)
        return fetch, dest, torch.minimum(index, last)

    def fill(self, dest: Tensor, source: Tensor, slot_rows: Tensor) -> None:
        """Compute side, after the copy: the fetched rows into their positions."""
        self.rows.index_copy_(0, dest, slot_rows.index_select(0, source).to(self.rows.dtype))

    def drop(self, dest: Tensor) -> None:
        """The rows planned into positions ``dest`` will never land (their copy was cancelled
        or failed): they are not on the device."""
        self.position.index_fill_(0, self.owner[dest], -1)
        self.position[self.num_rows] = -1
        self.owner.index_fill_(0, dest, self.num_rows)
        self.last_use.index_fill_(0, dest, -1)

    def local(self, neuron_ids: Tensor) -> Tensor:
        """Each pick's row in :attr:`rows` (every id must be resident: :meth:`plan` first)."""
        return self.position[neuron_ids.long()]

    def gather(self, active: Tensor) -> Tensor:
        """``[B, d]``: the rows of ``active`` in its order (what the backward stage reads)."""
        return self.rows.index_select(0, self.position[active].clamp(min=0))

    def forget(self, row_ids: Tensor) -> None:
        """The master rows ``row_ids`` changed (an optimizer step): drop their device copies."""
        if row_ids.numel() == 0:
            return
        self.forgets += 1
        ids = row_ids.to(self.position.device, torch.int64, non_blocking=True)
        pos = self.position[ids]
        held = pos >= 0
        free = torch.where(held, pos, torch.full_like(pos, self.capacity))
        self.owner.index_fill_(0, free, self.num_rows)
        self.last_use.index_fill_(0, free, -1)
        self.position.index_fill_(0, ids, -1)

    def forget_all(self) -> None:
        self.forgets += 1
        self.position.fill_(-1)
        self.owner.fill_(self.num_rows)
        self.last_use.fill_(-1)


class GradientSums:
    """One layer's gradient rows summed on the device across the micro-batches of a step."""

    def __init__(self, num_rows: int, width: int, capacity: int, device: torch.device) -> None:
        self.num_rows, self.capacity = num_rows, capacity
        self.sums = torch.zeros(capacity + 1, width, dtype=torch.float32, device=device)
        self.position = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=device)
        self.ids = torch.full((capacity + 1,), num_rows, dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.bound = 0  # host-known upper bound of ``count``

    @property
    def nbytes(self) -> int:
        tables = (self.sums, self.position, self.ids)
        return sum(t.numel() * t.element_size() for t in tables)

    def room_for(self, num_ids: int) -> bool:
        """Whether ``add`` of ``num_ids`` padded ids cannot overflow (host-known bounds)."""
        return min(self.num_rows, self.bound + num_ids) <= self.capacity

    def add(self, row_ids: Tensor, rows: Tensor) -> None:
        """Sum ``rows`` [B, r + d] into the rows ``row_ids`` (ascending, padded by repeats of the
        last id, whose rows are dropped). Check :meth:`room_for` first."""
        n = row_ids.numel()
        if not self.room_for(n):
            raise RuntimeError(f"{n} gradient rows could overflow the sums ({self.bound} of {self.capacity}): flush first")
        ids = row_ids.long()
        distinct = _distinct(ids)
        pos = self.position[ids]
        new = (pos < 0) & distinct
        rank = self.count + torch.cumsum(new, 0) - 1
        trash = torch.full_like(ids, self.capacity)
        target = torch.where(distinct, torch.where(new, rank, pos), trash)
        self.position.index_put_((torch.where(new, ids, torch.full_like(ids, self.num_rows)),),
                                 torch.where(new, target, -1))
        self.position[self.num_rows] = -1
        self.ids.index_put_((torch.where(new, target, trash),), torch.where(new, ids, self.num_rows))
        self.sums.index_add_(0, target, rows.float())
        self.count += new.sum()
        self.bound = min(self.num_rows, self.bound + n)

    def take(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The sums so far as ``(ids [n], rows [n, r + d])`` in ``dtype`` (fresh tensors, n the
        host-known bound; padded as the module docstring says), and clear the sums; None when
        nothing was added."""
        n = min(self.bound, self.capacity)
        if n == 0:
            return None
        index = torch.arange(n, device=self.sums.device)
        last = self.ids.index_select(0, (self.count - 1).clamp(min=0).view(1))
        ids = torch.where(index < self.count, self.ids[:n], last)
        rows = self.sums[:n].to(dtype, copy=True)
        self.clear()
        return ids, rows

    def clear(self) -> None:
        """Drop the sums (nothing to do when nothing was added)."""
        n = min(self.bound, self.capacity)
        if n == 0:
            return
        self.position.index_fill_(0, self.ids[:n], -1)  # unused positions hold the trash id N
        self.ids[:n] = self.num_rows
        self.sums[:n].zero_()
        self.sums[self.capacity].zero_()
        self.count.zero_()
        self.bound = 0


class GradientFactors:
    """One layer's key/value gradient factors held across the micro-batches of a step (module
    docstring), in arenas of ``capacity`` tokens created at the first :meth:`add`."""

    def __init__(self, num_rows: int, num_experts: int, capacity: int) -> None:
        self.num_rows, self.num_experts, self.capacity = num_rows, num_experts, capacity
        self.tokens = 0  # tokens held (host-known)
        self.arenas: list[Tensor] | None = None
        self.stages = None  # the backend that computes the rows (the calls')

    @staticmethod
    def token_bytes(*, key_width: int, hidden: int, experts_per_token: int, topk: int, es: int) -> int:
        """Device bytes per held token: x and dy in the compute dtype, int64 expert and neuron
        ids, fp32 score gradient and activation per pick."""
        return (key_width + hidden) * es + experts_per_token * 8 + topk * (8 + 4 + 4)

    @property
    def nbytes(self) -> int:
        return 0 if self.arenas is None else sum(t.numel() * t.element_size() for t in self.arenas)

    def room_for(self, num_tokens: int) -> bool:
        return self.tokens + num_tokens <= self.capacity

    def add(self, stages, hidden: Tensor, grad_y: Tensor, expert_ids: Tensor, neuron_ids: Tensor,
            pick_grads: Tensor, activations: Tensor) -> None:
        """Append one backward's factors (check :meth:`room_for` first)."""
        parts = (hidden, grad_y, expert_ids.long(), neuron_ids.long(), pick_grads, activations)
        n = hidden.shape[0]
        if not self.room_for(n):
            raise RuntimeError(f"{n} tokens of gradient factors could overflow ({self.tokens} of {self.capacity}): "
                               "flush first")
        if self.arenas is None:
            self.arenas = [torch.empty(self.capacity, *p.shape[1:], dtype=p.dtype, device=p.device) for p in parts]
        for arena, part in zip(self.arenas, parts):
            arena[self.tokens:self.tokens + n].copy_(part)
        self.tokens += n
        self.stages = stages

    def take(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The held tokens' key/value gradient rows ``(ids, rows)`` in ``dtype`` (fresh tensors,
        padded like :meth:`GradientSums.take`'s), and clear; None when nothing was added."""
        if self.tokens == 0:
            return None
        with torch.no_grad():
            held = [arena[:self.tokens] for arena in self.arenas]
            ids, rows = self.stages.key_value_rows(*held, self.num_rows, self.num_experts, dtype)
        self.clear()
        return ids, rows

    def clear(self) -> None:
        self.tokens = 0


class ResidentLayer:
    """Residency "resident" for one layer (``rows``, an :class:`~.rows.OffloadedRows`): its two
    tables, sized from ``MEFTConfig.value_budget`` / ``gradient_budget`` (split evenly over the
    runtime's layers) when a call first needs them; the copies in, and the gradient rows home.

    A budget whose share holds less than one call's padded ids runs that part per micro-batch:
    no value table (the call's rows go through a slot as under "per-micro-batch"), or no
    gradient sums (each backward's rows go home at once, in the compute dtype). Under
    ``gradient_form="factors"`` the gradient budget holds :class:`GradientFactors` instead of
    sums ("auto": when the share cannot hold the sums of every row); a backward with more
    tokens than its share holds sends its rows home at once.
    """

    def __init__(self, rows) -> None:
        self.rows = rows
        self.values: ResidentValues | None = None
        self.grads: GradientSums | None = None
        self.factors: GradientFactors | None = None
        self.id_bound = 0  # the padded ids the tables were sized for

    def _budgets(self, es: int) -> tuple[int, int]:
        cfg, runtime, store = self.rows.adapter.config, self.rows.runtime, self.rows.store
        value_budget, grad_budget = cfg.value_budget, cfg.gradient_budget
        if "auto" in (value_budget, grad_budget):
            if runtime.auto_budgets is None:  # once, before any layer's tables take memory
                from meft_triton.profiling.plan.auto import resident_budgets

                info = runtime.engine.memory_info()
                runtime.auto_budgets = resident_budgets(
                    layers=len(runtime.layers), num_neurons=store.num_rows, hidden=store.hidden_size,
                    key_width=store.key_size, es=es, free_bytes=None if info is None else info[0])
            value_budget = runtime.auto_budgets[0] if value_budget == "auto" else value_budget
            grad_budget = runtime.auto_budgets[1] if grad_budget == "auto" else grad_budget
        return value_budget, grad_budget

    def prepare(self, id_bound: int) -> None:
        """Tables for calls of up to ``id_bound`` padded ids (rebuilt, dropping what they held,
        when a call needs more than they were sized for)."""
        if id_bound <= self.id_bound:
            return
        runtime, store = self.rows.runtime, self.rows.store
        es = torch.empty((), dtype=runtime.dtype).element_size()
        layers = len(runtime.layers)
        value_budget, grad_budget = self._budgets(es)
        value_rows = min(store.num_rows, value_budget // (layers * store.hidden_size * es))
        grad_rows = min(store.num_rows, grad_budget // (layers * store.row_width * 4))
        self.flush()
        device = self.rows.key_cache.tensor.device
        self.values = (ResidentValues(store.num_rows, store.hidden_size, value_rows, runtime.dtype, device)
                       if value_rows >= id_bound else None)
        cfg = self.rows.adapter.config
        self.grads = self.factors = None
        form = cfg.gradient_form
        if form == "auto":  # the sums when they hold every row (one send per step), else factors
            form = "rows" if grad_rows >= store.num_rows else "factors"
        if form == "factors":
            token_bytes = GradientFactors.token_bytes(key_width=store.key_size, hidden=store.hidden_size,
                                                      experts_per_token=cfg.experts_per_token, topk=cfg.topk, es=es)
            tokens = grad_budget // (layers * token_bytes)
            self.factors = GradientFactors(store.num_rows, cfg.num_experts, tokens) if tokens else None
        elif grad_rows >= id_bound:
            self.grads = GradientSums(store.num_rows, store.row_width, grad_rows, device)
        self.id_bound = id_bound

    def fetch(self, active: Tensor, phase: str):
        """Start copying the rows of ``active`` not on the device; returns ``(ticket, fill)``
        for :meth:`land`, or None when this layer keeps no value table."""
        self.prepare(active.numel())
        if self.values is None:
            return None
        with torch.no_grad():
            fetch, dest, source = self.values.plan(active)
        prefetcher = self.rows.runtime.ensure_slots(active.numel())
        return prefetcher.prefetch(self.rows.layer, fetch, phase=phase, check_ids=False), (dest, source)

    def land(self, ticket, fill: tuple[Tensor, Tensor]) -> None:
        """Order the compute side after ``ticket``'s copy and put its rows in place."""
        runtime = self.rows.runtime
        values = self.values
        try:
            slot = runtime.prefetcher.acquire(ticket)
        except BaseException:
            values.drop(fill[0])  # the planned rows never land: the next call fetches them
            raise
        runtime.bytes_to_device += ticket.copied_bytes(slot)
        try:
            with torch.no_grad():
                runtime.engine.compute(lambda: values.fill(*fill, slot), reads=ticket.reads)
        finally:
            runtime.prefetcher.release(ticket, for_backward=False)

    def abandon(self, ticket, fill: tuple[Tensor, Tensor], values: ResidentValues) -> None:
        """A fetch whose rows will not be read: cancel its copy and forget what it planned."""
        self.rows.runtime.prefetcher.release(ticket)
        if values is self.values:
            values.drop(fill[0])

    def holds_factors(self, num_tokens: int) -> bool:
        """Whether a backward of ``num_tokens`` tokens keeps its gradient as factors."""
        return self.factors is not None and num_tokens <= self.factors.capacity

    def keep_factors(self, stages, *factors: Tensor) -> None:
        """One backward's gradient factors (:meth:`GradientFactors.add`'s), the held ones sent
        home as rows first if they would not fit."""
        if not self.factors.room_for(factors[0].shape[0]):
            self.flush()
        self.factors.add(stages, *factors)

    def ship(self, row_ids: Tensor, grad_rows: Tensor) -> None:
        """One backward's gradient rows (padded ascending ids): summed on the device (the sums
        sent home first if they could overflow), or home at once without gradient sums."""
        if self.grads is None:
            self._send(row_ids, grad_rows.to(self.rows.runtime.dtype))
            return
        if not self.grads.room_for(row_ids.numel()):
            self.flush()
        self.grads.add(row_ids, grad_rows)

    def flush(self) -> None:
        """Start sending the summed gradient rows home in the compute dtype (nothing to do when
        no backward ran since the last flush)."""
        held = self.factors if self.factors is not None else self.grads
        taken = None if held is None else held.take(self.rows.runtime.dtype)
        if taken is not None:
            self._send(*taken)

    def _send(self, ids: Tensor, rows: Tensor) -> None:
        runtime = self.rows.runtime
        runtime.bytes_to_host += rows.numel() * rows.element_size() + ids.numel() * 8
        self.rows.grads_sent(runtime.prefetcher.offload_grads(self.rows.layer, ids, rows, padded=True))

    def clear_grads(self) -> None:
        for held in (self.grads, self.factors):
            if held is not None:
                held.clear()

    def forget(self, row_ids: Tensor | None) -> None:
        """The master rows ``row_ids`` (None: all) changed: their device copies are stale."""
        if self.values is not None:
            self.values.forget_all() if row_ids is None else self.values.forget(row_ids)
