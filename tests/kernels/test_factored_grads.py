"""key_value_rows and sparse_kv_backward(factored=True): several calls' dK, dV from their
factors in one launch vs float64 autograd through the reference, summed over the calls."""

import pytest
import torch

from meft_triton.kernels import key_value_rows, router_topk, sparse_kv_backward, sparse_kv_forward
from oracle import float64_grads, rel_err

from test_sparse_kv_backward import SHAPES, TOLERANCE, expected_row_ids

CALLS = (3, 1, 2)  # token-count multipliers of the calls summed together (one of them small)


def factored_calls(shape, dtype, device, gate):
    """Calls of one layer (shared router, keys and values; fresh tokens each) with their
    factored backward; returns the inputs, each call's factors and its float64 gradients."""
    T, d, E, S, P, K = shape
    router, keys, values = (torch.randn(*s, device=device).to(dtype) for s in [(E, d), (E * S, d), (E * S, d)])
    router = (router.float() / d**0.5).to(dtype)
    calls = []
    for scale in CALLS:
        hidden, grad_y = (torch.randn(T * scale, d, device=device).to(dtype) for _ in range(2))
        gate_weights, expert_ids, lse = router_topk(hidden, router, P, gate=gate, return_lse=True)
        _, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights, E, K)
        grads = sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_weights, neuron_ids,
                                   activations, gate, gate_lse=lse, dense=False, factored=True)
        _, expected = float64_grads(hidden, router, keys, values, P, K, gate, grad_y, expert_ids, neuron_ids)
        calls.append(((hidden, grad_y, expert_ids, neuron_ids, grads.pick_grads, activations), grads, expected))
    return keys, calls


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_factors_sum_to_the_reference_rows(seed, device, poison_outputs, shape, dtype, gate):
    T, d, E, S, P, K = shape
    keys, calls = factored_calls(shape, dtype, device, gate)
    for _, grads, expected in calls:  # each call's dx and dG as the unfactored backward's
        assert grads.row_ids is None and grads.key_rows is None and grads.keys is None
        assert rel_err(grads.hidden, expected[0]) < TOLERANCE[dtype]
        assert rel_err(grads.router_weight, expected[1]) < TOLERANCE[dtype]
    factors = [torch.cat(parts) for parts in zip(*(f for f, _, _ in calls))]
    out = key_value_rows(*factors, E * S, E, out_dtype=dtype)
    assert out.rows.dtype == dtype and out.rows.shape == (out.row_ids.numel(), 2 * d)
    assert torch.equal(out.row_ids.cpu(), expected_row_ids(factors[3], E * S))
    kept = factors[3].long().unique().numel()
    assert (out.rows[kept:] == 0).all(), "padding rows are not zero"
    for table, side in ((slice(0, d), 2), (slice(d, 2 * d), 3)):
        want = sum(expected[side] for _, _, expected in calls)
        got = torch.zeros(E * S, d, dtype=torch.float64).index_add_(0, out.row_ids.cpu(),
                                                                    out.rows[:, table].double().cpu())
        assert rel_err(got, want) < TOLERANCE[dtype]


def test_low_key_widths_and_fp32_rows(seed, device, poison_outputs):
    """r != d (keys [N, r], values [N, d]): the rows are [R, r + d], keys first; out_dtype
    defaults to fp32."""
    T, d, r, E, S, P, K = 9, 40, 12, 5, 7, 2, 6
    x, router, keys, values, grad_y = (torch.randn(*s, device=device)
                                       for s in [(T, r), (E, r), (E * S, r), (E * S, d), (T, d)])
    gate_weights, expert_ids = router_topk(x, router, P)
    _, neuron_ids, activations = sparse_kv_forward(x, keys, values, expert_ids, gate_weights, E, K)
    grads = sparse_kv_backward(grad_y, x, router, keys, values, expert_ids, gate_weights, neuron_ids,
                               activations, dense=False, factored=True)
    out = key_value_rows(x, grad_y, expert_ids, neuron_ids, grads.pick_grads, activations, E * S, E)
    assert out.rows.dtype == torch.float32 and out.rows.shape[1] == r + d
    _, expected = float64_grads(x, router, keys, values, P, K, "logit", grad_y, expert_ids, neuron_ids)
    for table, want in ((out.rows[:, :r], expected[2]), (out.rows[:, r:], expected[3])):
        got = torch.zeros_like(want).index_add_(0, out.row_ids.cpu(), table.double().cpu())
        assert rel_err(got, want) < TOLERANCE[torch.float32]


def test_bad_input_is_refused(device):
    T, d, E, S, P, K = 4, 8, 2, 3, 1, 2
    x, dy = torch.randn(T, d, device=device), torch.randn(T, d, device=device)
    expert_ids = torch.zeros(T, P, dtype=torch.int64, device=device)
    neuron_ids = torch.zeros(T, K, dtype=torch.int64, device=device)
    coef = torch.zeros(T, K, device=device)
    with pytest.raises(ValueError, match="num_experts"):
        key_value_rows(x, dy, expert_ids, neuron_ids, coef, coef, E * S + 1, E)
    with pytest.raises(ValueError, match="pick_grads"):
        key_value_rows(x, dy, expert_ids, neuron_ids, coef[:, :1], coef, E * S, E)
    with pytest.raises(TypeError, match="out_dtype"):
        key_value_rows(x, dy, expert_ids, neuron_ids, coef, coef, E * S, E, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="neuron_ids"):
        key_value_rows(x, dy, expert_ids, neuron_ids + E * S, coef, coef, E * S, E)
    with pytest.raises(ValueError, match="dense=False"):
        sparse_kv_backward(dy, x, torch.randn(E, d, device=device), torch.randn(E * S, d, device=device),
                           torch.randn(E * S, d, device=device), expert_ids, coef[:, :P], neuron_ids, coef,
                           factored=True)
