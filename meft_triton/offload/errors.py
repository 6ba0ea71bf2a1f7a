"""Errors of the offload path: copies, slots, and the prefetcher."""

from __future__ import annotations

import torch

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


class ConcurrentUseError(SlotsExhaustedError):
    """A second thread ran a forward of a placement-"cpu" model while another thread's call held
    its value-row slots: the layers of one model share one slot pool, so their forward and
    backward passes run one thread at a time (use one model per thread)."""


class PrefetcherClosedError(PrefetchError):
    """The prefetcher or its engine is closed."""


class EngineWorkerError(PrefetchError):
    """A background thread of a copy engine died; the original error is the ``__cause__``."""


class LayerUpdateError(RuntimeError):
    """A layer's row-sparse optimizer update failed on its worker thread. It wrote nothing; its
    step was completed on the thread that waited for it (``touched``: the updated neuron ids),
    or, when that failed too, is kept to be completed at the next wait (``touched`` None)."""

    def __init__(self, message: str, layer: object = None, touched: torch.Tensor | None = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.touched = touched


class SlotAllocationError(PrefetchError, torch.OutOfMemoryError):
    """Not enough memory for the requested slots; the message says which sizes would fit.

    Also a ``torch.OutOfMemoryError``, so code that already catches that keeps working."""


