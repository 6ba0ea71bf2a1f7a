"""Autograd glue: the Triton path of the adapter as torch.library custom ops.

``meft_triton::adapter_forward`` / ``adapter_backward`` wrap the kernels so autograd, and
``torch.compile(fullgraph=True)``, see one opaque op with a fake (shape-only) implementation
instead of tracing into Triton launches.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("meft_triton::adapter_forward", mutates_args=())
def adapter_forward(hidden: Tensor, router_weight: Tensor, keys: Tensor, values: Tensor,
                    experts_per_token: int, topk: int, gate: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, expert_ids, gate_weights, neuron_ids, activations, gate_lse)``; ``gate_lse``
    (each token's log-sum-exp over all E logits, what the softmax gate's backward needs) is
    empty under gate "logit"."""
    from meft_triton.kernels import router_topk, sparse_kv_forward

    gate_weights, expert_ids, gate_lse = router_topk(hidden, router_weight, experts_per_token, gate=gate,
                                                     return_lse=True)
    y, neuron_ids, activations = sparse_kv_forward(
        hidden, keys, values, expert_ids, gate_weights, router_weight.shape[0], topk,
        check_ids=False)
    if gate != "softmax":
        gate_lse = gate_lse.new_empty(0)
    return y, expert_ids, gate_weights, neuron_ids, activations, gate_lse


@adapter_forward.register_fake
def _adapter_forward_fake(hidden, router_weight, keys, values, experts_per_token, topk, gate):
    num_tokens = hidden.shape[0]
    return (
        hidden.new_empty(num_tokens, values.shape[1]),
        hidden.new_empty(num_tokens, experts_per_token, dtype=torch.int32),
        hidden.new_empty(num_tokens, experts_per_token, dtype=torch.float32),
        hidden.new_empty(num_tokens, topk, dtype=torch.int32),
        hidden.new_empty(num_tokens, topk, dtype=torch.float32),
        hidden.new_empty(num_tokens if gate == "softmax" else 0, dtype=torch.float32),
    )


@torch.library.custom_op("meft_triton::adapter_backward", mutates_args=())
def adapter_backward(grad_y: Tensor, hidden: Tensor, router_weight: Tensor, keys: Tensor,
                     values: Tensor, expert_ids: Tensor, gate_weights: Tensor,
                     neuron_ids: Tensor, activations: Tensor, gate_lse: Tensor, gate: str,
                     param_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense gradients ``(d hidden, d router_weight, d keys, d values)``; with ``param_grads``
    False (a frozen adapter) the last three are empty and never computed."""
    from meft_triton.kernels import sparse_kv_backward

    grads = sparse_kv_backward(grad_y, hidden, router_weight, keys, values, expert_ids,
                               gate_weights, neuron_ids, activations, gate, dense=param_grads,
                               check_ids=False, param_grads=param_grads,
                               gate_lse=gate_lse if gate == "softmax" else None)
    if not param_grads:
        return grads.hidden, *(hidden.new_empty(0) for _ in range(3))
    return grads.hidden, grads.router_weight, grads.keys, grads.values


@adapter_backward.register_fake
def _adapter_backward_fake(grad_y, hidden, router_weight, keys, values, expert_ids,
                           gate_weights, neuron_ids, activations, gate_lse, gate, param_grads):
    if not param_grads:
        return torch.empty_like(hidden), *(hidden.new_empty(0) for _ in range(3))
    return (torch.empty_like(hidden), torch.empty_like(router_weight), torch.empty_like(keys),
            torch.empty_like(values))


def _setup_context(ctx, inputs, output):
    hidden, router_weight, keys, values, _, _, gate = inputs
    _, expert_ids, gate_weights, neuron_ids, activations, gate_lse = output
    ctx.save_for_backward(hidden, router_weight, keys, values, expert_ids, gate_weights,
                          neuron_ids, activations, gate_lse)
    ctx.gate = gate


def _backward(ctx, grad_y, *unused_grads):
    saved = ctx.saved_tensors
    param_grads = any(ctx.needs_input_grad[1:4])
    grad_hidden, *param = torch.ops.meft_triton.adapter_backward(grad_y.contiguous(), *saved, ctx.gate,
                                                                 param_grads)
    if not param_grads:
        param = [None, None, None]
    return (grad_hidden, *param, None, None, None)


adapter_forward.register_autograd(_backward, setup_context=_setup_context)


def sparse_adapter(hidden: Tensor, router_weight: Tensor, keys: Tensor, values: Tensor,
                   experts_per_token: int, topk: int, gate: str = "logit") -> Tensor:
    """y [T, d] of the adapter on the Triton kernels, differentiable in all four tensors."""
    return torch.ops.meft_triton.adapter_forward(hidden, router_weight, keys, values,
                                                 experts_per_token, topk, gate)[0]
