"""Index bookkeeping for the grouped kernels, in plain torch ops on the kernels' device.

The key-score kernel works on (token, expert) pairs sorted by expert, cut into blocks of at
most ``block_m`` pairs that all belong to one expert, so each program reads a single expert's
key rows (vLLM fused_moe's sorted-token layout). The block table has a fixed, host-known upper
size, so building it never synchronizes with the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def expert_segments(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pair indices (token * P + slot) in a stable order grouped by expert, and offsets
    [num_experts + 1] of each expert's run. Searchsorted on the sorted ids, not bincount: the
    offsets' size is known on the host, so nothing waits for the device."""
    keys = expert_ids.reshape(-1).long()
    order = torch.argsort(keys, stable=True)
    bounds = torch.arange(num_experts + 1, dtype=torch.int64, device=keys.device)
    return order, torch.searchsorted(keys[order], bounds)


def expert_blocks(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """Blocks of <= block_m same-expert (token, expert) pairs.

    Returns ``(order, block_start, block_end, block_expert)``: ``order[block_start[b]:
    block_end[b]]`` are flat pair indices (token * P + slot) of expert ``block_expert[b]``,
    capped to ``block_m`` by the kernel. Blocks past the real count have start == end.
    """
    order, offsets = expert_segments(expert_ids, num_experts)
    counts = offsets[1:] - offsets[:-1]
    blocks_per_expert = (counts + block_m - 1) // block_m
    block_end_cum = torch.cumsum(blocks_per_expert, 0)
    # Each used expert adds at most one partial block, and at most T * P experts are used.
    max_blocks = -(-expert_ids.numel() // block_m) + min(num_experts, expert_ids.numel())
    block = torch.arange(max_blocks, device=expert_ids.device)
    expert = torch.searchsorted(block_end_cum, block, right=True).clamp_(max=num_experts - 1)
    first_block = block_end_cum[expert] - blocks_per_expert[expert]
    valid = block < block_end_cum[-1]
    start = torch.where(valid, offsets[expert] + (block - first_block) * block_m, 0)
    end = torch.where(valid, offsets[expert + 1], 0)
    return order, start, end, expert


def surplus_neurons(expert_ids: torch.Tensor, neurons_per_expert: int, num_experts: int,
                    count: int) -> torch.Tensor:
    """[T, count] int64: per token, the first ``count`` neurons (ascending ids) of the experts it
    did not select: the zero-scoring picks that fill K_top past the P * S candidates.

    Only called when K_top > P * S; count <= (E - P) * S. One [T, E] byte mask and its stable
    sort (E is at most a few thousand), no host sync.
    """
    chosen = torch.zeros(expert_ids.shape[0], num_experts, dtype=torch.uint8, device=expert_ids.device)
    chosen.scatter_(1, expert_ids.long(), 1)
    unchosen = torch.sort(chosen, dim=1, stable=True).indices[:, :-(-count // neurons_per_expert)]
    picks = torch.arange(count, device=expert_ids.device)
    return unchosen[:, picks // neurons_per_expert] * neurons_per_expert + picks % neurons_per_expert


@triton.jit
def block_pairs(block, order_ptr, block_expert_ptr, start, end, experts_per_token: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """In a kernel, for block ``block`` of :func:`expert_blocks`' table (``start < end`` read by
    the caller, which returns first on an empty block): its expert, and its pairs' mask,
    indices and tokens ([BLOCK_M], int64)."""
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    slots = start + tl.arange(0, BLOCK_M)
    pair_ok = slots < end
    pair = tl.load(order_ptr + slots, mask=pair_ok, other=0).to(tl.int64)
    return expert, pair_ok, pair, pair // experts_per_token
