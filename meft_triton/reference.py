"""The MEFT semantics of docs/DESIGN.md, "Semantics" in plain PyTorch: the oracle for every test.

Every function works in any floating dtype (float64 included) on any device, and is
differentiable with autograd; the top-k selections are index choices, so gradients flow with
them held fixed, exactly as the contract says. Selections can be passed in (``expert_ids``,
``neuron_ids``) so a kernel's own choice can be re-evaluated here in float64: near-ties may
legitimately resolve differently at lower precision.

Shapes: hidden h [T, d]; optional low-key projection L [r, d] (``low_key``; None means the
identity and r = d); router_weight G [E, r], keys K [N, r], values V [N, d]; S = N / E. The
router and the key scores read x = h L^T [T, r]; the values are summed at width d.

The step functions ``candidate_scores`` and ``selected_scores`` take that key input x (called
``hidden`` there); ``route``, ``sparse_kv_forward``, ``meft_forward`` and
``meft_original_forward`` take h and an optional ``low_key``.

Gates (MEFT's ``KVLlamaMLP``): "logit" uses w_e = g_e; "softmax" uses w_e = softmax(g)_e over
**all E** logits, never renormalised over the P chosen experts, so under "softmax" every router
row gets a gradient. Either way the P chosen experts are the top-P of w (= the top-P of g).

K_top may exceed the number of candidates P * S (up to N): the selection is the top-K_top over
all N neurons with non-candidates scoring 0. Any candidate scoring above 0 outranks every
non-candidate, so it is the top-min(K_top, P * S) candidates (the reference and the kernels take
these) followed, when K_top > P * S, by K_top - P * S non-candidate neurons: the first ones in
ascending id order (the kernels pick the same ids). Those surplus picks score 0, contribute
nothing and get zero gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GATES = ("logit", "softmax")


def gather_rows(table: Tensor, ids: Tensor) -> Tensor:
    """``table[ids]`` ([*ids.shape, width]) through an embedding lookup: its backward sums the
    gradient rows of a repeated id in index order, the same bits at any thread count (indexing's
    backward on CPU adds them with parallel atomics, in a thread-dependent order)."""
    return F.embedding(ids.long(), table)


def _check_gate(gate: str) -> None:
    if gate not in GATES:
        raise ValueError(f"gate must be 'logit' or 'softmax', got {gate!r}")


def key_input(hidden: Tensor, low_key: Tensor | None = None) -> Tensor:
    """x = h L^T [T, r], the input of the router and the key scores (x = h without ``low_key``)."""
    if low_key is None:
        return hidden
    if not isinstance(low_key, Tensor) or low_key.dim() != 2 or low_key.shape[1] != hidden.shape[-1]:
        shape = tuple(low_key.shape) if isinstance(low_key, Tensor) else type(low_key).__name__
        raise ValueError(f"low_key must be a [r, {hidden.shape[-1]}] tensor (r >= 1), got {shape}")
    return hidden @ low_key.T


def route(
    hidden: Tensor,
    router_weight: Tensor,
    experts_per_token: int,
    gate: str = "logit",
    expert_ids: Tensor | None = None,
    low_key: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 1: the P best experts per token, descending.

    Returns ``(gate_logits [T, P], expert_ids [T, P] int64, gate_weights [T, P])``: the chosen
    experts' logits g_e and their gate weights w_e, which are the logits themselves
    (``gate="logit"``) or the softmax over all E logits at the chosen experts
    (``gate="softmax"``; not renormalised over the P, so they sum to at most 1).
    """
    _check_gate(gate)
    x = key_input(hidden, low_key)
    if expert_ids is None or gate == "softmax":
        logits = x @ router_weight.T
    if expert_ids is None:
        # the top-P of softmax(g) is the top-P of g: softmax is monotone
        gate_logits, expert_ids = logits.topk(experts_per_token, dim=-1, sorted=True)
    else:
        expert_ids = expert_ids.long()
        if gate == "softmax":
            gate_logits = logits.gather(1, expert_ids)
        else:
            gate_logits = torch.einsum("td,tpd->tp", x, gather_rows(router_weight, expert_ids))
    if gate == "logit":
        gate_weights = gate_logits
    else:
        gate_weights = torch.softmax(logits, dim=-1).gather(1, expert_ids)
    return gate_logits, expert_ids, gate_weights


def candidate_ids(expert_ids: Tensor, neurons_per_expert: int) -> Tensor:
    """Neuron ids of every token's candidates, [T, P * S]; candidate p*S + s is neuron e_p*S + s."""
    offsets = torch.arange(neurons_per_expert, device=expert_ids.device)
    return (expert_ids.long()[:, :, None] * neurons_per_expert + offsets).flatten(1)


def candidate_scores(hidden: Tensor, keys: Tensor, expert_ids: Tensor, gate_weights: Tensor,
                     neurons_per_expert: int) -> Tensor:
    """Step 2: s_j = w_e * (K_j . x) for the P * S candidates of each token, [T, P * S]
    (``hidden`` is the key input x)."""
    cands = candidate_ids(expert_ids, neurons_per_expert)
    raw = torch.einsum("td,tcd->tc", hidden, gather_rows(keys, cands))
    weights = gate_weights.repeat_interleave(neurons_per_expert, dim=1)
    return weights * raw


def surplus_ids(expert_ids: Tensor, neurons_per_expert: int, num_experts: int, count: int) -> Tensor:
    """[T, count] int64 non-candidate neurons per token: the first ``count`` neurons, in
    ascending id order, of the experts the token did not select (the picks past P * S when
    K_top > P * S; ``count`` <= (E - P) * S)."""
    expert_ids = expert_ids.long()
    chosen = torch.zeros(expert_ids.shape[0], num_experts, dtype=torch.uint8, device=expert_ids.device)
    chosen.scatter_(1, expert_ids, 1)
    unchosen = torch.sort(chosen, dim=1, stable=True).indices  # unchosen experts first, ascending
    picks = torch.arange(count, device=expert_ids.device)
    return unchosen[:, picks // neurons_per_expert] * neurons_per_expert + picks % neurons_per_expert


def select_neurons(scores: Tensor, cands: Tensor, topk: int, num_neurons: int | None = None,
                   expert_ids: Tensor | None = None) -> Tensor:
    """Step 3's choice: the ids of each token's ``topk`` best neurons, [T, topk].

    With ``topk`` <= P * S these are the best-scoring candidates. A larger ``topk`` (at most
    ``num_neurons`` = N, which must then be given, with ``expert_ids``) takes every candidate and
    then non-candidate neurons, which score 0 (see :func:`surplus_ids`).
    """
    num_candidates = cands.shape[1]
    if topk <= num_candidates:
        positions = scores.topk(topk, dim=-1).indices
        return cands.gather(1, positions)
    if num_neurons is None or expert_ids is None:
        raise ValueError(f"topk ({topk}) exceeds the {num_candidates} candidates: pass num_neurons "
                         "and expert_ids so non-candidate neurons can fill the surplus")
    if topk > num_neurons:
        raise ValueError(f"topk must be in [1, num_neurons={num_neurons}], got {topk}")
    positions = scores.topk(num_candidates, dim=-1).indices
    neurons_per_expert = num_candidates // expert_ids.shape[1]
    extra = surplus_ids(expert_ids, neurons_per_expert, num_neurons // neurons_per_expert,
                        topk - num_candidates)
    return torch.cat([cands.gather(1, positions), extra], dim=1)


def selected_scores(hidden: Tensor, keys: Tensor, expert_ids: Tensor, gate_weights: Tensor,
                    neuron_ids: Tensor, neurons_per_expert: int) -> Tensor:
    """Scores s_j of chosen neurons only, [T, K]: w of the neuron's expert times K_j . x
    (``hidden`` is the key input x); 0 for a neuron whose expert the token did not select."""
    neuron_ids = neuron_ids.long()
    owner = neuron_ids // neurons_per_expert
    match = owner[:, :, None] == expert_ids.long()[:, None, :]
    weight = (match.to(gate_weights.dtype) * gate_weights[:, None, :]).sum(-1)
    return weight * torch.einsum("td,tkd->tk", hidden, gather_rows(keys, neuron_ids))


def _check_topk(topk, num_neurons: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int in [1, num_neurons={num_neurons}], got {type(topk).__name__}")
    if not 1 <= topk <= num_neurons:
        raise ValueError(f"topk must be in [1, num_neurons={num_neurons}], got {topk}")


def sparse_kv_forward(
    hidden: Tensor,
    keys: Tensor,
    values: Tensor,
    expert_ids: Tensor,
    gate_weights: Tensor,
    neurons_per_expert: int,
    topk: int,
    neuron_ids: Tensor | None = None,
    low_key: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 2-4. Returns ``(y [T, d], neuron_ids [T, topk] int64, activations [T, topk])``.

    ``topk`` may be anything in [1, N]; past P * S the surplus picks are non-candidates with
    activation 0. Passed-in ``neuron_ids`` must be distinct per token and in [0, N); a
    non-candidate among them scores 0.
    """
    num_neurons = keys.shape[0]
    _check_topk(topk, num_neurons)
    x = key_input(hidden, low_key)
    if neuron_ids is None:
        with torch.no_grad():
            scores = candidate_scores(x, keys, expert_ids, gate_weights, neurons_per_expert)
            neuron_ids = select_neurons(scores, candidate_ids(expert_ids, neurons_per_expert), topk,
                                        num_neurons, expert_ids.long())
    else:
        ids = neuron_ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_neurons):
            raise ValueError(f"neuron_ids must hold ids in [0, {num_neurons}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if ids.shape[1] > 1 and bool((ids.sort(1).values.diff(dim=1) == 0).any()):
            raise ValueError("neuron_ids holds a neuron twice for one token: picks must be distinct")
    neuron_ids = neuron_ids.long()
    scores = selected_scores(x, keys, expert_ids, gate_weights, neuron_ids, neurons_per_expert)
    activations = torch.relu(scores)
    y = torch.einsum("tk,tkd->td", activations, gather_rows(values, neuron_ids))
    return y, neuron_ids, activations


def meft_forward(
    hidden: Tensor,
    router_weight: Tensor,
    keys: Tensor,
    values: Tensor,
    experts_per_token: int,
    topk: int,
    gate: str = "logit",
    expert_ids: Tensor | None = None,
    neuron_ids: Tensor | None = None,
    low_key: Tensor | None = None,
) -> Tensor:
    """The whole adapter: y = sum over selected j of ReLU(s_j) V_j, for hidden h [T, d]."""
    neurons_per_expert = keys.shape[0] // router_weight.shape[0]
    x = key_input(hidden, low_key)
    _, expert_ids, gate_weights = route(x, router_weight, experts_per_token, gate, expert_ids)
    y, _, _ = sparse_kv_forward(x, keys, values, expert_ids, gate_weights,
                                neurons_per_expert, topk, neuron_ids)
    return y


def meft_original_forward(
    hidden: Tensor,
    router_weight: Tensor,
    keys: Tensor,
    values: Tensor,
    experts_per_token: int,
    topk: int,
    gate: str = "logit",
    low_key: Tensor | None = None,
) -> Tensor:
    """MEFT's published formulation (``KVLlamaMLP`` with ``moe_style``), the baseline the kernels
    must beat: x = L h; expert scores G x (softmaxed over all E with ``gate="softmax"``); the
    top-P of them scattered into a dense [T, E] weight (0 elsewhere); dense scores over all N
    neurons times their expert's weight; the top-K_top of those over all N scattered into a
    dense [T, N] activation matrix, ReLU, times V."""
    _check_gate(gate)
    num_experts = router_weight.shape[0]
    neurons_per_expert = keys.shape[0] // num_experts
    x = key_input(hidden, low_key)
    expert_scores = x @ router_weight.T
    if gate == "softmax":
        expert_scores = torch.softmax(expert_scores, dim=-1)
    top, ids = expert_scores.topk(experts_per_token, dim=-1)
    expert_weight = torch.zeros_like(expert_scores).scatter(1, ids, top)
    scores = (x @ keys.T) * expert_weight.repeat_interleave(neurons_per_expert, dim=1)
    best, picks = scores.topk(topk, dim=-1)
    activations = torch.zeros_like(scores).scatter(1, picks, best)
    return torch.relu(activations) @ values
