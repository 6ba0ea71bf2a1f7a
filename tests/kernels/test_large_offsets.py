"""Offsets past 2^31 elements on CPU: the interpreter wraps int32 arithmetic like the GPU does,
so a missing int64 cast in any kernel shows up here as a wrong row.

The tables are 2^31 + 2^19 elements each (4 GiB in fp16) but allocated with torch.empty and
never touched except for the rows the test writes, so they cost almost no physical memory.
"""

import pytest
import torch

from meft_triton import reference
from meft_triton.kernels import sparse_kv_backward, sparse_kv_forward
from oracle import float64_grads, rel_err

D, E, S = 128, 4096, 4097  # N * d = 2^31 + 2^19 elements
N = E * S


@pytest.fixture(scope="module")
def tables():
    if torch.cuda.is_available():
        pytest.skip("the GPU variant is tests/kernels/test_gpu.py::test_offsets_past_2_31")
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
    kept = grads.row_ids.unique().numel()  # the rest repeats the last id with zero rows
    rows = grads.row_ids[:kept] - (E - 2) * S
    assert rel_err(grads.hidden, grads64[0]) < 3e-3
    assert rel_err(grads.router_weight[E - 2:], grads64[1]) < 3e-3
    assert rel_err(grads.key_rows[:kept], grads64[2][rows]) < 3e-3
    assert rel_err(grads.value_rows[:kept], grads64[3][rows]) < 3e-3


def test_value_width_and_softmax_gate_past_2_31(seed, tables):
    """Values wider than the keys (a low-key projection's r = 128 < d = 136), both tables past
    2^31 elements, and the softmax gate's dense router gradient. (K_top > P*S is not tried
    here: with S = 4097 it means thousands of picks per token, too slow for the interpreter;
    its surplus ids are the lowest non-candidate rows anyway.)"""
    keys, _ = tables
    DV = 136
    try:
        values = torch.empty(N, DV, dtype=torch.float16)
    except RuntimeError as err:
        pytest.skip(f"cannot reserve a third table: {err}")
    experts = torch.tensor([[E - 1], [E - 1], [E - 2]], dtype=torch.int32)
    used = torch.arange((E - 2) * S, N)
    keys[used] = torch.randn(used.numel(), D).half()
    values[used] = torch.randn(used.numel(), DV).half()
    assert used[-1].item() * DV > 2**31
    hidden = torch.randn(3, D).half()
    router = (torch.randn(E, D) / D**0.5).half()
    logits = hidden.float() @ router.float().T
    lse = logits.logsumexp(-1)
    gate_weights = (logits.gather(1, experts.long()) - lse[:, None]).exp()
    y, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, experts, gate_weights, E, 5)
    assert ((neuron_ids.long() // S) == experts.long()).all()
    grad_y = torch.randn(3, DV).half()
    grads = sparse_kv_backward(grad_y, hidden, router, keys, values, experts, gate_weights,
                               neuron_ids, activations, "softmax", dense=False, gate_lse=lse)

    # float64 reference on the used rows only, with the whole router: the softmax runs over all E
    leaves = [t.double().requires_grad_() for t in (hidden, router, keys[used], values[used])]
    _, _, w = reference.route(leaves[0], leaves[1], 1, "softmax", experts.long())
    y64, _, _ = reference.sparse_kv_forward(leaves[0], leaves[2], leaves[3], experts.long() - (E - 2), w, S,
                                            5, neuron_ids=neuron_ids.long() - (E - 2) * S)
    y64.backward(grad_y.double())
    assert rel_err(y, y64) < 2e-3
    assert rel_err(grads.hidden, leaves[0].grad) < 3e-3
    assert rel_err(grads.router_weight, leaves[1].grad) < 3e-3
    assert (grads.router_weight != 0).any(1).all(), "softmax: every router row gets a gradient"
    kept = grads.row_ids.unique().numel()  # the rest repeats the last id with zero rows
    rows = grads.row_ids[:kept] - (E - 2) * S
    assert rel_err(grads.key_rows[:kept], leaves[2].grad[rows]) < 3e-3
    assert rel_err(grads.value_rows[:kept], leaves[3].grad[rows]) < 3e-3
    assert grads.value_rows.shape[1] == DV and grads.key_rows.shape[1] == D
