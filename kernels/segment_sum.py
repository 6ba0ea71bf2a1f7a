"""Row-sparse gradient rows by segmented reduction: out[u] = sum over occurrences i of row u of
coef[i] * x[i // group] (and optionally out2 from coef2 and x2, which may have another width:
dK rows from the key input x [T, r], dV rows from dy [T, d]).

An occurrence is one (token, pick) of a [T, group] pick table (a selected neuron, or a selected
expert); ``order`` lists occurrences grouped by row and ``offsets`` delimits each row's run.
Each program owns one row and one slice of d and sums its run in a fixed order, so results are
deterministic (no atomics) and no [T * K, d] per-occurrence tensor is formed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .validation import pow2_block


@triton.jit
def _segment_sum_kernel(
    out_ptr, coef_ptr, x_ptr, out2_ptr, coef2_ptr, x2_ptr,
    order_ptr, offsets_ptr, hidden_size, hidden_size2, group,
    stride_xt, stride_xd, stride_x2t, stride_x2d,
    HAS_SECOND: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < hidden_size
    dim2_ok = dims < hidden_size2
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_D], tl.float32)
    for i0 in range(start, end, BLOCK_I):
        idx = i0 + tl.arange(0, BLOCK_I)
        ok = idx < end
        occurrence = tl.load(order_ptr + idx, mask=ok, other=0).to(tl.int64)
        token = occurrence // group
        tile_ok = ok[:, None] & dim_ok[None, :]
        coef = tl.load(coef_ptr + occurrence, mask=ok, other=0.0)
        x = tl.load(x_ptr + token[:, None] * stride_xt + dims[None, :] * stride_xd,
                    mask=tile_ok, other=0.0)
        acc += tl.sum(coef[:, None] * x.to(tl.float32), axis=0)
        if HAS_SECOND:
            coef2 = tl.load(coef2_ptr + occurrence, mask=ok, other=0.0)
            x2 = tl.load(x2_ptr + token[:, None] * stride_x2t + dims[None, :] * stride_x2d,
                         mask=ok[:, None] & dim2_ok[None, :], other=0.0)
            acc2 += tl.sum(coef2[:, None] * x2.to(tl.float32), axis=0)
    tl.store(out_ptr + row * hidden_size + dims, acc, mask=dim_ok)
    if HAS_SECOND:
        tl.store(out2_ptr + row * hidden_size2 + dims, acc2, mask=dim2_ok)


def segment_sum(order, offsets, group, coef, x, coef2=None, x2=None):
    """Rows [U, x's width] fp32 with out[u] = sum_{i in run u} coef[i] x[i // group] (and a
    second output [U, x2's width] for ``coef2``/``x2`` sharing the same runs). Internal
    launcher: ``coef``/``coef2`` are contiguous fp32 [T, group] tables, ``order``/``offsets``
    from meft_triton.kernels.grouping."""
    num_rows = offsets.numel() - 1
    hidden_size = x.shape[1]
    has_second = coef2 is not None
    out = torch.empty(num_rows, hidden_size, dtype=torch.float32, device=x.device)
    out2 = torch.empty(num_rows, x2.shape[1], dtype=torch.float32, device=x.device) if has_second else out
    if num_rows == 0:
        return (out, out2) if has_second else out
    if not has_second:
        coef2, x2 = coef, x
    width = max(hidden_size, x2.shape[1])
    block_d = pow2_block(width, 16, 128)
    grid = (num_rows, triton.cdiv(width, block_d))
    _segment_sum_kernel[grid](
        out, coef, x, out2, coef2, x2, order, offsets, hidden_size, x2.shape[1], group,
        x.stride(0), x.stride(1), x2.stride(0), x2.stride(1),
        HAS_SECOND=has_second, BLOCK_I=16, BLOCK_D=block_d,
    )
    return (out, out2) if has_second else out
