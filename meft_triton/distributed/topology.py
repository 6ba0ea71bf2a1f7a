"""Which ranks share a node, and the process groups MEFT's multi-process training uses.

torchrun (and ``accelerate launch``, which runs it) numbers the ranks of a node
consecutively and sets ``LOCAL_WORLD_SIZE``; a node is then ranks ``n * L ... n * L + L - 1``
and its local rank 0 is the node's leader: the process that owns the node's one CPU master
(docs/DESIGN.md, "Placement cpu"). Collectives that fail because another rank died or timed
out are re-raised as :class:`PeerFailedError` naming the rank and what it was doing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch.distributed as dist


class PeerFailedError(RuntimeError):
    """A collective of MEFT's distributed training failed: another rank died, raised, or did
    not arrive within the process group's timeout. Every rank raises it instead of hanging."""


@contextlib.contextmanager
def collectives(what: str) -> Iterator[None]:
    """Re-raise a failing collective inside the block as :class:`PeerFailedError` naming ``what``."""
    try:
        yield
    except PeerFailedError:
        raise
    except (RuntimeError, ConnectionError) as exc:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise PeerFailedError(f"rank {rank}: {what} failed, so another rank died, raised or timed out "
                              f"({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class NodeTopology:
    """This rank's place: ``node`` groups the ranks of its node, ``leaders`` the nodes' local
    rank 0 (None on the other ranks), ``cpu_world`` all ranks. All three are gloo groups: the
    rows they carry live in CPU memory, which NCCL cannot send."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: Any
    leaders: Any
    cpu_world: Any

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def node_index(self) -> int:
        return self.rank // self.local_world_size

    @property
    def leader_rank(self) -> int:
        """Global rank of this node's leader."""
        return self.node_index * self.local_world_size

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0


def node_topology(local_world_size: int | None = None) -> NodeTopology:
    """Build the node and leader groups (every rank must call it, in the same order as its other
    ``new_group`` calls). ``local_world_size``: ranks per node (default ``LOCAL_WORLD_SIZE``
    from torchrun, else the whole world on one node); it must divide the world size."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("node_topology needs torch.distributed initialised "
                           "(dist.init_process_group, as torchrun / accelerate launch set up)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if isinstance(local_world_size, bool) or not isinstance(local_world_size, int) or local_world_size < 1:
        raise ValueError(f"local_world_size must be an int >= 1, got {local_world_size!r}")
    if world % local_world_size:
        raise ValueError(f"local_world_size={local_world_size} must divide the world size {world}")
    nodes = world // local_world_size
    node_group = None
    for n in range(nodes):  # every rank creates every group, as new_group requires
        group = dist.new_group(list(range(n * local_world_size, (n + 1) * local_world_size)), backend="gloo")
        if n == rank // local_world_size:
            node_group = group
    leaders = dist.new_group([n * local_world_size for n in range(nodes)], backend="gloo")
    cpu_world = dist.new_group(list(range(world)), backend="gloo")
    local_rank = rank % local_world_size
    return NodeTopology(rank, world, local_rank, local_world_size, node_group,
                        leaders if local_rank == 0 else None, cpu_world)
