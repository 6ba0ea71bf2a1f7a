"""Fused router top-k: g = G x for a tile of tokens and experts, merged into a running per-row
top-k kept in registers. No [T, E] logits tensor is ever written.

Grid: blocks of 64 tokens (a wgmma tile in 16-bit on sm_90) times splits of the experts, as
many splits as it takes to fill the chip (launch_config "router_topk"). With more than one
split, each writes its top-k, its online max/sum and a NaN flag to [splits, T, ...] partials
and a second kernel merges them per token (the same order and tie rule; the log-sum-exp of
the splits' max/sum).

Ordering: descending logits; ties go to the smaller expert id; a NaN logit counts as the
largest (as torch.topk does) and its row's gate logits come out NaN.

Gate "softmax" (MEFT's ``moe_softmax_score``): w_e = softmax(g)_e over all E logits, not
renormalised over the chosen k. Its log-sum-exp is accumulated online in the same loop (running
max and rescaled sum per row, as flash attention does) while each logit tile is still in
registers. That is faster on a GPU than recomputing the logits with a torch matmul in the
launcher: it adds a few exp per logit to a kernel that is bound by its G x tensor-core work and
the top-k merge, where the alternative writes and reads a [T, E] fp32 tensor and repeats the
T * E * r matmul. The top-k of w is the top-k of g (softmax is monotone), so the selection is
unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import launch_config
from .validation import (FLOAT_DTYPES, check_devices, check_int_arg, check_same_dtype,
                         check_tensor, dot_precision)


@triton.jit
def _router_topk_kernel(
    hidden_ptr, router_ptr, logits_out_ptr, ids_out_ptr, lse_out_ptr, part_max_ptr, part_sum_ptr,
    num_tokens, num_experts, hidden_size, experts_per_split,
    stride_ht, stride_hd, stride_re, stride_rd,
    K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, COMPUTE_LSE: tl.constexpr, SOFTMAX: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """One block of tokens over one split of the experts. With SPLIT the split's top-k, its
    NaN flag and online max/sum go to [splits, T, ...] partials for _router_merge_kernel."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    e_start = split * experts_per_split
    e_end = tl.minimum(e_start + experts_per_split, num_experts)
    row_ok = rows < num_tokens
    slots = tl.arange(0, K_PAD)
    no_id = num_experts  # larger than every real id, so it never wins a tie

    top_val = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)
    top_id = tl.full([BLOCK_T, K_PAD], no_id, tl.int32)
    row_has_nan = tl.zeros([BLOCK_T], tl.int32)
    run_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_T], tl.float32)

    for e0 in range(e_start, e_end, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        col_ok = cols < e_end
        acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
        for d0 in range(0, hidden_size, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < hidden_size
            h = tl.load(hidden_ptr + rows[:, None] * stride_ht + dims[None, :] * stride_hd,
                        mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            g = tl.load(router_ptr + cols[None, :].to(tl.int64) * stride_re + dims[:, None] * stride_rd,
                        mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
            acc = tl.dot(h, g, acc, input_precision=DOT_PRECISION)
        if COMPUTE_LSE:
            # online log-sum-exp; the first tile has a real column, so run_max is finite after it
            tile = tl.where(col_ok[None, :], acc, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(tile, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(tile - new_max[:, None]), axis=1)
            run_max = new_max
        is_nan = acc != acc
        row_has_nan = tl.maximum(row_has_nan, tl.max(is_nan.to(tl.int32), axis=1))
        tile_val = tl.where(is_nan, float("inf"), acc)
        tile_val = tl.where(col_ok[None, :], tile_val, float("-inf"))
        tile_id = tl.where(col_ok, cols, no_id).to(tl.int32)[None, :] + tl.zeros([BLOCK_T, BLOCK_E], tl.int32)

        # Merge: K rounds of "take the best of running top-k and tile", marking the winner used.
        new_val = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)
        new_id = tl.full([BLOCK_T, K_PAD], no_id, tl.int32)
        for i in tl.static_range(K):
            best = tl.maximum(tl.max(top_val, axis=1), tl.max(tile_val, axis=1))
            id_top = tl.min(tl.where(top_val == best[:, None], top_id, no_id), axis=1)
            id_tile = tl.min(tl.where(tile_val == best[:, None], tile_id, no_id), axis=1)
            winner = tl.minimum(id_top, id_tile)
            new_val = tl.where(slots[None, :] == i, best[:, None], new_val)
            new_id = tl.where(slots[None, :] == i, winner[:, None], new_id)
            top_val = tl.where(top_id == winner[:, None], float("-inf"), top_val)
            tile_val = tl.where(tile_id == winner[:, None], float("-inf"), tile_val)
        top_val = new_val
        top_id = new_id

    out_ok = row_ok[:, None] & (slots[None, :] < K)
    if SPLIT:
        # NaN logits already rank as +inf here; the flag travels in the partial max
        part = split * num_tokens + rows
        tl.store(logits_out_ptr + part[:, None] * K + slots[None, :], top_val, mask=out_ok)
        tl.store(ids_out_ptr + part[:, None] * K + slots[None, :], top_id, mask=out_ok)
        tl.store(part_max_ptr + part, tl.where(row_has_nan > 0, float("nan"), run_max), mask=row_ok)
        if COMPUTE_LSE:
            tl.store(part_sum_ptr + part, run_sum, mask=row_ok)
    else:
        lse = run_max
        if COMPUTE_LSE:
            lse = run_max + tl.log(run_sum)
        _write_result(rows, row_ok, top_val, top_id, row_has_nan > 0, lse,
                      logits_out_ptr, ids_out_ptr, lse_out_ptr, K, K_PAD, COMPUTE_LSE, SOFTMAX)


@triton.jit
def _write_result(rows, row_ok, top_val, top_id, row_nan, lse, logits_out_ptr, ids_out_ptr,
                  lse_out_ptr, K: tl.constexpr, K_PAD: tl.constexpr, COMPUTE_LSE: tl.constexpr,
                  SOFTMAX: tl.constexpr):
    slots = tl.arange(0, K_PAD)
    top_val = tl.where(row_nan[:, None], float("nan"), top_val)
    out = rows[:, None] * K + slots[None, :]
    out_ok = row_ok[:, None] & (slots[None, :] < K)
    if COMPUTE_LSE:
        lse = tl.where(row_nan, float("nan"), lse)
        tl.store(lse_out_ptr + rows, lse, mask=row_ok)
        if SOFTMAX:
            top_val = tl.exp(top_val - lse[:, None])
    tl.store(logits_out_ptr + out, top_val, mask=out_ok)
    tl.store(ids_out_ptr + out, top_id, mask=out_ok)


@triton.jit
def _router_merge_kernel(
    part_val_ptr, part_id_ptr, part_max_ptr, part_sum_ptr, logits_out_ptr, ids_out_ptr, lse_out_ptr,
    num_tokens, num_experts, num_splits,
    K: tl.constexpr, K_PAD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    COMPUTE_LSE: tl.constexpr, SOFTMAX: tl.constexpr,
):
    """Per token: the top-k of the splits' top-k (the splits own disjoint experts, so a winner
    is marked used by its id) and the log-sum-exp of their online max/sum."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    no_id = num_experts
    cand = tl.arange(0, S_PAD * K_PAD)
    cand_ok = row_ok[:, None] & ((cand // K_PAD < num_splits) & (cand % K_PAD < K))[None, :]
    at = ((cand // K_PAD)[None, :] * num_tokens + rows[:, None]) * K + (cand % K_PAD)[None, :]
    vals = tl.load(part_val_ptr + at, mask=cand_ok, other=float("-inf"))
    ids = tl.load(part_id_ptr + at, mask=cand_ok, other=no_id)
    slots = tl.arange(0, K_PAD)
    top_val = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)
    top_id = tl.full([BLOCK_T, K_PAD], no_id, tl.int32)
    for i in tl.static_range(K):
        best = tl.max(vals, axis=1)
        winner = tl.min(tl.where(vals == best[:, None], ids, no_id), axis=1)
        top_val = tl.where(slots[None, :] == i, best[:, None], top_val)
        top_id = tl.where(slots[None, :] == i, winner[:, None], top_id)
        vals = tl.where(ids == winner[:, None], float("-inf"), vals)
    splits = tl.arange(0, S_PAD)
    split_ok = row_ok[:, None] & (splits < num_splits)[None, :]
    at = splits[None, :] * num_tokens + rows[:, None]
    part_max = tl.load(part_max_ptr + at, mask=split_ok, other=float("-inf"))
    row_nan = tl.max((part_max != part_max).to(tl.int32), axis=1) > 0
    lse = tl.zeros([BLOCK_T], tl.float32)
    if COMPUTE_LSE:
        run_max = tl.where(row_ok, tl.max(part_max, axis=1), 0.0)  # finite on padding rows
        part_sum = tl.load(part_sum_ptr + at, mask=split_ok, other=0.0)
        total = tl.sum(tl.where(split_ok, part_sum * tl.exp(part_max - run_max[:, None]), 0.0), axis=1)
        lse = run_max + tl.log(tl.where(row_ok, total, 1.0))
    _write_result(rows, row_ok, top_val, top_id, row_nan, lse, logits_out_ptr, ids_out_ptr,
                  lse_out_ptr, K, K_PAD, COMPUTE_LSE, SOFTMAX)


GATES = ("logit", "softmax")


def router_topk(hidden: torch.Tensor, router_weight: torch.Tensor, k: int, gate: str = "logit",
                return_lse: bool = False):
    """Top-``k`` experts per token: ``(gate_weights [T, k] float32, expert_ids [T, k] int32)``,
    each row in descending order of the logits ``hidden @ router_weight.T``.

    The gate weights are the logits themselves (``gate="logit"``) or, with ``gate="softmax"``,
    softmax over all E logits at the chosen experts (not renormalised over the k). With
    ``return_lse`` a third output, ``lse [T] float32``, is each row's log-sum-exp over all E
    logits (what the softmax backward needs: pass it to sparse_kv_backward's ``gate_lse``).

    hidden [T, r] (the router input: h, or x = L h with a low-key projection) and router_weight
    [E, r] share one float dtype (fp16, bf16, fp32) and device; any strides; 1 <= k <= E.
    """
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    check_tensor("router_weight", router_weight, 2, FLOAT_DTYPES)
    check_same_dtype(hidden=hidden, router_weight=router_weight)
    check_devices(hidden=hidden, router_weight=router_weight)
    num_tokens, hidden_size = hidden.shape
    num_experts = router_weight.shape[0]
    if router_weight.shape[1] != hidden_size:
        raise ValueError(f"router_weight must have shape [E, {hidden_size}] to match hidden, "
                         f"got {tuple(router_weight.shape)}")
    check_int_arg("k", k, 1, num_experts)
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")

    gate_logits = torch.empty(num_tokens, k, dtype=torch.float32, device=hidden.device)
    expert_ids = torch.empty(num_tokens, k, dtype=torch.int32, device=hidden.device)
    compute_lse = return_lse or gate == "softmax"
    lse = torch.empty(num_tokens if compute_lse else 0, dtype=torch.float32, device=hidden.device)
    result = (gate_logits, expert_ids, lse) if return_lse else (gate_logits, expert_ids)
    if num_tokens == 0:
        return result
    k_pad = triton.next_power_of_2(k)
    cfg = launch_config("router_topk", hidden.device, hidden.dtype, num_tokens=num_tokens,
                        num_experts=num_experts, width=hidden_size, k_pad=k_pad)
    token_blocks = triton.cdiv(num_tokens, cfg["BLOCK_T"])
    chunks = triton.cdiv(num_experts, cfg["BLOCK_E"])
    # split the experts until the grid fills the chip (each split keeps its own top-k); the
    # merge holds every split's top-k of a row at once, so at most 1024 of them
    wanted = max(1, triton.cdiv(cfg["min_programs"], token_blocks))
    per_split = triton.cdiv(chunks, min(chunks, wanted, max(1, 1024 // k_pad)))
    experts_per_split = per_split * cfg["BLOCK_E"]
    num_splits = triton.cdiv(num_experts, experts_per_split)
    common = dict(K=k, K_PAD=k_pad, COMPUTE_LSE=compute_lse, SOFTMAX=gate == "softmax")
    device = hidden.device
    if num_splits > 1:
        part_val = torch.empty(num_splits, num_tokens, k, dtype=torch.float32, device=device)
        part_id = torch.empty(num_splits, num_tokens, k, dtype=torch.int32, device=device)
        part_max = torch.empty(num_splits, num_tokens, dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max) if compute_lse else part_max
        outs = (part_val, part_id, part_val, part_max, part_sum)
    else:
        outs = (gate_logits, expert_ids, lse if compute_lse else gate_logits, gate_logits, gate_logits)
    _router_topk_kernel[(token_blocks, num_splits)](
        hidden, router_weight, *outs, num_tokens, num_experts, hidden_size, experts_per_split,
        hidden.stride(0), hidden.stride(1), router_weight.stride(0), router_weight.stride(1),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"], BLOCK_D=cfg["BLOCK_D"],
        DOT_PRECISION=dot_precision(hidden.dtype), SPLIT=num_splits > 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common,
    )
    if num_splits > 1:
        _router_merge_kernel[(triton.cdiv(num_tokens, 16),)](
            part_val, part_id, part_max, part_sum, gate_logits, expert_ids,
            lse if compute_lse else gate_logits, num_tokens, num_experts, num_splits,
            S_PAD=triton.next_power_of_2(num_splits), BLOCK_T=16, **common,
        )
    return result
