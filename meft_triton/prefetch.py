"""Asynchronous, double-buffered prefetch of MEFT value rows (DESIGN.md section 3, issue 3).

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
* :class:`FakeCopyEngine`: for tests. Copies complete on worker threads, late and out of
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

import atexit
import importlib
import itertools
import os
import queue
import random
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "CopyCancelledError",
    "CopyEngine",
    "CopyFailedError",
    "CopyHandle",
    "CopyTimeoutError",
    "CudaCopyEngine",
    "EngineWorkerError",
    "FakeCopyEngine",
    "Fence",
    "GATHER_STRATEGIES",
    "GradRows",
    "PrefetchError",
    "Prefetcher",
    "PrefetcherClosedError",
    "SlotAllocationError",
    "SlotBuffer",
    "SlotsExhaustedError",
    "Ticket",
    "cpu_gather",
    "zero_copy_gather",
]

ID_DTYPES = (torch.int32, torch.int64)
PHASES = ("forward", "backward")
#: forwards of one layer whose rows ``keep_resident`` keeps for their backwards (older: refetched)
RESIDENT_PER_LAYER = 4
_MiB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class PrefetchError(RuntimeError):
    """Base class of the prefetcher's errors."""


class CopyFailedError(PrefetchError):
    """A host->device or device->host copy failed; the original error is the ``__cause__``."""


class CopyCancelledError(PrefetchError):
    """The copy was cancelled (``Ticket``/``Prefetcher`` cancelled or closed) before it ran."""


class CopyTimeoutError(PrefetchError):
    """Waiting for a copy took longer than the timeout."""


class SlotsExhaustedError(PrefetchError):
    """Every slot is held by a ticket that was not released (or cancelled) yet."""


class PrefetcherClosedError(PrefetchError):
    """The prefetcher or its engine is closed."""


class EngineWorkerError(PrefetchError):
    """A background thread of a copy engine died; the original error is the ``__cause__``."""


class SlotAllocationError(PrefetchError, torch.OutOfMemoryError):
    """Not enough memory for the requested slots; the message says which sizes would fit.

    Also a ``torch.OutOfMemoryError``, so code that already catches that keeps working."""


# --------------------------------------------------------------------------------------------
# The copy-engine interface
# --------------------------------------------------------------------------------------------


class Fence(ABC):
    """A point in some stream of work that other work can be ordered after.

    A fence is *finished* once the work before it is over, successfully or not."""

    @abstractmethod
    def query(self) -> bool:
        """True once finished; never blocks."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling host thread until finished; False if ``timeout`` passed first."""


class CopyHandle(Fence):
    """An asynchronous host->device row copy, in two phases.

    ``submitted`` (a :class:`concurrent.futures.Future`) resolves once the copy has been handed
    to the transfer side (CUDA: the CPU gather finished and the device copy is enqueued on the
    copy stream). Errors the host can know about (a failed gather, bad ids, an injected fault)
    and cancellation show up here. The transfer itself then completes asynchronously; its
    completion is what :meth:`query` / :meth:`wait` report, and what a consumer is ordered
    after by :meth:`CopyEngine.consume`.
    """

    def __init__(self) -> None:
        self.submitted: Future = Future()

    def cancel(self) -> bool:
        """Cancel the copy if it has not started; True if it will never write anything."""
        return self.submitted.cancel()

    def failed(self) -> bool:
        s = self.submitted
        return s.done() and (s.cancelled() or s.exception() is not None)

    def check(self, timeout: float | None = None) -> Any:
        """Wait for the submission phase only and return its value, or raise
        :class:`CopyFailedError` / :class:`CopyCancelledError` / :class:`CopyTimeoutError`."""
        try:
            return self.submitted.result(timeout)
        except CancelledError:
            raise CopyCancelledError("the copy was cancelled before it ran") from None
        except FutureTimeoutError:
            raise CopyTimeoutError(f"the copy was not submitted within {timeout} s") from None
        except PrefetchError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised with context
            raise CopyFailedError(f"the copy failed: {type(exc).__name__}: {exc}") from exc

    @abstractmethod
    def _transfer_done(self) -> bool: ...

    @abstractmethod
    def _transfer_wait(self, timeout: float | None) -> bool: ...

    def query(self) -> bool:
        if not self.submitted.done():
            return False
        return self.failed() or self._transfer_done()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.submitted.exception(timeout)
        except CancelledError:
            return True
        except FutureTimeoutError:
            return False
        if self.failed():
            return True
        return self._transfer_wait(None if deadline is None else max(0.0, deadline - time.monotonic()))


@dataclass(eq=False)
class SlotBuffer:
    """One device slot: ``tensor`` is ``[max_rows, width]`` in the slot dtype on the engine's
    device. Engines keep their private per-slot state (staging buffer, last copy) in subclasses."""

    index: int
    tensor: Tensor

    @property
    def max_rows(self) -> int:
        return self.tensor.shape[0]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class CopyEngine(ABC):
    """Moves rows between host memory and device slots, asynchronously, in a stated order.

    The engine guarantees no ordering between copies except what ``after`` states; the
    :class:`Prefetcher` passes every fence it relies on. "Compute" is the consumer's side
    (CUDA: the current stream at the time of the call).
    """

    device: torch.device

    @abstractmethod
    def new_slot(self, index: int, max_rows: int, width: int, dtype: torch.dtype) -> SlotBuffer:
        """Allocate one slot; raises ``torch.OutOfMemoryError`` (or ``MemoryError``) if it does
        not fit."""

    def memory_info(self) -> tuple[int, int] | None:
        """(bytes free for new slots, total bytes) on the device, or None if unknown."""
        return None

    @abstractmethod
    def copy_in(
        self, slot: SlotBuffer, host_rows: Tensor, ids: Tensor, *, after: Sequence[Fence] = ()
    ) -> CopyHandle:
        """Start ``slot.tensor[i] = host_rows[ids[i]]`` for ``i < len(ids)`` (cast to the slot
        dtype). Returns at once; nothing is written into the slot before every fence in
        ``after`` finished. ``ids`` may live on the host or on the device; if on the device they
        are read after the compute work issued so far."""

    @abstractmethod
    def consume(self, handle: CopyHandle, timeout: float | None = None) -> None:
        """Order the compute side after the copy: reads issued after this call see the rows.
        Blocks the host only for the submission phase; raises :class:`CopyFailedError`,
        :class:`CopyCancelledError` or :class:`CopyTimeoutError`."""

    @abstractmethod
    def record_done(self) -> Fence:
        """A fence that finishes once all compute work issued so far has finished (the
        reader-done marker of a slot, or the producer-done marker of gradient rows)."""

    @abstractmethod
    def compute(self, fn: Callable[[], Any], reads: Iterable[tuple[SlotBuffer, CopyHandle]] = ()) -> None:
        """Issue ``fn`` on the compute side (CUDA: call it now, it enqueues kernels on the
        current stream). ``reads`` declares which slots, filled by which copy, ``fn`` reads; the
        fake engine checks them, the CUDA engine ignores them."""

    @abstractmethod
    def copy_out(self, tensors: Sequence[Tensor]) -> Future:
        """Copy device tensors, produced by the compute work issued so far, to (pinned) host
        memory. The future resolves to a tuple of host tensors once the copy finished."""

    @property
    def closed(self) -> bool:
        return getattr(self, "_closed", False)

    def close(self, timeout: float = 5.0) -> None:
        """Stop background threads; cancel copies that have not started; wait at most
        ``timeout`` seconds for the rest. Idempotent."""
        self._closed = True

    def __enter__(self) -> "CopyEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Shutdown: every engine is closed at interpreter exit, with a timeout, so copies in flight
# never hang the exit. All background threads are daemon threads.
# --------------------------------------------------------------------------------------------

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
EXIT_TIMEOUT_S = 2.0


def _close_all_at_exit() -> None:
    for obj in list(_LIVE):
        try:
            obj.close(timeout=EXIT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_close_all_at_exit)


class _DaemonPool:
    """A tiny FIFO thread pool of daemon threads (concurrent.futures' pool joins its threads at
    exit, which would hang on a copy that never finishes)."""

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise PrefetcherClosedError("the copy engine is closed")
            self._queue.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the future's owner
                fut.set_exception(exc)

    def close(self, timeout: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:  # cancel what has not started
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------------------------
# Transfer strategies (selected by name)
# --------------------------------------------------------------------------------------------


def _check_rows_ids_out(host_rows: Tensor, ids: Tensor, out: Tensor) -> int:
    if not isinstance(host_rows, Tensor) or host_rows.dim() != 2:
        raise ValueError(f"host_rows must be a 2-D tensor [N, width], got {_describe(host_rows)}")
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype not in ID_DTYPES:
        raise ValueError(f"ids must be a 1-D int32/int64 tensor, got {_describe(ids)}")
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError(f"out must be a 2-D tensor, got {_describe(out)}")
    n = ids.numel()
    if tuple(out.shape) != (n, host_rows.shape[1]):
        raise ValueError(
            f"out must have shape [len(ids), width] = [{n}, {host_rows.shape[1]}], got {tuple(out.shape)}"
        )
    if not host_rows.is_floating_point() or not out.is_floating_point():
        raise TypeError(f"host_rows and out must be floating point, got {host_rows.dtype} and {out.dtype}")
    return n


def cpu_gather(
    host_rows: Tensor, ids: Tensor, out: Tensor, *, pool: "_DaemonPool | None" = None, min_rows_per_task: int = 256
) -> Tensor:
    """``out[i] = host_rows[ids[i]]`` on the CPU (cast to ``out.dtype``), split over ``pool``'s
    threads. ``host_rows`` may be a strided view (e.g. the value half of [N, 2d] neuron rows);
    ``ids`` should be sorted (sequential reads); ``out`` is the pinned staging buffer."""
    n = _check_rows_ids_out(host_rows, ids, out)
    if host_rows.device.type != "cpu" or ids.device.type != "cpu" or out.device.type != "cpu":
        raise ValueError("cpu_gather needs host_rows, ids and out on the CPU")
    if n == 0:
        return out
    bounds = [0, n]
    if pool is not None and n >= 2 * min_rows_per_task:
        tasks = min(len(pool._threads) + 1, n // min_rows_per_task)
        bounds = [n * k // tasks for k in range(tasks + 1)]
    futures = [pool.submit(_gather_chunk, host_rows, ids, out, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    _gather_chunk(host_rows, ids, out, bounds[0], bounds[1])
    for f in futures:
        f.result()  # re-raises a chunk's error
    return out


def _gather_chunk(host_rows: Tensor, ids: Tensor, out: Tensor, a: int, b: int) -> None:
    if out.dtype == host_rows.dtype and out.is_contiguous():
        torch.index_select(host_rows, 0, ids[a:b], out=out[a:b])
    else:
        out[a:b].copy_(host_rows.index_select(0, ids[a:b]))


#: Where :func:`zero_copy_gather` finds its Triton launcher: ``module.function(host_rows, ids,
#: out)``. The kernel owner provides it in ``kernels/``; the contract is zero_copy_gather's.
ZERO_COPY_KERNEL = ("meft_triton.kernels.zero_copy_gather", "zero_copy_gather_rows")
_zero_copy_launcher: Callable[..., Any] | None = None


def _load_zero_copy_kernel() -> Callable[..., Any]:
    global _zero_copy_launcher
    if _zero_copy_launcher is None:
        module_name, fn_name = ZERO_COPY_KERNEL
        try:
            module = importlib.import_module(module_name)
            _zero_copy_launcher = getattr(module, fn_name)
        except (ImportError, AttributeError) as exc:
            raise NotImplementedError(
                f"the zero-copy gather kernel is not available: {module_name}.{fn_name}(host_rows, ids, out) "
                f"is missing ({exc}); use CudaCopyEngine(strategy='cpu_gather')"
            ) from exc
    return _zero_copy_launcher


def zero_copy_gather(host_rows: Tensor, ids: Tensor, out: Tensor) -> Tensor:
    """``out[i] = host_rows[ids[i]]`` (cast to ``out.dtype``) by a GPU kernel that reads the
    *pinned* host rows directly through unified virtual addressing: no staging buffer, no CPU
    work, only the selected rows cross PCIe. Runs on the current CUDA stream.

    Contract for the kernel launcher (``ZERO_COPY_KERNEL``): ``host_rows`` is a pinned CPU
    tensor ``[N, width]`` with ``stride(1) == 1`` and any row stride (a view into [N, 2d] neuron
    rows); ``ids`` is int32/int64 on ``out.device`` (sorted, in range, checked by the caller);
    ``out`` is ``[len(ids), width]`` on CUDA with ``stride(1) == 1``. Offsets
    ``ids[i] * host_rows.stride(0)`` must be computed in int64 (they pass 2^31 at LLaMA-7B
    shapes: 65536 rows x 8192 floats); an empty ``ids`` launches nothing.
    """
    n = _check_rows_ids_out(host_rows, ids, out)
    if host_rows.device.type != "cpu":
        raise ValueError(f"host_rows must be on the CPU (pinned), got {host_rows.device}")
    if not out.is_cuda:
        raise ValueError(f"out must be a CUDA tensor, got {out.device}")
    if ids.device != out.device:
        raise ValueError(f"ids must be on out's device {out.device}, got {ids.device}")
    if host_rows.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("host_rows and out must have unit stride along their rows (stride(1) == 1)")
    if not host_rows.is_pinned():
        raise ValueError("host_rows must be in pinned memory for a zero-copy gather (tensor.pin_memory())")
    if n == 0:
        return out
    _load_zero_copy_kernel()(host_rows, ids, out)
    return out


#: Transfer strategies of :class:`CudaCopyEngine`, by name.
GATHER_STRATEGIES: dict[str, Callable[..., Tensor]] = {"cpu_gather": cpu_gather, "zero_copy": zero_copy_gather}


# --------------------------------------------------------------------------------------------
# CUDA engine (not runnable without a GPU; its tests are marked gpu)
# --------------------------------------------------------------------------------------------


class _CudaFence(Fence):
    def __init__(self, event: "torch.cuda.Event") -> None:
        self.event = event

    def query(self) -> bool:
        return self.event.query()

    def wait(self, timeout: float | None = None) -> bool:
        return _wait_event(self.event, timeout)


def _wait_event(event: "torch.cuda.Event", timeout: float | None, closed: Callable[[], bool] | None = None) -> bool:
    """Poll an event with a bounded sleep, so a waiting host thread stays interruptible."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 2e-5
    while not event.query():
        if closed is not None and closed():
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 2e-4)
    return True


class _CudaCopyHandle(CopyHandle):
    """``submitted`` resolves to the CUDA event recorded on the copy stream after the copy."""

    def __init__(self) -> None:
        super().__init__()
        self.start_event: "torch.cuda.Event | None" = None  # with timing=True

    def _transfer_done(self) -> bool:
        return self.submitted.result().query()

    def _transfer_wait(self, timeout: float | None) -> bool:
        return _wait_event(self.submitted.result(), timeout)

    @property
    def done_event(self) -> "torch.cuda.Event":
        return self.submitted.result()


@dataclass(eq=False)
class _CudaSlot(SlotBuffer):
    staging: Tensor | None = None  # pinned, [max_rows, width], slot dtype ("cpu_gather")
    staging_free: "torch.cuda.Event | None" = None  # last copy out of staging


class CudaCopyEngine(CopyEngine):
    """Copies on dedicated CUDA streams, ordered by CUDA events.

    * ``h2d_stream``: value rows host->device into slots. Before writing a slot it waits (on
      the GPU, not the host) for every fence passed in ``after``: the reader-done event the
      compute stream recorded after the slot's previous reader.
    * ``d2h_stream``: gradient rows device->host into pinned buffers, after the compute
      stream's producer event.
    * ``ids_stream``: device-side ids -> pinned host memory for the CPU gather.

    ``strategy`` names a transfer strategy in :data:`GATHER_STRATEGIES`. With
    ``"cpu_gather"`` a single FIFO submit thread (so copies into one slot never overtake each
    other, and its pinned staging buffer is rewritten only after its previous copy finished)
    gathers on ``gather_threads`` CPU threads and enqueues one async copy; ``prefetch`` never
    waits for it. With ``"zero_copy"`` the gather kernel is enqueued on ``h2d_stream`` at once.
    ``timing=True`` records timing events around every copy (``handle.start_event`` /
    ``handle.done_event``), for the profiling suite's timelines.
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        strategy: str = "cpu_gather",
        *,
        gather_threads: int | None = None,
        timing: bool = False,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaCopyEngine needs a CUDA device; FakeCopyEngine runs the same schedule on CPU")
        if strategy not in GATHER_STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(map(repr, GATHER_STRATEGIES))}, got {strategy!r}")
        device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if gather_threads is None:
            gather_threads = max(1, min(4, (os.cpu_count() or 1) - 1))
        if isinstance(gather_threads, bool) or not isinstance(gather_threads, int) or gather_threads < 1:
            raise ValueError(f"gather_threads must be an int >= 1, got {gather_threads!r}")
        self.device = device
        self.strategy = strategy
        self._gather = GATHER_STRATEGIES[strategy]
        self.timing = bool(timing)
        self._closed = False
        with torch.cuda.device(device):
            self.h2d_stream = torch.cuda.Stream(device)
            self.d2h_stream = torch.cuda.Stream(device)
            self.ids_stream = torch.cuda.Stream(device)
        self._submit = _DaemonPool(1, "meft-prefetch-submit")
        self._gather_pool = _DaemonPool(gather_threads - 1, "meft-prefetch-gather") if gather_threads > 1 else None
        self._waiter = _DaemonPool(1, "meft-prefetch-d2h-wait")
        _LIVE.add(self)

    # -- slots ---------------------------------------------------------------------------
    def new_slot(self, index: int, max_rows: int, width: int, dtype: torch.dtype) -> SlotBuffer:
        tensor = torch.empty((max_rows, width), dtype=dtype, device=self.device)
        staging = None
        if self.strategy == "cpu_gather":
            staging = torch.empty((max_rows, width), dtype=dtype, pin_memory=True)
        return _CudaSlot(index=index, tensor=tensor, staging=staging)

    def memory_info(self) -> tuple[int, int] | None:
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return free + max(0, cached), total

    def _event(self, blocking: bool = False) -> "torch.cuda.Event":
        return torch.cuda.Event(enable_timing=self.timing, blocking=blocking)

    def _order_after(self, stream: "torch.cuda.Stream", fences: Sequence[Fence]) -> None:
        for f in fences:
            if isinstance(f, _CudaFence):
                stream.wait_event(f.event)
            elif isinstance(f, _CudaCopyHandle):
                # an earlier copy into the same slot (never consumed): wait for its transfer,
                # if it was submitted at all (FIFO submit thread: it has been by now)
                if f.submitted.done() and not f.failed():
                    stream.wait_event(f.done_event)
            else:
                f.wait()  # a foreign fence: the host waits (off the hot path)

    # -- host -> device ------------------------------------------------------------------
    def copy_in(self, slot: SlotBuffer, host_rows: Tensor, ids: Tensor, *, after: Sequence[Fence] = ()) -> CopyHandle:
        if self._closed:
            raise PrefetcherClosedError("the copy engine is closed")
        assert isinstance(slot, _CudaSlot)
        n = ids.numel()
        if n > slot.max_rows:
            raise ValueError(f"{n} ids do not fit a slot of {slot.max_rows} rows")
        handle = _CudaCopyHandle()
        after = tuple(after)
        compute = torch.cuda.current_stream(self.device)
        if self.strategy == "zero_copy":
            handle.submitted.set_running_or_notify_cancel()
            try:
                with torch.cuda.device(self.device):
                    handle.submitted.set_result(self._zero_copy_in(slot, host_rows, ids, after, compute, handle))
            except BaseException as exc:  # noqa: BLE001 - surfaced at acquire
                handle.submitted.set_exception(exc)
            return handle

        ids_ready = None
        if ids.is_cuda:
            # the ids come from the compute stream (router, top-k, unique): bring them to pinned
            # host memory on their own stream; the submit thread waits for that event, not us
            produced = torch.cuda.Event()
            produced.record(compute)
            self.ids_stream.wait_event(produced)
            ids_host = torch.empty(n, dtype=ids.dtype, pin_memory=True)
            with torch.cuda.stream(self.ids_stream):
                ids_host.copy_(ids, non_blocking=True)
                ids_ready = torch.cuda.Event(blocking=True)
                ids_ready.record(self.ids_stream)
            ids.record_stream(self.ids_stream)
        else:
            ids_host = ids

        def job() -> "torch.cuda.Event":
            # blocking-sync events: the submit thread sleeps in the driver, without polling lag
            if ids_ready is not None:
                ids_ready.synchronize()
            if slot.staging_free is not None:  # the previous copy out of this staging buffer
                slot.staging_free.synchronize()
            if self._closed:
                raise CopyCancelledError("the copy engine was closed")
            staging = slot.staging[:n]
            cpu_gather(host_rows, ids_host, staging, pool=self._gather_pool)
            with torch.cuda.device(self.device), torch.cuda.stream(self.h2d_stream):
                self._order_after(self.h2d_stream, after)
                if self.timing:
                    handle.start_event = self._event()
                    handle.start_event.record(self.h2d_stream)
                slot.tensor[:n].copy_(staging, non_blocking=True)
                done = self._event(blocking=True)
                done.record(self.h2d_stream)
            slot.staging_free = done
            return done

        handle.submitted = self._submit.submit(job)
        return handle

    def _zero_copy_in(self, slot, host_rows, ids, after, compute, handle) -> "torch.cuda.Event":
        stream = self.h2d_stream
        n = ids.numel()
        if ids.is_cuda:
            produced = torch.cuda.Event()
            produced.record(compute)
            stream.wait_event(produced)
        self._order_after(stream, after)
        with torch.cuda.stream(stream):
            if self.timing:
                handle.start_event = self._event()
                handle.start_event.record(stream)
            if ids.is_cuda:
                ids_dev = ids
            else:
                ids_dev = (ids if ids.is_pinned() else ids.pin_memory()).to(self.device, non_blocking=True)
            self._gather(host_rows, ids_dev, slot.tensor[:n])
            done = self._event(blocking=True)
            done.record(stream)
        if ids.is_cuda:
            ids.record_stream(stream)
        return done

    def consume(self, handle: CopyHandle, timeout: float | None = None) -> None:
        event = handle.check(timeout)
        torch.cuda.current_stream(self.device).wait_event(event)

    def record_done(self) -> Fence:
        event = torch.cuda.Event(blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        return _CudaFence(event)

    def compute(self, fn: Callable[[], Any], reads: Iterable[tuple[SlotBuffer, CopyHandle]] = ()) -> None:
        fn()

    # -- device -> host ------------------------------------------------------------------
    def copy_out(self, tensors: Sequence[Tensor]) -> Future:
        if self._closed:
            raise PrefetcherClosedError("the copy engine is closed")
        stream = self.d2h_stream
        produced = torch.cuda.Event()
        produced.record(torch.cuda.current_stream(self.device))
        stream.wait_event(produced)
        outs = []
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            for t in tensors:
                if t.is_cuda:
                    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    out.copy_(t, non_blocking=True)
                    t.record_stream(stream)  # its memory is not reused before the copy ran
                else:
                    out = t.clone()
                outs.append(out)
            done = self._event(blocking=True)
            done.record(stream)

        def wait() -> tuple[Tensor, ...]:
            if self._closed:
                raise CopyCancelledError("the copy engine was closed before the device->host copy finished")
            done.synchronize()  # a blocking-sync event on this daemon thread
            return tuple(outs)

        return self._waiter.submit(wait)

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        for pool in (self._submit, self._gather_pool, self._waiter):
            if pool is not None:
                pool.close(max(0.0, deadline - time.monotonic()))
        # let copies already on the streams finish (bounded; never a device-wide synchronize)
        for stream in (self.h2d_stream, self.d2h_stream, self.ids_stream):
            while not stream.query() and time.monotonic() < deadline:
                time.sleep(1e-3)
        _LIVE.discard(self)


# --------------------------------------------------------------------------------------------
# Fake engine (tests): late, out-of-order copies, an asynchronous compute stream, a checker
# --------------------------------------------------------------------------------------------


class _FakeFence(Fence):
    def __init__(self, engine: "FakeCopyEngine") -> None:
        self._engine = engine
        self._event = threading.Event()

    def _set(self) -> None:
        self._event.set()
        self._engine._notify()

    def query(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


class _FakeCopyHandle(CopyHandle):
    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id
        self.finished = threading.Event()  # transfer done, failed or cancelled

    def _transfer_done(self) -> bool:
        return self.finished.is_set()

    def _transfer_wait(self, timeout: float | None) -> bool:
        return self.finished.wait(timeout)


@dataclass(eq=False)
class _FakeJob:
    id: int
    kind: str  # "in" (host->slot) or "out" (device->host)
    after: tuple
    handle: _FakeCopyHandle | None = None
    slot: SlotBuffer | None = None
    src: Tensor | None = None
    ids: Tensor | None = None
    staged: Tensor | None = None
    tensors: tuple = ()
    future: Future | None = None


@dataclass(eq=False)
class _SlotTruth:
    writer: int | None = None  # job id writing the slot now
    content: int | None = None  # job id whose rows the slot holds
    reading: int = 0  # reads executing now
    # reads issued on the compute side and not finished, by the copy whose rows they expect
    # (reads of a copy that has not written yet are fine: the compute side waits for it)
    pending: dict = field(default_factory=dict)


class FakeCopyEngine(CopyEngine):
    """A copy engine for tests, on CPU tensors.

    * Copies run on ``workers`` threads and complete late and out of order: each worker picks
      a random eligible job (a copy to submit, or a submitted copy whose ``after`` fences all
      finished), sleeps a random time up to ``max_delay`` seconds, and writes the slot in
      chunks of ``chunk_rows`` rows with pauses between them, so races tear data.
    * With ``async_compute=True`` the compute side is a thread that runs ``consume`` waits,
      ``compute`` functions and ``record_done`` markers in issue order, late (like a CUDA
      stream); with False they run on the calling thread.
    * The checker: the engine knows which copy's rows each slot truly holds, which copy is
      writing it, and which declared reads are pending or running. Reading a slot that is being
      written or holds another copy's rows, writing a slot with a pending reader, and two
      copies writing one slot at once are appended to ``violations``.
    * Faults: ``fail_next(k)`` makes the next k submissions raise; ``pause()`` / ``resume()``
      hold copies in flight; ``memory_limit_bytes`` makes ``new_slot`` raise
      ``torch.OutOfMemoryError``. An exception in a ``compute`` function or in a worker thread
      is never swallowed: it is raised by the next engine call (and by :meth:`check`).
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        workers: int = 2,
        max_delay: float = 2e-4,
        async_compute: bool = True,
        chunk_rows: int = 4,
        memory_limit_bytes: int | None = None,
        deadlock_timeout: float = 30.0,
    ) -> None:
        self.device = torch.device("cpu")
        self.max_delay = float(max_delay)
        self.async_compute = bool(async_compute)
        self.chunk_rows = max(1, int(chunk_rows))
        self.memory_limit_bytes = memory_limit_bytes
        self.deadlock_timeout = deadlock_timeout
        self.violations: list[str] = []
        self.errors: list[BaseException] = []
        self.stats = {"copies_in": 0, "copies_out": 0, "reads": 0, "failed": 0, "cancelled": 0}
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._queued: list[_FakeJob] = []
        self._transfers: list[_FakeJob] = []
        self._compute_q: deque = deque()
        self._truth: dict[int, _SlotTruth] = {}
        self._allocated = 0
        self._fail_next: dict[str, list[Callable[[], BaseException]]] = {"in": [], "out": []}
        self._paused = False
        self._closed = False
        self._fatal: BaseException | None = None
        self._reported = 0  # errors already raised to the caller
        self._threads = [
            threading.Thread(target=self._worker, name=f"fake-copy-{i}", daemon=True) for i in range(workers)
        ]
        if self.async_compute:
            self._threads.append(threading.Thread(target=self._compute_loop, name="fake-compute", daemon=True))
        for t in self._threads:
            t.start()
        _LIVE.add(self)

    # -- test controls -------------------------------------------------------------------
    def fail_next(self, count: int = 1, error: Callable[[], BaseException] | None = None, kind: str = "in") -> None:
        """Make the next ``count`` host->device copy submissions (``kind="in"``) or
        device->host copies (``kind="out"``) fail with ``error()``."""
        if kind not in ("in", "out"):
            raise ValueError(f"kind must be 'in' or 'out', got {kind!r}")
        make = error or (lambda: RuntimeError("injected copy failure"))
        with self._cond:
            self._fail_next[kind].extend([make] * count)

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def check(self) -> None:
        """Raise AssertionError if the checker saw a violation or a background error."""
        problems = list(self.violations) + [f"{type(e).__name__}: {e}" for e in self.errors]
        if self._fatal is not None:
            problems.append(f"worker died: {type(self._fatal).__name__}: {self._fatal}")
        if problems:
            raise AssertionError("FakeCopyEngine saw:\n  " + "\n  ".join(problems[:20]))

    # -- helpers -------------------------------------------------------------------------
    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _sleep(self, scale: float = 1.0) -> None:
        if self.max_delay <= 0:
            return
        with self._cond:
            r = self._rng.random()
            d = self._rng.uniform(0.0, self.max_delay * scale)
        if r < 0.4:
            return
        time.sleep(0 if r < 0.6 else d)

    def _raise_if_broken(self) -> None:
        if self._fatal is not None:
            raise EngineWorkerError(f"a FakeCopyEngine worker died: {self._fatal!r}") from self._fatal
        if len(self.errors) > self._reported:
            exc = self.errors[self._reported]
            self._reported = len(self.errors)
            raise EngineWorkerError(f"FakeCopyEngine compute stream raised: {exc!r}") from exc
        if self._closed:
            raise PrefetcherClosedError("the copy engine is closed")

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    # -- CopyEngine ----------------------------------------------------------------------
    def new_slot(self, index: int, max_rows: int, width: int, dtype: torch.dtype) -> SlotBuffer:
        nbytes = max_rows * width * torch.empty((), dtype=dtype).element_size()
        with self._cond:
            if self.memory_limit_bytes is not None and self._allocated + nbytes > self.memory_limit_bytes:
                free = self.memory_limit_bytes - self._allocated
                raise torch.OutOfMemoryError(
                    f"FakeCopyEngine out of memory: tried to allocate {nbytes} bytes, {free} bytes free"
                )
            self._allocated += nbytes
        slot = SlotBuffer(index=index, tensor=torch.full((max_rows, width), float("nan"), dtype=dtype))
        with self._cond:
            self._truth[id(slot)] = _SlotTruth()
        weakref.finalize(slot, self._forget_slot, id(slot), nbytes)
        return slot

    def _forget_slot(self, key: int, nbytes: int) -> None:
        with self._cond:
            self._allocated -= nbytes
            self._truth.pop(key, None)

    def memory_info(self) -> tuple[int, int] | None:
        if self.memory_limit_bytes is None:
            return None
        return self.memory_limit_bytes - self._allocated, self.memory_limit_bytes

    def copy_in(self, slot: SlotBuffer, host_rows: Tensor, ids: Tensor, *, after: Sequence[Fence] = ()) -> CopyHandle:
        self._raise_if_broken()
        if id(slot) not in self._truth:
            raise ValueError("slot was not allocated by this engine")
        job = _FakeJob(id=next(self._ids), kind="in", after=tuple(after), slot=slot, src=host_rows, ids=ids)
        job.handle = _FakeCopyHandle(job.id)
        with self._cond:
            self._queued.append(job)
            self.stats["copies_in"] += 1
            self._cond.notify_all()
        return job.handle

    def consume(self, handle: CopyHandle, timeout: float | None = None) -> None:
        self._raise_if_broken()
        handle.check(timeout)
        if self.async_compute:
            self._enqueue(("wait", handle))
        elif not handle.wait(self.deadlock_timeout if timeout is None else timeout):
            raise CopyTimeoutError(f"copy #{getattr(handle, 'job_id', '?')} did not finish in time")

    def record_done(self) -> Fence:
        self._raise_if_broken()
        fence = _FakeFence(self)
        if self.async_compute:
            self._enqueue(("mark", fence))
        else:
            fence._set()
        return fence

    def compute(self, fn: Callable[[], Any], reads: Iterable[tuple[SlotBuffer, CopyHandle]] = ()) -> None:
        self._raise_if_broken()
        reads = tuple(reads)
        with self._cond:
            for slot, handle in reads:
                pending = self._truth[id(slot)].pending
                want = getattr(handle, "job_id", None)
                pending[want] = pending.get(want, 0) + 1
        if self.async_compute:
            self._enqueue(("fn", fn, reads))
        else:
            self._run_fn(fn, reads)
            self._raise_if_broken()

    def copy_out(self, tensors: Sequence[Tensor]) -> Future:
        self._raise_if_broken()
        producer = self.record_done()
        job = _FakeJob(id=next(self._ids), kind="out", after=(producer,), tensors=tuple(tensors), future=Future())
        with self._cond:
            self._transfers.append(job)
            self.stats["copies_out"] += 1
            self._cond.notify_all()
        return job.future

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = self._queued + self._transfers
            self._queued, self._transfers = [], []
            items = list(self._compute_q)
            self._compute_q.clear()
            self._cond.notify_all()
        for job in pending:
            if job.handle is not None:
                job.handle.submitted.cancel()
                job.handle.finished.set()
            if job.future is not None:
                job.future.cancel()
        for item in items:  # nothing may wait forever on a marker that will never run
            if item[0] == "mark":
                item[1]._event.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        _LIVE.discard(self)

    # -- compute stream ------------------------------------------------------------------
    def _enqueue(self, item: tuple) -> None:
        with self._cond:
            if self._closed:
                raise PrefetcherClosedError("the copy engine is closed")
            self._compute_q.append(item)
            self._cond.notify_all()

    def _compute_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._compute_q and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    item = self._compute_q.popleft()
                self._sleep()
                kind = item[0]
                if kind == "wait":
                    handle = item[1]
                    deadline = time.monotonic() + self.deadlock_timeout
                    while not handle.wait(0.05):
                        if self._closed:
                            return
                        if time.monotonic() > deadline:
                            self._violation(f"compute stream waited {self.deadlock_timeout} s for a copy (deadlock)")
                            break
                elif kind == "mark":
                    item[1]._set()
                else:
                    self._run_fn(item[1], item[2])
        except BaseException as exc:  # noqa: BLE001 - surfaced by the next engine call
            self._die(exc)

    def _check_read(self, slot: SlotBuffer, handle: CopyHandle, when: str) -> None:
        truth = self._truth[id(slot)]
        want = getattr(handle, "job_id", None)
        if truth.writer is not None:
            self._violation(f"slot {slot.index} read ({when}) for copy #{want} while copy #{truth.writer} writes it")
        elif truth.content != want:
            self._violation(
                f"slot {slot.index} read ({when}) for copy #{want} but holds copy #{truth.content} "
                "(read before its copy completed, or overwritten)"
            )

    def _run_fn(self, fn: Callable[[], Any], reads: tuple) -> None:
        with self._cond:
            for slot, handle in reads:
                self._check_read(slot, handle, "start")
                self._truth[id(slot)].reading += 1
            self.stats["reads"] += len(reads)
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the next engine call
            self.errors.append(exc)
        finally:
            if reads:
                self._sleep(0.5)  # keep the read open a little: a racing write is caught below
            with self._cond:
                for slot, handle in reads:
                    self._check_read(slot, handle, "end")
                    truth = self._truth[id(slot)]
                    truth.reading -= 1
                    truth.pending[getattr(handle, "job_id", None)] -= 1
                self._cond.notify_all()

    # -- copy workers --------------------------------------------------------------------
    def _die(self, exc: BaseException, current: _FakeJob | None = None) -> None:
        """A background thread hit a bug: fail every job (also the one it held), keep the error
        for the next engine call."""
        with self._cond:
            if self._fatal is None:
                self._fatal = exc
            pending = self._queued + self._transfers + ([current] if current is not None else [])
            self._queued, self._transfers = [], []
            self._cond.notify_all()
        for job in pending:
            if job.handle is not None and not job.handle.submitted.done():
                if job.handle.submitted.set_running_or_notify_cancel():
                    job.handle.submitted.set_exception(EngineWorkerError(f"copy engine worker died: {exc!r}"))
            if job.handle is not None:
                job.handle.finished.set()
            if job.future is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineWorkerError(f"copy engine worker died: {exc!r}"))

    def _pick(self) -> tuple[_FakeJob, str] | None:
        """Under the lock: wait for a random eligible job, or None once closed."""
        while True:
            if self._closed or self._fatal is not None:
                return None
            if not self._paused:
                eligible = [(j, "submit") for j in self._queued]
                eligible += [(j, "transfer") for j in self._transfers if all(f.query() for f in j.after)]
                if eligible:
                    job, phase = eligible[self._rng.randrange(len(eligible))]
                    (self._queued if phase == "submit" else self._transfers).remove(job)
                    return job, phase
            self._cond.wait(0.05)

    def _worker(self) -> None:
        job = None
        try:
            while True:
                job = None
                with self._cond:
                    picked = self._pick()
                if picked is None:
                    return
                job, phase = picked
                if job.kind == "out":
                    self._transfer_out(job)
                elif phase == "submit":
                    self._submit(job)
                else:
                    self._transfer_in(job)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the next engine call
            self._die(exc, job)

    def _submit(self, job: _FakeJob) -> None:
        handle = job.handle
        if not handle.submitted.set_running_or_notify_cancel():
            with self._cond:
                self.stats["cancelled"] += 1
            handle.finished.set()
            self._notify()
            return
        self._sleep()
        try:
            with self._cond:
                make = self._fail_next["in"].pop(0) if self._fail_next["in"] else None
            if make is not None:
                raise make()
            # the "CPU gather": reads the host rows now, like the real staging copy
            job.staged = job.src.index_select(0, job.ids.to(torch.int64)).to(job.slot.tensor.dtype)
        except BaseException as exc:  # noqa: BLE001 - surfaced at acquire
            with self._cond:
                self.stats["failed"] += 1
            handle.submitted.set_exception(exc)
            handle.finished.set()
            self._notify()
            return
        handle.submitted.set_result(None)
        with self._cond:
            self._transfers.append(job)
            self._cond.notify_all()

    def _transfer_in(self, job: _FakeJob) -> None:
        truth = self._truth[id(job.slot)]
        self._sleep()
        with self._cond:
            if truth.writer is not None:
                self._violation(f"slot {job.slot.index}: copy #{job.id} starts while copy #{truth.writer} writes it")
            waiting = truth.pending.get(truth.content, 0) if truth.content is not None else 0
            if waiting or truth.reading:
                self._violation(
                    f"slot {job.slot.index} overwritten by copy #{job.id} while {max(waiting, truth.reading)} "
                    f"reader(s) of copy #{truth.content} are pending"
                )
            truth.writer = job.id
            truth.content = None
        n = job.staged.shape[0]
        dst = job.slot.tensor
        for a in range(0, n, self.chunk_rows):
            b = min(n, a + self.chunk_rows)
            dst[a:b].copy_(job.staged[a:b])
            self._sleep(0.1)
        with self._cond:
            if truth.writer == job.id:
                truth.writer = None
                truth.content = job.id
            job.handle.finished.set()
            self._cond.notify_all()

    def _transfer_out(self, job: _FakeJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self._sleep()
        try:
            with self._cond:
                make = self._fail_next["out"].pop(0) if self._fail_next["out"] else None
            if make is not None:
                raise make()
            job.future.set_result(tuple(t.detach().clone() for t in job.tensors))
        except BaseException as exc:  # noqa: BLE001 - handed to the future
            job.future.set_exception(exc)
        self._notify()


# --------------------------------------------------------------------------------------------
# The prefetcher
# --------------------------------------------------------------------------------------------


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

    @property
    def reads(self) -> tuple[tuple[SlotBuffer, CopyHandle], ...]:
        """What a consumer reads, in the form :meth:`CopyEngine.compute` declares."""
        if self._slot_obj is None or self.handle is None:
            return ()
        return ((self._slot_obj, self.handle),)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, on {x.device}"
    return f"{type(x).__name__} {x!r}"


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _settle(fut: Future, exc: BaseException | None, result: Any = None) -> None:
    """Resolve ``fut`` unless something else resolved it first."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


class Prefetcher:
    """A pool of ``num_slots`` device slots that layers' value rows are copied into, ahead of use.

    ``host_rows`` gives the host rows of each layer: a sequence of 2-D CPU tensors (one per
    layer, e.g. the value half of the pinned row store) or a callable ``layer_idx -> Tensor``
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
        self.max_rows = _check_count("max_rows", max_rows, 1)
        self.num_slots = _check_count("num_slots", num_slots, 1)
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
        self.width = _check_count("width", width, 1)
        self.dtype = torch.float32 if dtype is None else dtype
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {self.dtype!r}")
        self.sort_ids = bool(sort_ids)
        self.keep_resident = bool(keep_resident)
        if backward_lookahead is None:
            backward_lookahead = num_slots - 1
        self.backward_lookahead = _check_count("backward_lookahead", backward_lookahead, 0)
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
        _LIVE.add(self)

    # -- set-up ---------------------------------------------------------------------------
    def _allocate_slots(self) -> list[SlotBuffer]:
        slots: list[SlotBuffer] = []
        try:
            for i in range(self.num_slots):
                slots.append(self.engine.new_slot(i, self.max_rows, self.width, self.dtype))
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
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

    def _check_ids(self, row_ids: Any, num_host_rows: int) -> Tensor:
        if not isinstance(row_ids, Tensor):
            raise TypeError(f"row_ids must be a torch.Tensor, got {type(row_ids).__name__}")
        if row_ids.dim() != 1 or row_ids.dtype not in ID_DTYPES:
            raise ValueError(f"row_ids must be a 1-D int32/int64 tensor, got {_describe(row_ids)}")
        if row_ids.device.type != "cpu" and row_ids.device != self.engine.device:
            raise ValueError(f"row_ids must be on the CPU or on {self.engine.device}, got {row_ids.device}")
        n = row_ids.numel()
        if n > self.max_rows:
            raise ValueError(f"row_ids has {n} ids but a slot holds max_rows={self.max_rows}")
        if n and row_ids.device.type == "cpu":  # cheap on the host; device ids are not synced on
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
        self, layer_idx: int, row_ids: Tensor, *, phase: str = "forward", timeout: float | None = 0.0
    ) -> Ticket:
        """Start copying host rows ``row_ids`` of layer ``layer_idx`` into a free slot; returns
        at once. ``timeout``: how long to wait for a slot when all are held (0: raise)."""
        layer_idx = self._check_layer(layer_idx)
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        host = self._check_host_rows(self._source(layer_idx), f"host rows of layer {layer_idx}", self.width)
        ids = self._check_ids(row_ids, host.shape[0])
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
    def backward_ticket(self, layer_idx: int, row_ids: Tensor | None = None, *, timeout: float | None = 0.0) -> Ticket:
        """The ticket for layer ``layer_idx``'s backward: its rows again (ids saved by the
        forward's ``release`` unless ``row_ids`` is given), then prefetches of the next layers
        below it. Acquire and release it like a forward ticket."""
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
                ticket = self.prefetch(layer_idx, ids, phase="backward", timeout=timeout)
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
            self._lookahead[nxt] = self.prefetch(nxt, self._saved_ids[nxt], phase="backward")
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
    def offload_grads(self, layer_idx: int, row_ids: Tensor, rows: Tensor) -> Future:
        """Copy a layer's gradient rows (produced by the compute work issued so far) to pinned
        host memory, asynchronously. Returns a Future of :class:`GradRows`; it raises
        :class:`CopyFailedError` / :class:`CopyCancelledError` from ``result()`` on a fault."""
        layer_idx = self._check_layer(layer_idx)
        if not isinstance(row_ids, Tensor) or row_ids.dim() != 1 or row_ids.dtype not in ID_DTYPES:
            raise ValueError(f"row_ids must be a 1-D int32/int64 tensor, got {_describe(row_ids)}")
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] != row_ids.numel():
            raise ValueError(f"rows must be a 2-D tensor [len(row_ids)={row_ids.numel()}, width], got {_describe(rows)}")
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
                _settle(outer, CopyCancelledError(f"gradient rows of layer {layer_idx}: the copy was cancelled"))
            elif f.exception() is not None:
                err = CopyFailedError(f"gradient rows of layer {layer_idx}: {f.exception()!r}")
                err.__cause__ = f.exception()
                _settle(outer, err)
            else:
                ids, host_rows = f.result()
                _settle(outer, None, GradRows(layer_idx, ids, host_rows))

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
            _settle(f, CopyCancelledError("the prefetcher was closed before the copy finished"))
        with self._cond:
            self._holder.clear()
            self._lookahead.clear()
            self._resident.clear()
            self._saved_ids.clear()
        _LIVE.discard(self)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Prefetcher(engine={type(self.engine).__name__}, num_slots={self.num_slots}, "
            f"max_rows={self.max_rows}, width={self.width}, dtype={self.dtype}, free={len(self._free)})"
        )
