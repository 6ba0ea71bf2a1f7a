"""dK and dV from saved factors: many calls' gradient rows in one grouped GEMM.

A call's key/value gradients are sums of rank-1 terms over its picks (sparse_kv_backward):

    dK_j = sum_{(t, k): n_tk = j} dr_tk x_t        dV_j = sum_{(t, k): n_tk = j} a_tk dy_t

so x [T, r], dy [T, d], the picks n [T, K] with their score gradients dr and activations a
[T, K], and the experts [T, P] (the pairs' grouping) determine them: T (r + d) numbers
where the rows take U (r + d), U the distinct picked rows. At MEFT's shapes one micro-batch
of T tokens touches U >> T rows (paper-7b: T = 256, U ~ 7,200), so placement "cpu" keeps
each backward's factors instead of its rows and computes the rows of many micro-batches at
once (meft_triton/offload/resident.py ``GradientFactors``): the tokens of all of them
concatenated are one call's worth of pairs for the per-expert GEMMs of expert_grads.

The coefficient tables those GEMMs read ([T * P, S] in the compute dtype, the candidate
layout) are rebuilt from the picks by score_grads' pick-table scatter, so they hold exactly
what sparse_kv_backward's own launch reads; only the order of the fp32 sums differs (all
tokens in one run per expert instead of one run per call).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .expert_grads import expert_grads, picked_rows
from .grouping import expert_segments
from .score_grads import fill_pick_table
from .validation import (FLOAT_DTYPES, INDEX_DTYPES, check_devices, check_ids_in_range, check_int_arg,
                         check_same_dtype, check_shape, check_tensor, dot_precision)


class KeyValueRows(NamedTuple):
    """Row-sparse key/value gradients: ``row_ids`` [R] (the distinct picked rows ascending, then
    repeats of the largest with zero rows: R = min(N, T * K) is host-known) and ``rows``
    [R, r + d], each row's key gradient then its value gradient."""

    row_ids: torch.Tensor
    rows: torch.Tensor


def key_value_rows(hidden, grad_y, expert_ids, neuron_ids, pick_grads, activations, num_neurons: int,
                   num_experts: int, out_dtype: torch.dtype | None = None, check_ids: bool = True) -> KeyValueRows:
    """dK and dV rows of the calls whose factors are concatenated along the tokens (module
    docstring): ``hidden`` [T, r] the key input x, ``grad_y`` [T, d] (same float dtype),
    ``expert_ids`` [T, P], ``neuron_ids`` [T, K], ``pick_grads`` [T, K] fp32 (what
    ``sparse_kv_backward(..., factored=True)`` returns) and ``activations`` [T, K] fp32.
    ``out_dtype``: the rows' dtype (default fp32; the sums run in fp32 either way).
    ``check_ids`` verifies the ids are in range (one device sync)."""
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    check_tensor("grad_y", grad_y, 2, FLOAT_DTYPES)
    check_tensor("expert_ids", expert_ids, 2, INDEX_DTYPES)
    check_tensor("neuron_ids", neuron_ids, 2, INDEX_DTYPES)
    check_tensor("pick_grads", pick_grads, 2, (torch.float32,))
    check_tensor("activations", activations, 2, (torch.float32,))
    check_same_dtype(hidden=hidden, grad_y=grad_y)
    check_devices(hidden=hidden, grad_y=grad_y, expert_ids=expert_ids, neuron_ids=neuron_ids,
                  pick_grads=pick_grads, activations=activations)
    check_int_arg("num_experts", num_experts, 1, 2 ** 31 - 1)
    check_int_arg("num_neurons", num_neurons, num_experts, 2 ** 31 - 1)
    if num_neurons % num_experts:
        raise ValueError(f"num_experts ({num_experts}) must divide num_neurons ({num_neurons})")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    num_tokens = hidden.shape[0]
    check_shape("grad_y", grad_y, (num_tokens, grad_y.shape[1]))
    check_shape("expert_ids", expert_ids, (num_tokens, expert_ids.shape[1]))
    check_shape("neuron_ids", neuron_ids, (num_tokens, neuron_ids.shape[1]))
    check_shape("pick_grads", pick_grads, tuple(neuron_ids.shape))
    check_shape("activations", activations, tuple(neuron_ids.shape))
    if check_ids:
        check_ids_in_range("expert_ids", expert_ids, num_experts)
        check_ids_in_range("neuron_ids", neuron_ids, num_neurons)

    key_width, value_width = hidden.shape[1], grad_y.shape[1]
    experts_per_token = expert_ids.shape[1]
    neurons_per_expert = num_neurons // num_experts
    device = hidden.device
    expert_ids, neuron_ids = expert_ids.contiguous(), neuron_ids.contiguous()
    rows = picked_rows(neuron_ids, num_neurons, num_experts)
    out = torch.empty(rows.row_ids.numel(), key_width + value_width, dtype=out_dtype, device=device)
    if num_tokens == 0:
        return KeyValueRows(rows.row_ids, out)
    table_shape = (num_tokens * experts_per_token, neurons_per_expert)
    tables = []
    for picks in (pick_grads, activations):
        table = torch.zeros(table_shape, dtype=hidden.dtype, device=device)
        fill_pick_table(table, picks.contiguous(), neuron_ids, expert_ids, neurons_per_expert, gather=False)
        tables.append(table)
    order, offsets = expert_segments(expert_ids, num_experts)
    # no dG here: the dw operand is unused and any tensor stands in for it
    expert_grads(tables[0], tables[1], tables[0], hidden, grad_y, order, offsets, experts_per_token,
                 neurons_per_expert, out[:, :key_width], out[:, key_width:], None, rows,
                 dot_precision(hidden.dtype))
    return KeyValueRows(rows.row_ids, out)
