"""The copy engine for placement "cpu" without a GPU: every copy runs at once, on the caller.

On CPU the "device" slots are ordinary CPU tensors and compute runs on the calling thread, so
there is nothing to overlap: a copy is finished when :meth:`copy_in` returns, and every fence
is finished when it is made. The prefetcher's slot schedule, the row counters and the
gradient path are the same as on a GPU; only the waiting is gone.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .engine import CopyEngine, CopyHandle, Fence, SlotBuffer
from .errors import PrefetcherClosedError
from .gather import cpu_gather, distinct_prefix


class _Finished(Fence):
    def query(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return True


class _FinishedCopy(CopyHandle):
    def _transfer_done(self) -> bool:
        return True

    def _transfer_wait(self, timeout: float | None) -> bool:
        return True


class SyncCopyEngine(CopyEngine):
    """Copies rows into CPU slots synchronously on the calling thread (no threads, no waits)."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def _check_open(self) -> None:
        if self.closed:
            raise PrefetcherClosedError("the copy engine is closed")

    def memory_info(self) -> tuple[int, int] | None:
        """Host RAM, where this engine's slots and residency tables live: (MemAvailable, MemTotal)
        of /proc/meminfo, None where it cannot be read. Sizes ``"auto"`` budgets on CPU compute."""
        try:
            fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None

    def new_slot(self, index: int, max_rows: int, width: int, dtype: torch.dtype) -> SlotBuffer:
        self._check_open()
        return SlotBuffer(index, torch.empty(max_rows, width, dtype=dtype))

    def copy_in(self, slot: SlotBuffer, host_rows: Tensor, ids: Tensor, *,
                after: Sequence[Fence] = ()) -> CopyHandle:
        self._check_open()
        handle = _FinishedCopy()
        try:
            # compute ran on this thread, so every fence in ``after`` has finished already
            ids = ids[: distinct_prefix(ids)]
            cpu_gather(host_rows, ids, slot.tensor[: ids.numel()])
            handle.rows = ids.numel()
        except BaseException as exc:  # noqa: BLE001 - reported through the handle, as engines do
            handle.submitted.set_exception(exc)
        else:
            handle.submitted.set_result(None)
        return handle

    def consume(self, handle: CopyHandle, timeout: float | None = None) -> None:
        handle.check(timeout)

    def record_done(self) -> Fence:
        return _Finished()

    def compute(self, fn: Callable[[], Any], reads: Iterable[tuple[SlotBuffer, CopyHandle]] = ()) -> None:
        self._check_open()
        fn()

    def copy_out(self, tensors: Sequence[Tensor]) -> Future:
        self._check_open()
        future: Future = Future()
        future.set_result(tuple(t.detach().clone() for t in tensors))
        return future
