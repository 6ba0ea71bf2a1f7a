"""IST layer selection on several ranks: every rank must train the same layers each step.

An :class:`~meft_triton.addons.ist.ISTScheduler` draws from its own generator (the same
``ISTConfig.seed`` on every rank gives the same draws) and from its layer scores, which a
scoring round updates from the losses of its passes. Each rank scores on its own share of the
batch, so without agreement the scores, and then the selections, drift apart (and DDP or the
per-node optimizer would reduce gradients of different layers). :func:`agreed_loss` wraps the
scoring loss so every rank gets the mean over ranks (one all-reduce per pass): the scores stay
equal on every rank, equal to one process scoring on the global batch, and so do the layers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .topology import collectives


def agreed_loss(loss_fn: Callable[[], Any], group: Any = None) -> Callable[[], Tensor]:
    """``loss_fn`` (a no-argument callable returning this rank's scoring loss, a tensor or a
    number) made to return the mean over the ranks of ``group`` (default: the world), as a
    float64 scalar, on every rank. Pass it as ``ISTScheduler.before_step(step, loss_fn)`` or
    ``ISTCallback(scheduler, loss_fn=...)``. Every rank must score equally sized shares, so that
    the mean of the ranks' losses is the loss of the whole batch. Without an initialised process
    group (one process) it returns the loss itself, so one script serves both."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")

    def mean_over_ranks() -> Tensor:
        value = loss_fn()
        local = value.detach().to("cpu", torch.float64).reshape(1) if isinstance(value, Tensor) \
            else torch.tensor([float(value)], dtype=torch.float64)
        if not (dist.is_available() and dist.is_initialized()):
            return local[0]
        with collectives("the IST scoring loss's all-reduce"):
            dist.all_reduce(local, group=group)
        return local[0] / dist.get_world_size(group)

    return mean_over_ranks
