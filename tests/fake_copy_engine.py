"""A test double of the copy engine: copies complete late and out of order on worker threads,
an asynchronous "compute stream" thread runs the consumer's reads, and a checker tracks the
true state of every slot (every read-before-copy-done and overwrite-while-a-reader-is-pending
is a violation)."""

from __future__ import annotations

import itertools
import random
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from meft_triton.offload.engine import CopyEngine, CopyHandle, Fence, SlotBuffer
from meft_triton.offload.errors import CopyTimeoutError, EngineWorkerError, PrefetcherClosedError
from meft_triton.offload.workers import LIVE

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
        self._settings = dict(seed=seed + 1, workers=workers, max_delay=max_delay, async_compute=async_compute,
                              chunk_rows=chunk_rows, memory_limit_bytes=memory_limit_bytes,
                              deadlock_timeout=deadlock_timeout)
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
        LIVE.add(self)

    def fault(self) -> BaseException | None:
        return self._fatal

    def renewed(self) -> "FakeCopyEngine":
        return FakeCopyEngine(**self._settings)

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
        LIVE.discard(self)

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


