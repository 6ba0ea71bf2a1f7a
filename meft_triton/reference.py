"""The MEFT semantics of DESIGN.md section 2 in plain PyTorch: the oracle for every test.

Every function works in any floating dtype (float64 included) on any device, and is
differentiable with autograd; the top-k selections are index choices, so gradients flow with
them held fixed, exactly as the contract says. Selections can be passed in (``expert_ids``,
``neuron_ids``) so a kernel's own choice can be re-evaluated here in float64: near-ties may
legitimately resolve differently at lower precision.

Shapes: hidden [T, d], router_weight G [E, d], keys K [N, d], values V [N, d]; S = N / E.
"""

from __future__ import annotations

import torch
from torch import Tensor


def route(
    hidden: Tensor,
    router_weight: Tensor,
    experts_per_token: int,
    gate: str = "logit",
    expert_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 1: the P best experts per token, descending.

    Returns ``(gate_logits [T, P], expert_ids [T, P] int64, gate_weights [T, P])``; the gate
    weights are the logits themselves (``gate="logit"``) or their softmax over the P.
    """
    if expert_ids is None:
        logits = hidden @ router_weight.T
        gate_logits, expert_ids = logits.topk(experts_per_token, dim=-1, sorted=True)
    else:
        expert_ids = expert_ids.long()
        gate_logits = torch.einsum("td,tpd->tp", hidden, router_weight[expert_ids])
    if gate == "logit":
        gate_weights = gate_logits
    elif gate == "softmax":
        gate_weights = torch.softmax(gate_logits, dim=-1)
    else:
        raise ValueError(f"gate must be 'logit' or 'softmax', got {gate!r}")
    return gate_logits, expert_ids, gate_weights


def candidate_ids(expert_ids: Tensor, neurons_per_expert: int) -> Tensor:
    """Neuron ids of every token's candidates, [T, P * S]; candidate p*S + s is neuron e_p*S + s."""
    offsets = torch.arange(neurons_per_expert, device=expert_ids.device)
    return (expert_ids.long()[:, :, None] * neurons_per_expert + offsets).flatten(1)


def candidate_scores(hidden: Tensor, keys: Tensor, expert_ids: Tensor, gate_weights: Tensor,
                     neurons_per_expert: int) -> Tensor:
    """Step 2: s_j = w_e * (K_j . h) for the P * S candidates of each token, [T, P * S]."""
    cands = candidate_ids(expert_ids, neurons_per_expert)
    raw = torch.einsum("td,tcd->tc", hidden, keys[cands])
    weights = gate_weights.repeat_interleave(neurons_per_expert, dim=1)
    return weights * raw


def select_neurons(scores: Tensor, cands: Tensor, topk: int) -> Tensor:
    """Step 3's choice: the ids of each token's ``topk`` best-scoring candidates, [T, topk]."""
    positions = scores.topk(topk, dim=-1).indices
    return cands.gather(1, positions)


def selected_scores(hidden: Tensor, keys: Tensor, expert_ids: Tensor, gate_weights: Tensor,
                    neuron_ids: Tensor, neurons_per_expert: int) -> Tensor:
    """Scores s_j of chosen neurons only, [T, K]: w of the neuron's expert times K_j . h."""
    neuron_ids = neuron_ids.long()
    owner = neuron_ids // neurons_per_expert
    match = owner[:, :, None] == expert_ids.long()[:, None, :]
    weight = (match.to(gate_weights.dtype) * gate_weights[:, None, :]).sum(-1)
    return weight * torch.einsum("td,tkd->tk", hidden, keys[neuron_ids])


def sparse_kv_forward(
    hidden: Tensor,
    keys: Tensor,
    values: Tensor,
    expert_ids: Tensor,
    gate_weights: Tensor,
    neurons_per_expert: int,
    topk: int,
    neuron_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 2-4. Returns ``(y [T, d], neuron_ids [T, topk] int64, activations [T, topk])``."""
    if neuron_ids is None:
        with torch.no_grad():
            scores = candidate_scores(hidden, keys, expert_ids, gate_weights, neurons_per_expert)
            neuron_ids = select_neurons(scores, candidate_ids(expert_ids, neurons_per_expert), topk)
    else:
        owner = neuron_ids.long() // neurons_per_expert
        if not bool((owner[:, :, None] == expert_ids.long()[:, None, :]).any(-1).all()):
            raise ValueError("neuron_ids holds a neuron whose expert the token did not select")
    neuron_ids = neuron_ids.long()
    scores = selected_scores(hidden, keys, expert_ids, gate_weights, neuron_ids, neurons_per_expert)
    activations = torch.relu(scores)
    y = torch.einsum("tk,tkd->td", activations, values[neuron_ids])
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
) -> Tensor:
    """The whole adapter: y = sum over selected j of ReLU(s_j) V_j, for hidden [T, d]."""
    neurons_per_expert = keys.shape[0] // router_weight.shape[0]
    _, expert_ids, gate_weights = route(hidden, router_weight, experts_per_token, gate, expert_ids)
    y, _, _ = sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights,
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
) -> Tensor:
    """MEFT's published formulation, the baseline the kernels must beat: dense scores over all
    N neurons, masked to the candidates and the top-k, and a dense [T, N] activation matmul."""
    num_experts = router_weight.shape[0]
    neurons_per_expert = keys.shape[0] // num_experts
    _, expert_ids, gate_weights = route(hidden, router_weight, experts_per_token, gate)
    expert_weight = torch.zeros(hidden.shape[0], num_experts, dtype=hidden.dtype, device=hidden.device)
    expert_weight = expert_weight.scatter(1, expert_ids, gate_weights)
    is_candidate = torch.zeros_like(expert_weight, dtype=torch.bool).scatter(1, expert_ids, True)
    scores = (hidden @ keys.T) * expert_weight.repeat_interleave(neurons_per_expert, dim=1)
    scores = scores.masked_fill(~is_candidate.repeat_interleave(neurons_per_expert, dim=1), float("-inf"))
    top = scores.topk(topk, dim=-1).indices
    activations = torch.zeros_like(scores).scatter(1, top, torch.relu(scores.gather(1, top)))
    return activations @ values
