"""Score gradients as a grouped GEMM per expert (DESIGN.md, "Performance model").

Like the forward's key scores, the (token, expert) pairs are sorted by expert and cut into
blocks of same-expert pairs; pair q = t * P + p owns row q of [T * P, S] tables in the
candidate layout. One program multiplies a block's dy [M, d] and x [M, r] by its expert's
values and keys on tensor cores, over all S candidates:

    g = dy V_e^T      r = x K_e^T                      ([M, S] each, fp32 accumulation)
    ds = g [a > 0]    dr = w_p ds    dw_p = sum_s ds r

with a the forward's fp32 activations scattered into a zeroed pick table (non-picks are 0, so
their ds is 0). It writes dr and a into the compute-dtype tables that the per-expert dK/dV
GEMMs (expert_grads) read, and dw per pair. dw sums the whole expert's S in one program, in
a fixed order: deterministic, no atomics. The dx key term still takes dr per pick, gathered
back from the table.

Three launches: scatter a [T, K] into the pick table, the GEMM, gather dr back to [T, K].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grouping import block_pairs, expert_blocks
from .launch_config import launch_config
from .validation import pow2_block


@triton.jit
def _pick_table_kernel(
    table_ptr, picks_ptr, neuron_ids_ptr, expert_ids_ptr,
    experts_per_token, num_picks,
    NEURONS_PER_EXPERT: tl.constexpr, P_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Per token: each pick's place in the [T * P, S] table (its expert's slot, its neuron
    within the expert). Scatter: table[place] = picks[t, k]. Gather: picks[t, k] =
    table[place], 0 for picks outside the token's experts (K_top > P * S), which have none.
    Neuron ids fit int32 and S is a compile-time constant: a pick's expert and neuron within
    it cost a multiply, not a 64-bit division."""
    token = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, P_PAD)
    experts = tl.load(expert_ids_ptr + token * experts_per_token + slots,
                      mask=slots < experts_per_token, other=-1).to(tl.int32)
    for k0 in range(0, num_picks, BLOCK_K):
        picks = k0 + tl.arange(0, BLOCK_K)
        pick_ok = picks < num_picks
        ids = tl.load(neuron_ids_ptr + token * num_picks + picks, mask=pick_ok, other=0).to(tl.int32)
        owner = (ids // NEURONS_PER_EXPERT)[:, None] == experts[None, :]
        slot = tl.max(tl.where(owner, slots[None, :], -1), axis=1)
        at = ((token * experts_per_token + slot) * NEURONS_PER_EXPERT
              + (ids % NEURONS_PER_EXPERT).to(tl.int64))
        placed = pick_ok & (slot >= 0)
        if GATHER:
            value = tl.load(table_ptr + at, mask=placed, other=0.0)
            tl.store(picks_ptr + token * num_picks + picks, value.to(picks_ptr.dtype.element_ty),
                     mask=pick_ok)
        else:
            value = tl.load(picks_ptr + token * num_picks + picks, mask=pick_ok, other=0.0)
            tl.store(table_ptr + at, value.to(table_ptr.dtype.element_ty), mask=placed)


@triton.jit
def _score_grads_kernel(
    grad_raw_table_ptr, act_table_ptr, grad_w_ptr,
    pick_table_ptr, x_ptr, dy_ptr, keys_ptr, values_ptr, value_pos_ptr, gate_weights_ptr,
    order_ptr, block_start_ptr, block_end_ptr, block_expert_ptr,
    key_width, value_width, neurons_per_expert,
    stride_xt, stride_xd, stride_yt, stride_yd, stride_kn, stride_kd, stride_vn, stride_vd,
    experts_per_token: tl.constexpr, VALUE_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    start = tl.load(block_start_ptr + block)
    end = tl.load(block_end_ptr + block)
    if start >= end:
        return
    expert, pair_ok, pair, token = block_pairs(block, order_ptr, block_expert_ptr, start, end, experts_per_token,
                                               BLOCK_M)
    weight = tl.load(gate_weights_ptr + pair, mask=pair_ok, other=0.0)
    grad_w = tl.zeros([BLOCK_M], tl.float32)
    for s0 in range(0, neurons_per_expert, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < neurons_per_expert
        neuron = expert * neurons_per_expert + offs_s
        if VALUE_MAP:
            # values holds only the picked rows; a neuron no token picked has none (-1)
            value_row = tl.load(value_pos_ptr + neuron, mask=s_ok, other=-1).to(tl.int64)
            value_ok = s_ok & (value_row >= 0)
        else:
            value_row = neuron
            value_ok = s_ok
        raw = tl.zeros([BLOCK_M, BLOCK_S], tl.float32)
        for d0 in range(0, key_width, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < key_width
            x = tl.load(x_ptr + token[:, None] * stride_xt + dims[None, :] * stride_xd,
                        mask=pair_ok[:, None] & dim_ok[None, :], other=0.0)
            k = tl.load(keys_ptr + neuron[None, :] * stride_kn + dims[:, None] * stride_kd,
                        mask=s_ok[None, :] & dim_ok[:, None], other=0.0)
            raw = tl.dot(x, k, raw, input_precision=DOT_PRECISION)
        grad_act = tl.zeros([BLOCK_M, BLOCK_S], tl.float32)
        for d0 in range(0, value_width, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < value_width
            dy = tl.load(dy_ptr + token[:, None] * stride_yt + dims[None, :] * stride_yd,
                         mask=pair_ok[:, None] & dim_ok[None, :], other=0.0)
            v = tl.load(values_ptr + value_row[None, :] * stride_vn + dims[:, None] * stride_vd,
                        mask=value_ok[None, :] & dim_ok[:, None], other=0.0)
            grad_act = tl.dot(dy, v, grad_act, input_precision=DOT_PRECISION)
        at = pair[:, None] * neurons_per_expert + offs_s[None, :]
        tile_ok = pair_ok[:, None] & s_ok[None, :]
        act = tl.load(pick_table_ptr + at, mask=tile_ok, other=0.0)
        grad_score = tl.where(act > 0.0, grad_act, 0.0)
        grad_w += tl.sum(grad_score * raw, axis=1)
        tl.store(grad_raw_table_ptr + at,
                 (grad_score * weight[:, None]).to(grad_raw_table_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(act_table_ptr + at, act.to(act_table_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(grad_w_ptr + pair, grad_w, mask=pair_ok)


def fill_pick_table(table, picks, neuron_ids, expert_ids, neurons_per_expert, gather):
    """Scatter ``picks`` [T, K] into the [T * P, S] ``table`` at each pick's place (``gather``
    False; entries of no pick are left as they are), or gather them back (True). Internal
    launcher: contiguous inputs (also what key_value_rows builds its tables with)."""
    num_tokens, experts_per_token = expert_ids.shape
    # one warp per token: a [BLOCK_K, P] owner tile of 64 x 8 is 16 elements per thread
    _pick_table_kernel[(num_tokens,)](
        table, picks, neuron_ids, expert_ids, experts_per_token, neuron_ids.shape[1],
        NEURONS_PER_EXPERT=neurons_per_expert, P_PAD=triton.next_power_of_2(experts_per_token),
        BLOCK_K=pow2_block(neuron_ids.shape[1], 16, 64), GATHER=gather, num_warps=1,
    )


def score_grads(grad_y, x, keys, values, value_ids, expert_ids, gate_weights, neuron_ids,
                activations, num_experts, dot_precision):
    """dr per pick [T, K] fp32, dw [T, P] fp32, and the [T * P, S] tables of dr and a in x's
    dtype (module docstring).

    Internal launcher: the public one validated everything; index and fp32 tensors are
    contiguous, T > 0, and ``value_ids`` is None (``values`` is the whole [N, d] table) or
    [T, K] rows of ``values`` for each pick.
    """
    num_tokens, experts_per_token = expert_ids.shape
    neurons_per_expert = keys.shape[0] // num_experts
    device = x.device
    table_shape = (num_tokens * experts_per_token, neurons_per_expert)
    pick_table = torch.zeros(table_shape, dtype=torch.float32, device=device)
    fill_pick_table(pick_table, activations, neuron_ids, expert_ids, neurons_per_expert, gather=False)
    if value_ids is None:
        value_pos = neuron_ids  # unused
    else:
        value_pos = torch.full((keys.shape[0],), -1, dtype=torch.int32, device=device)
        value_pos.scatter_(0, neuron_ids.reshape(-1).long(), value_ids.reshape(-1).to(torch.int32))

    cfg = launch_config("score_grads", device, x.dtype,
                        pairs_per_expert=expert_ids.numel() / num_experts,
                        neurons_per_expert=neurons_per_expert, width=max(x.shape[1], values.shape[1]))
    order, block_start, block_end, block_expert = expert_blocks(expert_ids, num_experts, cfg["BLOCK_M"])
    # every entry of both tables belongs to one block's pairs and is written there
    grad_raw_table = torch.empty(table_shape, dtype=x.dtype, device=device)
    act_table = torch.empty(table_shape, dtype=x.dtype, device=device)
    grad_w = torch.empty(num_tokens, experts_per_token, dtype=torch.float32, device=device)
    _score_grads_kernel[(block_start.numel(),)](
        grad_raw_table, act_table, grad_w, pick_table, x, grad_y, keys, values, value_pos,
        gate_weights, order, block_start, block_end, block_expert,
        x.shape[1], values.shape[1], neurons_per_expert,
        x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        experts_per_token=experts_per_token, VALUE_MAP=value_ids is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["BLOCK_D"],
        DOT_PRECISION=dot_precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    grad_raw = torch.empty(neuron_ids.shape, dtype=torch.float32, device=device)
    fill_pick_table(grad_raw_table, grad_raw, neuron_ids, expert_ids, neurons_per_expert, gather=True)
    return grad_raw, grad_w, grad_raw_table, act_table
