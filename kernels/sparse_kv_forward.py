"""Sparse key-value forward: y = sum over each token's top-K candidates j of ReLU(s_j) V_j.

Three launches, none of which forms a [T, N] or [T, P*S, d] tensor:

1. key scores: (token, expert) pairs sorted by expert; each program multiplies one block of
   same-expert tokens [BLOCK_M, r] by a slice of that expert's keys [r, BLOCK_S] on tensor
   cores and writes s = w_e * (K x) into the per-token candidate scores [T, P*S] (fp32).
2. select: per token, the min(K_top, P*S)-th largest candidate score, bit by bit from the top
   of the scores' order-preserving 32-bit keys (32 counting passes, no sort; a row of up to
   4096 candidates is read once and counted in registers, a longer one streamed per pass),
   then the winners (ties: the lowest candidate indices) are compacted in candidate order
   into ``neuron_ids [T, K_top]`` and ``activations = ReLU(s) [T, K_top]``.
3. values: y[t] = sum_k a[t, k] V[neuron_ids[t, k]], on tensor cores for 16-bit values
   (row_gather_sum: blocks of 16 tokens, their picks' rows times a block-diagonal operand).

Widths: the key input x and the keys have width r (r = d, or MEFT's ``low_key_dim`` with
x = L h computed by the caller); the values and y have width d.

K_top > P*S (allowed up to N): the top-K_top over all N with non-candidates scoring 0 is every
candidate followed by non-candidates. Slots P*S .. K_top-1 get the first K_top - P*S neurons,
in ascending id order, of the experts the token did not select, with activation 0: real,
distinct rows (so unique-id bookkeeping, slot gathers and offload copies work unchanged) that
add nothing to y and get zero gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grouping import block_pairs, expert_blocks, surplus_neurons
from .row_gather_sum import row_gather_sum
from .validation import (FLOAT_DTYPES, INDEX_DTYPES, check_devices, check_ids_in_range,
                         check_int_arg, check_same_dtype, check_shape, check_tensor,
                         dot_precision, pow2_block)


@triton.jit
def _key_scores_kernel(
    hidden_ptr, keys_ptr, gate_weights_ptr, scores_ptr,
    order_ptr, block_start_ptr, block_end_ptr, block_expert_ptr,
    hidden_size, neurons_per_expert,
    experts_per_token: tl.constexpr,  # a constant divisor: no 64-bit division per pair
    stride_ht, stride_hd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    start = tl.load(block_start_ptr + block)
    end = tl.load(block_end_ptr + block)
    if start >= end:
        return
    expert, pair_ok, pair, token = block_pairs(block, order_ptr, block_expert_ptr, start, end, experts_per_token,
                                               BLOCK_M)
    offs_s = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < neurons_per_expert
    neuron = expert * neurons_per_expert + offs_s

    acc = tl.zeros([BLOCK_M, BLOCK_S], tl.float32)
    for d0 in range(0, hidden_size, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < hidden_size
        h = tl.load(hidden_ptr + token[:, None] * stride_ht + dims[None, :] * stride_hd,
                    mask=pair_ok[:, None] & dim_ok[None, :], other=0.0)
        k = tl.load(keys_ptr + neuron[None, :] * stride_kn + dims[:, None] * stride_kd,
                    mask=s_ok[None, :] & dim_ok[:, None], other=0.0)
        acc = tl.dot(h, k, acc, input_precision=DOT_PRECISION)
    weight = tl.load(gate_weights_ptr + pair, mask=pair_ok, other=0.0)
    num_candidates = experts_per_token * neurons_per_expert
    column = (pair % experts_per_token) * neurons_per_expert
    out = scores_ptr + token[:, None] * num_candidates + column[:, None] + offs_s[None, :]
    tl.store(out, acc * weight[:, None], mask=pair_ok[:, None] & s_ok[None, :])


@triton.jit
def _order_key(x):
    """A uint32 that orders like the float32 x (NaN above +inf, as torch.topk ranks it; 0 only
    for the NaN with every bit set, below -inf)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) ^ -2147483648  # signed order -> unsigned
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def _relu_of_key(key):
    """ReLU of the float32 whose _order_key is ``key`` (so the scores need not stay in
    registers beside their keys): keys from 2^31 up are the non-negative floats (and +NaN),
    keys below -inf's (2^23 - 1) the negative NaNs, which stay NaN."""
    positive = (key ^ 0x80000000).to(tl.float32, bitcast=True)
    return tl.where(key >= 0x80000000, positive, tl.where(key < 0x7FFFFF, float("nan"), 0.0))


@triton.jit
def _candidate_keys(score_rows, tokens, c0, num_tokens, num_candidates, BLOCK_C: tl.constexpr):
    """The candidates c0 .. c0 + BLOCK_C - 1 of each row: their indices, the order keys of
    their scores (0 outside the rows) and the in-range mask."""
    cand = c0 + tl.arange(0, BLOCK_C)
    ok = (tokens < num_tokens)[:, None] & (cand < num_candidates)[None, :]
    score = tl.load(score_rows[:, None] + cand[None, :], mask=ok, other=0.0)
    return cand, tl.where(ok, _order_key(score), 0), ok


@triton.jit
def _select_topk_kernel(
    scores_ptr, expert_ids_ptr, neuron_ids_ptr, activations_ptr,
    num_tokens, num_candidates, experts_per_token, out_stride,
    NEURONS_PER_EXPERT: tl.constexpr, TOPK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr, RESIDENT: tl.constexpr,
):
    # TOPK <= num_candidates picks per token, written to the first TOPK columns of rows of
    # out_stride (= K_top) picks. RESIDENT (num_candidates <= BLOCK_C): each row's keys are
    # read once and stay in registers for the 32 counting passes; else every pass streams them.
    # S is a compile-time constant: a candidate's slot and neuron cost a multiply, not a division.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    score_rows = scores_ptr + tokens * num_candidates
    if RESIDENT:
        key = _candidate_keys(score_rows, tokens, 0, num_tokens, num_candidates, BLOCK_C)[1]

    # thr = each row's TOPK-th largest key, its bits from the top: the largest value with
    # count(key >= thr) >= TOPK. Keys outside the rows are 0 and every trial is >= 1, so they
    # never count. A row is done early once exactly TOPK keys are >= thr (the K_top-th and the
    # next key already differ above the remaining bits): its picks are then the keys >= thr,
    # which the compaction below takes as "above, then every tie". Distinct random scores stop
    # after about 15 of the 32 passes; equal K_top-th and next keys take all 32.
    thr = tl.zeros([BLOCK_T], tl.uint32)
    at_thr = tl.where(tokens < num_tokens, num_candidates, TOPK)  # count(key >= thr); padding rows: done
    bit = tl.full([], 0x80000000, tl.uint32)
    while (bit != 0) & (tl.max(at_thr, axis=0) > TOPK):
        trial = thr | bit
        if RESIDENT:
            count = tl.sum((key >= trial[:, None]).to(tl.int32), axis=1)
        else:
            count = tl.zeros([BLOCK_T], tl.int32)
            for c0 in range(0, num_candidates, BLOCK_C):
                chunk = _candidate_keys(score_rows, tokens, c0, num_tokens, num_candidates, BLOCK_C)[1]
                count += tl.sum((chunk >= trial[:, None]).to(tl.int32), axis=1)
        take = count >= TOPK
        thr = tl.where(take, trial, thr)
        at_thr = tl.where(take, count, at_thr)
        bit = bit >> 1

    num_above = tl.zeros([BLOCK_T], tl.int32)
    if RESIDENT:
        num_above = tl.sum((key > thr[:, None]).to(tl.int32), axis=1)
    else:
        for c0 in range(0, num_candidates, BLOCK_C):
            chunk = _candidate_keys(score_rows, tokens, c0, num_tokens, num_candidates, BLOCK_C)[1]
            num_above += tl.sum((chunk > thr[:, None]).to(tl.int32), axis=1)
    ties_needed = (TOPK - num_above)[:, None]

    # Compaction: everything above the threshold, then the first ties_needed ties in
    # candidate order, each row's picks in candidate order.
    written = tl.zeros([BLOCK_T], tl.int32)
    ties_seen = tl.zeros([BLOCK_T], tl.int32)
    expert_rows = expert_ids_ptr + tokens * experts_per_token
    id_rows = neuron_ids_ptr + tokens * out_stride
    activation_rows = activations_ptr + tokens * out_stride
    for c0 in range(0, num_candidates, BLOCK_C):
        cand, chunk, ok = _candidate_keys(score_rows, tokens, c0, num_tokens, num_candidates, BLOCK_C)
        tie = (chunk == thr[:, None]) & ok
        tie_rank = ties_seen[:, None] + tl.cumsum(tie.to(tl.int32), axis=1)
        chosen = (chunk > thr[:, None]) | (tie & (tie_rank <= ties_needed))
        position = written[:, None] + tl.cumsum(chosen.to(tl.int32), axis=1) - 1
        slot = (cand // NEURONS_PER_EXPERT).to(tl.int32)
        expert = tl.load(expert_rows[:, None] + slot[None, :], mask=chosen, other=0)
        neuron = expert.to(tl.int32) * NEURONS_PER_EXPERT + (cand % NEURONS_PER_EXPERT).to(tl.int32)[None, :]
        tl.store(id_rows[:, None] + position, neuron, mask=chosen)
        tl.store(activation_rows[:, None] + position, _relu_of_key(chunk), mask=chosen)
        written += tl.sum(chosen.to(tl.int32), axis=1)
        ties_seen += tl.sum(tie.to(tl.int32), axis=1)


#: the longest candidate row (P * S) whose keys the select keeps in registers
SELECT_RESIDENT_CANDIDATES = 4096


def _check_selection_inputs(hidden, keys, expert_ids, gate_weights, num_experts, topk, check_ids):
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    check_tensor("keys", keys, 2, FLOAT_DTYPES)
    check_tensor("expert_ids", expert_ids, 2, INDEX_DTYPES)
    check_tensor("gate_weights", gate_weights, 2, (torch.float32,))
    check_same_dtype(hidden=hidden, keys=keys)
    check_devices(hidden=hidden, keys=keys, expert_ids=expert_ids, gate_weights=gate_weights)
    num_tokens, hidden_size = hidden.shape
    num_neurons = keys.shape[0]
    if keys.shape[1] != hidden_size:
        raise ValueError(f"keys must have shape [N, {hidden_size}] (hidden's width r), "
                         f"got {tuple(keys.shape)}")
    check_int_arg("num_experts", num_experts, 1, num_neurons)
    if num_neurons % num_experts:
        raise ValueError(f"num_experts ({num_experts}) must divide the number of key rows ({num_neurons})")
    experts_per_token = expert_ids.shape[1]
    check_int_arg("expert_ids.shape[1] (experts per token)", experts_per_token, 1, num_experts)
    check_shape("expert_ids", expert_ids, (num_tokens, experts_per_token))
    check_shape("gate_weights", gate_weights, (num_tokens, experts_per_token))
    check_int_arg("topk", topk, 1, num_neurons)
    if check_ids:
        check_ids_in_range("expert_ids", expert_ids, num_experts)


def sparse_kv_select(hidden, keys, expert_ids, gate_weights, num_experts: int, topk: int,
                     check_ids: bool = True):
    """MEFT steps 2-3: each token's ``topk`` best candidates among its experts' neurons.

    Args:
        hidden: [T, r], the key input (h, or x = L h with a low-key projection),
            fp16/bf16/fp32, any strides.
        keys: [N, r], hidden's dtype and device; expert e owns rows e*S .. e*S+S-1, S = N / E.
        expert_ids: [T, P] int32/int64, each row's distinct experts.
        gate_weights: [T, P] float32, the gate weight w_e of each selected expert.
        num_experts: E, dividing N.
        topk: K_top, in [1, N]. Past P * S the surplus slots hold non-candidate neurons
            (the first ones of the unselected experts, ascending) with activation 0.
        check_ids: verify ``expert_ids`` lie in [0, E) (one device sync); callers passing the
            router kernel's own output may skip it.

    Returns ``(neuron_ids [T, K_top] int32, activations = ReLU(s) [T, K_top] float32)``.
    """
    _check_selection_inputs(hidden, keys, expert_ids, gate_weights, num_experts, topk, check_ids)
    num_tokens, hidden_size = hidden.shape
    experts_per_token = expert_ids.shape[1]
    neurons_per_expert = keys.shape[0] // num_experts
    num_candidates = experts_per_token * neurons_per_expert
    device = hidden.device
    neuron_ids = torch.empty(num_tokens, topk, dtype=torch.int32, device=device)
    activations = torch.empty(num_tokens, topk, dtype=torch.float32, device=device)
    if num_tokens == 0:
        return neuron_ids, activations
    expert_ids = expert_ids.contiguous()
    gate_weights = gate_weights.contiguous()

    block_m = 16 if num_tokens * experts_per_token <= 16 * num_experts else 64
    block_s = pow2_block(neurons_per_expert, 16, 64)
    block_d = pow2_block(hidden_size, 16, 64)
    order, block_start, block_end, block_expert = expert_blocks(expert_ids, num_experts, block_m)
    scores = torch.empty(num_tokens, num_candidates, dtype=torch.float32, device=device)
    grid = (block_start.numel(), triton.cdiv(neurons_per_expert, block_s))
    _key_scores_kernel[grid](
        hidden, keys, gate_weights, scores, order, block_start, block_end, block_expert,
        hidden_size, neurons_per_expert, experts_per_token,
        hidden.stride(0), hidden.stride(1), keys.stride(0), keys.stride(1),
        BLOCK_M=block_m, BLOCK_S=block_s, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(hidden.dtype),
    )
    # rows of up to 4096 candidates stay in registers, 16 keys per thread (at 32 the compiled
    # code is barely faster and takes all 255 registers): one warp holds 512 keys (several
    # tokens of a short row, no cross-warp sums), more warps a longer row
    block_c = pow2_block(num_candidates, 16, SELECT_RESIDENT_CANDIDATES)
    block_t = max(1, 512 // block_c)
    _select_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
        scores, expert_ids, neuron_ids, activations,
        num_tokens, num_candidates, experts_per_token, topk,
        NEURONS_PER_EXPERT=neurons_per_expert, TOPK=min(topk, num_candidates), BLOCK_T=block_t, BLOCK_C=block_c,
        RESIDENT=num_candidates <= block_c, num_warps=max(1, block_c // 512),
    )
    if topk > num_candidates:
        # every candidate is taken; the rest of the top-K_top over all N are neurons scoring 0
        neuron_ids[:, num_candidates:] = surplus_neurons(
            expert_ids, neurons_per_expert, num_experts, topk - num_candidates).to(torch.int32)
        activations[:, num_candidates:] = 0.0
    return neuron_ids, activations


def sparse_kv_values(activations, row_ids, values, check_ids: bool = True):
    """MEFT step 4: ``y[t] = sum_k activations[t, k] * values[row_ids[t, k]]``, [T, d] in
    values' dtype (d: values' width, which need not be the keys' width r).

    ``values`` is the whole [N, d] table (``row_ids`` = neuron ids) or any [U, d] set of rows
    with ``row_ids`` indexing into it, e.g. a prefetch slot holding just the active rows.
    """
    check_tensor("activations", activations, 2, (torch.float32,))
    check_tensor("row_ids", row_ids, 2, INDEX_DTYPES)
    check_tensor("values", values, 2, FLOAT_DTYPES)
    check_devices(activations=activations, row_ids=row_ids, values=values)
    check_shape("row_ids", row_ids, tuple(activations.shape))
    if check_ids:
        check_ids_in_range("row_ids", row_ids, values.shape[0])
    y = torch.empty(activations.shape[0], values.shape[1], dtype=values.dtype, device=values.device)
    return row_gather_sum(y, activations.contiguous(), row_ids.contiguous(), values)


def sparse_kv_forward(hidden, keys, values, expert_ids, gate_weights, num_experts: int,
                      topk: int, check_ids: bool = True):
    """MEFT steps 2-4 for tokens whose experts are already chosen: :func:`sparse_kv_select`
    then :func:`sparse_kv_values` (arguments as there; ``values`` [N, d], d any width: with a
    low-key projection ``hidden`` and ``keys`` have width r and ``values`` the model's d).

    Returns ``(y [T, d] in hidden's dtype, neuron_ids [T, K_top] int32,
    activations [T, K_top] float32)``; the last two are what the backward needs.
    """
    check_tensor("values", values, 2, FLOAT_DTYPES)
    check_same_dtype(hidden=hidden, values=values)
    check_tensor("keys", keys, 2, FLOAT_DTYPES)
    if values.shape[0] != keys.shape[0]:
        raise ValueError(f"values must have shape [N={keys.shape[0]}, d] (a row per key row), "
                         f"got {tuple(values.shape)}")
    neuron_ids, activations = sparse_kv_select(hidden, keys, expert_ids, gate_weights,
                                               num_experts, topk, check_ids)
    y = sparse_kv_values(activations, neuron_ids, values, check_ids=False)
    return y, neuron_ids, activations
