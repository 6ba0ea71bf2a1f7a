"""Zero-copy row gather: out[i] = host_rows[ids[i]], read by the GPU straight from pinned host
memory through unified virtual addressing. Only the selected rows cross PCIe, with no CPU work
and no staging buffer; sorted ids make neighbouring programs read neighbouring host pages.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .validation import INDEX_DTYPES, check_tensor, pow2_block


@triton.jit
def _zero_copy_gather_kernel(
    host_ptr, ids_ptr, out_ptr, num_ids, width, stride_host, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    picks = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    pick_ok = picks < num_ids
    rows = tl.load(ids_ptr + picks, mask=pick_ok, other=0).to(tl.int64)
    for w0 in range(0, width, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        ok = pick_ok[:, None] & (cols < width)[None, :]
        data = tl.load(host_ptr + rows[:, None] * stride_host + cols[None, :], mask=ok)
        tl.store(out_ptr + picks[:, None] * stride_out + cols[None, :],
                 data.to(out_ptr.dtype.element_ty), mask=ok)


def zero_copy_gather_rows(host_rows: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launcher behind ``meft_triton.prefetch.zero_copy_gather`` (which checks pinning, devices
    and ranges). Rows have unit stride along their width, any row stride; offsets are int64."""
    check_tensor("host_rows", host_rows, 2, (torch.float32, torch.float16, torch.bfloat16))
    check_tensor("ids", ids, 1, INDEX_DTYPES)
    check_tensor("out", out, 2, (torch.float32, torch.float16, torch.bfloat16))
    if out.shape[0] != ids.numel() or out.shape[1] != host_rows.shape[1]:
        raise ValueError(f"out must have shape [{ids.numel()}, {host_rows.shape[1]}], got {tuple(out.shape)}")
    if host_rows.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("host_rows and out must have unit stride along their rows")
    if ids.numel() == 0:
        return out
    block_r = 4
    block_w = pow2_block(host_rows.shape[1], 16, 1024)
    grid = (triton.cdiv(ids.numel(), block_r),)
    _zero_copy_gather_kernel[grid](host_rows, ids.contiguous(), out, ids.numel(), host_rows.shape[1],
                                   host_rows.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_W=block_w)
    return out
