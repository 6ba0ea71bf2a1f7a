"""Comparisons against meft_triton.reference shared by the kernel and layer tests."""

from __future__ import annotations

import torch

from meft_triton import reference


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (0 when both are all zero)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not actual.isnan().any(), "NaN in the result: an output element was never written"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_topk_choice(values: torch.Tensor, chosen: torch.Tensor, k: int, tol: float) -> None:
    """``chosen`` [T, k] holds k distinct column indices per row of ``values`` [T, C], each
    at least as large as every unchosen value up to ``tol`` (near-ties may go either way)."""
    assert chosen.shape == (values.shape[0], k)
    chosen = chosen.long().cpu()
    values = values.double().cpu()
    assert (chosen >= 0).all() and (chosen < values.shape[1]).all()
    assert (chosen.sort(1).values.diff(dim=1) > 0).all(), "a column was chosen twice"
    taken = torch.zeros_like(values, dtype=torch.bool).scatter_(1, chosen, True)
    worst_taken = values.masked_fill(~taken, float("inf")).min(1).values
    best_left = values.masked_fill(taken, float("-inf")).max(1).values
    scale = values.abs().max().clamp_min(1e-30)
    assert (best_left <= worst_taken + tol * scale).all(), "a better candidate was left out"


def float64_grads(hidden, router_weight, keys, values, experts_per_token, topk, gate, grad_y,
                  expert_ids=None, neuron_ids=None):
    """y and the four gradients of the reference in float64 at the given selections."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (hidden, router_weight, keys, values)]
    y = reference.meft_forward(*leaves, experts_per_token, topk, gate,
                               expert_ids=None if expert_ids is None else expert_ids.long().cpu(),
                               neuron_ids=None if neuron_ids is None else neuron_ids.long().cpu())
    y.backward(grad_y.double().cpu())
    return y.detach(), [leaf.grad for leaf in leaves]


def candidate_scores64(hidden, keys, expert_ids, gate_weights, neurons_per_expert):
    """Float64 scores of each token's candidates, [T, P * S], and their neuron ids."""
    scores = reference.candidate_scores(hidden.double().cpu(), keys.double().cpu(),
                                        expert_ids.long().cpu(), gate_weights.double().cpu(),
                                        neurons_per_expert)
    return scores, reference.candidate_ids(expert_ids.long().cpu(), neurons_per_expert)


def selected_rows(adapter, hidden):
    """The distinct rows the reference selects for ``hidden`` with ``adapter``'s weights (through
    its low-key projection, if any): the rows a placement-"cpu" call moves."""
    cfg = adapter.config
    flat = adapter.key_input(hidden.reshape(-1, adapter.hidden_size))
    _, expert_ids, weights = reference.route(flat, adapter.router.weight, cfg.experts_per_token, cfg.gate)
    _, neuron_ids, _ = reference.sparse_kv_forward(flat, adapter.keys, adapter.values, expert_ids, weights,
                                                   cfg.neurons_per_expert, cfg.topk)
    return neuron_ids.unique()


def assert_placements_agree(on_gpu, on_cpu, hidden, y_tol: float = 1e-5):
    """Placement "cpu" gives placement "gpu"'s forward (to ``y_tol``), dh, d router and key/value
    gradient rows (1e-5) for ``hidden``. Returns the fp32 gradient rows the backward shipped to
    the host (residency "per-micro-batch": under "resident" they wait on the device for the step)."""
    assert on_cpu.config.residency == "per-micro-batch", "reads the rows one backward ships home"
    h_gpu, h_cpu = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    y_gpu, y_cpu = on_gpu(h_gpu), on_cpu(h_cpu)
    assert y_cpu.shape == y_gpu.shape
    assert rel_err(y_cpu, y_gpu) < y_tol
    grad_y = torch.randn_like(y_gpu)
    y_gpu.backward(grad_y)
    y_cpu.backward(grad_y)
    assert rel_err(h_cpu.grad, h_gpu.grad) < 1e-5
    assert rel_err(on_cpu.router.weight.grad, on_gpu.router.weight.grad) < 1e-5
    if on_gpu.low_key is not None:
        assert rel_err(on_cpu.low_key.weight.grad, on_gpu.low_key.weight.grad) < 1e-5
    grads = on_cpu.offload.pending_grads[0].result()
    assert grads.rows.device.type == "cpu"
    r, rows = on_gpu.key_size, grads.row_ids.to(hidden.device)  # rows are [dK (r wide) | dV]
    assert rel_err(grads.rows[:, :r], on_gpu.keys.grad[rows]) < 1e-5
    assert rel_err(grads.rows[:, r:], on_gpu.values.grad[rows]) < 1e-5
    return grads


def take_grad_rows(offloaded) -> tuple[torch.Tensor, torch.Tensor]:
    """A placement-"cpu" layer's gradient rows since the last step, summed per row and taken
    off the layer: ``(row_ids [U] sorted, rows [U, 2d] = [dK | dV])``, on the CPU. Residency
    "resident" sends its device sums home first (their zero padding rows add nothing)."""
    offloaded.flush_grads()
    summed: dict[int, torch.Tensor] = {}
    for future in offloaded.pending_grads:
        grad = future.result()
        for row_id, row in zip(grad.row_ids.tolist(), grad.rows):
            summed[row_id] = summed.get(row_id, 0) + row
    offloaded.pending_grads.clear()
    ids = sorted(summed)
    return torch.tensor(ids, dtype=torch.int64), torch.stack([summed[i] for i in ids])


def adapter_tensors(adapters) -> list[torch.Tensor]:
    """Every trained tensor of some adapters: router, keys, values (placement "cpu": the master
    rows, after any in-flight update)."""
    return [t for a in adapters for t in (a.router.weight, *a.master_rows())]


def record_sent_grads(monkeypatch, offloaded) -> list:
    """Every gradient copy home that ``offloaded`` (an ``OffloadedRows``) starts from now on,
    in order, as Futures of ``GradRows``; they are still summed into its optimizer as usual."""
    sent = []
    real = offloaded.grads_sent

    def recording(future):
        sent.append(future)
        real(future)

    monkeypatch.setattr(offloaded, "grads_sent", recording)
    return sent
