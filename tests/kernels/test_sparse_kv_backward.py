"""sparse_kv_backward kernel: every gradient vs float64 autograd through the reference."""

import pytest
import torch

from meft_triton import reference
from meft_triton.kernels import router_topk, sparse_kv_backward, sparse_kv_forward
from oracle import float64_grads, rel_err

SHAPES = [  # T, d, E, S, P, K_top
    (1, 97, 7, 3, 7, 21),     # P = E, K_top = P*S
    (37, 33, 13, 5, 1, 1),    # K_top = 1
    (50, 64, 16, 16, 4, 16),
    (20, 40, 5, 40, 1, 17),
    (67, 24, 11, 2, 3, 6),
    (7, 97, 4, 23, 1, 40),    # S = 23, d = 97, K_top > P*S
    (6, 16, 4, 3, 1, 12),     # K_top = N
]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3}


def run_kernels(shape, dtype, device, gate, pass_lse=True, dense=True):
    """Router, forward and backward kernels on fresh inputs; the softmax gate's log-sum-exp
    goes from router_topk to the backward (``pass_lse``) or is recomputed there."""
    T, d, E, S, P, K = shape
    hidden, router, keys, values, grad_y = (
        torch.randn(*s, device=device).to(dtype) for s in [(T, d), (E, d), (E * S, d), (E * S, d), (T, d)])
    router = (router.float() / d**0.5).to(dtype)  # O(1) logits: an unsaturated softmax is well conditioned
    gate_weights, expert_ids, lse = router_topk(hidden, router, P, gate=gate, return_lse=True)
    _, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights, E, K)
    grads = sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_weights,
                               neuron_ids, activations, gate, gate_lse=lse if pass_lse else None,
                               dense=dense)
    return (hidden, router, keys, values, grad_y), (expert_ids, neuron_ids), grads


def expected_row_ids(neuron_ids, num_neurons):
    """The row-sparse form's ids: the distinct picks ascending, then the largest repeated up to
    the host-known length min(N, T * K_top)."""
    distinct = neuron_ids.long().unique().cpu()
    size = min(num_neurons, neuron_ids.numel())
    return torch.cat([distinct, distinct[-1:].expand(size - distinct.numel())])


def scattered(grads, num_neurons):
    """Row-sparse key/value gradients as dense [N, width] tables (float64), after checking
    that the padding past the distinct ids is zero rows."""
    kept = grads.row_ids.unique().numel()
    assert (grads.row_ids[kept:] == grads.row_ids[kept - 1]).all()
    out = []
    for rows in (grads.key_rows, grads.value_rows):
        assert (rows[kept:] == 0).all(), "padding rows are not zero"
        table = torch.zeros(num_neurons, rows.shape[1], dtype=torch.float64)
        out.append(table.index_add_(0, grads.row_ids.cpu(), rows.double().cpu()))
    return out


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_reference(seed, device, poison_outputs, shape, dtype, gate):
    T, d, E, S, P, K = shape
    (hidden, router, keys, values, grad_y), (expert_ids, neuron_ids), grads = run_kernels(shape, dtype, device, gate)
    _, expected = float64_grads(hidden, router, keys, values, P, K, gate, grad_y, expert_ids, neuron_ids)
    for name, actual, want in zip(["hidden", "router", "keys", "values"],
                                  [grads.hidden, grads.router_weight, grads.keys, grads.values], expected):
        assert actual.dtype == dtype, name
        assert rel_err(actual, want) < TOLERANCE[dtype], name


def test_softmax_without_saved_lse(seed, device, poison_outputs):
    """The backward recomputes the log-sum-exp when the forward's is not passed: same result."""
    shape = (19, 24, 9, 4, 2, 5)
    torch.manual_seed(seed)
    _, _, with_lse = run_kernels(shape, torch.float32, device, "softmax")
    torch.manual_seed(seed)
    (hidden, router, keys, values, grad_y), (expert_ids, neuron_ids), without = run_kernels(
        shape, torch.float32, device, "softmax", pass_lse=False)
    for name in ("hidden", "router_weight", "keys", "values"):
        assert rel_err(getattr(without, name), getattr(with_lse, name)) < 1e-6, name
    _, expected = float64_grads(hidden, router, keys, values, 2, 5, "softmax", grad_y, expert_ids, neuron_ids)
    assert rel_err(without.router_weight, expected[1]) < TOLERANCE[torch.float32]


def test_softmax_gradient_reaches_every_router_row(seed, device, poison_outputs):
    """Two tokens choose at most two of 13 experts, yet under "softmax" every router row gets
    dG_e = sum_t dg_te x_t with dg_te = p_te (dw_te [e chosen] - sum w dw), like autograd."""
    shape = (2, 16, 13, 3, 1, 2)
    for gate in ("logit", "softmax"):
        (hidden, router, keys, values, grad_y), (expert_ids, neuron_ids), grads = run_kernels(
            shape, torch.float32, device, gate)
        _, expected = float64_grads(hidden, router, keys, values, 1, 2, gate, grad_y, expert_ids, neuron_ids)
        assert rel_err(grads.router_weight, expected[1]) < TOLERANCE[torch.float32]
        assert rel_err(grads.hidden, expected[0]) < TOLERANCE[torch.float32]
        touched = (grads.router_weight != 0).any(1).cpu()
        if gate == "softmax":
            assert touched.all()
        else:
            assert touched.sum() <= 2


def test_surplus_picks_get_zero_gradients(seed, device, poison_outputs):
    """K_top > P*S: the non-candidate picks are gradient rows (they are picks) whose dK, dV are 0."""
    # P*S = 6: each token's 8 surplus picks span 3 unchosen experts, and the other token
    # chooses only 2, so some surplus pick is no token's candidate whatever the routing
    shape = (2, 20, 12, 3, 2, 14)
    (hidden, router, keys, values, grad_y), (expert_ids, neuron_ids), grads = run_kernels(
        shape, torch.float32, device, "softmax", dense=False)
    candidates = set(reference.candidate_ids(expert_ids.long().cpu(), 3).flatten().tolist())
    assert torch.equal(grads.row_ids.cpu(), expected_row_ids(neuron_ids, keys.shape[0]))
    assert set(grads.row_ids.tolist()) - candidates  # some surplus pick is a gradient row
    for row_id, key_row, value_row in zip(grads.row_ids.tolist(), grads.key_rows, grads.value_rows):
        if row_id not in candidates:
            assert (key_row == 0).all() and (value_row == 0).all(), row_id
    _, expected = float64_grads(hidden, router, keys, values, 2, 14, "softmax", grad_y, expert_ids, neuron_ids)
    actual = [grads.hidden, grads.router_weight, *scattered(grads, keys.shape[0])]
    for actual, want in zip(actual, expected):
        assert rel_err(actual, want) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_key_widths(seed, device, poison_outputs, gate, dtype):
    """MEFT's low_key_dim: the kernels see x = L h [T, r] (router [E, r], keys [N, r]) and
    values/dy of width d. Their dx [T, r], dG, dK, dV match autograd at that x; in fp32 also
    dh = dx L and dL = dx^T h through the reference's own low_key (in fp16 the rounding of x
    would move scores near 0 across the ReLU, so the whole chain is compared in fp32 only)."""
    T, d, r, E, S, P, K = 11, 97, 12, 5, 23, 2, 50  # K_top > P*S as well
    h, L, router, keys, values, grad_y = (torch.randn(*s, device=device)
                                          for s in [(T, d), (r, d), (E, r), (E * S, r), (E * S, d), (T, d)])
    L, router = L / d**0.5, router / r**0.5
    x = (h @ L.T).to(dtype)
    router, keys, values, grad_y = (t.to(dtype) for t in (router, keys, values, grad_y))
    gate_weights, expert_ids, lse = router_topk(x, router, P, gate=gate, return_lse=True)
    y, neuron_ids, activations = sparse_kv_forward(x, keys, values, expert_ids, gate_weights, E, K)
    grads = sparse_kv_backward(grad_y, x, router, keys, values, expert_ids, gate_weights, neuron_ids,
                               activations, gate, gate_lse=lse)
    rows = sparse_kv_backward(grad_y, x, router, keys, values, expert_ids, gate_weights, neuron_ids,
                              activations, gate, gate_lse=lse, dense=False)
    assert grads.hidden.shape == (T, r) and grads.keys.shape == (E * S, r) and grads.values.shape == (E * S, d)
    assert rows.key_rows.shape[1] == r and rows.value_rows.shape[1] == d
    for a, b in zip(scattered(rows, E * S), (grads.keys, grads.values)):
        assert rel_err(a, b) < TOLERANCE[dtype]  # the dense form is rounded to the compute dtype

    y64, expected = float64_grads(x, router, keys, values, P, K, gate, grad_y, expert_ids, neuron_ids)
    assert rel_err(y, y64) < TOLERANCE[dtype]
    actual = [grads.hidden, grads.router_weight, grads.keys, grads.values]
    for name, a, want in zip(["x", "router", "keys", "values"], actual, expected):
        assert rel_err(a, want) < TOLERANCE[dtype], name
    if dtype != torch.float32:
        return
    leaves = [t.detach().double().cpu().requires_grad_() for t in (h, router, keys, values, L)]
    y64 = reference.meft_forward(*leaves[:4], P, K, gate, expert_ids=expert_ids.long().cpu(),
                                 neuron_ids=neuron_ids.long().cpu(), low_key=leaves[4])
    y64.backward(grad_y.double().cpu())
    assert rel_err(y, y64) < TOLERANCE[dtype]
    dx = grads.hidden.double().cpu()
    actual = [dx @ L.double().cpu(), grads.router_weight, grads.keys, grads.values, dx.T @ h.double().cpu()]
    for name, a, leaf in zip(["hidden", "router", "keys", "values", "low_key"], actual, leaves):
        assert rel_err(a, leaf.grad) < TOLERANCE[dtype], name


def test_row_sparse_and_dense_agree(seed, device, poison_outputs):
    """Both forms from the same per-expert GEMMs: the dense one writes every row (zeros where
    nothing was picked), the row-sparse one exactly the distinct picks, with the same sums."""
    shape = (8, 24, 8, 6, 2, 5)  # at most 40 of the 48 rows picked: some always untouched
    (hidden, router, keys, values, grad_y), (expert_ids, neuron_ids), dense = run_kernels(
        shape, torch.float32, device, "logit")
    gate_logits, _ = router_topk(hidden, router, 2)
    _, _, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_logits, 8, 5)
    rows = sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_logits,
                              neuron_ids, activations, dense=False)
    assert dense.row_ids is None and dense.key_rows is None and rows.keys is None
    assert torch.equal(rows.row_ids.cpu(), expected_row_ids(neuron_ids, keys.shape[0]))
    assert rows.key_rows.dtype == rows.value_rows.dtype == torch.float32
    untouched = torch.ones(keys.shape[0], dtype=torch.bool)
    untouched[rows.row_ids.cpu()] = False
    assert untouched.any()
    assert (dense.keys.cpu()[untouched] == 0).all() and (dense.values.cpu()[untouched] == 0).all()
    kept = neuron_ids.long().unique().numel()
    assert kept < rows.row_ids.numel(), "no padding: pick a shape with repeated picks"
    ids = rows.row_ids[:kept]
    assert torch.equal(dense.keys[ids], rows.key_rows[:kept])
    assert torch.equal(dense.values[ids], rows.value_rows[:kept])
    assert (rows.key_rows[kept:] == 0).all() and (rows.value_rows[kept:] == 0).all()
    assert torch.equal(dense.router_weight, rows.router_weight)


@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_expert_tiles_and_runs(seed, device, poison_outputs, gate):
    """S past one neuron tile (BLOCK_S = 64), widths past one width tile (r != d), and experts
    with runs of pairs longer than one BLOCK_M (every token on one of two experts): the grouped
    GEMMs' tile edges and their loop over each expert's pairs, in both output forms; bitwise
    the same on a second run (fixed summation order, no atomics)."""
    T, d, r, E, S, P, K = 70, 97, 72, 2, 70, 1, 9
    x, router, keys, values, grad_y = (torch.randn(*s, device=device)
                                       for s in [(T, r), (E, r), (E * S, r), (E * S, d), (T, d)])
    router = router / r**0.5
    gate_weights, expert_ids, lse = router_topk(x, router, P, gate=gate, return_lse=True)
    _, neuron_ids, activations = sparse_kv_forward(x, keys, values, expert_ids, gate_weights, E, K)
    args = (grad_y, x, router, keys, values, expert_ids, gate_weights, neuron_ids, activations, gate)
    dense = sparse_kv_backward(*args, gate_lse=lse)
    rows = sparse_kv_backward(*args, gate_lse=lse, dense=False)
    again = sparse_kv_backward(*args, gate_lse=lse, dense=False)
    _, expected = float64_grads(x, router, keys, values, P, K, gate, grad_y, expert_ids, neuron_ids)
    for name, a, want in zip(["x", "router", "keys", "values"],
                             [dense.hidden, dense.router_weight, dense.keys, dense.values], expected):
        assert rel_err(a, want) < TOLERANCE[torch.float32], name
    for a, want in zip(scattered(rows, E * S), expected[2:]):
        assert rel_err(a, want) < TOLERANCE[torch.float32]
    for name in ("router_weight", "key_rows", "value_rows"):
        assert torch.equal(getattr(rows, name), getattr(again, name)), name


def test_sparse_only_skips_dense(device):
    shape = (9, 16, 4, 4, 2, 3)
    (hidden, router, keys, values, grad_y), _, _ = run_kernels(shape, torch.float32, device, "logit")
    gate_logits, expert_ids = router_topk(hidden, router, 2)
    _, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_logits, 4, 3)
    grads = sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_logits,
                               neuron_ids, activations, dense=False)
    assert grads.keys is None and grads.values is None and grads.key_rows.shape[1] == 16


def test_hidden_gradient_only(seed, device, poison_outputs):
    """param_grads=False (a frozen layer): dh as with every gradient, nothing else computed."""
    shape = (31, 20, 6, 5, 2, 4)
    (hidden, router, keys, values, grad_y), (expert_ids, neuron_ids), full = run_kernels(shape, torch.float32, device, "softmax")
    gate_weights, _ = router_topk(hidden, router, 2, gate="softmax")
    _, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights, 6, 4)[1:]
    grads = sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_weights, neuron_ids,
                               activations, "softmax", dense=False, param_grads=False)
    assert torch.equal(grads.hidden, full.hidden)
    _, expected = float64_grads(hidden, router, keys, values, 2, 4, "softmax", grad_y, expert_ids, neuron_ids)
    assert rel_err(grads.hidden, expected[0]) < TOLERANCE[torch.float32]
    assert all(g is None for g in grads[1:])


@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_empty_tokens(device, poison_outputs, gate):
    d, E, N = 8, 2, 6
    empty_ids = torch.zeros(0, 1, dtype=torch.int32, device=device)
    args = (torch.zeros(0, d, device=device), torch.zeros(0, d, device=device),
            torch.randn(E, d, device=device), torch.randn(N, d, device=device),
            torch.randn(N, d, device=device), empty_ids,
            torch.zeros(0, 1, device=device), torch.zeros(0, 2, dtype=torch.int32, device=device),
            torch.zeros(0, 2, device=device), gate)
    grads = sparse_kv_backward(*args)
    assert grads.hidden.shape == (0, d)
    assert (grads.router_weight == 0).all() and (grads.keys == 0).all() and (grads.values == 0).all()
    rows = sparse_kv_backward(*args, dense=False)
    assert rows.row_ids.numel() == 0 and rows.key_rows.shape == (0, d) and (rows.router_weight == 0).all()


def test_rejects_bad_arguments(device):
    t = lambda *s, **k: torch.randn(*s, device=device, **k)  # noqa: E731
    ids = torch.zeros(2, 1, dtype=torch.int32, device=device)
    good = dict(grad_y=t(2, 4), hidden=t(2, 4), router_weight=t(2, 4), keys=t(6, 4), values=t(6, 4),
                expert_ids=ids, gate_weights=t(2, 1), neuron_ids=ids, activations=t(2, 1))
    with pytest.raises(ValueError, match="gate must be one of"):
        sparse_kv_backward(**good, gate="relu")
    with pytest.raises(ValueError, match=r"neuron_ids must hold ids in \[0, 6\)"):
        sparse_kv_backward(**{**good, "neuron_ids": ids + 6})
    with pytest.raises(ValueError, match="activations must have shape"):
        sparse_kv_backward(**{**good, "activations": t(2, 2)})
    with pytest.raises(TypeError, match="grad_y has dtype"):
        sparse_kv_backward(**{**good, "grad_y": t(2, 4).half()})
    with pytest.raises(ValueError, match=r"grad_y must have shape \(2, 4\)"):
        sparse_kv_backward(**{**good, "grad_y": t(2, 5)})
    with pytest.raises(ValueError, match=r"keys must have shape \(6, 4\)"):
        sparse_kv_backward(**{**good, "keys": t(6, 3)})
    with pytest.raises(ValueError, match=r"gate_lse must have shape \(2,\)"):
        sparse_kv_backward(**good, gate="softmax", gate_lse=t(3))
    with pytest.raises(TypeError, match="gate_lse must have dtype"):
        sparse_kv_backward(**good, gate="softmax", gate_lse=t(2).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_value_rows_from_a_slot(seed, device, poison_outputs, dtype):
    """values given as just the active rows plus each pick's row in them (a prefetch slot): the
    score-gradient GEMM reads each expert's value rows through the slot's row map."""
    shape = (25, 20, 6, 5, 2, 4)
    (hidden, router, keys, values, grad_y), (expert_ids, neuron_ids), full = run_kernels(shape, dtype, device, "logit")
    gate_logits, _ = router_topk(hidden, router, 2)
    _, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_logits, 6, 4)[1:]
    active, local = torch.unique(neuron_ids.long(), sorted=True, return_inverse=True)
    slot = values[active]
    grads = sparse_kv_backward(grad_y, hidden, router, keys, slot, expert_ids, gate_logits, neuron_ids,
                               activations, dense=False, value_ids=local)
    rows = sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_logits, neuron_ids,
                              activations, dense=False)
    assert torch.equal(grads.row_ids.cpu(), expected_row_ids(neuron_ids, keys.shape[0]))
    assert torch.equal(grads.row_ids, rows.row_ids)
    for name in ("hidden", "router_weight", "key_rows", "value_rows"):
        assert rel_err(getattr(grads, name), getattr(rows, name)) < 1e-6, name
    with pytest.raises(ValueError, match="dense=True needs the whole values table"):
        sparse_kv_backward(grad_y, hidden, router, keys, slot, expert_ids, gate_logits, neuron_ids,
                           activations, value_ids=local)
