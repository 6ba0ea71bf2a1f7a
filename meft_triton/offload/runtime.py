"""The placement-"cpu" resources a model's adapters share: the copy engine, the value-row slot
pool (through the prefetcher) and the transfer counters."""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from .cuda_engine import CudaCopyEngine
from .engine import CopyEngine
from .errors import ConcurrentUseError
from .prefetcher import Prefetcher
from .sync_engine import SyncCopyEngine
from .workers import EXIT_TIMEOUT_S, DaemonPool


def default_engine(device: torch.device, transfer: str) -> CopyEngine:
    """The copy engine for ``device``: CUDA streams and events on a GPU. On CPU compute (tests,
    CPU-only profiling) rows still go through the same slot schedule, copied on a worker thread."""
    if device.type == "cuda":
        return CudaCopyEngine(device, strategy=transfer)
    return SyncCopyEngine()


class RowCache:
    """Value rows kept on the device across forward-only passes (IST's scoring round).

    Several no-grad passes over one batch route most tokens to the same rows: each layer keeps
    the union of the rows it has fetched (sorted ids and their rows, compute dtype) and the
    next pass copies only the rows it lacks. The cache never exceeds ``budget_bytes`` of device
    memory: a layer whose grown union would not fit keeps what it had. The master rows cannot
    change while it lives (no optimizer step runs inside a scoring round) and it is dropped at
    the end of the round.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._layers: dict[int, tuple[Tensor, Tensor]] = {}

    def get(self, layer: int) -> tuple[Tensor, Tensor] | None:
        return self._layers.get(layer)

    def offer(self, layer: int, ids: Tensor, rows: Tensor) -> None:
        old = self._layers.get(layer)
        old_bytes = 0 if old is None else old[1].numel() * old[1].element_size()
        used = self.used_bytes - old_bytes + rows.numel() * rows.element_size()
        if used <= self.budget_bytes:
            self._layers[layer] = (ids, rows)
            self.used_bytes = used


class OffloadRuntime:
    """The copy engine and value-row slot pool shared by a model's CPU-placed adapters.

    Layers register in forward order. The slots are sized for the most active rows one layer
    needs in one call (``max_rows``), grown when a call needs more while nothing is in flight.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype, hidden_size: int, *,
                 transfer: str = "cpu_gather", keep_rows: bool = False, num_slots: int = 2,
                 engine: CopyEngine | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden_size = hidden_size
        self.keep_rows = keep_rows
        self.num_slots = num_slots
        if engine is not None and getattr(engine, "async_compute", False):
            # the layer's CPU work runs on the calling thread, not through engine.compute(): a
            # "compute stream" thread would not order it after the copies (it would read slots
            # before their rows land)
            raise ValueError("engine: OffloadRuntime needs an engine whose compute runs on the calling "
                             "thread (a test engine with async_compute=False)")
        self.engine = engine if engine is not None else default_engine(self.device, transfer)
        self.layers: list[Any] = []  # the OffloadedRows of each layer, in forward order
        self.prefetcher: Prefetcher | None = None
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self.rows_reused = 0
        self.row_cache: RowCache | None = None
        # residency "resident": what budgets "auto" came to at the first call, for every layer
        self.auto_budgets: tuple[int, int] | None = None
        self._owner: int | None = None  # the thread of the last call (see ensure_slots)
        self._owner_lock = threading.Lock()
        self._collector: DaemonPool | None = None  # sums the layers' gradient rows at a step

    @contextmanager
    def reusing_rows(self, budget_bytes: int) -> Iterator[RowCache]:
        """Within the block, forward passes without autograd (``torch.no_grad``) copy only the
        value rows that an earlier such pass of the block did not already bring to the device
        (``rows_reused`` counts the others). Passes with autograd are unaffected."""
        if self.row_cache is not None:
            raise RuntimeError("reusing_rows blocks do not nest")
        self.row_cache = RowCache(budget_bytes)
        try:
            yield self.row_cache
        finally:
            self.row_cache = None

    def register(self, rows: Any) -> int:
        if self.prefetcher is not None:
            raise RuntimeError("register every layer before the first forward")
        self.layers.append(rows)
        return len(self.layers) - 1

    def _host_values(self, layer: int) -> Tensor:
        """The host rows a copy of ``layer``'s values reads: a zero-copy gather reads the
        compute-dtype shadow (what crosses the link is then the compute dtype); a CPU gather
        reads the fp32 master and rounds while staging."""
        store = self.layers[layer].store
        if getattr(self.engine, "strategy", None) == "zero_copy" and self.dtype in (torch.bfloat16, torch.float16):
            return store.value_shadow(self.dtype)
        return store.values()

    def heal(self) -> bool:
        """Replace a broken engine (a background thread of it died, so every later copy would
        fail) and the prefetcher on it with fresh ones; True if it did. The call that met the
        fault raised it; the layers' next forward calls this first, and works. Gradient rows
        in flight on the old engine fail with it: the optimizer step that needs them raises
        and drops the step as a whole."""
        if self.engine.fault() is None:
            return False
        fresh = self.engine.renewed()
        if fresh is None:  # an engine that cannot renew itself: its calls keep raising
            return False
        if self.prefetcher is not None:
            self.prefetcher.close(timeout=EXIT_TIMEOUT_S)
            self.prefetcher = None
        self.engine.close(timeout=EXIT_TIMEOUT_S)
        self.engine = fresh
        return True

    def ensure_slots(self, rows_needed: int) -> Prefetcher:
        self.heal()
        caller = threading.get_ident()
        with self._owner_lock:
            if (self.prefetcher is not None and self._owner not in (None, caller)
                    and self.prefetcher.free_slots() < self.num_slots):
                raise ConcurrentUseError(
                    "placement 'cpu': another thread's forward holds this model's value-row slots; "
                    "the layers of one model share one slot pool, so run its forward and backward "
                    "passes from one thread at a time (or use one model per thread)")
            self._owner = caller
        if self.prefetcher is not None and rows_needed <= self.prefetcher.max_rows:
            return self.prefetcher
        # grown by doubling (few regrowths), never past the most rows a layer has: a call's
        # padded ids are at most num_rows long
        most_rows = max((layer.store.num_rows for layer in self.layers), default=rows_needed)
        max_rows = max(rows_needed, min(most_rows, 2 * (self.prefetcher.max_rows if self.prefetcher else 0)))
        if self.prefetcher is not None:
            self.prefetcher.cancel_lookahead()
            if self.prefetcher.free_slots() < self.num_slots:
                raise RuntimeError(
                    f"a layer needs {rows_needed} active rows but the prefetch slots hold "
                    f"{self.prefetcher.max_rows} and are in use; run a first call with the largest "
                    "micro-batch, or create the runtime with bigger slots")
            # Gradient rows still on their way to the host were started by the old prefetcher,
            # whose close() would cancel them (losing a micro-batch's gradients): let them land.
            wait_futures([f for layer in self.layers for f in (*layer.pending_grads, *layer.summing)])
            self.prefetcher.close()
        self.prefetcher = Prefetcher(self.engine, self._host_values, max_rows=max_rows,
                                     num_slots=self.num_slots, width=self.hidden_size, dtype=self.dtype,
                                     keep_resident=self.keep_rows, owns_engine=False)
        return self.prefetcher

    def collector(self, threads: int) -> DaemonPool:
        """The worker threads that sum this runtime's layers' gradient rows at the optimizer
        step (made on first use with ``threads`` threads; they end with the runtime, so detaching
        the adapters leaves no thread behind whatever holds the optimizer)."""
        if self._collector is None:
            self._collector = DaemonPool(threads, "meft-collect")
            # a runtime dropped without close() ends its threads too (without waiting: the
            # finalizer may run inside garbage collection, on any thread)
            weakref.finalize(self, self._collector.close, 0.0)
        return self._collector

    def close(self) -> None:
        if self._collector is not None:
            self._collector.close(EXIT_TIMEOUT_S)
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.engine.close()
