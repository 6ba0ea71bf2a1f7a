"""SMT block gradients: the weight gradient of a linear layer restricted to a list of blocks.

For ``y = x W^T`` with ``W [out, in]``, the dense weight gradient is ``dW = dY^T X``. Sparse
Matrix Tuning trains only a few ``b x b`` blocks of ``W``, so only those blocks' gradients
are needed: for block ``i`` covering output rows ``row_start[i] .. row_end[i]`` and input
columns ``col_start[i] .. col_end[i]``,

    out[i, :h, :w] = dY[:, row_start[i]:row_end[i]]^T @ X[:, col_start[i]:col_end[i]]
    (h = row_end - row_start <= b, w = col_end - col_start <= b; the rest of out[i] is 0)

so blocks at the matrix edges may be partial. ``X`` may be a compacted copy holding only the
input columns some block needs (the caller maps block columns into it). One program computes
one ``BLOCK_M x BLOCK_N`` tile of one block, streaming the tokens in ``BLOCK_T`` chunks with
fp32 accumulation; no dense ``[out, in]`` tensor is ever formed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .validation import (FLOAT_DTYPES, INDEX_DTYPES, INTERPRETED, check_devices, check_int_arg,
                         check_same_dtype, check_tensor, dot_precision, pow2_block)


@triton.jit
def _smt_block_grad_kernel(
    out_ptr, grad_ptr, x_ptr,
    row_start_ptr, row_end_ptr, col_start_ptr, col_end_ptr,
    num_tokens, block_size,
    stride_gt, stride_go, stride_xt, stride_xc,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside the block
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns inside the block
    r0 = tl.load(row_start_ptr + blk).to(tl.int64)
    r1 = tl.load(row_end_ptr + blk).to(tl.int64)
    c0 = tl.load(col_start_ptr + blk).to(tl.int64)
    c1 = tl.load(col_end_ptr + blk).to(tl.int64)
    rows = r0 + offs_m
    cols = c0 + offs_n
    row_ok = rows < r1
    col_ok = cols < c1

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t0 in range(0, num_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < num_tokens
        t64 = t.to(tl.int64)
        # dY^T tile [BLOCK_M, BLOCK_T] and X tile [BLOCK_T, BLOCK_N]
        g = tl.load(grad_ptr + t64[None, :] * stride_gt + rows[:, None] * stride_go,
                    mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        x = tl.load(x_ptr + t64[:, None] * stride_xt + cols[None, :] * stride_xc,
                    mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(g, x, acc, input_precision=DOT_PRECISION)

    in_block = (offs_m < block_size)[:, None] & (offs_n < block_size)[None, :]
    dst = out_ptr + blk * block_size * block_size + offs_m[:, None].to(tl.int64) * block_size + offs_n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=in_block)


def smt_block_grad(grad_out: torch.Tensor, x: torch.Tensor, row_start: torch.Tensor,
                   row_end: torch.Tensor, col_start: torch.Tensor, col_end: torch.Tensor,
                   block_size: int, out_dtype: torch.dtype | None = None,
                   check_blocks: bool = True) -> torch.Tensor:
    """Packed block gradients ``[n, block_size, block_size]`` (see the module docstring).

    grad_out ``[T, out_features]`` and x ``[T, C]`` share one float dtype (fp16, bf16, fp32)
    and device, any strides; ``row_start/row_end/col_start/col_end`` are 1-D int32/int64 of
    one length ``n`` on that device with ``0 <= start < end``, ``end - start <= block_size``,
    rows within ``out_features`` and columns within ``C``. ``out_dtype`` defaults to
    grad_out's dtype (accumulation is fp32 either way). ``check_blocks=False`` skips the
    range check of the block table (it synchronizes on a GPU): for callers that validated it
    once.
    """
    check_tensor("grad_out", grad_out, 2, FLOAT_DTYPES)
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_same_dtype(grad_out=grad_out, x=x)
    names = ("row_start", "row_end", "col_start", "col_end")
    table = (row_start, row_end, col_start, col_end)
    for name, t in zip(names, table):
        check_tensor(name, t, 1, INDEX_DTYPES)
    device = check_devices(grad_out=grad_out, x=x, row_start=row_start, row_end=row_end,
                           col_start=col_start, col_end=col_end)
    num_tokens, out_features = grad_out.shape
    if x.shape[0] != num_tokens:
        raise ValueError(f"x must have shape [{num_tokens}, C] (one row per token of grad_out), "
                         f"got {tuple(x.shape)}")
    num_blocks = row_start.numel()
    for name, t in zip(names[1:], table[1:]):
        if t.numel() != num_blocks:
            raise ValueError(f"{name} must have {num_blocks} entries like row_start, got {t.numel()}")
    check_int_arg("block_size", block_size, 1, 1 << 15)
    if out_dtype is None:
        out_dtype = grad_out.dtype
    if out_dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}")
    if check_blocks and num_blocks:
        for (lo_name, lo), (hi_name, hi), limit in (
                (("row_start", row_start), ("row_end", row_end), out_features),
                (("col_start", col_start), ("col_end", col_end), x.shape[1])):
            lo64, hi64 = lo.long(), hi.long()
            if int(lo64.min()) < 0 or int(hi64.max()) > limit:
                raise ValueError(f"{lo_name}/{hi_name} must lie in [0, {limit}], got "
                                 f"[{int(lo64.min())}, {int(hi64.max())}]")
            span = hi64 - lo64
            if int(span.min()) < 1 or int(span.max()) > block_size:
                raise ValueError(f"{hi_name} - {lo_name} must be in [1, block_size={block_size}], "
                                 f"got values in [{int(span.min())}, {int(span.max())}]")

    out = torch.empty(num_blocks, block_size, block_size, dtype=out_dtype, device=device)
    if num_blocks == 0:
        return out
    if num_tokens == 0:
        return out.zero_()
    block_m = pow2_block(block_size, 16, 64)
    block_n = pow2_block(block_size, 16, 64)
    block_t = 16 if num_tokens <= 16 else 32
    upcast = grad_out.dtype == torch.float32 or (INTERPRETED and grad_out.dtype == torch.bfloat16)
    grid = (num_blocks, triton.cdiv(block_size, block_m), triton.cdiv(block_size, block_n))
    _smt_block_grad_kernel[grid](
        out, grad_out, x, row_start, row_end, col_start, col_end,
        num_tokens, block_size,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
        UPCAST=upcast, DOT_PRECISION=dot_precision(torch.float32 if upcast else grad_out.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=block_t,
    )
    return out


__all__ = ["smt_block_grad"]
