"""Placement "cpu": same math as placement "gpu", same training with the same lazy AdamW."""

import pytest
import torch

from meft_triton import MEFTAdapter, MEFTConfig, reference
from meft_triton import SparseRowAdamW
from meft_triton.offload import CPURowStore
from oracle import assert_placements_agree, record_sent_grads, rel_err, selected_rows, take_grad_rows

BASE = dict(num_neurons=48, num_experts=6, experts_per_token=2, topk=5, key_init_std=1.0,
            value_init_std=1.0, router_init_scale=0.3)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pair(backend="torch", device="cpu", **changes):
    cfg = MEFTConfig(**{**BASE, "backend": backend, **changes})
    on_gpu = MEFTAdapter(12, cfg.replace(placement="gpu"), device=device)
    on_cpu = MEFTAdapter(12, cfg.replace(placement="cpu"), device=device)
    on_cpu.load_state_dict(on_gpu.state_dict())
    return on_gpu, on_cpu


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("backward_rows", ["refetch", "keep"])
def test_forward_and_router_grads_match_gpu_placement(seed, backend, backward_rows, device):
    on_gpu, on_cpu = pair(backend, device, backward_rows=backward_rows, residency="per-micro-batch")
    assert_placements_agree(on_gpu, on_cpu, torch.randn(4, 7, 12, device=device), y_tol=1e-6)


def train_micro_batch(on_gpu, on_cpu, expected, shape, device):
    """One micro-batch on both placements: placement "gpu"'s key/value gradients of the rows it
    selected go to ``expected`` (the lazy AdamW it follows), placement "cpu" keeps its own."""
    hidden, target = torch.randn(*shape, device=device), torch.randn(*shape, device=device)
    rows = selected_rows(on_gpu, hidden)
    on_gpu.keys.grad = on_gpu.values.grad = None
    (on_gpu(hidden) - target).square().mean().backward()
    expected.accumulate(rows.cpu(), on_gpu.keys.grad[rows].float().cpu(), on_gpu.values.grad[rows].float().cpu())
    (on_cpu(hidden) - target).square().mean().backward()


def follow(on_gpu, expected):
    """Placement "gpu"'s keys and values take the rows of the lazy AdamW it follows."""
    with torch.no_grad():
        on_gpu.keys.copy_(expected.store.keys())
        on_gpu.values.copy_(expected.store.values())


def assert_followed(on_gpu, on_cpu, expected):
    """Placement "cpu"'s master rows and router equal placement "gpu"'s (1e-6); returns the rows."""
    keys, values = on_cpu.master_rows()
    torch.testing.assert_close(keys, expected.store.keys(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values, expected.store.values(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(on_cpu.router.weight, on_gpu.router.weight, rtol=1e-6, atol=1e-6)
    return keys, values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_training_equals_gpu_placement_with_lazy_adamw(seed, gate, device):
    """3 steps of 2 micro-batches each, weight decay and global-norm clipping."""
    on_gpu, on_cpu = pair("auto", device, gate=gate)
    # eps 1e-6: with 1e-8, gradients near 1e-9 (rounding-level, order-dependent) turn into
    # lr-sized updates and the two placements drift apart by more than 1e-6 in rare elements.
    hyper = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, eps=1e-6)
    expected = SparseRowAdamW(CPURowStore.from_dense(on_gpu.keys.detach().cpu(), on_gpu.values.detach().cpu()),
                              **hyper)
    on_cpu.configure_optimizer(**hyper)
    router_gpu = torch.optim.AdamW(on_gpu.router.parameters(), lr=1e-2)
    router_cpu = torch.optim.AdamW(on_cpu.router.parameters(), lr=1e-2)
    for _ in range(3):
        for _ in range(2):
            train_micro_batch(on_gpu, on_cpu, expected, (3, 5, 12), device)
            router_gpu.step()
            router_cpu.step()
            router_gpu.zero_grad()
            router_cpu.zero_grad()
        expected.step()
        on_cpu.sparse_step()
        follow(on_gpu, expected)
    keys, values = assert_followed(on_gpu, on_cpu, expected)
    assert not torch.equal(values, torch.zeros_like(values))
    torch.testing.assert_close(on_cpu.offload.key_cache.tensor.cpu(), keys)


def test_transfer_accounting(seed):
    _, on_cpu = pair()
    runtime = on_cpu.offload.runtime
    assert runtime.bytes_to_device == 48 * 12 * 4  # load_state_dict wrote every key row to the cache
    before = runtime.bytes_to_device
    hidden = torch.randn(9, 12)
    with torch.no_grad():
        routed = on_cpu.start_routing(hidden)
        on_cpu.finish_values(routed)
    # the slot is sized by a host-known bound, min(N, T * K_top); only the active rows move
    assert routed.ticket.row_ids.numel() == min(48, routed.neuron_ids.numel())
    assert runtime.bytes_to_device - before == routed.neuron_ids.unique().numel() * 12 * 4


def test_key_rows_an_update_touched_go_back_through_the_copy_engine(seed, monkeypatch):
    """After a row-sparse step exactly the touched key rows reach the device cache, through the
    runtime's copy engine (counted), and the cache equals the updated master keys."""
    _, on_cpu = pair(residency="per-micro-batch")  # the touched ids: one backward's rows, shipped at once
    runtime = on_cpu.offload.runtime
    on_cpu.configure_optimizer(lr=1e-1)
    copied = []
    real_copy_in = runtime.engine.copy_in

    def counting_copy_in(slot, host_rows, ids, **kw):
        copied.append(ids.clone())
        return real_copy_in(slot, host_rows, ids, **kw)

    monkeypatch.setattr(runtime.engine, "copy_in", counting_copy_in)
    sent = record_sent_grads(monkeypatch, on_cpu.offload)
    on_cpu(torch.randn(9, 12)).square().sum().backward()
    touched = sent[0].result().row_ids.sort().values
    on_cpu.sparse_step()
    copied.clear()
    before = runtime.bytes_to_device
    on_cpu.offload.wait_for_update()
    assert torch.equal(torch.cat(copied).sort().values, touched)
    assert runtime.bytes_to_device - before == touched.numel() * 12 * 4
    torch.testing.assert_close(on_cpu.offload.key_cache.tensor, on_cpu.offload.store.keys(), rtol=0, atol=0)


def test_state_dict_round_trip_keeps_master_rows(seed):
    _, on_cpu = pair()
    copy = MEFTAdapter(12, on_cpu.config)
    copy.load_state_dict(on_cpu.state_dict())
    hidden = torch.randn(5, 12)
    assert torch.equal(copy(hidden), on_cpu(hidden))
    with pytest.raises(RuntimeError, match="size mismatch for keys"):
        MEFTAdapter(12, on_cpu.config.replace(num_neurons=60)).load_state_dict(on_cpu.state_dict())


def test_sparse_step_needs_an_optimizer(seed):
    _, on_cpu = pair()
    on_cpu(torch.randn(2, 12)).sum().backward()
    with pytest.raises(RuntimeError, match="configure_optimizer"):
        on_cpu.sparse_step()


def test_gpu_placement_rejects_cpu_only_calls():
    on_gpu, _ = pair()
    with pytest.raises(RuntimeError, match="placement='cpu'"):
        on_gpu.configure_optimizer(lr=1.0)


def test_frozen_layer_passes_dh_but_moves_no_rows(seed):
    on_gpu, on_cpu = pair()
    on_cpu.requires_grad_(False)
    hidden = torch.randn(6, 12, requires_grad=True)
    on_cpu(hidden).square().sum().backward()
    expected = hidden.detach().clone().requires_grad_()
    on_gpu(expected).square().sum().backward()
    assert rel_err(hidden.grad, expected.grad) < 1e-5
    assert on_cpu.offload.pending_grads == [] and on_cpu.offload.runtime.bytes_to_host == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward_rows", ["refetch", "keep"])
def test_several_forwards_before_their_backwards(seed, device, backward_rows):
    """Two losses over one layer (e.g. chosen and rejected answers), or more forwards than the
    prefetcher keeps rows for: each backward, in any order, gets its own forward's rows."""
    on_gpu, on_cpu = pair("auto", device, backward_rows=backward_rows, residency="per-micro-batch")
    inputs = [torch.randn(3 + 2 * i, 12, device=device) for i in range(6)]
    for layer in (on_gpu, on_cpu):
        losses = [(i + 1) * layer(h).square().sum() for i, h in enumerate(inputs)]
        for i in (0, 5, 2, 1, 4, 3):  # first forward first: the one a single kept slot would lose
            losses[i].backward()
    ids, rows = take_grad_rows(on_cpu.offload)
    ids = ids.to(device)
    want = torch.cat([on_gpu.keys.grad[ids], on_gpu.values.grad[ids]], dim=1)
    assert rel_err(rows.to(device), want) < 1e-5
    assert rel_err(on_cpu.router.weight.grad, on_gpu.router.weight.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("growing", [False, True])
def test_layers_frozen_in_turn_get_their_own_rows_in_backward(seed, device, backend, growing):
    """IST's pattern: a layer below every trained one runs no backward; when it trains in a
    later step, its backward must read its own forward's rows, never a lookahead prefetch made
    with an earlier step's ids. Two stacked layers share one runtime; each step's key/value
    gradient rows are compared with placement "gpu". ``growing``: more tokens each step, so the
    slots must grow while a stale lookahead would hold one."""
    from meft_triton.offload import OffloadRuntime

    cfg = MEFTConfig(**{**BASE, "backend": backend, "residency": "per-micro-batch"})  # one backward's rows
    runtime = OffloadRuntime(device, torch.float32, 12)
    on_gpu = [MEFTAdapter(12, cfg, device=device) for _ in range(2)]
    on_cpu = [MEFTAdapter(12, cfg.replace(placement="cpu"), device=device, runtime=runtime) for _ in range(2)]
    for a, b in zip(on_gpu, on_cpu):
        b.load_state_dict(a.state_dict())

    def stack(layers, hidden):
        for layer in layers:
            hidden = hidden + layer(hidden)
        return hidden.square().sum()

    for step, trained in enumerate([1, 0, 1, 0, 0, 1]):
        for layers in (on_gpu, on_cpu):
            for i, layer in enumerate(layers):
                layer.requires_grad_(i == trained)
                layer.zero_grad()
        hidden = torch.randn(7 + step * growing, 12, device=device)  # other rows each step
        stack(on_gpu, hidden).backward()
        stack(on_cpu, hidden).backward()
        rows = on_cpu[trained].offload
        grads = [f.result() for f in rows.pending_grads]
        rows.pending_grads.clear()
        assert len(grads) == 1, step
        ids = grads[0].row_ids.to(device)
        want = torch.cat([on_gpu[trained].keys.grad[ids], on_gpu[trained].values.grad[ids]], dim=1)
        assert rel_err(grads[0].rows.to(device), want) < 1e-5, step
    runtime.close()


@pytest.mark.gpu
def test_gpu_memory_stays_at_key_cache_plus_slots_over_100_steps(seed):
    """LLaMA-7B-shaped layers (d = 4096, N = 65536) under placement "cpu": what the device holds
    is the bf16 key caches, the routers and the slots, and nothing grows step after step.
    Four layers, not 32: each layer's fp32 master + AdamW moments take 6 GiB of host memory."""
    from meft_triton.offload import OffloadRuntime

    d, layers, tokens = 4096, 4, 512
    cfg = MEFTConfig(num_neurons=65536, num_experts=1024, experts_per_token=8, topk=64,
                     placement="cpu", value_init_std=0.02, residency="per-micro-batch")  # no resident tables
    runtime = OffloadRuntime("cuda", torch.bfloat16, d)
    adapters = [MEFTAdapter(d, cfg, device="cuda", runtime=runtime) for _ in range(layers)]
    for adapter in adapters:
        adapter.configure_optimizer(lr=1e-4)
    router_opt = torch.optim.AdamW([a.router.weight for a in adapters], lr=1e-4)
    key_cache_bytes = layers * cfg.num_neurons * d * 2

    def step():
        hidden = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = hidden
        for adapter in adapters:
            out = out + adapter(out)
        out.float().square().mean().backward()
        router_opt.step()
        router_opt.zero_grad()
        for adapter in adapters:
            adapter.sparse_step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    settled = torch.cuda.memory_allocated()
    slots = sum(s.nbytes for s in runtime.prefetcher.slots)
    assert settled < key_cache_bytes + slots + 256 * 2**20, "more than key caches + slots + 256 MiB"
    for _ in range(95):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= settled + 16 * 2**20


# -- low_key_dim: keys [N, r] in the row store and the key cache, L trained on the device -------
LOW_KEY = dict(num_neurons=69, num_experts=3, experts_per_token=2, topk=50, key_init_std=1.0,
               value_init_std=1.0, router_init_scale=0.3, low_key_dim=5)  # S = 23, K_top > P*S


def low_key_pair(backend="torch", device="cpu", dtype=torch.float32, **changes):
    cfg = MEFTConfig(**{**LOW_KEY, "backend": backend, **changes})
    on_gpu = MEFTAdapter(12, cfg.replace(placement="gpu"), device=device, dtype=dtype)
    on_cpu = MEFTAdapter(12, cfg.replace(placement="cpu"), device=device, dtype=dtype)
    on_cpu.load_state_dict(on_gpu.state_dict())
    return on_gpu, on_cpu


@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_low_key_cpu_placement_is_meft_original_formulation_in_float64(seed, gate):
    """Placement "cpu" in float64 (fp32 masters, float64 key cache and slots) against MEFT's
    formula with x = L h in float64: y, dh, dL, d router and the key/value gradient rows it ships
    home to 1e-6 (the stages carry gate weights, activations and gradient rows in fp32, as the
    kernels do). The store holds [N, r + d] records, the key cache [N, r]."""
    on_gpu, on_cpu = low_key_pair(dtype=torch.float64, gate=gate)
    store = on_cpu.offload.store
    assert store.records.shape == (69, 5 + 12) and on_cpu.offload.key_cache.tensor.shape == (69, 5)
    hidden = torch.randn(23, 12, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(23, 12, dtype=torch.float64)
    on_cpu(hidden).backward(grad_y)
    keys, values = (t.double() for t in on_cpu.master_rows())
    leaves = [t.detach().clone().requires_grad_()
              for t in (hidden, on_cpu.router.weight, keys, values, on_cpu.low_key.weight)]
    y = reference.meft_original_forward(*leaves[:4], 2, 50, gate, low_key=leaves[4])
    y.backward(grad_y)
    assert rel_err(on_cpu(hidden.detach()), y) < 1e-6
    for name, ours, leaf in zip(["hidden", "router", "low_key"],
                                [hidden.grad, on_cpu.router.weight.grad, on_cpu.low_key.weight.grad],
                                [leaves[0], leaves[1], leaves[4]]):
        assert rel_err(ours, leaf.grad) < 1e-6, name
    ids, rows = take_grad_rows(on_cpu.offload)
    assert rows.shape == (ids.numel(), 5 + 12)
    assert rel_err(rows[:, :5], leaves[2].grad[ids]) < 1e-6 and rel_err(rows[:, 5:], leaves[3].grad[ids]) < 1e-6
    untouched = torch.ones(69, dtype=torch.bool).index_fill_(0, ids, False)
    assert not leaves[2].grad[untouched].any() and not leaves[3].grad[untouched].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("backward_rows", ["refetch", "keep"])
@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_low_key_forward_and_grads_match_gpu_placement(seed, backend, backward_rows, gate, device):
    on_gpu, on_cpu = low_key_pair(backend, device, backward_rows=backward_rows, gate=gate,
                                  residency="per-micro-batch")
    assert_placements_agree(on_gpu, on_cpu, torch.randn(23, 12, device=device), y_tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_low_key_training_with_offloaded_adamw_equals_gpu_placement(seed, gate, device):
    """3 steps of 2 micro-batches through OffloadedAdamW (routers and L by AdamW, L with weight
    decay as placement "gpu" gives it; keys and values by the lazy row-sparse AdamW, clipped)
    against placement "gpu" trained the same way, fp32, to 1e-6."""
    from meft_triton import OffloadedAdamW

    on_gpu, on_cpu = low_key_pair("auto", device, gate=gate)
    hyper = dict(lr=1e-2, weight_decay=0.1, eps=1e-6)
    optimizer = OffloadedAdamW([on_cpu], max_grad_norm=0.5, **hyper)
    assert [g["params"] for g in optimizer.param_groups] == [[on_cpu.router.weight], [on_cpu.low_key.weight]]
    expected = SparseRowAdamW(CPURowStore.from_dense(on_gpu.keys.detach().cpu(), on_gpu.values.detach().cpu()),
                              max_grad_norm=0.5, **hyper)
    dense = torch.optim.AdamW([{"params": [on_gpu.router.weight], "weight_decay": 0.0},
                               {"params": [on_gpu.low_key.weight], "weight_decay": 0.1}], lr=1e-2, eps=1e-6)
    start = on_gpu.low_key.weight.detach().clone()
    for _ in range(3):
        for _ in range(2):
            train_micro_batch(on_gpu, on_cpu, expected, (23, 12), device)
        optimizer.step()
        optimizer.zero_grad()
        dense.step()
        dense.zero_grad()
        expected.step()
        follow(on_gpu, expected)
    keys, values = assert_followed(on_gpu, on_cpu, expected)
    torch.testing.assert_close(on_cpu.low_key.weight, on_gpu.low_key.weight, rtol=1e-6, atol=1e-6)
    assert (on_cpu.low_key.weight - start).abs().max() > 1e-3, "L was not trained"
    torch.testing.assert_close(on_cpu.offload.key_cache.tensor.cpu(), keys)


def test_low_key_state_dict_round_trip_and_mismatch(seed):
    _, on_cpu = low_key_pair()
    state = on_cpu.state_dict()
    assert state["keys"].shape == (69, 5) and state["values"].shape == (69, 12)
    assert state["low_key.weight"].shape == (5, 12) and state["router.weight"].shape == (3, 5)
    copy = MEFTAdapter(12, on_cpu.config)
    copy.load_state_dict(state)
    hidden = torch.randn(7, 12)
    assert torch.equal(copy(hidden), on_cpu(hidden))
    with pytest.raises(RuntimeError, match="size mismatch for keys"):
        MEFTAdapter(12, on_cpu.config.replace(low_key_dim=4)).load_state_dict(state)


def spy_on_summing(monkeypatch, optimizer):
    """Wraps ``optimizer.accumulate_records``: the threads it ran on, a weak reference to each
    batch of host rows and a copy of it (ids, rows)."""
    import threading
    import weakref

    seen = dict(threads=set(), buffers=[], copies=[])
    real = optimizer.accumulate_records

    def spying(row_ids, records):
        seen["threads"].add(threading.current_thread().name)
        seen["buffers"].append(weakref.ref(records))
        seen["copies"].append((row_ids.clone(), records.clone()))
        real(row_ids, records)

    monkeypatch.setattr(optimizer, "accumulate_records", spying)
    return seen


@pytest.mark.parametrize("residency", ["per-micro-batch", "resident"])
def test_gradient_rows_are_summed_as_they_land_and_freed(seed, monkeypatch, residency):
    """Each backward's gradient rows (residency "per-micro-batch", or "resident" with a gradient
    budget below one call) are summed into the optimizer on its worker thread as they land, not
    at the step: their host buffers are freed during the step, and the step equals one fed the
    same rows at once."""
    changes = dict(residency=residency, **({} if residency == "per-micro-batch" else dict(gradient_budget=1)))
    on_gpu, on_cpu = pair(**changes)
    on_cpu.configure_optimizer(lr=1e-2)
    seen = spy_on_summing(monkeypatch, on_cpu.offload.optimizer)
    initial = [t.clone() for t in on_cpu.master_rows()]
    sink = SparseRowAdamW(CPURowStore(48, 12), lr=1e-2)
    for _ in range(3):
        train_micro_batch(on_gpu, on_cpu, sink, (4, 12), "cpu")
    assert on_cpu.offload.pending_grads == [] and len(on_cpu.offload.summing) == 3
    on_cpu.offload.collect_grads()
    assert len(seen["buffers"]) == 3 and all(name.startswith("meft-sparse-adamw") for name in seen["threads"])
    assert all(ref() is None for ref in seen["buffers"]), "a micro-batch's host rows outlived its summing"
    on_cpu.sparse_step().result()
    expected = SparseRowAdamW(CPURowStore.from_dense(*initial), lr=1e-2)
    for row_ids, records in seen["copies"]:
        expected.accumulate_records(row_ids, records)
    expected.step()
    keys, values = on_cpu.master_rows()
    assert torch.equal(keys, expected.store.keys()) and torch.equal(values, expected.store.values())


def test_zero_grad_drops_rows_summed_during_the_step(seed, monkeypatch):
    """backward, zero_grad, backward, step: the update sees the second micro-batch only, though
    the first one's rows were already summed in the background."""
    on_gpu, on_cpu = pair(residency="per-micro-batch")
    on_cpu.configure_optimizer(lr=1e-2)
    seen = spy_on_summing(monkeypatch, on_cpu.offload.optimizer)
    initial = [t.clone() for t in on_cpu.master_rows()]
    sink = SparseRowAdamW(CPURowStore(48, 12), lr=1e-2)
    train_micro_batch(on_gpu, on_cpu, sink, (4, 12), "cpu")
    on_cpu.offload.discard_grads()
    assert len(seen["copies"]) == 1
    train_micro_batch(on_gpu, on_cpu, sink, (4, 12), "cpu")
    on_cpu.sparse_step().result()
    expected = SparseRowAdamW(CPURowStore.from_dense(*initial), lr=1e-2)
    expected.accumulate_records(*seen["copies"][1])
    expected.step()
    keys, values = on_cpu.master_rows()
    assert torch.equal(keys, expected.store.keys()) and torch.equal(values, expected.store.values())


def test_a_new_optimizer_steps_the_rows_summed_before_it(seed):
    """configure_optimizer between backward and step: the rows the old optimizer summed in the
    background go to the new one (as rows waiting for the step always did)."""
    on_gpu, on_cpu = pair(residency="per-micro-batch")
    on_cpu.configure_optimizer(lr=1e-2)
    train_micro_batch(on_gpu, on_cpu, SparseRowAdamW(CPURowStore(48, 12)), (4, 12), "cpu")
    on_cpu.offload.collect_grads()
    ids, records = (t.clone() for t in on_cpu.offload.optimizer.accumulated())
    new = on_cpu.configure_optimizer(lr=1e-2)
    assert new.pending_rows == ids.numel() > 0
    got_ids, got = new.accumulated()
    assert torch.equal(got_ids, ids) and torch.equal(got, records)
