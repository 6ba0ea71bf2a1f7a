"""dK, dV and the "logit" gate's dG as grouped GEMMs per expert (DESIGN.md, "Performance model").

The (token, expert) pairs are sorted by expert (``expert_segments``); pair q = t * P + p owns
row q of two [T * P, S] coefficient tables in the candidate layout of the forward's scores:
dr (the score gradient times the gate weight) and a = ReLU(s) at the token's picks of expert
e_p, zero elsewhere. For expert e with pairs Q_e, tokens t(Q_e):

    dK_e [S, r] = dR[Q_e]^T x[t(Q_e)]      dV_e [S, d] = A[Q_e]^T dy[t(Q_e)]
    dG_e [r]    = dw[Q_e]^T x[t(Q_e)]      (gate "logit": one more row, fed by the same x tile)

Each program owns one expert, a tile of its S neurons and a tile of the width, and runs over
the expert's pairs in their sorted order: tensor-core products, deterministic sums, no
atomics. Picks outside the token's experts (K_top > P * S) are zero in both tables, so their
rows come out zero like every untouched neuron of a written expert.

Outputs go where the optimizer reads them: the dense [N, width] gradients in the parameters'
dtype (every row written, no zero-fill and scatter), or fp32 rows of the distinct picked
neurons, each program writing its neurons at their place in that list. The list has the
host-known length min(N, T * K) (no host read of the distinct count U): after the U distinct
ids come repeats of the largest, whose rows a second small launch zeroes (work in proportion
to the padding, read from the device).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch_config import LONG_RUN_PAIRS, launch_config


@triton.jit
def _expert_grads_kernel(
    key_out_ptr, value_out_ptr, router_out_ptr,
    grad_raw_ptr, act_ptr, grad_w_ptr, x_ptr, dy_ptr,
    order_ptr, offsets_ptr, row_pos_ptr, row_experts_ptr,
    num_experts, key_width, value_width, neurons_per_expert,
    experts_per_token: tl.constexpr,  # a constant divisor: no 64-bit division per pair
    stride_xt, stride_xd, stride_yt, stride_yd, stride_ko, stride_vo, stride_go,
    HAS_ROUTER: tl.constexpr, ROW_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROWS: tl.constexpr = True,
):
    # ROWS False: dG alone (the factored backward leaves dK, dV to key_value_rows)
    if ROW_MAP:
        # only experts owning a picked row have rows to write; the list's padding is E
        expert = tl.load(row_experts_ptr + tl.program_id(0)).to(tl.int64)
        if expert >= num_experts:
            return
    else:
        expert = tl.program_id(0).to(tl.int64)
    s_tile = tl.program_id(1)
    offs_s = s_tile * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < neurons_per_expert
    dims = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    key_ok = dims < key_width
    value_ok = dims < value_width
    do_key = tl.program_id(2) * BLOCK_D < key_width
    do_value = tl.program_id(2) * BLOCK_D < value_width
    do_router = do_key & (s_tile == 0)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)

    acc_k = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    # dG rides on a 16-row operand (the smallest tensor-core M) whose row 0 is dw
    acc_g = tl.zeros([16, BLOCK_D], tl.float32)
    g_row = tl.arange(0, 16)
    for m0 in range(start, end, BLOCK_M):
        idx = m0 + tl.arange(0, BLOCK_M)
        pair_ok = idx < end
        pair = tl.load(order_ptr + idx, mask=pair_ok, other=0).to(tl.int64)
        token = pair // experts_per_token
        coef_at = pair[None, :] * neurons_per_expert + offs_s[:, None]
        coef_ok = s_ok[:, None] & pair_ok[None, :]
        if do_key:
            x = tl.load(x_ptr + token[:, None] * stride_xt + dims[None, :] * stride_xd,
                        mask=pair_ok[:, None] & key_ok[None, :], other=0.0)
            if ROWS:
                dr = tl.load(grad_raw_ptr + coef_at, mask=coef_ok, other=0.0)
                acc_k = tl.dot(dr, x, acc_k, input_precision=DOT_PRECISION)
            if HAS_ROUTER:
                if do_router:
                    dw = tl.load(grad_w_ptr + pair, mask=pair_ok, other=0.0)
                    dw = tl.where(g_row[:, None] == 0, dw[None, :], 0.0).to(x.dtype)
                    acc_g = tl.dot(dw, x, acc_g, input_precision=DOT_PRECISION)
        if ROWS and do_value:
            dy = tl.load(dy_ptr + token[:, None] * stride_yt + dims[None, :] * stride_yd,
                         mask=pair_ok[:, None] & value_ok[None, :], other=0.0)
            act = tl.load(act_ptr + coef_at, mask=coef_ok, other=0.0)
            acc_v = tl.dot(act, dy, acc_v, input_precision=DOT_PRECISION)

    neuron = expert * neurons_per_expert + offs_s
    if ROW_MAP:
        # fp32 rows of the distinct picked neurons; -1 marks a neuron no token picked
        row = tl.load(row_pos_ptr + neuron, mask=s_ok, other=-1).to(tl.int64)
        row_ok = s_ok & (row >= 0)
    else:
        row = neuron
        row_ok = s_ok
    if ROWS and do_key:
        tl.store(key_out_ptr + row[:, None] * stride_ko + dims[None, :],
                 acc_k.to(key_out_ptr.dtype.element_ty), mask=row_ok[:, None] & key_ok[None, :])
    if ROWS and do_value:
        tl.store(value_out_ptr + row[:, None] * stride_vo + dims[None, :],
                 acc_v.to(value_out_ptr.dtype.element_ty), mask=row_ok[:, None] & value_ok[None, :])
    if HAS_ROUTER:
        if do_router:
            tl.store(router_out_ptr + expert * stride_go + g_row[:, None] * 0 + dims[None, :],
                     acc_g.to(router_out_ptr.dtype.element_ty),
                     mask=(g_row[:, None] == 0) & key_ok[None, :])


@triton.jit
def _zero_padding_kernel(
    key_out_ptr, value_out_ptr, count_ptr, num_rows, key_width, value_width,
    stride_ko, stride_vo,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # rows count .. num_rows - 1 of both tables, split over the programs in BLOCK_R strides:
    # the work follows the padding's size (device data), not the tables' host-known bound
    count = tl.load(count_ptr).to(tl.int64)
    step = tl.num_programs(0) * BLOCK_R
    offs_d = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_R, BLOCK_D], key_out_ptr.dtype.element_ty)
    for r0 in range(count + tl.program_id(0) * BLOCK_R, num_rows, step):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < num_rows
        for d0 in range(0, key_width, BLOCK_D):
            dims = d0 + offs_d
            tl.store(key_out_ptr + rows[:, None] * stride_ko + dims[None, :], zeros,
                     mask=row_ok[:, None] & (dims < key_width)[None, :])
        for d0 in range(0, value_width, BLOCK_D):
            dims = d0 + offs_d
            tl.store(value_out_ptr + rows[:, None] * stride_vo + dims[None, :], zeros,
                     mask=row_ok[:, None] & (dims < value_width)[None, :])


#: programs of the padding fill: two waves of a 132-SM chip (the padding is a few percent of
#: the rows; the loop strides over whatever it is)
PADDING_PROGRAMS = 264


class PickedRows(NamedTuple):
    """The distinct picked neurons in a form of host-known size (module docstring of
    sparse_kv_backward: the row-sparse gradients)."""

    row_ids: torch.Tensor      # [min(N, T*K)] int64: distinct ids ascending, then the largest repeated
    row_pos: torch.Tensor      # [N] int32: each neuron's row, -1 if no token picked it
    row_experts: torch.Tensor  # [min(E, len(row_ids))] int64: owning experts ascending, then E
    count: torch.Tensor        # [1] int32: how many distinct ids (device data)


def picked_rows(neuron_ids: torch.Tensor, num_neurons: int, num_experts: int) -> PickedRows:
    """The distinct picked neurons without a host read: every size is a host-known bound
    (min(N, T * K) rows, min(E, rows) experts), the distinct count stays on the device and
    the padding repeats the largest picked id (the layout of the offload's slot ids)."""
    flat = neuron_ids.reshape(-1).long()
    device = flat.device
    capacity = min(num_neurons, flat.numel())
    touched = torch.zeros(num_neurons, dtype=torch.int32, device=device)
    touched.index_fill_(0, flat, 1)
    rank = torch.cumsum(touched, 0, dtype=torch.int32)  # picked neurons up to and including n
    row_pos = (rank - 1).masked_fill_(touched == 0, -1)
    # row i holds the first neuron of rank i + 1; past the count searchsorted answers N
    wanted = torch.arange(1, capacity + 1, dtype=torch.int32, device=device)
    row_ids = torch.searchsorted(rank, wanted)
    if capacity:
        row_ids = torch.minimum(row_ids, flat.max())
    owned = torch.zeros(num_experts, dtype=torch.int32, device=device)
    owned.index_fill_(0, flat // (num_neurons // num_experts), 1)
    expert_rank = torch.cumsum(owned, 0, dtype=torch.int32)
    # past the count of owning experts searchsorted answers E: the padding the kernel skips
    row_experts = torch.searchsorted(expert_rank, wanted[:min(num_experts, capacity)])
    count = rank[-1:] if num_neurons else torch.zeros(1, dtype=torch.int32, device=device)
    return PickedRows(row_ids, row_pos, row_experts, count)


def expert_grads(grad_raw_table, act_table, grad_w, x, dy, order, offsets, experts_per_token,
                 neurons_per_expert, key_out, value_out, router_out=None, rows=None,
                 dot_precision="tf32"):
    """Fill ``key_out`` with dK, ``value_out`` with dV and (if given) ``router_out`` [E, r]
    with the "logit" gate's dG, all per expert (module docstring).

    Internal launcher: ``grad_raw_table``/``act_table`` [T * P, S] in x's dtype and
    ``grad_w`` [T * P] fp32 are contiguous; ``order``/``offsets`` come from
    grouping.expert_segments. Outputs are [N, width] (``rows`` None) or the rows of
    ``rows`` = ``picked_rows(...)`` [len(rows.row_ids), width], padding rows zero, with unit
    stride along the width (views of one wider buffer work). With ``rows``, only experts
    owning a picked row run, so ``router_out`` must come zeroed: an expert none of whose
    neurons was picked has dw = 0 at every pair. ``key_out`` and ``value_out`` None (and the
    tables None): dG alone, over every expert.
    """
    num_experts = offsets.numel() - 1
    key_width, value_width = x.shape[1], dy.shape[1]
    with_rows = key_out is not None
    if not with_rows and (router_out is None or rows is not None):
        raise ValueError("expert_grads without key/value outputs computes dG alone: pass router_out, not rows")
    width = max(key_width, value_width) if with_rows else key_width
    pairs_per_expert = x.shape[0] * experts_per_token / num_experts
    entry = ("expert_grads_dg" if not with_rows else
             "expert_grads_long" if pairs_per_expert >= LONG_RUN_PAIRS else "expert_grads")
    cfg = launch_config(entry, x.device, x.dtype, pairs_per_expert=pairs_per_expert,
                        neurons_per_expert=neurons_per_expert, width=width)
    row_pos, row_experts = (rows.row_pos, rows.row_experts) if rows is not None else (offsets, offsets)
    grid = (num_experts if rows is None else row_experts.numel(),
            triton.cdiv(neurons_per_expert, cfg["BLOCK_S"]) if with_rows else 1,
            triton.cdiv(width, cfg["BLOCK_D"]))
    has_router = router_out is not None
    key_out = key_out if with_rows else router_out
    value_out = value_out if with_rows else router_out
    grad_raw_table = grad_raw_table if with_rows else x
    act_table = act_table if with_rows else x
    _expert_grads_kernel[grid](
        key_out, value_out, router_out if has_router else key_out,
        grad_raw_table, act_table, grad_w, x, dy, order, offsets, row_pos, row_experts,
        num_experts, key_width, value_width, neurons_per_expert, experts_per_token,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        key_out.stride(0), value_out.stride(0), router_out.stride(0) if has_router else 0,
        HAS_ROUTER=has_router, ROW_MAP=rows is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["BLOCK_D"],
        DOT_PRECISION=dot_precision, ROWS=with_rows, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if rows is not None and key_out.shape[0]:
        grid = (min(triton.cdiv(key_out.shape[0], 16), PADDING_PROGRAMS),)
        _zero_padding_kernel[grid](
            key_out, value_out, rows.count, key_out.shape[0], key_width, value_width,
            key_out.stride(0), value_out.stride(0), BLOCK_R=16, BLOCK_D=128, num_warps=4,
        )
