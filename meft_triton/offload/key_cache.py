"""The device copy of a layer's keys (compute dtype) and its write-back after an update.

Routing and key scoring stay on the device and exact, so the device keeps every key row. After
a row-sparse AdamW step changed some rows of the CPU master, those rows (and only those) go
back through the runtime's copy engine: gathered into a staging slot (pinned, on a copy stream
on a GPU), then scattered into the cache on the compute side once the copy is consumed. The
bytes are counted with the rest of the host->device traffic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: rows per write-back copy: two slots of this many rows alternate (double buffering)
WRITE_BACK_CHUNK_ROWS = 8192


class KeyCache:
    """``tensor`` [N, r] on the device of ``runtime`` (an :class:`~.runtime.OffloadRuntime`) in its
    compute dtype, fed from ``host_keys`` (the store's fp32 key rows; r = ``low_key_dim`` or d)."""

    def __init__(self, runtime: Any, host_keys: Tensor) -> None:
        self.runtime = runtime
        self.host_keys = host_keys
        self.tensor = host_keys.detach().to(runtime.device, runtime.dtype)
        self._slots: list = []
        self._slots_engine: Any = None

    def refresh(self) -> None:
        """Every row again (after a load or a re-initialisation of the master rows)."""
        self.write_back(torch.arange(self.host_keys.shape[0]))

    def write_back(self, row_ids: Tensor) -> None:
        """Copy the master key rows ``row_ids`` (sorted, on the CPU) into the cache."""
        total = row_ids.numel()
        if total == 0:
            return
        engine = self.runtime.engine
        width = self.host_keys.shape[1]
        chunk = min(total, WRITE_BACK_CHUNK_ROWS)
        if not self._slots or self._slots[0].max_rows < chunk or self._slots_engine is not engine:
            self._slots_engine = engine  # (a healed runtime has a new engine)
            # negative indices: never confused with the prefetcher's value slots
            self._slots = [engine.new_slot(-1 - i, chunk, width, self.runtime.dtype) for i in range(2)]
        readers_done = [(), ()]
        for n, start in enumerate(range(0, total, chunk)):
            ids = row_ids[start:start + chunk]
            slot = self._slots[n % 2]
            handle = engine.copy_in(slot, self.host_keys, ids, after=readers_done[n % 2])
            engine.consume(handle)
            device_ids = ids.to(self.tensor.device, non_blocking=True)
            rows = slot.tensor[: ids.numel()]
            engine.compute(lambda d=device_ids, r=rows: self.tensor.index_copy_(0, d, r),
                           reads=((slot, handle),))
            readers_done[n % 2] = (engine.record_done(),)
        self.runtime.bytes_to_device += total * width * self.tensor.element_size()
