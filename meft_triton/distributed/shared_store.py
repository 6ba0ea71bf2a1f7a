"""Placement "cpu", one master per node: the ranks of a node map one CPU row store.

The node's leader (local rank 0) copies each layer's master rows and AdamW moments into a file
in ``/dev/shm`` mapped by ``torch.from_file(..., shared=True)``; the other ranks of the node map
the same file, and every rank's :class:`~meft_triton.offload.row_store.CPURowStore` then points at
it (its private arrays are dropped). Once everyone has mapped it the leader unlinks the file:
the pages live as long as a mapping does and nothing is left behind if a process dies. Only the
leader writes the store (its row-sparse AdamW, :class:`~.node_optimizer.NodeSharedAdamW`); the
others read it between steps. Across nodes every leader holds the same master (global rank 0's
rows are broadcast once here), so the nodes stay identical by applying identical updates.

The mapping is pageable memory: a GPU build would register it with ``cudaHostRegister`` to get
asynchronous copies again (not done yet; this machine has no GPU).
"""

from __future__ import annotations

import os
import uuid
from typing import Sequence

import torch
import torch.distributed as dist

from .topology import NodeTopology, collectives

SHM_DIR = "/dev/shm"
PARTS = ("records", "exp_avg", "exp_avg_sq")


def _map(path: str, numel: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=numel, dtype=torch.float32)


def share_row_stores(adapters: Sequence, topology: NodeTopology, directory: str = SHM_DIR) -> list[str]:
    """Make the row stores of ``adapters`` (placement "cpu", the same layers on every rank) one
    shared store per node, holding global rank 0's master rows and moments; every rank calls
    it, before training. Router and low-key projection are broadcast from rank 0 too, so all
    ranks start equal. Returns the (already unlinked) file names."""
    adapters = list(adapters)
    if not adapters or any(getattr(a, "offload", None) is None for a in adapters):
        raise ValueError("adapters must be MEFT adapters with placement='cpu'")
    if not isinstance(topology, NodeTopology):
        raise TypeError(f"topology must be a NodeTopology, got {type(topology).__name__}")
    for adapter in adapters:
        adapter.offload.wait_for_update()
    with collectives("sharing the row stores"):
        # every rank starts from global rank 0's state (a dense broadcast, once)
        for adapter in adapters:
            for p in adapter.parameters():
                dist.broadcast(p.data, src=0)
            store = adapter.offload.store
            if topology.leaders is not None:
                for name in PARTS:
                    dist.broadcast(getattr(store, name), src=0, group=topology.leaders)
        names = [None]
        if topology.is_leader:
            token = uuid.uuid4().hex[:12]
            names = [[os.path.join(directory, f"meft-rows-{os.getpid()}-{token}-{i}")
                      for i in range(len(adapters))]]
        mapped: dict[int, torch.Tensor] = {}
        if topology.is_leader:
            for i, (path, adapter) in enumerate(zip(names[0], adapters)):
                store = adapter.offload.store
                mapped[i] = _map(path, 3 * store.records.numel()).view(3, *store.records.shape)
                for k, name in enumerate(PARTS):
                    mapped[i][k].copy_(getattr(store, name))
        dist.broadcast_object_list(names, src=topology.leader_rank, group=topology.node)
        paths = names[0]
        for i, (path, adapter) in enumerate(zip(paths, adapters)):
            store = adapter.offload.store
            rows = mapped[i] if i in mapped else _map(path, 3 * store.records.numel()).view(3, *store.records.shape)
            for k, name in enumerate(PARTS):
                setattr(store, name, rows[k])  # the private arrays go with their last reference
            store.pinned = False
            store.pin_error = "the rows are shared by the ranks of the node (meft_triton.distributed)"
            cache = adapter.offload.key_cache
            cache.host_keys = store.keys()
            # built as KeyCache builds it: on a CPU device in fp32 `.to` returns the rows
            # themselves, so the old cache would keep the private store alive
            cache.tensor = store.keys().detach().to(cache.tensor.device, cache.tensor.dtype)
        dist.barrier(group=topology.node)
    if topology.is_leader:
        for path in paths:
            os.unlink(path)
    for adapter in adapters:
        adapter.offload.refresh_key_cache()
    return paths
