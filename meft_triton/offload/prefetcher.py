"""Asynchronous, double-buffered prefetch of MEFT value rows (docs/DESIGN.md, "Placement cpu").

Under ``placement="cpu"`` a layer's value rows live in (pinned) CPU memory. Once the layer's
active neuron ids are known, :class:`Prefetcher` copies exactly those rows into one of a few
device *slots* while the backbone's FFN runs; the value kernel reads the slot; the slot is
refilled only after everything that reads it has finished. Gradient rows go back to pinned
host memory as each layer's backward produces them.

The schedule is written against a small :class:`CopyEngine` interface, so its ordering logic
runs and is tested on CPU:

* :class:`CudaCopyEngine`: the real one. A dedicated copy stream, a CUDA event per copy
  ("copy done"), an event recorded on the compute stream after a slot's last reader ("reader
  done") that the copy stream waits on before overwriting the slot, pinned staging buffers,
  ``non_blocking`` copies and ``record_stream`` for tensors that cross streams. Two transfer
  strategies, chosen by name (:data:`GATHER_STRATEGIES`): ``"cpu_gather"`` (sorted ids,
  multi-threaded ``index_select`` into a pinned staging buffer, one async host->device copy)
  and ``"zero_copy"`` (a GPU kernel reads the pinned host rows through unified addressing,
  :func:`zero_copy_gather`).
* :class:`~meft_triton.offload.sync_engine.SyncCopyEngine`: CPU compute, copies done at once.
* ``FakeCopyEngine`` (tests/fake_copy_engine.py): for tests. Copies complete on worker threads, late and out of
  order; an asynchronous "compute stream" thread runs the consumer's reads; the engine tracks
  the true state of every slot and records every read-before-copy-done and every
  overwrite-while-a-reader-is-pending as a violation.

Ordering is by events, fences and futures only; nothing here calls a device-wide synchronize.

Usage inside one adapted layer (forward, then backward in reverse layer order)::

    # forward of layer l, once the unique active ids are known (router + key scores)
    ticket = prefetcher.prefetch(l, ids)           # async copy into a free slot
    ffn_out = backbone_ffn(h)                       # overlaps the copy
    values = prefetcher.acquire(ticket)             # compute stream waits for the copy
    y = value_kernel(acts, ticket.row_ids, values)  # slot row i holds row ticket.row_ids[i]
    prefetcher.release(ticket)                      # reader-done marker; slot can be refilled

    # backward of layer l (layers visited L-1 .. 0)
    ticket = prefetcher.backward_ticket(l)          # also prefetches l-1, l-2, ... ahead
    values = prefetcher.acquire(ticket)
    grad_h, grad_keys, grad_values = value_backward(..., values)
    prefetcher.release(ticket)
    future = prefetcher.offload_grads(l, ticket.row_ids, grad_values)  # -> GradRows on host
"""


from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ..validation import check_int, describe, is_out_of_memory
from .engine import CopyEngine, CopyHandle, SlotBuffer
from .errors import (CopyCancelledError, CopyFailedError, PrefetchError, PrefetcherClosedError,
                     SlotAllocationError, SlotsExhaustedError)
from .gather import ID_DTYPES, distinct_prefix
from .workers import LIVE, settle

PHASES = ("forward", "backward")
#: forwards of one layer whose rows ``keep_resident`` keeps for their backwards (older: refetched)
RESIDENT_PER_LAYER = 4
_MiB = 1024 * 1024


class GradRows(NamedTuple):
    """Gradient rows of one layer in host memory: ``rows[i]`` belongs to row ``row_ids[i]``."""

    layer_idx: int
    row_ids: Tensor
    rows: Tensor


@dataclass(eq=False)
class Ticket:
    """One layer's rows on their way into a slot.

    ``row_ids`` is the order of the rows in the slot (sorted if the prefetcher sorts):
    ``rows[i]`` is host row ``row_ids[i]``. ``state``: "pending" (copy issued), "acquired"
    (the consumer may read ``rows``), "released", "cancelled" or "failed". ``slot`` is None for
    rows kept resident from the forward (``keep_resident=True``)."""

    layer_idx: int
    phase: str
    row_ids: Tensor
    num_rows: int
    slot: int | None
    state: str = "pending"
    rows: Tensor | None = None
    handle: CopyHandle | None = field(default=None, repr=False)
    _slot_obj: SlotBuffer | None = field(default=None, repr=False)
    _prior: tuple = field(default=(), repr=False)  # fences the copy was ordered after

    def copied_bytes(self, rows: Tensor) -> int:
        """Bytes this acquired ticket's copy moved into ``rows`` (its slot view): the rows its
        engine reports (the ids without their padding), else all of them; none for rows kept
        on the device since the forward."""
        if self.slot is None:
            return 0
        copied = self.num_rows if self.handle.rows is None else self.handle.rows
        return copied * rows.shape[1] * rows.element_size()

    @property
    def reads(self) -> tuple[tuple[SlotBuffer, CopyHandle], ...]:
        """What a consumer reads, in the form :meth:`CopyEngine.compute` declares."""
        if self._slot_obj is None or self.handle is None:
            return ()
        return ((self._slot_obj, self.handle),)


class Prefetcher:
    """A pool of ``num_slots`` device slots that layers' value rows are copied into, ahead of use.

    ``host_rows`` gives the host rows of each layer: a sequence of 2-D CPU tensors (one per
    layer, e.g. the value part of the pinned row store's [N, r + d] records) or a callable ``layer_idx -> Tensor``
    (then pass ``width``). A slot holds up to ``max_rows`` rows of ``width`` in ``dtype`` (the
    compute dtype; rows are cast during the transfer). Per layer visit:

    ``prefetch`` (start the copy into the least recently used free slot, ordered on the copy
    side after the reader-done marker of that slot's previous user: the host does not wait)
    -> ``acquire`` (the compute side waits for the copy) -> reads -> ``release`` (reader-done
    marker, slot back in the pool). ``prefetch`` raises :class:`SlotsExhaustedError` when every
    slot is held by an unreleased ticket (waiting in a single-threaded loop would deadlock);
    pass ``timeout`` > 0 to wait for another thread's release instead.

    Backward: ``backward_ticket(l)`` fetches the rows of layer ``l`` again (with the ids saved
    by the forward's ``release``) and prefetches up to ``backward_lookahead`` of the next
    layers (l-1, l-2, ...) into free slots. With ``keep_resident=True`` the forward's rows are
    instead kept on the device (a copy made on the compute side at ``release``) and handed
    back by ``backward_ticket`` without a transfer. A layer may run several forwards before
    their backwards (two losses, e.g. chosen and rejected answers): each backward gets its own
    forward's rows, matched by the forward ticket's ``row_ids`` object; the last
    ``RESIDENT_PER_LAYER`` forwards of a layer are kept, an older one is refetched.

    Thread-safe (autograd runs backward on its own thread). ``close()`` (or ``with``) cancels
    copies that have not started and stops the engine; it is also called at interpreter exit.
    """

    def __init__(
        self,
        engine: CopyEngine,
        host_rows: Sequence[Tensor] | Callable[[int], Tensor],
        *,
        max_rows: int,
        num_slots: int = 2,
        width: int | None = None,
        dtype: torch.dtype | None = None,
        sort_ids: bool = True,
        keep_resident: bool = False,
        backward_lookahead: int | None = None,
        timeout: float = 60.0,
        owns_engine: bool = True,
    ) -> None:
        if not isinstance(engine, CopyEngine):
            raise TypeError(f"engine must be a CopyEngine, got {type(engine).__name__}")
        self.engine = engine
        self.max_rows = check_int("max_rows", max_rows, 1)
        self.num_slots = check_int("num_slots", num_slots, 1)
        if callable(host_rows) and not isinstance(host_rows, Tensor):
            self._source: Callable[[int], Tensor] = host_rows
            self.num_layers: int | None = None
        else:
            layers = list(host_rows)
            if not layers:
                raise ValueError("host_rows must hold at least one layer's rows")
            for i, rows in enumerate(layers):
                self._check_host_rows(rows, f"host_rows[{i}]", layers[0].shape[1] if width is None else width)
            self._source = layers.__getitem__
            self.num_layers = len(layers)
            width = layers[0].shape[1] if width is None else width
            dtype = layers[0].dtype if dtype is None else dtype
        if width is None:
            raise ValueError("width is required when host_rows is a callable")
        self.width = check_int("width", width, 1)
        self.dtype = torch.float32 if dtype is None else dtype
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {self.dtype!r}")
        self.sort_ids = bool(sort_ids)
        self.keep_resident = bool(keep_resident)
        if backward_lookahead is None:
            backward_lookahead = num_slots - 1
        self.backward_lookahead = check_int("backward_lookahead", backward_lookahead, 0)
        self.timeout = timeout
        self.owns_engine = owns_engine

        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self._slots = self._allocate_slots()
        self._fences: list[tuple] = [() for _ in self._slots]
        self._free: deque[int] = deque(range(num_slots))
        self._holder: dict[int, Ticket] = {}
        self._saved_ids: dict[int, Tensor] = {}
        self._resident: dict[int, deque[tuple[Tensor, Tensor]]] = {}
        self._lookahead: dict[int, Ticket] = {}
        self._grad_futures: set[Future] = set()
        LIVE.add(self)

    # -- set-up ---------------------------------------------------------------------------
    def _allocate_slots(self) -> list[SlotBuffer]:
        slots: list[SlotBuffer] = []
        try:
            for i in range(self.num_slots):
                slots.append(self.engine.new_slot(i, self.max_rows, self.width, self.dtype))
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            slots.clear()
            raise SlotAllocationError(self._oom_message(exc)) from exc
        return slots

    def _oom_message(self, exc: BaseException) -> str:
        item = torch.empty((), dtype=self.dtype).element_size()
        per_slot = self.max_rows * self.width * item
        text = (
            f"could not allocate {self.num_slots} prefetch slot(s) of {self.max_rows} rows x {self.width} "
            f"{self.dtype} ({per_slot / _MiB:.1f} MiB each, {self.num_slots * per_slot / _MiB:.1f} MiB in all) "
            f"on {self.engine.device}: {exc}."
        )
        try:
            info = self.engine.memory_info()
        except Exception:  # noqa: BLE001 - the message is best effort
            info = None
        if info is None:
            return text + " Lower max_rows (tokens per micro-batch x topk bounds it) or num_slots."
        free = info[0]
        fit_slots = min(self.num_slots, free // per_slot)
        fit_rows = free // (self.num_slots * self.width * item)
        return text + (
            f" About {free / _MiB:.1f} MiB is free there, which fits num_slots={fit_slots} at "
            f"max_rows={self.max_rows}, or num_slots={self.num_slots} at max_rows<={fit_rows}"
            + (" (fewer than 2 slots: no double buffering)" if fit_slots < 2 else "")
            + ". Lower max_rows (tokens per micro-batch x topk bounds it) or num_slots; the engine "
            "stays open, so a smaller Prefetcher can reuse it."
        )

    def _check_host_rows(self, rows: Any, name: str, width: int | None) -> Tensor:
        if not isinstance(rows, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(rows).__name__}")
        if rows.dim() != 2 or (width is not None and rows.shape[1] != width):
            raise ValueError(f"{name} must be a 2-D tensor [N, {width}], got shape {tuple(rows.shape)}")
        if rows.device.type != "cpu":
            raise ValueError(f"{name} must be in host memory, got {rows.device}")
        if not rows.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {rows.dtype}")
        return rows

    # -- checks ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise PrefetcherClosedError("the prefetcher is closed")

    def _check_layer(self, layer_idx: Any) -> int:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int, got {type(layer_idx).__name__} {layer_idx!r}")
        if layer_idx < 0 or (self.num_layers is not None and layer_idx >= self.num_layers):
            upper = "" if self.num_layers is None else f", {self.num_layers - 1}"
            raise ValueError(f"layer_idx must be in [0{upper}], got {layer_idx}")
        return layer_idx

    def _check_ids(self, row_ids: Any, num_host_rows: int, values: bool = True) -> Tensor:
        if not isinstance(row_ids, Tensor):
            raise TypeError(f"row_ids must be a torch.Tensor, got {type(row_ids).__name__}")
        if row_ids.dim() != 1 or row_ids.dtype not in ID_DTYPES:
            raise ValueError(f"row_ids must be a 1-D int32/int64 tensor, got {describe(row_ids)}")
        if row_ids.device.type != "cpu" and row_ids.device != self.engine.device:
            raise ValueError(f"row_ids must be on the CPU or on {self.engine.device}, got {row_ids.device}")
        n = row_ids.numel()
        if n > self.max_rows:
            raise ValueError(f"row_ids has {n} ids but a slot holds max_rows={self.max_rows}")
        if values and n and row_ids.device.type == "cpu":  # cheap on the host; device ids are not synced on
            lo, hi = int(row_ids.min()), int(row_ids.max())
            if lo < 0 or hi >= num_host_rows:
                raise ValueError(f"row_ids must be in [0, {num_host_rows - 1}], got values in [{lo}, {hi}]")
        return row_ids

    # -- the slot pool ---------------------------------------------------------------------
    def _take_slot(self, timeout: float | None, what: str) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._free and self._lookahead:
            # lookahead prefetches are speculative: real work takes their slots, the layer
            # used last (the lowest) first
            self._cancel_locked(self._lookahead[min(self._lookahead)])
        while not self._free:
            self._check_open()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                held = ", ".join(
                    f"slot {s}: layer {t.layer_idx} {t.phase} ({t.state})" for s, t in sorted(self._holder.items())
                )
                raise SlotsExhaustedError(
                    f"no free slot for {what}: all {self.num_slots} are held ({held}); release or cancel "
                    "a ticket first, or use more num_slots"
                )
            self._cond.wait(remaining)
        return self._free.popleft()

    def _retire(self, ticket: Ticket, state: str, fences: tuple) -> None:
        """Under the lock: give the ticket's slot back, with the fences its next writer needs."""
        ticket.state = state
        if ticket.slot is not None and self._holder.get(ticket.slot) is ticket:
            del self._holder[ticket.slot]
            if not self._closed:
                self._fences[ticket.slot] = fences
                self._free.append(ticket.slot)
        if self._lookahead.get(ticket.layer_idx) is ticket:
            del self._lookahead[ticket.layer_idx]
        self._cond.notify_all()

    # -- forward / generic API -------------------------------------------------------------
    def prefetch(
        self, layer_idx: int, row_ids: Tensor, *, phase: str = "forward", timeout: float | None = 0.0,
        check_ids: bool = True,
    ) -> Ticket:
        """Start copying host rows ``row_ids`` of layer ``layer_idx`` into a free slot; returns
        at once. ``timeout``: how long to wait for a slot when all are held (0: raise).
        ``check_ids=False`` skips the range check of the id values (ids the package computed,
        whose check on a host copy would read them on the hot path)."""
        layer_idx = self._check_layer(layer_idx)
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        host = self._check_host_rows(self._source(layer_idx), f"host rows of layer {layer_idx}", self.width)
        ids = self._check_ids(row_ids, host.shape[0], values=check_ids)
        if self.sort_ids and ids.numel() > 1:
            ids = torch.sort(ids).values
        with self._cond:
            self._check_open()
            if phase == "forward" and layer_idx in self._lookahead:
                # a new forward of the layer: a lookahead made with its older ids is stale
                self._cancel_locked(self._lookahead[layer_idx])
            index = self._take_slot(timeout, f"layer {layer_idx} ({phase})")
            slot = self._slots[index]
            prior = self._fences[index]
            try:
                handle = self.engine.copy_in(slot, host, ids, after=prior)
            except BaseException:
                self._free.appendleft(index)
                raise
            ticket = Ticket(
                layer_idx=layer_idx, phase=phase, row_ids=ids, num_rows=ids.numel(), slot=index,
                handle=handle, _slot_obj=slot, _prior=prior,
            )
            self._holder[index] = ticket
            return ticket

    def acquire(self, ticket: Ticket, timeout: float | None = None) -> Tensor:
        """Order the compute side after the ticket's copy and return its rows ``[num_rows, width]``
        (a view of the slot, valid until ``release``). Raises :class:`CopyFailedError` /
        :class:`CopyCancelledError` / :class:`CopyTimeoutError` (the slot goes back to the pool)."""
        if not isinstance(ticket, Ticket):
            raise TypeError(f"ticket must be a Ticket, got {type(ticket).__name__}")
        with self._cond:
            self._check_open()
            if ticket.state == "acquired":
                return ticket.rows
            if ticket.state != "pending":
                raise PrefetchError(f"cannot acquire a {ticket.state} ticket (layer {ticket.layer_idx} {ticket.phase})")
            if ticket.slot is None:  # resident rows: ordered on the compute side already
                ticket.state = "acquired"
                return ticket.rows
        try:
            self.engine.consume(ticket.handle, self.timeout if timeout is None else timeout)
        except PrefetcherClosedError:
            raise
        except PrefetchError as exc:
            with self._cond:
                # the copy may still be running (timeout): the slot's next writer waits for it
                self._retire(ticket, "failed", ticket._prior + (ticket.handle,))
            raise type(exc)(
                f"layer {ticket.layer_idx} ({ticket.phase}), slot {ticket.slot}, {ticket.num_rows} rows: {exc}"
            ) from exc
        with self._cond:
            ticket.rows = ticket._slot_obj.tensor[: ticket.num_rows]
            ticket.state = "acquired"
            return ticket.rows

    def release(self, ticket: Ticket, *, for_backward: bool = True) -> None:
        """The consumer has issued its last read of ``ticket.rows``: record the reader-done marker
        and give the slot back. A pending ticket is cancelled; releasing twice is a no-op.

        A forward ticket's ids (or, with ``keep_resident``, its rows) are kept for the layer's
        backward; ``for_backward=False`` says no backward will follow (a no-grad or frozen
        forward), so nothing is kept and no backward lookahead will copy its rows."""
        if not isinstance(ticket, Ticket):
            raise TypeError(f"ticket must be a Ticket, got {type(ticket).__name__}")
        with self._cond:
            if ticket.state == "pending":
                self._cancel_locked(ticket)
                return
            if ticket.state != "acquired":
                return
            if ticket.slot is None:  # resident rows of the backward
                ticket.state = "released"
                ticket.rows = None
                self._saved_ids.pop(ticket.layer_idx, None)
                return
            if ticket.phase == "forward":
                if for_backward and self.keep_resident:
                    rows = ticket.rows
                    kept = torch.empty_like(rows)
                    self.engine.compute(lambda: kept.copy_(rows), reads=ticket.reads)
                    kept_rows = self._resident.setdefault(ticket.layer_idx, deque(maxlen=RESIDENT_PER_LAYER))
                    kept_rows.append((ticket.row_ids, kept))
                elif for_backward:
                    self._saved_ids[ticket.layer_idx] = ticket.row_ids
            else:
                self._saved_ids.pop(ticket.layer_idx, None)
            marker = self.engine.record_done()
            ticket.rows = None
            self._retire(ticket, "released", (marker,))

    def cancel(self, ticket: Ticket) -> None:
        """Drop a ticket that was not acquired; its copy is cancelled if it has not started."""
        with self._cond:
            if ticket.state == "pending":
                self._cancel_locked(ticket)
            elif ticket.state == "acquired":
                raise PrefetchError("cannot cancel an acquired ticket; release it")

    def _cancel_locked(self, ticket: Ticket) -> None:
        if ticket.slot is None:
            ticket.state = "cancelled"
            return
        ticket.handle.cancel()
        # if it could not be cancelled it may still write: the slot's next writer waits for it
        self._retire(ticket, "cancelled", ticket._prior + (ticket.handle,))

    # -- backward ----------------------------------------------------------------------------
    def backward_ticket(self, layer_idx: int, row_ids: Tensor | None = None, *, timeout: float | None = 0.0,
                        check_ids: bool = True) -> Ticket:
        """The ticket for layer ``layer_idx``'s backward: its rows again (ids saved by the
        forward's ``release`` unless ``row_ids`` is given), then prefetches of the next layers
        below it. Acquire and release it like a forward ticket. ``check_ids``: as in
        :meth:`prefetch`, for ``row_ids``."""
        layer_idx = self._check_layer(layer_idx)
        with self._cond:
            self._check_open()
            resident = self._take_resident(layer_idx, row_ids)
            if resident is not None:
                ids, rows = resident
                return Ticket(layer_idx=layer_idx, phase="backward", row_ids=ids, num_rows=ids.numel(), slot=None,
                              rows=rows)
            for other in [l for l in self._lookahead if l >= layer_idx]:  # stale or this layer's
                if other != layer_idx:
                    self._cancel_locked(self._lookahead[other])
            ticket = self._lookahead.pop(layer_idx, None)
            if ticket is not None and row_ids is not None and row_ids is not self._saved_ids.get(layer_idx):
                self._cancel_locked(ticket)  # the caller asks for other ids than the saved ones
                ticket = None
            if ticket is None:
                ids = row_ids if row_ids is not None else self._saved_ids.get(layer_idx)
                if ids is None:
                    raise PrefetchError(
                        f"no row ids for layer {layer_idx}'s backward: its forward did not release a "
                        "ticket (or was already consumed); pass row_ids"
                    )
                # saved ids were the forward's (checked then, if at all)
                ticket = self.prefetch(layer_idx, ids, phase="backward", timeout=timeout,
                                       check_ids=check_ids and row_ids is not None)
            self._prefetch_ahead(layer_idx)
            return ticket

    def _take_resident(self, layer_idx: int, row_ids: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Under the lock: the kept rows of the forward whose ticket had ``row_ids`` (the latest
        forward's when None), removed from the store; None when they are not kept."""
        kept = self._resident.get(layer_idx)
        if not kept:
            return None
        if row_ids is None:
            return kept.pop()
        for index, (ids, rows) in enumerate(kept):
            if ids is row_ids:
                del kept[index]
                return ids, rows
        return None

    def _prefetch_ahead(self, layer_idx: int) -> None:
        budget = self.backward_lookahead - len(self._lookahead)
        for nxt in sorted((l for l in self._saved_ids if l < layer_idx), reverse=True):
            if budget <= 0 or not self._free:
                return
            if nxt in self._lookahead:
                continue
            self._lookahead[nxt] = self.prefetch(nxt, self._saved_ids[nxt], phase="backward", check_ids=False)
            budget -= 1

    def cancel_lookahead(self) -> None:
        """Cancel the backward lookahead prefetches in flight (their slots go back to the pool)."""
        with self._cond:
            for ticket in list(self._lookahead.values()):
                self._cancel_locked(ticket)
            self._lookahead.clear()

    def reset_backward(self) -> None:
        """Forget saved ids and resident rows; cancel lookahead prefetches (e.g. after a step
        whose backward did not visit every layer)."""
        with self._cond:
            self.cancel_lookahead()
            self._saved_ids.clear()
            self._resident.clear()

    # -- gradients ---------------------------------------------------------------------------
    def offload_grads(self, layer_idx: int, row_ids: Tensor, rows: Tensor, *, padded: bool = False) -> Future:
        """Copy a layer's gradient rows (produced by the compute work issued so far) to pinned
        host memory, asynchronously. Returns a Future of :class:`GradRows`; it raises
        :class:`CopyFailedError` / :class:`CopyCancelledError` from ``result()`` on a fault.
        ``padded=True``: ``row_ids`` may end in repeats of the last id with zero rows (the
        padding of :func:`~meft_triton.layer.backend.unique_ids`), which the host drops once
        they arrive."""
        layer_idx = self._check_layer(layer_idx)
        if not isinstance(row_ids, Tensor) or row_ids.dim() != 1 or row_ids.dtype not in ID_DTYPES:
            raise ValueError(f"row_ids must be a 1-D int32/int64 tensor, got {describe(row_ids)}")
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] != row_ids.numel():
            raise ValueError(f"rows must be a 2-D tensor [len(row_ids)={row_ids.numel()}, width], got {describe(rows)}")
        with self._cond:
            self._check_open()
            inner = self.engine.copy_out((row_ids, rows))
            outer: Future = Future()
            outer.set_running_or_notify_cancel()
            self._grad_futures.add(outer)

        def done(f: Future) -> None:
            with self._cond:
                self._grad_futures.discard(outer)
            if f.cancelled():
                settle(outer, CopyCancelledError(f"gradient rows of layer {layer_idx}: the copy was cancelled"))
            elif f.exception() is not None:
                err = CopyFailedError(f"gradient rows of layer {layer_idx}: {f.exception()!r}")
                err.__cause__ = f.exception()
                settle(outer, err)
            else:
                ids, host_rows = f.result()
                kept = distinct_prefix(ids) if padded else ids.numel()
                settle(outer, None, GradRows(layer_idx, ids[:kept], host_rows[:kept]))

        inner.add_done_callback(done)
        return outer

    # -- introspection / shutdown ------------------------------------------------------------
    @property
    def slots(self) -> tuple[SlotBuffer, ...]:
        return tuple(self._slots)

    def free_slots(self) -> int:
        with self._cond:
            return len(self._free)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Cancel outstanding tickets and gradient copies that have not started, stop the engine
        (if owned) within ``timeout`` seconds. Idempotent; never blocks longer than the timeout."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            tickets = list(self._holder.values())
            grads = list(self._grad_futures)
            self._cond.notify_all()
        for t in tickets:
            if t.state == "pending":
                t.handle.cancel()
                t.state = "cancelled"
        if self.owns_engine:
            self.engine.close(timeout)
        for f in grads:
            settle(f, CopyCancelledError("the prefetcher was closed before the copy finished"))
        with self._cond:
            self._holder.clear()
            self._lookahead.clear()
            self._resident.clear()
            self._saved_ids.clear()
        LIVE.discard(self)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Prefetcher(engine={type(self.engine).__name__}, num_slots={self.num_slots}, "
            f"max_rows={self.max_rows}, width={self.width}, dtype={self.dtype}, free={len(self._free)})"
        )
