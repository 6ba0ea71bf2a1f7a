"""Weighted sums of gathered rows: out[t] = sum_k coef[t, k] * rows[ids[t, k]].

The value stage of the forward (y = sum_j a_j V_j over the selected neurons) and the dh of the
backward (sum_j dr_j K_j plus the router term sum_p dg_p G_{e_p}) are both this. No [T, K, d]
tensor is formed.

16-bit rows go through tensor cores: a program owns BLOCK_T tokens and a slice of d, gathers
the rows of BLOCK_K picks of each token as one [BLOCK_T * BLOCK_K, BLOCK_D] operand and
multiplies it by the block-diagonal [BLOCK_T, BLOCK_T * BLOCK_K] matrix of their coefficients
(row i holds token i's coefficients, zeros elsewhere). Only 1 / BLOCK_T of those products are
useful (BLOCK_T = 16, the smallest tensor-core M), but tensor-core FLOPs are cheap here, the
rows are read once per pick as in a plain gather-sum, and the instructions per element are
far fewer than convert-and-FMA. The coefficients enter the product in the rows' dtype (fp32
accumulation), the usual rounding of activations in 16-bit training. Per-expert GEMMs would
share each row among a block of tokens but leave P partial sums per token to combine: a
[T * P, d] buffer (more bytes than the whole stage) or atomics (not deterministic).
Launch parameters: launch_config "row_gather_dot".

fp32 rows stream one token per program with FMAs: on tensor cores an fp32 row would need
three tf32 products (validation.dot_precision) of a tile that is 15/16 zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import launch_config
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


@triton.jit
def _dot_gathered_rows(acc, tokens0, num_tokens, dims, dim_ok, coef_ptr, ids_ptr, rows_ptr,
                       num_picks, stride_rn, stride_rd,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BLOCK_T, BLOCK_D] += the block's sums, BLOCK_K picks per token at a time; the
    operands' flat index j is (token tokens0 + j // BLOCK_K, pick k0 + j % BLOCK_K)."""
    flat = tl.arange(0, BLOCK_T * BLOCK_K)
    token = tokens0 + flat // BLOCK_K
    token_ok = token < num_tokens
    own = tl.arange(0, BLOCK_T)[:, None] == (flat // BLOCK_K)[None, :]
    for k0 in range(0, num_picks, BLOCK_K):
        pick = k0 + flat % BLOCK_K
        ok = token_ok & (pick < num_picks)
        ids = tl.load(ids_ptr + token * num_picks + pick, mask=ok, other=0).to(tl.int64)
        coef = tl.load(coef_ptr + token * num_picks + pick, mask=ok, other=0.0)
        rows = tl.load(rows_ptr + ids[:, None] * stride_rn + dims[None, :] * stride_rd,
                       mask=ok[:, None] & dim_ok[None, :], other=0.0)
        block = tl.where(own, coef[None, :], 0.0).to(rows.dtype)
        acc = tl.dot(block, rows, acc)
    return acc


@triton.jit
def _row_gather_dot_kernel(
    out_ptr, coef_ptr, ids_ptr, rows_ptr,
    coef2_ptr, ids2_ptr, rows2_ptr,
    num_tokens, hidden_size, num_picks, num_picks2,
    stride_ot, stride_od, stride_rn, stride_rd, stride_r2n, stride_r2d,
    HAS_SECOND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < hidden_size
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    acc = _dot_gathered_rows(acc, tokens0, num_tokens, dims, dim_ok, coef_ptr, ids_ptr, rows_ptr,
                             num_picks, stride_rn, stride_rd, BLOCK_T, BLOCK_K)
    if HAS_SECOND:
        acc = _dot_gathered_rows(acc, tokens0, num_tokens, dims, dim_ok, coef2_ptr, ids2_ptr,
                                 rows2_ptr, num_picks2, stride_r2n, stride_r2d, BLOCK_T, BLOCK_K)
    tokens = tokens0 + tl.arange(0, BLOCK_T)
    tl.store(out_ptr + tokens[:, None] * stride_ot + dims[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=(tokens < num_tokens)[:, None] & dim_ok[None, :])


def row_gather_sum(out, coef, ids, rows, coef2=None, ids2=None, rows2=None):
    """Fill ``out [T, d]`` with sum_k coef[t, k] rows[ids[t, k]] (+ the same over coef2/ids2/rows2).

    Internal launcher: callers pass contiguous fp32 ``coef`` and in-range int ``ids`` they made
    themselves (the public launchers validate user input); ``rows`` and ``rows2`` share a dtype.
    """
    num_tokens, hidden_size = out.shape
    if num_tokens == 0:
        return out
    has_second = coef2 is not None
    num_picks = coef.shape[1]
    if not has_second:
        coef2, ids2, rows2 = coef, ids, rows
    args = (out, coef, ids, rows, coef2, ids2, rows2)
    strides = (out.stride(0), out.stride(1), rows.stride(0), rows.stride(1),
               rows2.stride(0), rows2.stride(1))
    if rows.dtype == torch.float32:
        block_d = pow2_block(hidden_size, 16, 128)
        _row_gather_sum_kernel[(num_tokens, triton.cdiv(hidden_size, block_d))](
            *args, hidden_size, num_picks, coef2.shape[1], *strides,
            HAS_SECOND=has_second, BLOCK_K=pow2_block(num_picks, 16, 64), BLOCK_D=block_d,
        )
        return out
    cfg = launch_config("row_gather_dot", out.device, rows.dtype, width=hidden_size)
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_T"]), triton.cdiv(hidden_size, cfg["BLOCK_D"]))
    _row_gather_dot_kernel[grid](
        *args, num_tokens, hidden_size, num_picks, coef2.shape[1], *strides,
        HAS_SECOND=has_second, BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
