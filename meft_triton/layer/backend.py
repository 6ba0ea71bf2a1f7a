"""One backend dispatch for both placements: which implementation computes a call, and the
stages (route, select, values, backward) the placement-"cpu" layer runs on it.

``"triton"``: the fused kernels (CUDA tensors in fp16/bf16/fp32, or CPU tensors under Triton's
interpreter). ``"torch"``: :mod:`meft_triton.reference`. ``"auto"`` picks the kernels for CUDA
tensors of a kernel dtype and the reference otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unique_ids(ids: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """``(active, local)``: the distinct values of ``ids`` ascending and each entry's position
    among them (``active[local] == ids``), computed on the device without a host read. The
    distinct count is device data, so ``active`` has the host-known length
    ``min(num_rows, ids.numel())`` and repeats its largest id at the end (padding no entry of
    ``local`` points at; a copy engine copies the repeated row once)."""
    flat = ids.reshape(-1).long()
    ordered, order = torch.sort(flat)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    rank = torch.cumsum(first, 0) - 1
    local = torch.empty_like(rank).scatter_(0, order, rank).view(ids.shape)
    active = ordered[-1:].expand(min(num_rows, flat.numel())).clone()
    return active.scatter_(0, rank, ordered), local  # equal ranks write equal ids


def resolve_backend(requested: str, hidden: Tensor) -> str:
    """The backend a call with ``hidden`` runs on, "triton" or "torch", for the configured
    ``requested`` ("auto", "triton" or "torch")."""
    if requested == "auto":
        return "triton" if hidden.is_cuda and hidden.dtype in KERNEL_DTYPES else "torch"
    return requested


class TritonStages:
    """The offloaded layer's device work on the Triton kernels."""

    @staticmethod
    def route(hidden, router_weight, experts_per_token, gate):
        from meft_triton.kernels import router_topk

        if gate == "softmax":
            gate_weights, expert_ids, gate_lse = router_topk(hidden, router_weight, experts_per_token, gate=gate,
                                                             return_lse=True)
            return expert_ids, gate_weights, gate_lse
        gate_weights, expert_ids = router_topk(hidden, router_weight, experts_per_token, gate=gate)
        return expert_ids, gate_weights, None

    @staticmethod
    def select(hidden, keys, expert_ids, gate_weights, num_experts, topk):
        from meft_triton.kernels import sparse_kv_select

        return sparse_kv_select(hidden, keys, expert_ids, gate_weights, num_experts, topk, check_ids=False)

    @staticmethod
    def values(activations, local_ids, rows):
        from meft_triton.kernels import sparse_kv_values

        return sparse_kv_values(activations, local_ids, rows, check_ids=False)

    @staticmethod
    def backward(grad_y, hidden, router_weight, keys, rows, expert_ids, gate_weights, neuron_ids,
                 activations, local_ids, gate, gate_lse=None, param_grads=True, factored=False):
        from meft_triton.kernels import sparse_kv_backward

        grads = sparse_kv_backward(grad_y, hidden, router_weight, keys, rows, expert_ids, gate_weights,
                                   neuron_ids, activations, gate, dense=False, check_ids=False,
                                   value_ids=local_ids, param_grads=param_grads, gate_lse=gate_lse,
                                   factored=factored)
        if factored:
            return grads.hidden, grads.router_weight, grads.pick_grads
        return grads.hidden, grads.router_weight, grads.row_ids, grads.key_rows, grads.value_rows

    @staticmethod
    def key_value_rows(hidden, grad_y, expert_ids, neuron_ids, pick_grads, activations, num_rows, num_experts,
                       out_dtype):
        from meft_triton.kernels import key_value_rows

        return tuple(key_value_rows(hidden, grad_y, expert_ids, neuron_ids, pick_grads, activations, num_rows,
                                    num_experts, out_dtype, check_ids=False))


class TorchStages:
    """The same work through meft_triton.reference (CPU tensors without Triton's interpreter)."""

    @staticmethod
    def route(hidden, router_weight, experts_per_token, gate):
        _, expert_ids, gate_weights = reference.route(hidden, router_weight, experts_per_token, gate)
        return expert_ids, gate_weights.float(), None

    @staticmethod
    def select(hidden, keys, expert_ids, gate_weights, num_experts, topk):
        neurons_per_expert = keys.shape[0] // num_experts
        weights = gate_weights.to(hidden.dtype)
        scores = reference.candidate_scores(hidden, keys, expert_ids, weights, neurons_per_expert)
        neuron_ids = reference.select_neurons(scores, reference.candidate_ids(expert_ids, neurons_per_expert), topk,
                                              keys.shape[0], expert_ids)
        chosen = reference.selected_scores(hidden, keys, expert_ids, weights, neuron_ids, neurons_per_expert)
        return neuron_ids, torch.relu(chosen).float()

    @staticmethod
    def values(activations, local_ids, rows):
        return torch.einsum("tk,tkd->td", activations.to(rows.dtype), reference.gather_rows(rows, local_ids))

    @staticmethod
    def backward(grad_y, hidden, router_weight, keys, rows, expert_ids, gate_weights, neuron_ids,
                 activations, local_ids, gate, gate_lse=None, param_grads=True, factored=False):
        """``factored``: (dh, dG, dr per pick) instead of the gradient rows (key_value_rows)."""
        active, _ = unique_ids(neuron_ids, keys.shape[0])  # the forward's slot order
        num_experts = router_weight.shape[0]
        neurons_per_expert = keys.shape[0] // num_experts
        with torch.enable_grad():
            h, g = hidden.detach().requires_grad_(), router_weight.detach().requires_grad_()
            key_rows = keys[active].detach().requires_grad_()
            value_rows = rows.detach().requires_grad_()
            _, _, weights = reference.route(h, g, expert_ids.shape[1], gate, expert_ids)
            owner = neuron_ids.long() // neurons_per_expert
            match = (owner[:, :, None] == expert_ids.long()[:, None, :]).to(weights.dtype)
            # gather_rows: the key/value gradient rows of one neuron are summed in a fixed order
            picked_keys = reference.gather_rows(key_rows, local_ids)
            raw = torch.einsum("td,tkd->tk", h, picked_keys)
            scores = (match * weights[:, None, :]).sum(-1) * raw
            y = torch.einsum("tk,tkd->td", torch.relu(scores), reference.gather_rows(value_rows, local_ids))
            if not param_grads:
                return torch.autograd.grad(y, h, grad_y)[0], None, None, None, None
            if factored:  # d raw = dr: the factor dK_j = sum dr x_t takes (key_value_rows)
                dh, dg, draw = torch.autograd.grad(y, (h, g, raw), grad_y)
                return dh, dg, draw.float()
            dh, dg, dk, dv = torch.autograd.grad(y, (h, g, key_rows, value_rows), grad_y)
        return dh, dg, active, dk.float(), dv.float()

    @staticmethod
    def key_value_rows(hidden, grad_y, expert_ids, neuron_ids, pick_grads, activations, num_rows, num_experts,
                       out_dtype):
        """(row ids, rows [R, r + d]) as :func:`meft_triton.kernels.key_value_rows` returns them."""
        active, local = unique_ids(neuron_ids, num_rows)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.zeros(active.numel(), hidden.shape[1] + grad_y.shape[1], dtype=acc, device=hidden.device)
        terms = torch.cat([pick_grads[:, :, None] * hidden[:, None, :].to(acc),
                           activations[:, :, None] * grad_y[:, None, :].to(acc)], dim=2)
        out.index_add_(0, local.reshape(-1), terms.reshape(-1, out.shape[1]))
        return active, out.to(out_dtype)


def stages_for(hidden: Tensor, backend: str):
    """The stages a call with ``hidden`` runs (:func:`resolve_backend`)."""
    return TritonStages if resolve_backend(backend, hidden) == "triton" else TorchStages
