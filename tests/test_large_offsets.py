"""Offsets past 2^31 elements on CPU: the interpreter wraps int32 arithmetic like the GPU does,
so a missing int64 cast in any kernel shows up here as a wrong row.

The tables are 2^31 + 2^19 elements each (4 GiB in fp16) but allocated with torch.empty and
never touched except for the rows the test writes, so they cost almost no physical memory.
"""

import pytest
import torch

from meft_triton.kernels import sparse_kv_backward, sparse_kv_forward
from oracle import float64_grads, rel_err

D, E, S = 128, 4096, 4097  # N * d = 2^31 + 2^19 elements
N = E * S


@pytest.fixture(scope="module")
def tables():
    if torch.cuda.is_available():
        pytest.skip("the GPU variant is tests/test_gpu.py::test_offsets_past_2_31")
    try:
        return torch.empty(N, D, dtype=torch.float16), torch.empty(N, D, dtype=torch.float16)
    except RuntimeError as err:  # address space or overcommit limits
        pytest.skip(f"cannot reserve two 4 GiB tables: {err}")


def test_rows_past_2_31_forward_and_backward(seed, tables):
    keys, values = tables
    experts = torch.tensor([[E - 1], [E - 1], [E - 2]], dtype=torch.int32)
    hidden = torch.randn(3, D).half()
    used = torch.arange((E - 2) * S, N)
    keys[used] = torch.randn(used.numel(), D).half()
    values[used] = torch.randn(used.numel(), D).half()
    assert used[-1].item() * D > 2**31
    router = (torch.randn(E, D) / D**0.5).half()
    gate_weights = torch.einsum("td,td->t", hidden.float(), router[experts[:, 0].long()].float())[:, None]
    y, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, experts, gate_weights, E, 5)
    assert ((neuron_ids.long() // S) == experts.long()).all()

    local = neuron_ids.long() - (E - 2) * S  # evaluate the reference on the used rows only
    sub_router = router[E - 2:]
    grad_y = torch.randn(3, D).half()
    y64, grads64 = float64_grads(hidden, sub_router, keys[used], values[used], 1, 5, "logit", grad_y,
                                 experts.long() - (E - 2), local)
    assert rel_err(y, y64) < 2e-3
    grads = sparse_kv_backward(grad_y, hidden, router, keys, values, experts, gate_weights,
                               neuron_ids, activations, dense=False)
    assert grads.row_ids.min().item() >= (E - 2) * S
    rows = grads.row_ids - (E - 2) * S
    assert rel_err(grads.hidden, grads64[0]) < 3e-3
    assert rel_err(grads.router_weight[E - 2:], grads64[1]) < 3e-3
    assert rel_err(grads.key_rows, grads64[2][rows]) < 3e-3
    assert rel_err(grads.value_rows, grads64[3][rows]) < 3e-3
