"""Zero-copy gather kernel (its launcher on CPU under the interpreter; pinned reads on a GPU)."""

import pytest
import torch

from meft_triton.kernels.zero_copy_gather import zero_copy_gather_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 casts: GPU only
def test_gathers_rows_of_a_strided_view(seed, poison_outputs, dtype):
    neurons = torch.randn(50, 2, 37)  # [N, 2, d] records; values are the [:, 1] view
    values = neurons[:, 1]
    ids = torch.tensor([3, 3, 0, 49, 17, 5, 6], dtype=torch.int64)
    out = torch.empty(ids.numel(), 37, dtype=dtype)
    zero_copy_gather_rows(values, ids, out)
    assert torch.equal(out, values[ids].to(dtype))


def test_rejects_wrong_out_shape():
    with pytest.raises(ValueError, match=r"out must have shape \[2, 8\]"):
        zero_copy_gather_rows(torch.randn(4, 8), torch.tensor([0, 1]), torch.empty(3, 8))


@pytest.mark.gpu
def test_reads_pinned_host_memory_from_the_gpu(seed):
    host = torch.randn(1000, 2, 256).pin_memory()
    ids = torch.randint(0, 1000, (300,), device="cuda").sort().values
    out = torch.empty(300, 256, device="cuda", dtype=torch.bfloat16)
    zero_copy_gather_rows(host[:, 1], ids, out)
    assert torch.equal(out.cpu(), host[:, 1][ids.cpu()].bfloat16())
