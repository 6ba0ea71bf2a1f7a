"""Compiled kernels on a real GPU: bf16 (wrong under the interpreter), fp32's tf32x3 products
(the interpreter multiplies in plain fp32), big offsets, autograd.

All marked ``gpu``: skipped without CUDA, run by ``python -m profiling.gpu_check``.
"""

import pytest
import torch

from meft_triton.kernels import router_topk, sparse_kv_backward, sparse_kv_forward
from meft_triton import MEFTAdapter, MEFTConfig
from oracle import assert_topk_choice, candidate_scores64, float64_grads, rel_err

pytestmark = pytest.mark.gpu

BF16_TOL = 2e-2
#: the compiled products: bf16 on tensor cores, fp32 as three tf32 products ("tf32x3",
#: validation.dot_precision), held to the interpreter's fp32 tolerance
TOLERANCE = {torch.bfloat16: BF16_TOL, torch.float32: 2e-5}


@pytest.mark.parametrize("shape", [(1, 97, 7, 3, 7, 21), (300, 128, 64, 16, 8, 64), (77, 40, 13, 5, 3, 9)])
@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_forward_backward(seed, poison_outputs, shape, gate, dtype):
    T, d, E, S, P, K = shape
    tol = TOLERANCE[dtype]
    hidden, router, keys, values, grad_y = (
        torch.randn(*s, device="cuda").to(dtype) for s in [(T, d), (E, d), (E * S, d), (E * S, d), (T, d)])
    router = (router.float() / d**0.5).to(dtype)  # O(1) logits: an unsaturated softmax is well conditioned
    gate_weights, expert_ids, gate_lse = router_topk(hidden, router, P, gate=gate, return_lse=True)
    assert_topk_choice(hidden.double().cpu() @ router.double().cpu().T, expert_ids, P, tol=min(tol, 1e-3))
    y, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights, E, K)
    scores64, cands = candidate_scores64(hidden, keys, expert_ids, gate_weights, S)
    position = (cands[:, :, None] == neuron_ids.long().cpu()[:, None, :]).int().argmax(1)
    assert_topk_choice(scores64, position, K, tol=min(tol, 1e-3))
    grads = sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_weights,
                               neuron_ids, activations, gate, gate_lse=gate_lse)
    y64, expected = float64_grads(hidden, router, keys, values, P, K, gate, grad_y, expert_ids, neuron_ids)
    assert rel_err(y, y64) < tol
    for name, actual, want in zip(["hidden", "router", "keys", "values"],
                                  [grads.hidden, grads.router_weight, grads.keys, grads.values], expected):
        assert rel_err(actual, want) < tol, name


def test_offsets_past_2_31(seed):
    """N * d > 2^31 elements: row offsets must be computed in int64."""
    d, E, S = 4096, 8, 2**16 + 8  # keys and values: 2^31 + 2^15 elements each, 4 GiB in bf16
    try:
        keys = torch.zeros(E * S, d, device="cuda", dtype=torch.bfloat16)
        values = torch.zeros_like(keys)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element table")
    hidden = torch.randn(4, d, device="cuda").bfloat16()
    last = E * S - 1
    keys[last] = hidden[0]
    values[last] = 1.0
    expert_ids = torch.full((4, 1), E - 1, device="cuda", dtype=torch.int32)
    y, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids,
                                                   torch.ones(4, 1, device="cuda"), E, 1)
    assert neuron_ids[0, 0].item() == last
    expected = activations[0, 0].item()
    assert expected > 0 and abs(y[0, 0].float().item() - expected) / expected < 1e-2


def test_layer_auto_backend_uses_triton_and_trains(seed):
    adapter = MEFTAdapter(64, MEFTConfig(num_neurons=512, num_experts=32, experts_per_token=4, topk=16,
                                         value_init_std=0.02), device="cuda")
    hidden = torch.randn(8, 33, 64, device="cuda", requires_grad=True)
    assert adapter.backend_for(hidden) == "triton"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = adapter(hidden.bfloat16())
    y.float().square().sum().backward()
    assert adapter.keys.grad is not None and adapter.keys.grad.abs().sum() > 0
