"""The copy-engine interface the prefetcher schedules against.

An engine moves rows between host memory and device slots asynchronously, in the order its
callers state with fences: CUDA streams and events on a GPU (:mod:`.cuda_engine`), plain
synchronous copies on CPU (:mod:`.sync_engine`), late and out-of-order copies in the tests.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .errors import CopyCancelledError, CopyFailedError, CopyTimeoutError, PrefetchError

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
        self.rows: int | None = None  # rows the copy moved, set by engines that know it once submitted

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

    def fault(self) -> BaseException | None:
        """The error that broke one of this engine's background threads (every later call
        would fail), or None while it works."""
        return None

    def renewed(self) -> "CopyEngine | None":
        """A fresh engine of the same kind and settings, to replace this one after a
        :meth:`fault`; None when it cannot make one."""
        return None

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
        are read after the compute work issued so far. ``ids`` may end in repeats of their last
        id (padding to a size the host knows without reading device data, see
        :func:`meft_triton.layer.backend.unique_ids`): an engine may copy that row once and leave
        the padding's slot rows as they are, and then reports the rows it copied in
        ``handle.rows``."""

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


