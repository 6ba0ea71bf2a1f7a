"""kernels/smt_block_grad.py: per-block weight gradients vs the float64 dense gradient restricted
to the blocks (fp32 under the interpreter, poisoned outputs), argument validation, and
SMTLinear on the Triton backend."""

from __future__ import annotations

import pytest
import torch

from meft_triton.kernels.smt_block_grad import smt_block_grad
from meft_triton.addons.smt import SMTLinear, block_grad_reference
from oracle import rel_err


def block_table(blocks, out_features, in_features, b, device):
    """Row/column ranges of (row block, col block) pairs on an uncompacted x."""
    blocks = torch.as_tensor(blocks, dtype=torch.int64)
    r0, c0 = blocks[:, 0] * b, blocks[:, 1] * b
    r1 = (r0 + b).clamp(max=out_features)
    c1 = (c0 + b).clamp(max=in_features)
    return [t.to(device) for t in (r0, r1, c0, c1)]


def restricted64(grad_out, x, r0, r1, c0, c1, b):
    dense = grad_out.double().cpu().t() @ x.double().cpu()
    out = torch.zeros(r0.numel(), b, b, dtype=torch.float64)
    for i, (a, z, c, e) in enumerate(zip(r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist())):
        out[i, : z - a, : e - c] = dense[a:z, c:e]
    return out


CASES = [  # T, out, in, b, blocks (row block, col block)
    (7, 13, 11, 4, [(0, 0), (3, 2), (1, 1), (3, 0), (0, 2)]),   # partial rows (13 = 3*4+1), cols
    (33, 32, 48, 16, [(0, 0), (1, 2), (1, 0)]),
    (1, 5, 3, 8, [(0, 0)]),                                      # one block larger than W
    (20, 24, 17, 8, [(2, 2), (0, 1)]),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-{c[1]}x{c[2]}-b{c[3]}" for c in CASES])
def test_block_grad_matches_dense_restricted(seed, device, poison_outputs, case):
    T, out_features, in_features, b, blocks = case
    grad_out = torch.randn(T, out_features, device=device)
    x = torch.randn(T, in_features, device=device)
    r0, r1, c0, c1 = block_table(blocks, out_features, in_features, b, device)
    got = smt_block_grad(grad_out, x, r0, r1, c0, c1, b)
    want = restricted64(grad_out, x, r0, r1, c0, c1, b)
    assert got.shape == (len(blocks), b, b) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5
    assert (got.cpu()[want == 0] == 0).all(), "padding of partial blocks must be written as 0"
    ref = block_grad_reference(grad_out.double(), x.double(), r0, r1, c0, c1, b)
    assert rel_err(ref, want) < 1e-12


def test_block_grad_strided_inputs_and_compacted_columns(seed, device, poison_outputs):
    T, out_features, b = 9, 10, 4
    big = torch.randn(T, 2 * out_features, device=device)
    grad_out = big[:, ::2]  # non-unit column stride
    x_full = torch.randn(T, 12, device=device)
    cols = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11], device=device)  # column blocks 1 and 2 only
    x_saved = x_full.index_select(1, cols).t().contiguous().t()  # column-major copy
    r0 = torch.tensor([0, 8], device=device, dtype=torch.int32)
    r1 = torch.tensor([4, 10], device=device, dtype=torch.int32)
    c0 = torch.tensor([4, 0], device=device, dtype=torch.int32)  # positions in x_saved
    c1 = torch.tensor([8, 4], device=device, dtype=torch.int32)
    got = smt_block_grad(grad_out, x_saved, r0, r1, c0, c1, b)
    dense = grad_out.double().cpu().t() @ x_full.double().cpu()
    assert rel_err(got[0], dense[0:4, 8:12]) < 1e-5
    assert rel_err(got[1, :2], dense[8:10, 4:8]) < 1e-5
    assert (got[1, 2:].cpu() == 0).all()
    ref = block_grad_reference(grad_out.double(), x_saved.double(), r0, r1, c0, c1, b)
    assert rel_err(got, ref) < 1e-5
    # unaligned column starts (a generic caller): the reference slices them as well
    c0u, c1u = torch.tensor([1, 3], device=device), torch.tensor([5, 6], device=device)
    ref = block_grad_reference(grad_out.double(), x_saved.double(), r0, r1, c0u, c1u, b)
    kern = smt_block_grad(grad_out, x_saved, r0, r1, c0u, c1u, b)
    dense_saved = grad_out.double().cpu().t() @ x_saved.double().cpu()
    assert rel_err(ref[0], dense_saved[0:4, 1:5]) < 1e-12
    assert rel_err(ref[1, :2, :3], dense_saved[8:10, 3:6]) < 1e-12 and (ref[1, :, 3:] == 0).all()
    assert rel_err(kern, ref) < 1e-5


def test_block_grad_empty_and_validation(device):
    g, x = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    r0, r1, c0, c1 = block_table([(0, 0)], 8, 8, 4, device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    assert smt_block_grad(g, x, empty, empty, empty, empty, 4).shape == (0, 4, 4)
    zero = smt_block_grad(g[:0], x[:0], r0, r1, c0, c1, 4)
    assert zero.shape == (1, 4, 4) and (zero == 0).all()
    with pytest.raises(TypeError, match="grad_out"):
        smt_block_grad(g.long(), x, r0, r1, c0, c1, 4)
    with pytest.raises(TypeError, match="x has dtype"):
        smt_block_grad(g, x.half(), r0, r1, c0, c1, 4)
    with pytest.raises(ValueError, match="one row per token"):
        smt_block_grad(g, x[:3], r0, r1, c0, c1, 4)
    with pytest.raises(ValueError, match="row_end must have 1 entries"):
        smt_block_grad(g, x, r0, r1.repeat(2), c0, c1, 4)
    with pytest.raises(TypeError, match="row_start"):
        smt_block_grad(g, x, r0.float(), r1, c0, c1, 4)
    with pytest.raises(ValueError, match=r"row_start/row_end must lie in \[0, 8\]"):
        smt_block_grad(g, x, r0 + 6, r1 + 6, c0, c1, 4)
    with pytest.raises(ValueError, match="col_end - col_start must be in"):
        smt_block_grad(g, x, r0, r1, c0, c1 + 2, 4)
    with pytest.raises(ValueError, match="block_size"):
        smt_block_grad(g, x, r0, r1, c0, c1, 0)


def test_smt_linear_triton_backend_matches_float64(seed, device, poison_outputs):
    """SMTLinear's backward on the kernel (fp32) vs float64 autograd of the dense layer."""
    lin = torch.nn.Linear(13, 10, device=device)
    blocks = torch.tensor([[0, 0], [2, 3], [1, 1], [2, 0]])
    dense64 = lin.weight.detach().double().cpu().requires_grad_()
    layer = SMTLinear(lin, blocks, 4, backend="triton")
    x = torch.randn(2, 3, 13, device=device, requires_grad=True)
    gy = torch.randn(2, 3, 10, device=device)
    layer(x).backward(gy)
    x64 = x.detach().double().cpu().requires_grad_()
    torch.nn.functional.linear(x64, dense64, lin.bias.detach().double().cpu()).backward(gy.double().cpu())
    want = torch.zeros(4, 4, 4, dtype=torch.float64)
    for i, (r, c) in enumerate(layer.blocks.tolist()):
        region = dense64.grad[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]
        want[i, : region.shape[0], : region.shape[1]] = region
    assert rel_err(layer.block_weight.grad, want) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5
