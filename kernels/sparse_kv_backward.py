"""Sparse key-value backward, with both selections (experts and neurons) held fixed.

For token t with key input x_t (width r: h_t, or L h_t with a low-key projection; the caller
turns dx into dh = dx L), selected neuron j of expert e (slot p), a_j = ReLU(s_j),
s_j = w_p r_j, r_j = K_j . x_t, and upstream dy_t (width d, the values' width):

    ds_j = (V_j . dy_t) [s_j > 0]      dr_j = w_p ds_j      dw_p = sum_{j in p} ds_j r_j
    dK_j = sum_t dr_tj x_t     dV_j = sum_t a_tj dy_t

Gate "logit" (w_p = g_{e_p}): dg = dw on the P selected experts only, so
    dx_t = sum_j dr_j K_j + sum_p dw_p G_{e_p}      dG_e = sum_{(t, p): e_p = e} dw_tp x_t
Gate "softmax" (w_e = softmax(g)_e over all E, not renormalised): every expert gets
    dg_te = p_te (dw_te [e selected] - sum_p w_tp dw_tp),   p_te = exp(g_te - lse_t)
    dx_t = sum_j dr_j K_j + sum_e dg_te G_e                  dG = dg^T x
a dense [T, E] dg (E is at most a few thousand; there is never a [T, N] tensor).

Launches: the per-expert score-gradient GEMM of meft_triton.kernels.score_grads for dr and
dw (it also fills the candidate tables of dr and a), the row gather-sum for dx's key term,
and the per-expert grouped GEMMs of meft_triton.kernels.expert_grads for dK, dV (and dG
under "logit"). The router term: "logit" adds the P gathered router rows in the same gather-sum;
"softmax" recomputes each [T, E] logit tile on tensor cores (fp32 accumulation, the forward's
log-sum-exp) to write dg in the compute dtype, then two dense GEMMs (cuBLAS on a GPU): dg G
into dx and dg^T x for dG.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .expert_grads import expert_grads, picked_rows
from .grouping import expert_segments
from .router_topk import router_topk
from .row_gather_sum import row_gather_sum
from .score_grads import score_grads
from .validation import (FLOAT_DTYPES, INDEX_DTYPES, check_devices, check_ids_in_range,
                         check_same_dtype, check_shape, check_tensor, dot_precision, pow2_block)

GATES = ("logit", "softmax")


@triton.jit
def _softmax_gate_grad_kernel(
    hidden_ptr, router_ptr, lse_ptr, dense_dw_ptr, weighted_dw_ptr, out_ptr,
    num_tokens, num_experts, width,
    stride_ht, stride_hd, stride_re, stride_rd,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_T, BLOCK_E] tile of dg = p * (dw scattered - sum_p w dw), p = exp(g - lse),
    the logits g recomputed like the router kernel does (fp32 accumulation)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for d0 in range(0, width, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < width
        h = tl.load(hidden_ptr + rows[:, None] * stride_ht + dims[None, :] * stride_hd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        g = tl.load(router_ptr + cols[None, :] * stride_re + dims[:, None] * stride_rd,
                    mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        acc = tl.dot(h, g, acc, input_precision=DOT_PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    weighted = tl.load(weighted_dw_ptr + rows, mask=row_ok, other=0.0)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    dense_dw = tl.load(dense_dw_ptr + rows[:, None] * num_experts + cols[None, :], mask=tile_ok, other=0.0)
    grad = tl.exp(acc - lse[:, None]) * (dense_dw - weighted[:, None])
    tl.store(out_ptr + rows[:, None] * num_experts + cols[None, :],
             grad.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _softmax_gate_grad(hidden, router_weight, expert_ids, gate_weights, grad_w, gate_lse):
    """Dense dg [T, E] in hidden's dtype (the operand of the two router GEMMs)."""
    num_tokens, width = hidden.shape
    num_experts = router_weight.shape[0]
    if gate_lse is None and num_tokens:
        # the forward's log-sum-exp was not kept: one more pass of the router kernel
        gate_lse = router_topk(hidden, router_weight, 1, return_lse=True)[2]
    weighted_dw = (gate_weights * grad_w).sum(1)
    dense_dw = torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=hidden.device)
    dense_dw.scatter_(1, expert_ids.long(), grad_w)
    grad_logits = torch.empty(num_tokens, num_experts, dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return grad_logits
    block_t = 16 if num_tokens <= 16 else 32
    block_e = pow2_block(num_experts, 16, 64)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_experts, block_e))
    _softmax_gate_grad_kernel[grid](
        hidden, router_weight, gate_lse.contiguous(), dense_dw, weighted_dw.contiguous(), grad_logits,
        num_tokens, num_experts, width,
        hidden.stride(0), hidden.stride(1), router_weight.stride(0), router_weight.stride(1),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=pow2_block(width, 16, 64),
        DOT_PRECISION=dot_precision(hidden.dtype),
    )
    return grad_logits


class SparseKVGrads(NamedTuple):
    """Gradients of one adapter call. ``hidden`` is d(key input) [T, r]. Key/value gradients
    come in the form asked for: dense ``keys`` [N, r] / ``values`` [N, d] in the parameters'
    dtype (``dense=True``; the row fields are None), or row-sparse (``dense=False``): ``row_ids``
    [R] with ``key_rows`` [R, r] and ``value_rows`` [R, d] fp32 (``keys``/``values`` None).
    R = min(N, T * K_top) is known on the host, so nothing waits for the device's count U of
    distinct picked neurons: ``row_ids`` holds those U ascending, then repeats the largest of
    them, with zero rows, up to R (the layout of the offload's slot ids). Sum rows into a table
    with ``index_add_`` (the padding adds nothing), or keep the rows before the first repeat.
    Without parameter gradients (``param_grads=False``) only ``hidden`` is set, the rest is
    None. Factored (``factored=True``): ``hidden``, ``router_weight`` and ``pick_grads``
    [T, K] fp32, the score gradient of each pick (dr_j, with the gate weight), which with
    the call's activations, x and dy are the factors of its dK and dV
    (:func:`~meft_triton.kernels.key_value_rows`); the key/value fields are None."""

    hidden: torch.Tensor
    router_weight: Optional[torch.Tensor]
    row_ids: Optional[torch.Tensor]
    key_rows: Optional[torch.Tensor]
    value_rows: Optional[torch.Tensor]
    keys: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    pick_grads: Optional[torch.Tensor] = None


def sparse_kv_backward(grad_y, hidden, router_weight, keys, values, expert_ids, gate_weights,
                       neuron_ids, activations, gate: str = "logit", dense: bool = True,
                       check_ids: bool = True, value_ids=None, param_grads: bool = True,
                       gate_lse=None, factored: bool = False) -> SparseKVGrads:
    """Backward of the MEFT adapter for saved selections.

    ``expert_ids`` [T, P], ``gate_weights`` [T, P] fp32, ``neuron_ids`` [T, K] and
    ``activations`` [T, K] fp32 are what router_topk / sparse_kv_forward produced; ``gate`` is
    "logit" or "softmax". ``check_ids`` verifies that the ids are in range (one device sync).

    Widths: ``hidden`` [T, r] is the key input the forward scored with (h, or x = L h with a
    low-key projection), ``router_weight`` [E, r] and ``keys`` [N, r] match it; ``values``
    [N, d] and ``grad_y`` [T, d] have the output width d (r = d without a projection). The
    returned ``hidden`` gradient is dx [T, r]; the caller applies L^T itself.

    ``gate_lse`` [T] fp32 (gate "softmax" only): each token's log-sum-exp over all E logits, as
    ``router_topk(..., return_lse=True)`` returns it. Without it the router kernel runs once
    more to recompute it.

    ``values`` may instead hold only some rows [U, d] (a prefetch slot) with ``value_ids``
    [T, K] giving each pick's row in it; keys stay the whole [N, r] table. ``dense=True``
    then needs the whole table and is refused.

    ``dense`` picks the form of the key/value gradients (SparseKVGrads): the per-expert GEMMs
    write either form directly; neither reads anything back to the host.

    ``param_grads=False`` computes only dx (a frozen layer still passes the gradient on):
    the per-expert GEMMs for dK, dV and dG and the softmax gate's dG GEMM are skipped.

    ``factored=True`` leaves dK and dV as factors (SparseKVGrads): the per-expert GEMMs then
    compute the "logit" gate's dG alone. Many calls' factors make one launch of
    :func:`~meft_triton.kernels.key_value_rows` (placement "cpu" sums a whole optimizer
    step's gradient rows that way, without a [N, r + d] table on the device).
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
    if factored and dense:
        raise ValueError("factored=True returns the key/value gradients as factors: pass dense=False")
    num_tokens, key_width = hidden.shape
    value_width = values.shape[1]
    num_experts = router_weight.shape[0]
    num_neurons = keys.shape[0]
    experts_per_token = expert_ids.shape[1]
    topk = neuron_ids.shape[1]
    check_shape("grad_y", grad_y, (num_tokens, value_width))
    check_shape("router_weight", router_weight, (num_experts, key_width))
    check_shape("keys", keys, (num_neurons, key_width))
    if value_ids is None:
        check_shape("values", values, (num_neurons, value_width))
    else:
        check_tensor("value_ids", value_ids, 2, INDEX_DTYPES)
        check_shape("value_ids", value_ids, tuple(neuron_ids.shape))
        check_devices(value_ids=value_ids, values=values)
        if dense:
            raise ValueError("dense=True needs the whole values table; pass dense=False with value_ids")
    check_shape("expert_ids", expert_ids, (num_tokens, experts_per_token))
    check_shape("gate_weights", gate_weights, (num_tokens, experts_per_token))
    check_shape("activations", activations, (num_tokens, topk))
    if num_neurons % num_experts:
        raise ValueError(f"router_weight's rows ({num_experts}) must divide keys' rows ({num_neurons})")
    if gate_lse is not None and gate == "softmax":
        check_tensor("gate_lse", gate_lse, 1, (torch.float32,))
        check_shape("gate_lse", gate_lse, (num_tokens,))
        check_devices(gate_lse=gate_lse, hidden=hidden)
    if check_ids:
        check_ids_in_range("expert_ids", expert_ids, num_experts)
        check_ids_in_range("neuron_ids", neuron_ids, num_neurons)
        if value_ids is not None:
            check_ids_in_range("value_ids", value_ids, values.shape[0])

    device = hidden.device
    neurons_per_expert = num_neurons // num_experts
    expert_ids, neuron_ids = expert_ids.contiguous(), neuron_ids.contiguous()
    gate_weights, activations = gate_weights.contiguous(), activations.contiguous()
    value_ids = None if value_ids is None else value_ids.contiguous()
    if num_tokens:
        grad_raw, grad_w, grad_raw_table, act_table = score_grads(
            grad_y, hidden, keys, values, value_ids,
            expert_ids, gate_weights, neuron_ids, activations, num_experts,
            dot_precision(hidden.dtype))
    else:
        grad_raw = torch.empty(0, topk, dtype=torch.float32, device=device)
        grad_w = torch.empty(0, experts_per_token, dtype=torch.float32, device=device)
        grad_raw_table = act_table = torch.empty(0, neurons_per_expert, dtype=hidden.dtype,
                                                 device=device)
    if gate == "logit":
        grad_hidden = torch.empty(num_tokens, key_width, dtype=hidden.dtype, device=device)
        row_gather_sum(grad_hidden, grad_raw, neuron_ids, keys, grad_w, expert_ids, router_weight)
    else:
        grad_logits = _softmax_gate_grad(hidden, router_weight, expert_ids, gate_weights, grad_w,
                                         gate_lse)
        key_term = torch.empty(num_tokens, key_width, dtype=torch.float32, device=device)
        row_gather_sum(key_term, grad_raw, neuron_ids, keys)
        grad_hidden = key_term.add_(grad_logits @ router_weight).to(hidden.dtype)

    if not param_grads:
        return SparseKVGrads(grad_hidden, None, None, None, None, None, None)

    grad_router = rows = None
    if gate == "logit":
        # row-sparse outputs run only the experts owning a picked row, the rest have dG = 0;
        # dense outputs and dG alone (factored) run every expert
        grad_router = (torch.empty if dense or factored else torch.zeros)(
            num_experts, key_width, dtype=router_weight.dtype, device=device)
    row_ids = key_rows = value_rows = grad_keys = grad_values = key_out = value_out = None
    if dense:
        grad_keys = torch.empty(num_neurons, key_width, dtype=keys.dtype, device=device)
        grad_values = torch.empty(num_neurons, value_width, dtype=values.dtype, device=device)
        key_out, value_out = grad_keys, grad_values
    elif not factored:
        rows = picked_rows(neuron_ids, num_neurons, num_experts)
        row_ids = rows.row_ids
        key_rows = torch.empty(row_ids.numel(), key_width, dtype=torch.float32, device=device)
        value_rows = torch.empty(row_ids.numel(), value_width, dtype=torch.float32, device=device)
        key_out, value_out = key_rows, value_rows
    if key_out is not None or grad_router is not None:  # (factored under "softmax": nothing to run)
        order, offsets = expert_segments(expert_ids, num_experts)
        expert_grads(grad_raw_table, act_table, grad_w, hidden, grad_y, order, offsets,
                     experts_per_token, neurons_per_expert, key_out, value_out, grad_router, rows,
                     dot_precision(hidden.dtype))
    if gate == "softmax":
        grad_router = (grad_logits.T @ hidden).to(router_weight.dtype)
    return SparseKVGrads(grad_hidden, grad_router, row_ids, key_rows, value_rows, grad_keys,
                         grad_values, grad_raw if factored else None)
