"""Training checkpoints of a data-parallel run: written once, loaded by every rank.

Every rank holds the same adapters and optimizer state (placement "gpu": DDP keeps the
replicas equal; placement "cpu": every node's master is identical), so global rank 0 writes
one checkpoint with :func:`~meft_triton.io.save_training_state` for the whole node set.
Resuming at the same world size, every rank loads it: the node leaders first, then the other
ranks (which write the same bytes into the node's shared store while the leaders wait), so the
next step equals the uninterrupted run's bitwise. A rank whose save or load fails makes every
rank raise (:class:`~.topology.PeerFailedError` on the others) instead of waiting.
RNG states are rank 0's; pass ``restore_rng=False`` where ranks must keep their own.
A model sharded by FSDP2 (:func:`~.fsdp.shard_meft_model`) holds no rank's full adapters:
both functions refuse it, before anything is written or read (:func:`~.fsdp.save_sharded_state`
and :func:`~.fsdp.load_sharded_state` save and resume it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..io import load_training_state, save_training_state
from .topology import NodeTopology, PeerFailedError, collectives


def _agree(error: BaseException | None, what: str, topology: NodeTopology) -> None:
    """Every rank learns whether any rank failed ``what``; the failing rank re-raises its own
    error, the others raise PeerFailedError naming it."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    everyone: list[Any] = [None] * topology.world_size
    with collectives(what):
        dist.all_gather_object(everyone, mine, group=topology.cpu_world)
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
    if failed:
        raise PeerFailedError(f"rank {topology.rank}: {what} failed on rank {failed[0][0]}: {failed[0][1]}")


def _refuse_sharded(model, what: str) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(f"{what}: the model's parameters are sharded by FSDP (DTensor), so no rank holds "
                         "the full adapters; use save_sharded_state / load_sharded_state "
                         "(torch.distributed.checkpoint, every rank its shards)")


def save_node_state(model, optimizer, path: str | os.PathLike, *, step: int, topology: NodeTopology,
                    **kwargs: Any) -> Path:
    """Global rank 0 saves (``save_training_state``'s keywords pass through); every rank calls
    it and returns once the checkpoint is committed."""
    _refuse_sharded(model, "save_node_state")
    error = None
    if topology.rank == 0:
        try:
            save_training_state(model, optimizer, path, step=step, **kwargs)
        except BaseException as exc:  # reported to every rank below
            error = exc
    _agree(error, "saving the checkpoint", topology)
    return Path(path)


def load_node_state(model, optimizer, path: str | os.PathLike, *, topology: NodeTopology,
                    **kwargs: Any) -> int:
    """Every rank loads ``path`` (``load_training_state``'s keywords pass through): the node
    leaders, then the others. Returns the saved step."""
    _refuse_sharded(model, "load_node_state")
    step = None
    for leaders_turn in (True, False):
        error = None
        if topology.is_leader == leaders_turn:
            try:
                step = load_training_state(model, optimizer, path, **kwargs)
            except BaseException as exc:  # reported to every rank below
                error = exc
        _agree(error, "loading the checkpoint", topology)
    return step
