"""router_topk kernel vs float64 torch: the top-k, the logit and softmax gates, the log-sum-exp."""

import pytest
import torch

from meft_triton.kernels import router_topk
from oracle import assert_topk_choice, rel_err

SHAPES = [  # T, d, E, k
    (1, 97, 7, 7),     # prime E, k = E, T = 1, odd d
    (37, 33, 13, 1),   # k = 1, T not a multiple of any block
    (50, 64, 64, 8),
    (70, 40, 100, 5),  # E spans several expert tiles: 2 expert splits
    (23, 97, 300, 8),  # 5 expert splits merged (an odd count)
    (17, 16, 3, 2),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_router_topk_matches_reference(seed, device, poison_outputs, shape, dtype):
    T, d, E, k = shape
    hidden = torch.randn(T, d, device=device).to(dtype)
    router = torch.randn(E, d, device=device).to(dtype)
    gate_logits, expert_ids = router_topk(hidden, router, k)
    assert gate_logits.dtype == torch.float32 and expert_ids.dtype == torch.int32
    logits64 = hidden.double().cpu() @ router.double().cpu().T
    assert_topk_choice(logits64, expert_ids, k, tol=TOLERANCE[dtype])
    assert rel_err(gate_logits, logits64.gather(1, expert_ids.long().cpu())) < TOLERANCE[dtype]
    assert (gate_logits.diff(dim=1) <= 0).all(), "gate logits must be in descending order"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_router_topk_softmax_over_all_experts(seed, device, poison_outputs, shape, dtype):
    """gate="softmax": w = softmax over all E logits at the chosen experts (MEFT's original,
    not renormalised over the k), the same experts as gate="logit", and the log-sum-exp."""
    T, d, E, k = shape
    hidden = torch.randn(T, d, device=device).to(dtype)
    router = (torch.randn(E, d, device=device) * 3 / d**0.5).to(dtype)
    gate_weights, expert_ids, lse = router_topk(hidden, router, k, gate="softmax", return_lse=True)
    assert gate_weights.dtype == lse.dtype == torch.float32 and lse.shape == (T,)
    logits64 = hidden.double().cpu() @ router.double().cpu().T
    assert_topk_choice(logits64, expert_ids, k, tol=TOLERANCE[dtype])
    probs64 = logits64.softmax(-1).gather(1, expert_ids.long().cpu())
    assert rel_err(gate_weights, probs64) < TOLERANCE[dtype]
    assert (lse.cpu().double() - logits64.logsumexp(-1)).abs().max() < TOLERANCE[dtype] * logits64.abs().max()
    assert (gate_weights.diff(dim=1) <= 0).all()
    if k < E:
        # rows whose unchosen experts hold under fp32's resolution of 1 sum to 1 exactly
        visible = 1 - probs64.sum(1) > 1e-6
        assert (gate_weights.sum(1).cpu() < 1)[visible].all(), "softmax weights must not be renormalised over the k"
        assert visible.any()
    logits, ids_logit, lse_logit = router_topk(hidden, router, k, return_lse=True)
    assert torch.equal(ids_logit, expert_ids) and torch.equal(lse_logit, lse)
    assert torch.equal(logits, router_topk(hidden, router, k)[0]), "gate='logit' must not change"
    torch.testing.assert_close(gate_weights, torch.exp(logits - lse[:, None]))


def test_router_topk_strided_input(seed, device):
    hidden = torch.randn(9, 2 * 40, device=device)[:, ::2]
    router = torch.randn(40, 12, device=device).T
    gate_logits, expert_ids = router_topk(hidden, router, 3)
    expected = (hidden.double() @ router.double().T).topk(3)
    assert rel_err(gate_logits, expected.values) < 1e-5
    assert torch.equal(expert_ids.long().cpu(), expected.indices.cpu())


@pytest.mark.parametrize("num_experts", [5, 200])  # one expert split, and four merged
@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_router_topk_nan_row_propagates(device, gate, num_experts):
    hidden = torch.randn(3, 16, device=device)
    hidden[1, 4] = float("nan")
    gate_logits, expert_ids, lse = router_topk(hidden, torch.randn(num_experts, 16, device=device), 2,
                                               gate, True)
    assert gate_logits[1].isnan().all() and not gate_logits[[0, 2]].isnan().any()
    assert lse[1].isnan() and not lse[[0, 2]].isnan().any()
    assert ((expert_ids >= 0) & (expert_ids < num_experts)).all(), "NaN rows must still give valid ids"


def test_router_topk_ties_across_expert_splits_go_to_the_smaller_id(seed, device):
    """Experts 3, 70 and 129 (three expert splits of 64) have the same router row, the best
    for token 0: the merge keeps torch.topk's order, smaller id first."""
    hidden = torch.randn(5, 16, device=device)
    router = torch.randn(130, 16, device=device) * 0.1
    router[[3, 70, 129]] = hidden[0] * 4
    gate_logits, expert_ids = router_topk(hidden, router, 2)
    assert expert_ids[0].tolist() == [3, 70]
    assert gate_logits[0, 0] == gate_logits[0, 1]


def test_router_topk_empty(device):
    gate_logits, expert_ids = router_topk(torch.randn(0, 8, device=device), torch.randn(4, 8, device=device), 2)
    assert gate_logits.shape == (0, 2) and expert_ids.shape == (0, 2)
    weights, expert_ids, lse = router_topk(torch.randn(0, 8, device=device), torch.randn(4, 8, device=device),
                                           2, gate="softmax", return_lse=True)
    assert weights.shape == (0, 2) and expert_ids.shape == (0, 2) and lse.shape == (0,)


@pytest.mark.parametrize("bad, error, match", [
    (dict(k=0), ValueError, "k must be in"),
    (dict(k=5), ValueError, "k must be in"),
    (dict(router=torch.randn(4, 7)), ValueError, "router_weight must have shape"),
    (dict(hidden=torch.randn(3, 8).to(torch.float64)), TypeError, "hidden must have dtype"),
    (dict(hidden=torch.ones(3, 8, dtype=torch.int64)), TypeError, "hidden must have dtype"),
    (dict(router=torch.randn(4, 8).half()), TypeError, "router_weight has dtype"),
    (dict(hidden=torch.randn(8)), ValueError, "hidden must be 2-D"),
    (dict(gate="relu"), ValueError, "gate must be one of"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
])
def test_router_topk_rejects_bad_arguments(device, bad, error, match):
    args = dict(hidden=torch.randn(3, 8), router=torch.randn(4, 8), k=2, gate="logit", return_lse=False)
    args.update(bad)
    with pytest.raises(error, match=match):
        router_topk(*(v.to(device) if torch.is_tensor(v) else v for v in args.values()))
