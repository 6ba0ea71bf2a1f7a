"""The CUDA copy engine: dedicated copy streams ordered by CUDA events (not runnable without a
GPU; its tests are marked gpu)."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .engine import CopyEngine, CopyHandle, Fence, SlotBuffer
from .errors import CopyCancelledError, PrefetcherClosedError
from .gather import GATHER_STRATEGIES, cpu_gather, distinct_prefix
from .workers import LIVE, DaemonPool

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
            raise RuntimeError("CudaCopyEngine needs a CUDA device; SyncCopyEngine runs the same schedule on CPU")
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
        self.gather_threads = gather_threads
        self._gather = GATHER_STRATEGIES[strategy]
        self.timing = bool(timing)
        self._closed = False
        with torch.cuda.device(device):
            self.h2d_stream = torch.cuda.Stream(device)
            self.d2h_stream = torch.cuda.Stream(device)
            self.ids_stream = torch.cuda.Stream(device)
        self._submit = DaemonPool(1, "meft-prefetch-submit")
        self._gather_pool = DaemonPool(gather_threads - 1, "meft-prefetch-gather") if gather_threads > 1 else None
        self._waiter = DaemonPool(1, "meft-prefetch-d2h-wait")
        LIVE.add(self)

    def fault(self) -> BaseException | None:
        for pool in (self._submit, self._gather_pool, self._waiter):
            fault = None if pool is None else pool.fault()
            if fault is not None:
                return fault
        return None

    def renewed(self) -> "CudaCopyEngine":
        return CudaCopyEngine(self.device, strategy=self.strategy, gather_threads=self.gather_threads,
                              timing=self.timing)

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
            rows = distinct_prefix(ids_host)  # the padding's repeats are never read: copy one
            staging = slot.staging[:rows]
            cpu_gather(host_rows, ids_host[:rows], staging, pool=self._gather_pool)
            with torch.cuda.device(self.device), torch.cuda.stream(self.h2d_stream):
                self._order_after(self.h2d_stream, after)
                if self.timing:
                    handle.start_event = self._event()
                    handle.start_event.record(self.h2d_stream)
                slot.tensor[:rows].copy_(staging, non_blocking=True)
                # the slot was allocated on the compute stream: if its pool is dropped (slots
                # regrown, an engine healed) while this copy, even a cancelled lookahead's that
                # had started, still writes, the allocator must not hand the memory out before
                slot.tensor.record_stream(self.h2d_stream)
                done = self._event(blocking=True)
                done.record(self.h2d_stream)
            slot.staging_free = done
            handle.rows = rows
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
            self._gather(host_rows, ids_dev, slot.tensor[:n])  # padding included: its count is device data
            slot.tensor.record_stream(stream)  # as in copy_in's cpu_gather job
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
        LIVE.discard(self)


