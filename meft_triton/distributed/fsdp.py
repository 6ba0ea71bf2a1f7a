"""Placement "gpu" under FSDP2 (``fully_shard``): each adapter's tables split by rows across ranks.

:func:`shard_meft_model` applies torch's own ``fully_shard`` to every MEFT adapter (its own
FSDP group: keys [N, r], values [N, d] and the router are sharded along dim 0, so each rank
keeps about 1/W of the rows and their AdamW moments between steps) and then to the whole
model (the rest: the frozen backbone). FSDP all-gathers an adapter's rows before its forward
and backward and reduce-scatters its gradients (dense, to the mean over ranks); gradient
accumulation is FSDP's ``model.set_requires_gradient_sync(False)`` on all but the last
micro-batch. The optimizer is the usual ``create_meft_optimizer(model)`` (a torch AdamW over
the sharded parameters, with the non-finite check). The row-sparse reduction of
:mod:`.ddp_hook` does not apply: FSDP reduces whole flat shards.

Placement "cpu" has nothing for FSDP to shard (the rows live in the CPU row store): use
:class:`~.node_optimizer.NodeSharedAdamW`, one master per node.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..integration.attach import meft_adapters


def fully_shard_function() -> Callable[..., Any]:
    """torch's FSDP2 ``fully_shard`` (``torch.distributed.fsdp`` from torch 2.6, before that
    ``torch.distributed._composable.fsdp``)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def shard_meft_model(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """``fully_shard`` every MEFT adapter of ``model`` (placement "gpu"), then ``model`` itself;
    ``fsdp_kwargs`` go to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``,
    ``mp_policy``, ...). Returns ``model`` (FSDP2 shards in place). Needs torch.distributed
    initialised, as torchrun sets it up."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapters = meft_adapters(model)
    if not adapters:
        raise ValueError(f"shard_meft_model: {type(model).__name__} has no MEFT adapters; call attach_meft first")
    offloaded = [name for name, adapter in adapters.items() if adapter.offload is not None]
    if offloaded:
        raise ValueError(f"shard_meft_model needs placement 'gpu'; layers {offloaded} have placement 'cpu', "
                         "whose rows live in the CPU row store (use NodeSharedAdamW: one master per node)")
    fully_shard = fully_shard_function()
    for adapter in adapters.values():
        fully_shard(adapter, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model
