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

Checkpoints: no rank holds the full adapters, so :func:`save_sharded_state` /
:func:`load_sharded_state` use ``torch.distributed.checkpoint`` (every rank writes and reads
its own shards; the frozen backbone is left out): the adapters, the optimizer state and the
step, committed by renaming a finished folder (an existing checkpoint is replaced only then),
and a resumed run continues bitwise at the same world size.

Placement "cpu" has nothing for FSDP to shard (the rows live in the CPU row store): use
:class:`~.node_optimizer.NodeSharedAdamW`, one master per node.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
from torch import nn

from ..integration.attach import meft_adapters
from .topology import collectives


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


def _state_dicts(model: nn.Module, optimizer: Any) -> tuple[dict, dict]:
    """The sharded state dicts of the trained parameters (not the frozen backbone) and the optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_sharded_state(model: nn.Module, optimizer: Any, path: str | os.PathLike, *, step: int) -> Path:
    """Every rank writes its shards of the adapters and of ``optimizer``'s state, and ``step``,
    to the folder ``path`` (``torch.distributed.checkpoint``; a shared file system across
    nodes); returns it once it is committed on every rank."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    unfinished = path.with_name(path.name + ".incomplete")
    model_state, optim_state = _state_dicts(model, optimizer)
    first = dist.get_rank() == 0
    if first and unfinished.exists():
        shutil.rmtree(unfinished)  # what an interrupted save left
    with collectives("saving the sharded checkpoint (before writing)"):
        dist.barrier()
    # every rank's shards; an I/O error on any rank raises on every rank
    dcp.save({"model": model_state, "optim": optim_state, "step": step}, checkpoint_id=str(unfinished))
    with collectives("saving the sharded checkpoint (after writing)"):
        dist.barrier()
    failure: list[Any] = [None]
    if first:
        try:
            _commit(unfinished, path)
        except OSError as exc:  # every rank must learn it, not wait at a barrier
            failure = [f"{type(exc).__name__}: {exc}"]
    with collectives("saving the sharded checkpoint (committing)"):
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise OSError(f"save_sharded_state: committing {path} on rank 0 failed: {failure[0]}")
    return path


def _commit(unfinished: Path, path: Path) -> None:
    """Put the finished folder in place of ``path``; the old checkpoint is deleted only after."""
    replaced = path.with_name(path.name + ".replaced")
    if path.exists():
        shutil.rmtree(replaced, ignore_errors=True)  # an earlier commit's leftover; path is the good one
        path.rename(replaced)
    unfinished.rename(path)
    shutil.rmtree(replaced, ignore_errors=True)


def load_sharded_state(model: nn.Module, optimizer: Any, path: str | os.PathLike) -> int:
    """Load what :func:`save_sharded_state` wrote into ``model`` (sharded the same way, at the
    same world size) and ``optimizer``; returns the saved step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"load_sharded_state: {path} is not a checkpoint folder")
    model_state, optim_state = _state_dicts(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "step": -1}
    dcp.load(state, checkpoint_id=str(path))  # raises if the checkpoint lacks any of these keys
    # strict=False: the frozen backbone is not in the checkpoint (nor asked for above)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    return int(state["step"])
