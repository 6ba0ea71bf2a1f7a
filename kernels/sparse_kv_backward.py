"""Sparse key-value backward, with both selections (experts and neurons) held fixed.

For token t, selected neuron j of expert e (slot p), a_j = ReLU(s_j), s_j = w_p r_j,
r_j = K_j . h_t, and upstream dy_t:

    ds_j = (V_j . dy_t) [s_j > 0]      dr_j = w_p ds_j      dw_p = sum_{j in p} ds_j r_j
    dg = dw (gate "logit") or w * (dw - sum(w * dw)) (gate "softmax")
    dh_t = sum_j dr_j K_j + sum_p dg_p G_{e_p}
    dK_j = sum_t dr_tj h_t     dV_j = sum_t a_tj dy_t     dG_e = sum_{(t, p): e_p = e} dg_tp h_t

Launches: one per-token kernel for dr and dg (it gathers the token's K and V rows), the row
gather-sum for dh, and segmented reductions for the row-sparse dK/dV and the dense dG.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .grouping import segments_by_key, unique_row_segments
from .row_gather_sum import row_gather_sum
from .segment_sum import segment_sum
from .validation import (FLOAT_DTYPES, INDEX_DTYPES, check_devices, check_ids_in_range,
                         check_same_dtype, check_shape, check_tensor, pow2_block)

GATES = ("logit", "softmax")


@triton.jit
def _score_grads_kernel(
    grad_y_ptr, hidden_ptr, keys_ptr, values_ptr,
    expert_ids_ptr, gate_weights_ptr, neuron_ids_ptr, value_ids_ptr, activations_ptr,
    grad_raw_ptr, grad_gate_ptr,
    hidden_size, neurons_per_expert, experts_per_token, num_picks,
    stride_gyt, stride_gyd, stride_ht, stride_hd, stride_kn, stride_kd, stride_vn, stride_vd,
    SOFTMAX: tl.constexpr, P_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, P_PAD)
    slot_ok = slots < experts_per_token
    experts = tl.load(expert_ids_ptr + token * experts_per_token + slots, mask=slot_ok, other=-1)
    weights = tl.load(gate_weights_ptr + token * experts_per_token + slots, mask=slot_ok, other=0.0)
    grad_w = tl.zeros([P_PAD], tl.float32)
    for k0 in range(0, num_picks, BLOCK_K):
        picks = k0 + tl.arange(0, BLOCK_K)
        pick_ok = picks < num_picks
        ids = tl.load(neuron_ids_ptr + token * num_picks + picks, mask=pick_ok, other=0).to(tl.int64)
        value_ids = tl.load(value_ids_ptr + token * num_picks + picks, mask=pick_ok, other=0).to(tl.int64)
        act = tl.load(activations_ptr + token * num_picks + picks, mask=pick_ok, other=0.0)
        grad_act = tl.zeros([BLOCK_K], tl.float32)
        raw = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, hidden_size, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < hidden_size
            tile_ok = pick_ok[:, None] & dim_ok[None, :]
            gy = tl.load(grad_y_ptr + token * stride_gyt + dims * stride_gyd, mask=dim_ok, other=0.0)
            h = tl.load(hidden_ptr + token * stride_ht + dims * stride_hd, mask=dim_ok, other=0.0)
            v = tl.load(values_ptr + value_ids[:, None] * stride_vn + dims[None, :] * stride_vd,
                        mask=tile_ok, other=0.0)
            k = tl.load(keys_ptr + ids[:, None] * stride_kn + dims[None, :] * stride_kd,
                        mask=tile_ok, other=0.0)
            grad_act += tl.sum(v.to(tl.float32) * gy.to(tl.float32)[None, :], axis=1)
            raw += tl.sum(k.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
        grad_score = tl.where(act > 0.0, grad_act, 0.0)
        owner = (ids // neurons_per_expert)[:, None] == experts[None, :].to(tl.int64)
        weight = tl.sum(tl.where(owner, weights[None, :], 0.0), axis=1)
        grad_w += tl.sum(tl.where(owner, (grad_score * raw)[:, None], 0.0), axis=0)
        tl.store(grad_raw_ptr + token * num_picks + picks, grad_score * weight, mask=pick_ok)
    if SOFTMAX:
        grad_gate = weights * (grad_w - tl.sum(weights * grad_w, axis=0))
    else:
        grad_gate = grad_w
    tl.store(grad_gate_ptr + token * experts_per_token + slots, grad_gate, mask=slot_ok)


class SparseKVGrads(NamedTuple):
    """Gradients of one adapter call. Key/value gradients are row-sparse: ``row_ids`` [U] (sorted,
    distinct) with ``key_rows``/``value_rows`` [U, d] fp32; ``keys``/``values`` are the same
    scattered into dense tensors of the parameters' dtype, when asked for. Without parameter
    gradients (``param_grads=False``) only ``hidden`` is set, the rest is None."""

    hidden: torch.Tensor
    router_weight: Optional[torch.Tensor]
    row_ids: Optional[torch.Tensor]
    key_rows: Optional[torch.Tensor]
    value_rows: Optional[torch.Tensor]
    keys: Optional[torch.Tensor]
    values: Optional[torch.Tensor]


def sparse_kv_backward(grad_y, hidden, router_weight, keys, values, expert_ids, gate_weights,
                       neuron_ids, activations, gate: str = "logit", dense: bool = True,
                       check_ids: bool = True, value_ids=None, param_grads: bool = True) -> SparseKVGrads:
    """Backward of the MEFT adapter for saved selections.

    ``expert_ids`` [T, P], ``gate_weights`` [T, P] fp32, ``neuron_ids`` [T, K] and
    ``activations`` [T, K] fp32 are what router_topk / sparse_kv_forward produced; ``grad_y``
    and ``hidden`` are [T, d] in the parameters' dtype; ``gate`` is "logit" or "softmax".
    ``check_ids`` verifies that the ids are in range (one device sync).

    ``values`` may instead hold only some rows [U, d] (a prefetch slot) with ``value_ids``
    [T, K] giving each pick's row in it; keys stay the whole [N, d] table. ``dense=True``
    then needs the whole table and is refused.

    ``param_grads=False`` computes only ``dh`` (a frozen layer still passes the gradient on):
    the segmented reductions for dK, dV and dG are skipped.
    """
    check_tensor("grad_y", grad_y, 2, FLOAT_DTYPES)
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    check_tensor("router_weight", router_weight, 2, FLOAT_DTYPES)
    check_tensor("keys", keys, 2, FLOAT_DTYPES)
    check_tensor("values", values, 2, FLOAT_DTYPES)
    check_tensor("expert_ids", expert_ids, 2, INDEX_DTYPES)
    check_tensor("neuron_ids", neuron_ids, 2, INDEX_DTYPES)
    check_tensor("gate_weights", gate_weights, 2, (torch.float32,))
    check_tensor("activations", activations, 2, (torch.float32,))
    check_same_dtype(hidden=hidden, grad_y=grad_y, router_weight=router_weight, keys=keys,
                     values=values)
    check_devices(hidden=hidden, grad_y=grad_y, router_weight=router_weight, keys=keys,
                  values=values, expert_ids=expert_ids, gate_weights=gate_weights,
                  neuron_ids=neuron_ids, activations=activations)
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    num_tokens, hidden_size = hidden.shape
    num_experts = router_weight.shape[0]
    num_neurons = keys.shape[0]
    experts_per_token = expert_ids.shape[1]
    topk = neuron_ids.shape[1]
    check_shape("grad_y", grad_y, (num_tokens, hidden_size))
    check_shape("router_weight", router_weight, (num_experts, hidden_size))
    check_shape("keys", keys, (num_neurons, hidden_size))
    if value_ids is None:
        check_shape("values", values, (num_neurons, hidden_size))
    else:
        check_tensor("value_ids", value_ids, 2, INDEX_DTYPES)
        check_shape("value_ids", value_ids, tuple(neuron_ids.shape))
        check_devices(value_ids=value_ids, values=values)
        if values.shape[1] != hidden_size:
            raise ValueError(f"values must have {hidden_size} columns, got {tuple(values.shape)}")
        if dense:
            raise ValueError("dense=True needs the whole values table; pass dense=False with value_ids")
    check_shape("expert_ids", expert_ids, (num_tokens, experts_per_token))
    check_shape("gate_weights", gate_weights, (num_tokens, experts_per_token))
    check_shape("activations", activations, (num_tokens, topk))
    if num_neurons % num_experts:
        raise ValueError(f"router_weight's rows ({num_experts}) must divide keys' rows ({num_neurons})")
    if check_ids:
        check_ids_in_range("expert_ids", expert_ids, num_experts)
        check_ids_in_range("neuron_ids", neuron_ids, num_neurons)
        if value_ids is not None:
            check_ids_in_range("value_ids", value_ids, values.shape[0])

    device = hidden.device
    expert_ids, neuron_ids = expert_ids.contiguous(), neuron_ids.contiguous()
    gate_weights, activations = gate_weights.contiguous(), activations.contiguous()
    value_ids = neuron_ids if value_ids is None else value_ids.contiguous()
    grad_raw = torch.empty(num_tokens, topk, dtype=torch.float32, device=device)
    grad_gate = torch.empty(num_tokens, experts_per_token, dtype=torch.float32, device=device)
    if num_tokens:
        _score_grads_kernel[(num_tokens,)](
            grad_y, hidden, keys, values, expert_ids, gate_weights, neuron_ids, value_ids,
            activations, grad_raw, grad_gate,
            hidden_size, num_neurons // num_experts, experts_per_token, topk,
            grad_y.stride(0), grad_y.stride(1), hidden.stride(0), hidden.stride(1),
            keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            SOFTMAX=gate == "softmax", P_PAD=triton.next_power_of_2(experts_per_token),
            BLOCK_K=pow2_block(topk, 16, 32), BLOCK_D=pow2_block(hidden_size, 16, 64),
        )
    grad_hidden = torch.empty(num_tokens, hidden_size, dtype=hidden.dtype, device=device)
    row_gather_sum(grad_hidden, grad_raw, neuron_ids, keys, grad_gate, expert_ids, router_weight)

    if not param_grads:
        return SparseKVGrads(grad_hidden, None, None, None, None, None, None)

    row_ids, order, offsets = unique_row_segments(neuron_ids)
    key_rows, value_rows = segment_sum(order, offsets, topk, grad_raw, hidden, activations, grad_y)
    expert_order, expert_offsets = segments_by_key(expert_ids, num_experts)
    grad_router = segment_sum(expert_order, expert_offsets, experts_per_token, grad_gate, hidden)

    grad_keys = grad_values = None
    if dense:
        grad_keys = torch.zeros_like(keys).index_copy_(0, row_ids, key_rows.to(keys.dtype))
        grad_values = torch.zeros_like(values).index_copy_(0, row_ids, value_rows.to(values.dtype))
    return SparseKVGrads(grad_hidden, grad_router.to(router_weight.dtype), row_ids, key_rows,
                         value_rows, grad_keys, grad_values)
