"""The reference against independent readings of docs/DESIGN.md, "Semantics" and of MEFT's own code."""

import pytest
import torch

from meft_triton import reference


def brute_force(hidden, router_weight, keys, values, experts_per_token, topk, gate, low_key=None):
    """docs/DESIGN.md, "Semantics" token by token, neuron by neuron, in Python loops: softmax over all E
    (no renormalisation), the top-K_top over all N neurons with non-candidates scoring 0."""
    num_experts = router_weight.shape[0]
    num_neurons = keys.shape[0]
    neurons_per_expert = num_neurons // num_experts
    out = torch.zeros(hidden.shape[0], values.shape[1], dtype=hidden.dtype)
    for t, h in enumerate(hidden):
        x = h if low_key is None else low_key @ h
        logits = torch.stack([router_weight[e] @ x for e in range(num_experts)])
        weights = logits if gate == "logit" else torch.exp(logits) / torch.exp(logits).sum()
        chosen = sorted(((float(weights[e]), e) for e in range(num_experts)), reverse=True)
        weight_of = {e: w for w, e in chosen[:experts_per_token]}
        scores = []
        for j in range(num_neurons):
            w = weight_of.get(j // neurons_per_expert)
            scores.append((0.0 if w is None else float(w * (keys[j] @ x)), j))
        for score, j in sorted(scores, reverse=True)[:topk]:
            out[t] += max(score, 0.0) * values[j]
    return out


SHAPES = [  # T, d, E, S, P, K_top
    (5, 7, 3, 4, 2, 3),
    (1, 9, 5, 2, 5, 10),    # P = E, K_top = P*S = N
    (6, 4, 7, 1, 1, 1),     # S = 1, K_top = 1
    (4, 6, 4, 5, 3, 15),
    (3, 5, 4, 3, 1, 10),    # K_top > P*S
    (2, 97, 2, 23, 1, 46),  # S = 23, d = 97, K_top = N > P*S
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
def test_low_key_matches_brute_force(seed, gate):
    T, d, r, E, S, P, K = 4, 11, 5, 4, 3, 2, 8
    h, L, G, keys, values = (torch.randn(*s, dtype=torch.float64)
                             for s in [(T, d), (r, d), (E, r), (E * S, r), (E * S, d)])
    expected = brute_force(h, G, keys, values, P, K, gate, low_key=L)
    actual = reference.meft_forward(h, G, keys, values, P, K, gate, low_key=L)
    assert actual.shape == (T, d)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(actual, reference.meft_forward(h @ L.T, G, keys, values, P, K, gate))


def original_softmax_meft(h, G, keys, values, n_probe, topk):
    """MEFT's KVLlamaMLP (moe_style, moe_softmax_score, use_unstable_feature) written out
    straight from its formula, in float64: probabilities over all E, top-n_probe of them
    scattered unnormalised, dense scores times them, top-k over all N, ReLU, times V."""
    expert_scores = torch.softmax(h @ G.T, dim=-1)
    probs, ids = torch.topk(expert_scores, n_probe)
    coff = torch.zeros(h.shape[0], G.shape[0], dtype=h.dtype).scatter_(-1, ids, probs)
    coff = coff.unsqueeze(2).repeat(1, 1, keys.shape[0] // G.shape[0]).view(h.shape[0], -1)
    o = (h @ keys.T) * coff
    top, ids = torch.topk(o, topk)
    keys_weight = torch.zeros(h.shape[0], keys.shape[0], dtype=h.dtype).scatter_(-1, ids, top)
    return torch.relu(keys_weight) @ values, probs


@pytest.mark.parametrize("shape", [(9, 12, 6, 4, 3, 5), (3, 8, 5, 2, 5, 10), (4, 7, 4, 3, 1, 7)])
def test_softmax_gate_is_the_original_formula(seed, shape):
    T, d, E, S, P, K = shape
    h, G, keys, values = (torch.randn(*s, dtype=torch.float64) for s in [(T, d), (E, d), (E * S, d), (E * S, d)])
    expected, probs = original_softmax_meft(h, G, keys, values, P, K)
    _, expert_ids, gate_weights = reference.route(h, G, P, "softmax")
    torch.testing.assert_close(gate_weights, probs, rtol=1e-13, atol=0)
    torch.testing.assert_close(reference.meft_forward(h, G, keys, values, P, K, "softmax"), expected,
                               rtol=1e-12, atol=1e-12)
    if P < E:  # the old, renormalised reading is really different
        assert (gate_weights.sum(-1) < 1 - 1e-6).all()
        renormalised = torch.softmax(h @ G.T, -1).gather(1, expert_ids)
        assert not torch.allclose(renormalised / renormalised.sum(-1, keepdim=True), gate_weights)


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("shape", [(11, 8, 6, 4, 2, 5), (5, 9, 3, 2, 1, 6), (4, 6, 5, 3, 5, 15)])
def test_original_dense_formulation_agrees(seed, gate, shape):
    T, d, E, S, P, K = shape
    h, G, keys, values = (torch.randn(*s, dtype=torch.float64) for s in [(T, d), (E, d), (E * S, d), (E * S, d)])
    torch.testing.assert_close(reference.meft_original_forward(h, G, keys, values, P, K, gate),
                               reference.meft_forward(h, G, keys, values, P, K, gate))


def test_original_dense_formulation_with_low_key(seed):
    h, L, G, keys, values = (torch.randn(*s, dtype=torch.float64)
                             for s in [(7, 10), (4, 10), (5, 4), (15, 4), (15, 10)])
    for gate in ("logit", "softmax"):
        torch.testing.assert_close(reference.meft_original_forward(h, G, keys, values, 2, 9, gate, low_key=L),
                                   reference.meft_forward(h, G, keys, values, 2, 9, gate, low_key=L))


def fixed_selection_fn(h, G, keys, values, P, K, gate, L=None):
    """The reference at the selection it makes for these inputs, as a function of the tensors."""
    with torch.no_grad():
        x = reference.key_input(h, L)
        _, expert_ids, weights = reference.route(x, G, P, gate)
        _, neuron_ids, _ = reference.sparse_kv_forward(x, keys, values, expert_ids, weights,
                                                       keys.shape[0] // G.shape[0], K)

    def fn(h, G, keys, values, *low_key):
        return reference.meft_forward(h, G, keys, values, P, K, gate, expert_ids=expert_ids,
                                      neuron_ids=neuron_ids, low_key=low_key[0] if low_key else None)

    return fn, expert_ids, neuron_ids


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("shape", [(4, 5, 3, 3, 2, 4), (3, 4, 3, 2, 1, 5)])  # the second: K_top > P*S
def test_reference_gradcheck_with_fixed_selection(seed, gate, shape):
    T, d, E, S, P, K = shape
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
              for s in [(T, d), (E, d), (E * S, d), (E * S, d)]]
    fn, _, _ = fixed_selection_fn(*leaves, P, K, gate)
    torch.testing.assert_close(fn(*leaves), reference.meft_forward(*leaves, P, K, gate))
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_low_key_gradcheck(seed, gate):
    T, d, r, E, S, P, K = 4, 6, 3, 3, 2, 2, 5
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
              for s in [(T, d), (E, r), (E * S, r), (E * S, d), (r, d)]]
    fn, _, _ = fixed_selection_fn(*leaves[:4], P, K, gate, L=leaves[4])
    assert fn(*leaves).shape == (T, d)
    assert torch.autograd.gradcheck(fn, leaves)


def test_softmax_gradient_reaches_every_router_row(seed):
    """Under "softmax" dg_e = w_e (dw_e [e selected] - sum_selected w dw) for every e; under
    "logit" only the selected experts' rows get a gradient."""
    T, d, E, S, P, K = 6, 5, 7, 3, 2, 4
    h, G, keys, values = (torch.randn(*s, dtype=torch.float64) for s in [(T, d), (E, d), (E * S, d), (E * S, d)])
    grad_y = torch.randn(T, d, dtype=torch.float64)
    grads = {}
    for gate in ("logit", "softmax"):
        fn, expert_ids, neuron_ids = fixed_selection_fn(h, G, keys, values, P, K, gate)
        G_leaf = G.clone().requires_grad_()
        fn(h, G_leaf, keys, values).backward(grad_y)
        grads[gate] = G_leaf.grad
        if gate == "logit":
            unused = torch.ones(E, dtype=torch.bool)
            unused[expert_ids.unique()] = False
            assert (G_leaf.grad[unused] == 0).all()
            continue
        # the contract's formula, from dw = d y / d w at the selected experts
        _, _, w_sel = reference.route(h, G, P, "softmax", expert_ids)
        w_leaf = w_sel.clone().requires_grad_()
        y, _, _ = reference.sparse_kv_forward(h, keys, values, expert_ids, w_leaf, S, K, neuron_ids)
        (dw,) = torch.autograd.grad(y, w_leaf, grad_y)
        w_all = torch.softmax(h @ G.T, -1)
        dw_all = torch.zeros(T, E, dtype=torch.float64).scatter(1, expert_ids, dw)
        dg = w_all * (dw_all - (w_sel * dw).sum(-1, keepdim=True))
        torch.testing.assert_close(G_leaf.grad, dg.T @ h, rtol=1e-10, atol=1e-12)
    assert (grads["softmax"].abs().sum(1) > 0).all()


def test_topk_beyond_candidates(seed):
    """K_top > P*S: every candidate, then non-candidates (the first ones, ascending) scoring 0;
    y and every gradient equal those at K_top = P*S, the surplus rows' gradients are 0."""
    T, d, E, S, P = 5, 6, 5, 3, 2
    K = 11  # P*S = 6, N = 15
    h, G, keys, values = (torch.randn(*s, dtype=torch.float64) for s in [(T, d), (E, d), (E * S, d), (E * S, d)])
    _, expert_ids, weights = reference.route(h, G, P, "softmax")
    y, neuron_ids, act = reference.sparse_kv_forward(h, keys, values, expert_ids, weights, S, K)
    assert neuron_ids.shape == (T, K) and act.shape == (T, K)
    cands = reference.candidate_ids(expert_ids, S)
    assert torch.equal(neuron_ids[:, :P * S].sort(1).values, cands.sort(1).values)
    surplus = neuron_ids[:, P * S:]
    for row, experts in zip(surplus, expert_ids):
        assert not set((row // S).tolist()) & set(experts.tolist())
        assert row.unique().numel() == row.numel()
    expected_surplus = torch.stack([
        torch.tensor([j for j in range(E * S) if j // S not in set(e.tolist())][:K - P * S]) for e in expert_ids])
    assert torch.equal(surplus, expected_surplus)
    assert (act[:, P * S:] == 0).all()
    y_cands, _, _ = reference.sparse_kv_forward(h, keys, values, expert_ids, weights, S, P * S)
    torch.testing.assert_close(y, y_cands, rtol=1e-13, atol=1e-13)

    leaves = [t.clone().requires_grad_() for t in (h, G, keys, values)]
    reference.meft_forward(*leaves, P, K, "softmax", expert_ids, neuron_ids).backward(torch.ones(T, d, dtype=torch.float64))
    touched = torch.zeros(E * S, dtype=torch.bool)
    touched[neuron_ids[:, :P * S].flatten()] = True
    assert (leaves[2].grad[~touched] == 0).all() and (leaves[3].grad[~touched] == 0).all()


def test_selection_may_hold_non_candidates_but_not_repeats(seed):
    h, G, keys, values = (torch.randn(*s, dtype=torch.float64) for s in [(2, 4), (2, 4), (4, 4), (4, 4)])
    expert_ids = torch.tensor([[0], [0]])
    # neuron 3 belongs to expert 1, which neither token selected: it scores 0
    y = reference.meft_forward(h, G, keys, values, 1, 2, expert_ids=expert_ids,
                               neuron_ids=torch.tensor([[3, 0], [1, 2]]))
    _, _, w = reference.route(h, G, 1, "logit", expert_ids)
    expected0 = torch.relu(w[0, 0] * (keys[0] @ h[0])) * values[0]
    torch.testing.assert_close(y[0], expected0)
    with pytest.raises(ValueError, match="neuron_ids holds a neuron twice"):
        reference.meft_forward(h, G, keys, values, 1, 2, expert_ids=expert_ids,
                               neuron_ids=torch.tensor([[1, 1], [0, 1]]))
    with pytest.raises(ValueError, match=r"neuron_ids must hold ids in \[0, 4\)"):
        reference.meft_forward(h, G, keys, values, 1, 2, expert_ids=expert_ids,
                               neuron_ids=torch.tensor([[4, 0], [0, 1]]))


@pytest.mark.parametrize("call, error, match", [
    (dict(topk=0), ValueError, r"topk must be in \[1, num_neurons=8\]"),
    (dict(topk=9), ValueError, r"topk must be in \[1, num_neurons=8\]"),
    (dict(topk=2.0), TypeError, "topk must be an int"),
    (dict(gate="relu"), ValueError, "gate must be 'logit' or 'softmax'"),
    (dict(low_key=torch.randn(3, 5)), ValueError, r"low_key must be a \[r, 4\] tensor"),
])
def test_rejects_bad_arguments(call, error, match):
    args = dict(hidden=torch.randn(3, 4), router_weight=torch.randn(2, 4), keys=torch.randn(8, 4),
                values=torch.randn(8, 4), experts_per_token=1, topk=3)
    args.update(call)
    with pytest.raises(error, match=match):
        reference.meft_forward(**args)
    if "low_key" in call or "gate" in call:
        with pytest.raises(error, match=match):
            reference.meft_original_forward(**args)


def test_empty_input_gives_empty_output():
    h = torch.zeros(0, 4)
    y = reference.meft_forward(h, torch.randn(2, 4), torch.randn(4, 4), torch.randn(4, 4), 1, 2)
    assert y.shape == (0, 4)
    y = reference.meft_forward(h, torch.randn(2, 4), torch.randn(4, 4), torch.randn(4, 4), 1, 3, "softmax")
    assert y.shape == (0, 4)
