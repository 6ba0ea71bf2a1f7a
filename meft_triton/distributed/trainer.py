"""The row-sparse DDP hook under the Hugging Face Trainer (torchrun / accelerate launch).

The Trainer builds its own ``DistributedDataParallel`` wrapper inside ``train()``, so
:func:`~.ddp_hook.register_row_sparse_hook` cannot be called on it beforehand.
:func:`use_row_sparse_hook` adds a callback that registers the hook on ``trainer.model_wrapped``
when training begins (after the wrapping, before the first backward), once per wrapper. In one
process, or when the wrapper is not DDP (FSDP, DeepSpeed), it does nothing and the returned
stats stay at zero.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from .ddp_hook import RowSparseStats, row_sparse_hook


def use_row_sparse_hook(trainer: Any, group: Any = None) -> RowSparseStats:
    """Have ``trainer`` (a ``transformers.Trainer``) reduce the adapters' gradients by rows
    where that is cheaper (:mod:`.ddp_hook`); returns the :class:`RowSparseStats` the hook
    updates. Call it before ``trainer.train()``."""
    from transformers import Trainer, TrainerCallback

    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
    stats = RowSparseStats(group=group)
    hooked: weakref.WeakSet = weakref.WeakSet()

    class RowSparseHookCallback(TrainerCallback):
        """Registers the row-sparse hook on the Trainer's DDP wrapper as training begins."""

        def on_train_begin(self, args, state, control, **kwargs):
            wrapped = trainer.model_wrapped
            if isinstance(wrapped, DistributedDataParallel) and wrapped not in hooked:
                wrapped.register_comm_hook(stats, row_sparse_hook)
                hooked.add(wrapped)

    trainer.add_callback(RowSparseHookCallback())
    return stats
