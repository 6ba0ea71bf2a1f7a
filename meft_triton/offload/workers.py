"""Background threads of the offload path: daemon pools, closed at interpreter exit.

Every engine and prefetcher registers in :data:`LIVE` and is closed at exit with a timeout,
so copies in flight never hang the exit. All background threads are daemon threads.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable

from .errors import PrefetcherClosedError

LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
EXIT_TIMEOUT_S = 2.0


def _close_all_at_exit() -> None:
    for obj in list(LIVE):
        try:
            obj.close(timeout=EXIT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_close_all_at_exit)


class DaemonPool:
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

    @property
    def size(self) -> int:
        """Number of threads."""
        return len(self._threads)

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

    def fault(self) -> BaseException | None:
        """A thread of the open pool that is gone (its jobs would never run), or None."""
        if self._closed:
            return None
        dead = [t.name for t in self._threads if not t.is_alive()]
        return RuntimeError(f"thread {dead[0]} died") if dead else None

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
        if timeout <= 0:  # e.g. from a finalizer inside garbage collection: never join there
            return
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))




def settle(fut: Future, exc: BaseException | None, result: Any = None) -> None:
    """Resolve ``fut`` unless something else resolved it first."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass

