"""Row-sparse collectives: every rank's (row ids, rows) to every rank, on torch.distributed.

The adapters' key/value gradients touch few rows of large tables, so instead of an all-reduce
of the whole table each rank can send only the rows it touched (ids + rows, by
``all_gather``) and every receiver sums them. Which one moves fewer bytes depends on the rows
touched: :func:`sparse_is_cheaper` compares the two with the bytes a ring algorithm sends per
rank, so every rank (given the same counts) makes the same choice.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

ID_BYTES = 8  # int64 row ids


def touched_rows(grad: Tensor) -> Tensor:
    """Ids (int64, ascending) of the rows of a 2-D ``grad`` that are not all zero: the only rows
    a sum over ranks needs from this rank (NaN/Inf rows count as touched)."""
    if not isinstance(grad, Tensor) or grad.dim() != 2:
        raise ValueError(f"grad must be a 2-D tensor, got {getattr(grad, 'shape', type(grad).__name__)}")
    return torch.nonzero((grad != 0).any(dim=1)).flatten()


def dense_allreduce_bytes(numel: int, element_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements (reduce-scatter + all-gather)."""
    return 2 * (world_size - 1) * numel * element_size // world_size


def sparse_allgather_bytes(max_rows: int, width: int, element_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-gather of ``max_rows`` padded (id, row) pairs."""
    return (world_size - 1) * max_rows * (width * element_size + ID_BYTES)


def sparse_is_cheaper(max_rows: int, shape: Sequence[int], element_size: int, world_size: int) -> bool:
    """True when sending the touched rows (the most any rank touched: the all-gather is padded
    to it) moves fewer bytes than a dense all-reduce of the ``shape`` [N, width] table."""
    num_rows, width = shape
    return (sparse_allgather_bytes(max_rows, width, element_size, world_size)
            < dense_allreduce_bytes(num_rows * width, element_size, world_size))


def all_gather_counts(counts: Sequence[int], group=None) -> Tensor:
    """``[world, len(counts)]`` int64: every rank's ``counts`` (one small all-gather)."""
    local = torch.tensor(list(counts), dtype=torch.int64)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.stack(out)


def padded(ids: Tensor, rows: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """``ids`` and ``rows`` zero-padded to the largest of ``counts`` (collectives need one size)."""
    most = int(counts.max()) if counts.numel() else 0
    n = ids.numel()
    pad_ids = torch.zeros(most, dtype=torch.int64)
    pad_rows = torch.zeros(most, rows.shape[1], dtype=rows.dtype)
    pad_ids[:n] = ids
    pad_rows[:n] = rows
    return pad_ids, pad_rows


def all_gather_rows(ids: Tensor, rows: Tensor, counts: Tensor, group=None) -> list[tuple[Tensor, Tensor]]:
    """Every rank's ``(ids [U_r], rows [U_r, width])``, in rank order. ``counts[r]`` = U_r (from
    :func:`all_gather_counts`); the exchange is padded to the largest."""
    pad_ids, pad_rows = padded(ids, rows, counts)
    world = dist.get_world_size(group)
    got_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    got_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(got_ids, pad_ids, group=group)
    dist.all_gather(got_rows, pad_rows, group=group)
    return [(i[: int(c)], r[: int(c)]) for i, r, c in zip(got_ids, got_rows, counts.tolist())]


def sum_rows_into(out: Tensor, parts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``out`` (zeroed) plus every part's rows at its ids, added in the given (rank) order, so
    every rank that sums the same parts gets the same bits."""
    out.zero_()
    for ids, rows in parts:
        out.index_add_(0, ids, rows.to(out.dtype))
    return out


def gather_rows(ids: Tensor, rows: Tensor, counts: Tensor, dst: int, group=None) -> list[tuple[Tensor, Tensor]] | None:
    """Like :func:`all_gather_rows`, but only global rank ``dst`` receives (the others get None)."""
    pad_ids, pad_rows = padded(ids, rows, counts)
    mine = dist.get_rank() == dst
    world = dist.get_world_size(group)
    got_ids = [torch.empty_like(pad_ids) for _ in range(world)] if mine else None
    got_rows = [torch.empty_like(pad_rows) for _ in range(world)] if mine else None
    dist.gather(pad_ids, got_ids, dst=dst, group=group)
    dist.gather(pad_rows, got_rows, dst=dst, group=group)
    if not mine:
        return None
    return [(i[: int(c)], r[: int(c)]) for i, r, c in zip(got_ids, got_rows, counts.tolist())]
