"""sparse_kv_forward kernel vs the float64 reference."""

import importlib

import pytest
import torch

from meft_triton.kernels import router_topk, sparse_kv_forward, sparse_kv_select, sparse_kv_values
from meft_triton import reference
from oracle import assert_topk_choice, candidate_scores64, rel_err

SHAPES = [  # T, d, E, S, P, K_top
    (1, 97, 7, 3, 7, 21),     # P = E, K_top = P*S, prime E, T = 1
    (37, 33, 13, 5, 1, 1),    # P = 1, K_top = 1
    (50, 64, 16, 16, 4, 16),
    (20, 40, 5, 40, 1, 17),   # S spans several key tiles
    (67, 24, 11, 2, 3, 6),    # K_top = P*S
    (21, 16, 2, 300, 2, 70),  # candidates span several select chunks
    (9, 97, 5, 23, 2, 60),    # S = 23, d = 97, K_top > P*S
    (6, 16, 4, 3, 1, 12),     # K_top = N > P*S
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
# the module, not the function the package exports under the same name
sparse_kv_forward_module = importlib.import_module("meft_triton.kernels.sparse_kv_forward")


def make_inputs(shape, dtype, device, gate="logit", value_width=None):
    """hidden and keys of width d (the key input's width r), values of ``value_width`` (d)."""
    T, d, E, S, P, _ = shape
    hidden = torch.randn(T, d, device=device).to(dtype)
    keys = torch.randn(E * S, d, device=device).to(dtype)
    values = torch.randn(E * S, value_width or d, device=device).to(dtype)
    expert_ids = torch.stack([torch.randperm(E, device=device)[:P] for _ in range(T)]).int()
    gate_weights = torch.randn(T, P, device=device)
    if gate == "softmax":
        gate_weights = gate_weights.softmax(-1)
    return hidden, keys, values, expert_ids, gate_weights


def assert_selection(hidden, keys, expert_ids, gate_weights, neuron_ids, activations, E, K, tol):
    """The first min(K, P*S) picks are a top-k of the candidates (to ``tol``); past P*S the picks
    are the first non-candidate neurons (ascending), with activation 0."""
    S = keys.shape[0] // E
    scores64, cands = candidate_scores64(hidden, keys, expert_ids, gate_weights, S)
    num_candidates = cands.shape[1]
    picked = neuron_ids.long().cpu()[:, :min(K, num_candidates)]
    position = (cands[:, :, None] == picked[:, None, :]).int().argmax(1)
    assert torch.equal(cands.gather(1, position), picked), "not a candidate"
    assert_topk_choice(scores64, position, picked.shape[1], tol=tol)
    if K > num_candidates:
        surplus = neuron_ids.long().cpu()[:, num_candidates:]
        assert torch.equal(surplus, reference.surplus_ids(expert_ids.cpu(), S, E, K - num_candidates))
        assert (activations[:, num_candidates:] == 0).all()
        for row in neuron_ids.long().cpu():
            assert row.unique().numel() == K, "a neuron was picked twice"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_kv_forward_matches_reference(seed, device, poison_outputs, shape, dtype):
    T, d, E, S, P, K = shape
    hidden, keys, values, expert_ids, gate_weights = make_inputs(shape, dtype, device)
    y, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights, E, K)
    assert y.dtype == dtype and neuron_ids.dtype == torch.int32 and activations.dtype == torch.float32
    assert_selection(hidden, keys, expert_ids, gate_weights, neuron_ids, activations, E, K, TOLERANCE[dtype])

    y64, _, act64 = reference.sparse_kv_forward(
        hidden.double().cpu(), keys.double().cpu(), values.double().cpu(), expert_ids.long().cpu(),
        gate_weights.double().cpu(), S, K, neuron_ids=neuron_ids.long().cpu())
    assert rel_err(activations, act64) < TOLERANCE[dtype]
    assert rel_err(y, y64) < TOLERANCE[dtype]


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("topk", [5, 19])  # 19 > P*S = 16
def test_forward_after_router_kernel(seed, device, poison_outputs, gate, topk):
    hidden, keys, values = (torch.randn(*s, device=device) for s in [(30, 20), (48, 20), (48, 20)])
    router = torch.randn(6, 20, device=device) / 2
    gate_weights, expert_ids = router_topk(hidden, router, 2, gate=gate)
    y, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights=gate_weights,
                                                   num_experts=6, topk=topk)
    h64, G64 = hidden.double().cpu(), router.double().cpu()
    _, ref_experts, ref_weights = reference.route(h64, G64, 2, gate, expert_ids.cpu())
    assert rel_err(gate_weights, ref_weights) < 1e-5
    assert_selection(hidden, keys, expert_ids, gate_weights, neuron_ids, activations, 6, topk, 1e-5)
    y64 = reference.meft_forward(h64, G64, keys.double().cpu(), values.double().cpu(), 2, topk, gate,
                                 expert_ids=expert_ids.cpu(), neuron_ids=neuron_ids.cpu())
    assert rel_err(y, y64) < 1e-5


@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_low_key_widths(seed, device, poison_outputs, gate):
    """MEFT's low_key_dim: x = L h [T, r] routes and scores (router [E, r], keys [N, r]); the
    values and y keep the model width d."""
    T, d, r, E, S, P, K = 13, 97, 12, 5, 23, 2, 50  # K_top > P*S as well
    h, L, G = (torch.randn(*s, device=device) for s in [(T, d), (r, d), (E, r)])
    keys, values = torch.randn(E * S, r, device=device), torch.randn(E * S, d, device=device)
    x = h @ (L / d**0.5).T
    gate_weights, expert_ids = router_topk(x, G, P, gate=gate)
    y, neuron_ids, activations = sparse_kv_forward(x, keys, values, expert_ids, gate_weights, E, K)
    assert y.shape == (T, d) and neuron_ids.shape == (T, K)
    assert_selection(x, keys, expert_ids, gate_weights, neuron_ids, activations, E, K, 1e-5)
    y64 = reference.meft_forward(h.double().cpu(), G.double().cpu(), keys.double().cpu(),
                                 values.double().cpu(), P, K, gate, expert_ids=expert_ids.cpu(),
                                 neuron_ids=neuron_ids.cpu(), low_key=(L / d**0.5).double().cpu())
    assert rel_err(y, y64) < 1e-5


def test_ties_pick_exactly_topk(device):
    """All candidate scores equal: any K of them, each once."""
    hidden = torch.ones(3, 16, device=device)
    keys = torch.ones(32, 16, device=device)
    values = torch.randn(32, 16, device=device)
    expert_ids = torch.tensor([[0, 1], [1, 3], [2, 0]], device=device, dtype=torch.int32)
    y, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids,
                                                   torch.ones(3, 2, device=device), 4, 5)
    for row, experts in zip(neuron_ids.long().cpu(), expert_ids.long().cpu()):
        assert row.unique().numel() == 5 and set((row // 8).tolist()) <= set(experts.tolist())
    assert torch.equal(activations.cpu(), torch.full((3, 5), 16.0))
    assert rel_err(y, 16.0 * values[neuron_ids.long()].sum(1)) < 1e-6


def exact_scores(hidden, keys, expert_ids, gate_weights, S):
    """The kernels' fp32 candidate scores when every product is exact: small integers."""
    scores, cands = candidate_scores64(hidden, keys, expert_ids, gate_weights, S)
    return scores.float(), cands


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("K", [1, 7, 29, 40])
def test_select_is_the_exact_topk_with_ties(seed, device, poison_outputs, monkeypatch, resident, K):
    """Integer scores with many ties, K_top = 1 up to past P*S, rows held in registers or
    streamed in chunks (resident=False: chunks of 16 of the 30 candidates): the picks are a
    top-K_top of the exact scores, ties taken in candidate order (the lowest candidate
    indices), the same picks on both paths."""
    if not resident:
        monkeypatch.setattr(sparse_kv_forward_module, "SELECT_RESIDENT_CANDIDATES", 16)
    T, d, E, S, P = 23, 5, 7, 10, 3
    hidden = torch.randint(-2, 3, (T, d), device=device).float()
    keys = torch.randint(-1, 2, (E * S, d), device=device).float()
    expert_ids = torch.stack([torch.randperm(E, device=device)[:P] for _ in range(T)]).int()
    gate_weights = torch.randint(1, 3, (T, P), device=device).float()
    neuron_ids, activations = sparse_kv_select(hidden, keys, expert_ids, gate_weights, E, K)
    scores, cands = exact_scores(hidden, keys, expert_ids, gate_weights, S)
    taken = min(K, P * S)
    # torch.topk's choice among equal scores is unspecified; the kernel's is the lowest
    # candidate index: a stable descending sort's first K_top
    want = cands.gather(1, scores.sort(dim=1, descending=True, stable=True).indices[:, :taken])
    assert torch.equal(neuron_ids[:, :taken].long().cpu().sort(1).values, want.sort(1).values)
    assert torch.equal(activations[:, :taken].cpu().sort(1).values,
                       scores.relu().sort(dim=1, descending=True, stable=True).values[:, :taken].sort(1).values)
    if K > taken:
        assert torch.equal(neuron_ids[:, taken:].long().cpu(),
                           reference.surplus_ids(expert_ids.long().cpu(), S, E, K - taken))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
def test_select_orders_special_values(device, poison_outputs):
    """+-inf, +-0 and NaN (a NaN score ranks above +inf, as torch.topk ranks it)."""
    hidden = torch.ones(1, 1, device=device)
    column = torch.tensor([0.5, float("inf"), -0.0, float("nan"), -float("inf"), 0.0, 3.0, -2.0],
                          device=device)
    keys = column[:, None]
    expert_ids = torch.tensor([[0]], dtype=torch.int32, device=device)
    ranked = [3, 1, 6, 0, 5, 2, 7, 4]  # best first; 5 (+0) and 2 (-0) are equal scores
    for K in range(1, 9):
        neuron_ids, _ = sparse_kv_select(hidden, keys, expert_ids, torch.ones(1, 1, device=device), 1, K)
        picked = set(neuron_ids[0].tolist())
        assert len(picked) == K
        if K == 5:  # either zero
            assert picked - {2, 5} == set(ranked[:4]) and len(picked & {2, 5}) == 1
        else:
            assert picked == set(ranked[:K]), K


def test_strided_inputs(seed, device):
    hidden = torch.randn(12, 64, device=device)[:, ::2]
    keys = torch.randn(32, 64, device=device)[:, 1::2]
    values = torch.randn(32, 32, device=device).T.contiguous().T  # column-major
    expert_ids = torch.stack([torch.randperm(4, device=device)[:2] for _ in range(12)]).long()
    gate_weights = torch.rand(12, 2, device=device)
    y, neuron_ids, _ = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights, 4, 6)
    y_contig, ids_contig, _ = sparse_kv_forward(hidden.contiguous(), keys.contiguous(),
                                                values.contiguous(), expert_ids, gate_weights, 4, 6)
    assert torch.equal(neuron_ids.sort(1).values, ids_contig.sort(1).values)
    assert rel_err(y, y_contig) < 1e-6


def test_empty_tokens(device):
    y, ids, act = sparse_kv_forward(torch.randn(0, 8, device=device), torch.randn(8, 8, device=device),
                                    torch.randn(8, 8, device=device),
                                    torch.zeros(0, 2, dtype=torch.int32, device=device),
                                    torch.zeros(0, 2, device=device), 4, 3)
    assert y.shape == (0, 8) and ids.shape == (0, 3) and act.shape == (0, 3)


@pytest.mark.parametrize("bad, error, match", [
    (dict(topk=0), ValueError, "topk must be in"),
    (dict(topk=9), ValueError, r"topk must be in \[1, 8\], got 9"),
    (dict(num_experts=3), ValueError, "must divide"),
    (dict(expert_ids=torch.tensor([[0, 4]] * 3)), ValueError, r"expert_ids must hold ids in \[0, 4\)"),
    (dict(expert_ids=torch.zeros(3, 2)), TypeError, "expert_ids must have dtype"),
    (dict(gate_weights=torch.ones(3, 2).half()), TypeError, "gate_weights must have dtype"),
    (dict(values=torch.randn(7, 4)), ValueError, r"values must have shape \[N=8, d\]"),
    (dict(keys=torch.randn(8, 5), values=torch.randn(8, 5)), ValueError, r"keys must have shape \[N, 4\]"),
    (dict(keys=torch.randn(8, 4).double()), TypeError, "keys must have dtype"),
    (dict(gate_weights=torch.ones(3, 3)), ValueError, "gate_weights must have shape"),
])
def test_rejects_bad_arguments(device, bad, error, match):
    args = dict(hidden=torch.randn(3, 4), keys=torch.randn(8, 4), values=torch.randn(8, 4),
                expert_ids=torch.tensor([[0, 1], [2, 3], [1, 0]]), gate_weights=torch.ones(3, 2),
                num_experts=4, topk=3)
    args.update(bad)
    with pytest.raises(error, match=match):
        sparse_kv_forward(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in args.items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_values_from_a_slot_of_active_rows(seed, device, poison_outputs, dtype):
    """The same sums from a [U, d] slot of the active rows (fp16: the tensor-core path, two
    blocks of 16 tokens)."""
    hidden, keys, values, expert_ids, gate_weights = make_inputs((30, 20, 6, 5, 2, 4), dtype, device)
    y, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights, 6, 4)
    active, local = torch.unique(neuron_ids.long(), sorted=True, return_inverse=True)
    assert rel_err(sparse_kv_values(activations, local, values[active]), y) < 1e-6
    with pytest.raises(ValueError, match=r"row_ids must hold ids in \[0, 3\)"):
        sparse_kv_values(activations, local, values[:3])
