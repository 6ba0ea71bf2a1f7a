"""Weighted sums of gathered rows: out[t] = sum_k coef[t, k] * rows[ids[t, k]].

The value stage of the forward (y = sum_j a_j V_j over the selected neurons) and the dh of the
backward (sum_j dr_j K_j plus the router term sum_p dg_p G_{e_p}) are both this. No [T, K, d]
tensor is formed: each program owns one token and one slice of d and streams the rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .validation import pow2_block


@triton.jit
def _add_gathered_rows(acc, token, dims, dim_ok, coef_ptr, ids_ptr, rows_ptr, num_picks,
                       stride_rn, stride_rd, BLOCK_K: tl.constexpr):
    """acc += sum_k coef[token, k] * rows[ids[token, k], dims]."""
    for k0 in range(0, num_picks, BLOCK_K):
        picks = k0 + tl.arange(0, BLOCK_K)
        pick_ok = picks < num_picks
        ids = tl.load(ids_ptr + token * num_picks + picks, mask=pick_ok, other=0).to(tl.int64)
        coef = tl.load(coef_ptr + token * num_picks + picks, mask=pick_ok, other=0.0)
        rows = tl.load(rows_ptr + ids[:, None] * stride_rn + dims[None, :] * stride_rd,
                       mask=pick_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += tl.sum(coef[:, None] * rows.to(tl.float32), axis=0)
    return acc


@triton.jit
def _row_gather_sum_kernel(
    out_ptr, coef_ptr, ids_ptr, rows_ptr,
    coef2_ptr, ids2_ptr, rows2_ptr,
    hidden_size, num_picks, num_picks2,
    stride_ot, stride_od, stride_rn, stride_rd, stride_r2n, stride_r2d,
    HAS_SECOND: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < hidden_size
    acc = tl.zeros([BLOCK_D], tl.float32)
    acc = _add_gathered_rows(acc, token, dims, dim_ok, coef_ptr, ids_ptr, rows_ptr, num_picks,
                             stride_rn, stride_rd, BLOCK_K)
    if HAS_SECOND:
        acc = _add_gathered_rows(acc, token, dims, dim_ok, coef2_ptr, ids2_ptr, rows2_ptr, num_picks2,
                                 stride_r2n, stride_r2d, BLOCK_K)
    tl.store(out_ptr + token * stride_ot + dims * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=dim_ok)


def row_gather_sum(out, coef, ids, rows, coef2=None, ids2=None, rows2=None):
    """Fill ``out [T, d]`` with sum_k coef[t, k] rows[ids[t, k]] (+ the same over coef2/ids2/rows2).

    Internal launcher: callers pass contiguous fp32 ``coef`` and in-range int ``ids`` they made
    themselves (the public launchers validate user input).
    """
    num_tokens, hidden_size = out.shape
    if num_tokens == 0:
        return out
    has_second = coef2 is not None
    num_picks = coef.shape[1]
    block_k = pow2_block(num_picks, 16, 64)
    block_d = pow2_block(hidden_size, 16, 128)
    if not has_second:
        coef2, ids2, rows2 = coef, ids, rows
    grid = (num_tokens, triton.cdiv(hidden_size, block_d))
    _row_gather_sum_kernel[grid](
        out, coef, ids, rows, coef2, ids2, rows2,
        hidden_size, num_picks, coef2.shape[1],
        out.stride(0), out.stride(1), rows.stride(0), rows.stride(1),
        rows2.stride(0), rows2.stride(1),
        HAS_SECOND=has_second, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return out
