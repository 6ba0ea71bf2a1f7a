"""The reference against an independent per-token reading of DESIGN.md section 2."""

import pytest
import torch

from meft_triton import reference


def brute_force(hidden, router_weight, keys, values, experts_per_token, topk, gate):
    """DESIGN.md section 2 token by token, candidate by candidate, in Python loops."""
    num_experts = router_weight.shape[0]
    neurons_per_expert = keys.shape[0] // num_experts
    out = torch.zeros_like(hidden)
    for t, h in enumerate(hidden):
        logits = [(float(router_weight[e] @ h), e) for e in range(num_experts)]
        chosen = sorted(logits, reverse=True)[:experts_per_token]
        gate_logits = torch.tensor([g for g, _ in chosen], dtype=hidden.dtype)
        weights = gate_logits if gate == "logit" else torch.softmax(gate_logits, 0)
        candidates = []
        for (_, e), w in zip(chosen, weights):
            for j in range(e * neurons_per_expert, (e + 1) * neurons_per_expert):
                candidates.append((float(w * (keys[j] @ h)), j))
        for score, j in sorted(candidates, reverse=True)[:topk]:
            out[t] += max(score, 0.0) * values[j]
    return out


SHAPES = [  # T, d, E, S, P, K_top
    (5, 7, 3, 4, 2, 3),
    (1, 9, 5, 2, 5, 10),
    (6, 4, 7, 1, 1, 1),
    (4, 6, 4, 5, 3, 15),
]


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_brute_force(seed, shape, gate):
    T, d, E, S, P, K = shape
    h, G, keys, values = (torch.randn(*s, dtype=torch.float64) for s in [(T, d), (E, d), (E * S, d), (E * S, d)])
    expected = brute_force(h, G, keys, values, P, K, gate)
    actual = reference.meft_forward(h, G, keys, values, P, K, gate)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_original_dense_formulation_agrees(seed, gate):
    h, G, keys, values = (torch.randn(*s, dtype=torch.float64) for s in [(11, 8), (6, 8), (24, 8), (24, 8)])
    torch.testing.assert_close(reference.meft_original_forward(h, G, keys, values, 2, 5, gate),
                               reference.meft_forward(h, G, keys, values, 2, 5, gate))


@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_reference_gradcheck_with_fixed_selection(seed, gate):
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
              for s in [(4, 5), (3, 5), (9, 5), (9, 5)]]
    with torch.no_grad():
        _, expert_ids, weights = reference.route(leaves[0], leaves[1], 2, gate)
        y, neuron_ids, _ = reference.sparse_kv_forward(leaves[0], leaves[2], leaves[3], expert_ids, weights, 3, 4)

    def fn(h, G, keys, values):
        return reference.meft_forward(h, G, keys, values, 2, 4, gate,
                                      expert_ids=expert_ids, neuron_ids=neuron_ids)

    torch.testing.assert_close(fn(*leaves), y)
    assert torch.autograd.gradcheck(fn, leaves)


def test_forced_selection_must_belong_to_chosen_experts(seed):
    h, G, keys, values = (torch.randn(*s, dtype=torch.float64) for s in [(2, 4), (2, 4), (4, 4), (4, 4)])
    expert_ids = torch.tensor([[0], [0]])
    with pytest.raises(ValueError, match="did not select"):
        reference.meft_forward(h, G, keys, values, 1, 1, expert_ids=expert_ids,
                               neuron_ids=torch.tensor([[3], [0]]))


def test_empty_input_gives_empty_output():
    h = torch.zeros(0, 4)
    y = reference.meft_forward(h, torch.randn(2, 4), torch.randn(4, 4), torch.randn(4, 4), 1, 2)
    assert y.shape == (0, 4)
