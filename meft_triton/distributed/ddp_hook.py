"""Placement "gpu" under DDP: a communication hook that reduces the adapters' key/value
gradients row-sparsely where that moves fewer bytes than DDP's dense all-reduce.

``register_row_sparse_hook(ddp_model)`` installs :func:`row_sparse_hook` with DDP's own
``register_comm_hook``: DDP still buckets the gradients, skips the reduction inside
``no_sync()`` (gradient accumulation) and calls the hook once per bucket per synchronised
backward, in the same bucket order on every rank. Inside a bucket every 2-D gradient (keys
[N, r], values [N, d], the router [E, r], L [r, d]) is reduced by the cheaper of

- a dense all-reduce (what DDP does by default), or
- an all-gather of the rows it touched (ids + rows, padded to the most any rank touched),
  summed by every rank in rank order,

chosen from the row counts of all ranks (one small all-gather per bucket), so every rank
chooses the same. Gradients end as the mean over ranks, as with DDP's default hook.
:class:`RowSparseStats` counts the bytes each rank sent and what dense all-reduces would
have sent.
"""

# (no `from __future__ import annotations`: DDP checks the hook's return annotation object)
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .row_exchange import (all_gather_counts, all_gather_rows, dense_allreduce_bytes, sparse_allgather_bytes,
                           sparse_is_cheaper, sum_rows_into, touched_rows, ID_BYTES)


@dataclass
class RowSparseStats:
    """What the hook did on this rank since it was registered (or :meth:`reset`)."""

    group: object = None
    bytes_sent: int = 0            # ring-algorithm bytes this rank sent (counts, rows, dense parts)
    bytes_dense: int = 0           # what DDP's dense all-reduce of the same buckets would send
    sparse_tensors: int = 0        # gradients reduced row-sparsely
    dense_tensors: int = 0         # gradients reduced by all-reduce
    rows_sent: list = field(default_factory=list)  # per sparse reduction: rows this rank sent
    # per 2-D gradient, in reduction order: (rows, width, the most rows any rank touched, by rows?)
    choices: list = field(default_factory=list)

    def reset(self) -> None:
        self.bytes_sent = self.bytes_dense = self.sparse_tensors = self.dense_tensors = 0
        self.rows_sent = []
        self.choices = []


def _bucket_grads(bucket) -> "list[Tensor] | None":
    """The bucket's gradients as views of its flat buffer, by the parameters' order and shapes;
    None when the layout is not the plain concatenation (then the whole buffer goes dense)."""
    buffer = bucket.buffer()
    views, offset = [], 0
    for p in bucket.parameters():
        n = p.numel()
        views.append(buffer[offset:offset + n].view(p.shape))
        offset += n
    return views if offset == buffer.numel() else None


def row_sparse_hook(state: RowSparseStats, bucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook (``DistributedDataParallel.register_comm_hook(state, hook)``)
    reducing each 2-D gradient of the bucket by rows where that is cheaper (module docstring)."""
    group = state.group
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    size = buffer.element_size()
    grads = _bucket_grads(bucket)
    state.bytes_dense += dense_allreduce_bytes(buffer.numel(), size, world)
    dense: list[Tensor] = []
    if grads is None:
        dense = [buffer]
    else:
        candidates = [g for g in grads if g.dim() == 2]
        ids = [touched_rows(g) for g in candidates]
        counts = all_gather_counts([i.numel() for i in ids], group) if candidates else None
        if candidates:
            state.bytes_sent += (world - 1) * len(candidates) * ID_BYTES
        sparse = {}
        for k, (g, i) in enumerate(zip(candidates, ids)):
            most = int(counts[:, k].max())
            by_rows = sparse_is_cheaper(most, g.shape, size, world)
            state.choices.append((g.shape[0], g.shape[1], most, by_rows))
            if by_rows:
                sparse[id(g)] = (g, i, counts[:, k])
        for g in grads:
            if id(g) not in sparse:
                dense.append(g)
        for g, i, per_rank in sparse.values():
            parts = all_gather_rows(i, g[i], per_rank, group)
            sum_rows_into(g, parts).div_(world)
            state.bytes_sent += sparse_allgather_bytes(int(per_rank.max()), g.shape[1], size, world)
            state.sparse_tensors += 1
            state.rows_sent.append(i.numel())
    if dense:
        flat = torch.cat([g.reshape(-1) for g in dense])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for g in dense:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        state.bytes_sent += dense_allreduce_bytes(flat.numel(), size, world)
        state.dense_tensors += len(dense)
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buffer)
    return fut


def register_row_sparse_hook(ddp_model, group=None) -> RowSparseStats:
    """Install :func:`row_sparse_hook` on ``ddp_model`` (a ``DistributedDataParallel``) over
    ``group`` (default: the world); returns the :class:`RowSparseStats` it updates."""
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, "
                        f"got {type(ddp_model).__name__}")
    stats = RowSparseStats(group=group)
    ddp_model.register_comm_hook(stats, row_sparse_hook)
    return stats
