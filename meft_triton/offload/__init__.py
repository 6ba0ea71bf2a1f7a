"""Placement "cpu": the CPU row store, the copy engines, the prefetcher and the offloaded layer.

Data path of one layer, in file order: :mod:`.row_store` (fp32 master rows + AdamW moments in
pinned memory) -> :mod:`.gather` (host row gathers) -> :mod:`.engine` (the copy-engine
interface; :mod:`.cuda_engine` on a GPU, :mod:`.sync_engine` on CPU) -> :mod:`.prefetcher`
(slots, tickets, double buffering, gradient rows home) -> :mod:`.runtime` (what a model's
layers share) -> :mod:`.resident` (residency "resident": value rows and gradient sums kept
on the device across a step's micro-batches) -> :mod:`.rows` (one layer's two forward stages
and its backward) ->
:mod:`.key_cache` (updated key rows back to the device through the engine).
"""

from .cuda_engine import CudaCopyEngine
from .engine import CopyEngine, CopyHandle, Fence, SlotBuffer
from .errors import (ConcurrentUseError, CopyCancelledError, CopyFailedError, CopyTimeoutError, EngineWorkerError,
                     LayerUpdateError, PrefetchError, PrefetcherClosedError, SlotAllocationError, SlotsExhaustedError)
from .gather import GATHER_STRATEGIES, cpu_gather, zero_copy_gather
from .prefetcher import GradRows, Prefetcher, Ticket
from .resident import GradientFactors, GradientSums, ResidentValues
from .row_store import CPURowStore
from .rows import OffloadedRows, RoutedTokens
from .runtime import OffloadRuntime, RowCache
from .sync_engine import SyncCopyEngine

__all__ = [
    "CPURowStore", "ConcurrentUseError", "CopyCancelledError", "CopyEngine", "CopyFailedError", "CopyHandle", "CopyTimeoutError",
    "CudaCopyEngine", "EngineWorkerError", "Fence", "GATHER_STRATEGIES", "GradRows", "GradientFactors", "GradientSums", "LayerUpdateError",
    "OffloadRuntime",
    "OffloadedRows", "PrefetchError", "Prefetcher", "PrefetcherClosedError", "ResidentValues",
    "RoutedTokens", "RowCache",
    "SlotAllocationError", "SlotBuffer", "SlotsExhaustedError", "SyncCopyEngine", "Ticket", "cpu_gather",
    "zero_copy_gather",
]
