"""GPU and CPU bytes by component, per placement and residency policy.

What each component counts (L adapted layers, N rows, key width r, hidden d, compute-dtype
element size es; U: rows a micro-batch touches, V: rows the step touches):

* backbone: the frozen weights in the compute dtype.
* activations (an estimate): what a Llama-style decoder layer saves for backward per token,
  in the compute dtype: the two RMSNorm inputs (2d), q, k, v (d + 2 kv), the attention output
  (d; flash attention keeps no T x T scores), the SwiGLU gate, up, silu(gate) and their
  product (4 ffn), plus the adapter's saved hidden row (d) and its ids / activations
  (K_top x 16 B); plus the logits and their fp32 softmax for the loss (vocab x (es + 4)).
  With gradient checkpointing: each layer's input (d) and one layer's full set.
* router: fp32 weight, gradient and two AdamW moments (E x r x 16 B per layer).
* placement "gpu": fp32 keys and values, their dense fp32 gradients and AdamW moments
  (N (r + d) x 16 B per layer), and the compute-dtype copies autograd saves for backward (the
  adapter casts its fp32 parameters per call: N (r + d) x es per layer).
* placement "cpu": the key cache (N r es per layer); the value slots (2 slots of min(N, T K_top)
  rows, the host-known bound of a call's active ids) and the key write-back's 2 staging slots; under "keep" every layer's
  forward rows until its backward; the gradient rows of one layer's backward (fp32 dK, dV and
  their concatenation); under "resident" the resident value rows and the fp32 gradient sums,
  within their budgets; with gradient_form "factors" instead of the sums and the backward's
  rows, the factors of F micro-batches per layer (resident.py ``GradientFactors.token_bytes``
  per token) and one layer's flush: its rows in the compute dtype and the two coefficient
  tables key_value_rows builds (F T P S es each).
* CPU RAM (placement "cpu"): fp32 masters and two AdamW moments (N (r + d) x 12 B per layer);
  where gradient rows come home during the step, two gradient accumulators per layer (one
  fills while the other steps), each grown like SparseRowAdamW's (at least double, capped at
  N; a step's single batch of rows is read as it came, without them); per-micro-batch: every micro-batch's fp32
  gradient rows held pinned until the step; resident: one compute-dtype staging copy of the
  summed gradients, and with zero_copy (16-bit compute dtype) the shadow of the values it reads.
"""

from __future__ import annotations

from meft_triton.offload.resident import GradientFactors  # the runtime's bytes per held token

from .inputs import Backbone, Batch
from .routing import RoutingProfile
from .traffic import FP32, ID_BYTES

#: rows per key write-back staging slot (meft_triton/offload/key_cache.py WRITE_BACK_CHUNK_ROWS)
WRITE_BACK_CHUNK_ROWS = 8192


def slot_rows(num_neurons: int, tokens: int, topk: int) -> int:
    """The prefetch slots' rows: a call's active ids have the host-known length min(N, T K_top)
    (meft_triton/layer/backend.py ``unique_ids``: no host read of the distinct count), so the
    runtime sizes its slots by that bound on the first call and never grows them."""
    return min(num_neurons, tokens * topk)


def accumulator_rows(cumulative: tuple[int, ...], num_rows: int) -> int:
    cap = 0
    for need in cumulative:
        if need > cap:
            cap = min(num_rows, max(need, 2 * cap))
    return cap


def activation_bytes(backbone: Backbone, batch: Batch, topk: int) -> float:
    d, f, kv, es = backbone.hidden_size, backbone.ffn_hidden, backbone.kv_width, batch.es
    per_token_layer = es * (2 * d + d + 2 * kv + d + 4 * f + d) + 16 * topk
    logits = batch.tokens * backbone.vocab_size * (es + FP32)
    if batch.checkpointing:
        return batch.tokens * (backbone.layers * d * es + per_token_layer) + logits
    return batch.tokens * backbone.layers * per_token_layer + logits


def common_gpu_bytes(backbone: Backbone, batch: Batch, num_experts: int, key_width: int, topk: int) -> dict:
    return {
        "backbone": float(backbone.params * batch.es),
        "activations": float(activation_bytes(backbone, batch, topk)),
        "router + AdamW": float(backbone.layers * num_experts * key_width * 16),
    }


def gpu_placement_bytes(backbone: Backbone, batch: Batch, num_neurons: int, key_width: int) -> dict:
    rows = backbone.layers * num_neurons * (key_width + backbone.hidden_size)
    return {"keys + values, grads, AdamW (fp32)": float(rows * 16),
            "compute-dtype copies saved for backward": float(rows * batch.es)}


def cpu_placement_bytes(backbone: Backbone, batch: Batch, profile: RoutingProfile, *, num_neurons: int,
                        key_width: int, topk: int, policy: str, backward_rows: str, value_share: float = 1.0,
                        grad_share: float = 1.0, factor_period: int | None = None, num_experts: int = 1,
                        experts_per_token: int = 1) -> dict:
    """``factor_period``: gradient_form "factors" holding that many micro-batches per layer
    (None: the rows form; ``grad_share`` is then the sums' share)."""
    d, r, es, L = backbone.hidden_size, key_width, batch.es, backbone.layers
    max_v = max(layer.per_step for layer in profile.layers)
    bound = slot_rows(num_neurons, batch.tokens, topk)
    out = {
        "key cache": float(L * num_neurons * r * es),
        "value slots": float(2 * bound * d * es + 2 * min(max_v, WRITE_BACK_CHUNK_ROWS) * r * es),
    }
    if factor_period is None:
        out["gradient rows (one backward)"] = float(2 * bound * (r + d) * FP32)
    else:
        held = factor_period * batch.tokens
        tables = 2 * held * experts_per_token * (num_neurons // num_experts) * es
        out["gradient rows (one flush)"] = float(min(num_neurons, factor_period * bound) * (r + d) * es + tables)
    if backward_rows == "keep":
        kept = sum(max(layer.per_micro_batch) for layer in profile.layers) * d * es
        # resident rows serve the backward; only evicted ones would be kept
        out["kept forward rows"] = float(kept if policy == "per-micro-batch" else (1 - value_share) * kept)
    if policy == "resident":
        out["resident value rows"] = float(value_share * sum(l.per_step for l in profile.layers) * d * es)
        if factor_period is None:
            out["gradient sums (fp32)"] = float(grad_share * sum(l.per_step for l in profile.layers) * (r + d) * FP32)
        else:
            out["gradient factors"] = float(L * factor_period * batch.tokens * GradientFactors.token_bytes(
                key_width=r, hidden=d, experts_per_token=experts_per_token, topk=topk, es=es))
    return out


def cpu_ram_bytes(backbone: Backbone, batch: Batch, profile: RoutingProfile, *, num_neurons: int,
                  key_width: int, topk: int, policy: str, transfer: str, in_step_sends: bool = True) -> dict:
    """``in_step_sends``: gradient rows come home during the step, not only at it (the fp32
    accumulators exist only then: a step's single batch is read as it came)."""
    d, r, es, L = backbone.hidden_size, key_width, batch.es, backbone.layers
    out = {"masters + AdamW moments (fp32)": float(L * num_neurons * (r + d) * 12)}
    if in_step_sends or policy == "per-micro-batch":
        acc = sum(accumulator_rows(l.cumulative, num_neurons) for l in profile.layers)
        out["gradient accumulators"] = float(2 * acc * (r + d) * FP32)
    if policy == "per-micro-batch":
        # each backward's rows are summed as they land (offload/rows.py grads_sent): one
        # micro-batch's landing while the one before is summed
        rows = L * min(2, profile.micro_batches()) * slot_rows(num_neurons, batch.tokens, topk)  # padded, as sent
        out["pinned gradient rows (in flight)"] = float(rows * ((r + d) * FP32 + ID_BYTES))
    else:
        out["pinned gradient staging"] = float(sum(l.per_step for l in profile.layers) * ((r + d) * es + ID_BYTES))
    if transfer == "zero_copy" and es < FP32:  # the zero-copy kernel reads it, under either policy
        out["compute-dtype value shadow"] = float(L * num_neurons * d * es)
    return out
