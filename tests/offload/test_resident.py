"""Residency "resident": value rows stay on the device across the micro-batches of a step and
gradient rows are summed there; training equals placement "gpu" with the same lazy AdamW."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fake_copy_engine import FakeCopyEngine
from meft_triton import MEFTAdapter, MEFTConfig, OffloadedAdamW, SparseRowAdamW
from meft_triton.offload import CPURowStore, OffloadRuntime
from oracle import selected_rows

D = 12
BASE = dict(num_neurons=48, num_experts=6, experts_per_token=2, topk=5, key_init_std=1.0,
            value_init_std=1.0, router_init_scale=0.3, backend="torch")
HYPER = dict(lr=1e-2, weight_decay=0.1, eps=1e-6)
#: one call of 5 tokens x K_top 5 has at most 25 padded ids: a budget of 25 rows per layer
#: holds one call, so a step's ~40 distinct rows force eviction
def tight(layers=2):
    return dict(value_budget=layers * 25 * D * 4, gradient_budget=layers * 25 * 2 * D * 4)


def stacks(engine=None, layers=2, device="cpu", **changes):
    """``layers`` placement-"gpu" adapters and the same under placement "cpu", residency
    "resident", sharing one runtime (on ``engine``), computing on ``device``."""
    cfg = MEFTConfig(**{**BASE, **changes})
    runtime = OffloadRuntime(device, torch.float32, D, engine=engine)
    on_gpu = [MEFTAdapter(D, cfg.replace(residency="per-micro-batch"), device=device) for _ in range(layers)]
    on_cpu = [MEFTAdapter(D, cfg.replace(placement="cpu", residency="resident"), device=device, runtime=runtime)
              for _ in range(layers)]
    for a, b in zip(on_gpu, on_cpu):
        b.load_state_dict(a.state_dict())
    return on_gpu, on_cpu, runtime


def run(layers_, hidden, checkpointing=False):
    for layer in layers_:
        if checkpointing:
            hidden = hidden + checkpoint(layer, hidden, use_reentrant=False)
        else:
            hidden = hidden + layer(hidden)
    return hidden.square().mean()


def train_and_compare(on_gpu, on_cpu, *, steps, micro_batches, checkpointing=False, frozen=None, tokens=5):
    """``steps`` optimizer steps of ``micro_batches`` each on both stacks; the "gpu" stack's keys
    and values follow a SparseRowAdamW fed with its dense gradients' selected rows (the lazy
    AdamW placement "cpu" runs). ``frozen(step)``: the layers left out in that step (IST)."""
    device = on_gpu[0].keys.device
    expected = [SparseRowAdamW(CPURowStore.from_dense(a.keys.detach().cpu(), a.values.detach().cpu()), **HYPER)
                for a in on_gpu]
    optimizer = OffloadedAdamW(on_cpu, **HYPER)
    routers = torch.optim.AdamW([a.router.weight for a in on_gpu], lr=HYPER["lr"], eps=HYPER["eps"], weight_decay=0.0)
    for step in range(steps):
        left_out = frozen(step) if frozen else ()
        for i, (a, b) in enumerate(zip(on_gpu, on_cpu)):
            a.requires_grad_(i not in left_out)
            b.requires_grad_(i not in left_out)
        for _ in range(micro_batches):
            hidden = torch.randn(tokens, D, device=device)
            inputs, h = [], hidden
            for a in on_gpu:  # each layer's input, for the rows it selects
                inputs.append(h)
                h = h + a(h)
            for a in on_gpu:
                a.keys.grad = a.values.grad = None
            run(on_gpu, hidden).backward()
            for i, (a, x) in enumerate(zip(on_gpu, inputs)):
                if i not in left_out:
                    rows = selected_rows(a, x.detach())
                    expected[i].accumulate(rows.cpu(), a.keys.grad[rows].cpu(), a.values.grad[rows].cpu())
            run(on_cpu, hidden, checkpointing).backward()
        routers.step()
        routers.zero_grad()
        optimizer.step()
        optimizer.zero_grad()
        for a, e in zip(on_gpu, expected):
            if e.pending_rows:
                e.step()
            with torch.no_grad():
                a.keys.copy_(e.store.keys())
                a.values.copy_(e.store.values())
    # The two placements sum the same gradient terms in different orders (reference autograd
    # vs the offloaded stages and the device sums): with cancellation their gradients agree
    # to ~5e-6 relative (measured, seed 1728456567), and AdamW's normalised update carries that
    # into parameter changes of lr x O(1) per step; 1e-6 failed ~1 run in 20. A wrong row, a
    # lost micro-batch or a stale value moves a parameter by ~lr = 1e-2.
    for a, b in zip(on_gpu, on_cpu):
        keys, values = b.master_rows()
        torch.testing.assert_close(keys, a.keys.detach().cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, a.values.detach().cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.router.weight, a.router.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.offload.key_cache.tensor.cpu(), keys)


FORMS = ["rows", "factors"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("micro_batches", [1, 4])
@pytest.mark.parametrize("budgets", ["auto", "tight"])
@pytest.mark.parametrize("gradient_form", FORMS)
def test_training_equals_gpu_placement(seed, micro_batches, budgets, device, gradient_form):
    """On CUDA: the copy engine's streams and the Triton kernels (backend "auto"). Tight
    budgets under "factors" hold two micro-batches' factors: rows go home mid-step too."""
    changes = tight() if budgets == "tight" else {}
    on_gpu, on_cpu, runtime = stacks(device=device, gradient_form=gradient_form, **changes,
                                     **({"backend": "auto"} if device == "cuda" else {}))
    train_and_compare(on_gpu, on_cpu, steps=3, micro_batches=micro_batches)
    capacity = on_cpu[0].offload.residency.values.capacity
    assert capacity == (25 if budgets == "tight" else 48)
    runtime.close()


@pytest.mark.parametrize("gradient_form", FORMS)
def test_kernel_backend(seed, gradient_form):
    """The Triton stages read the resident rows (values) and their gathered view (backward);
    under "factors" key_value_rows computes the held tokens' rows."""
    on_gpu, on_cpu, runtime = stacks(backend="triton", gradient_form=gradient_form, **tight())
    train_and_compare(on_gpu, on_cpu, steps=2, micro_batches=2)
    runtime.close()


@pytest.mark.parametrize("gradient_form", FORMS)
def test_gradient_checkpointing_and_frozen_layers(seed, gradient_form):
    """Checkpointed layers (a recompute fetches nothing new) and IST's pattern: a layer left
    out of a step computes dh only, sends no gradient rows, and its optimizer state stays."""
    on_gpu, on_cpu, runtime = stacks(layers=3, gradient_form=gradient_form, **tight(3))
    train_and_compare(on_gpu, on_cpu, steps=4, micro_batches=3, checkpointing=True,
                      frozen=lambda step: {step % 3})
    runtime.close()


@pytest.mark.parametrize("engine_seed", [0, 1, 2])
@pytest.mark.parametrize("gradient_form", FORMS)
def test_randomized_fake_engine_schedules(seed, engine_seed, gradient_form):
    """Copies that land late and out of order (the fake engine checks every slot read against
    the copy it waited for), with eviction."""
    engine = FakeCopyEngine(seed=engine_seed, async_compute=False, chunk_rows=3)
    on_gpu, on_cpu, runtime = stacks(engine=engine, gradient_form=gradient_form, **tight())
    train_and_compare(on_gpu, on_cpu, steps=2, micro_batches=3, tokens=3 + engine_seed)
    engine.check()
    assert engine.violations == []
    runtime.close()


def test_rows_cross_once_per_step_with_room(seed):
    """With the budgets holding everything: each row the step touches crosses once to the
    device (plus one row per call that found every row resident) and its summed gradient
    once home, in the compute dtype; after the step only the changed rows are fetched again."""
    on_gpu, on_cpu, runtime = stacks(layers=1)
    layer = on_cpu[0]
    layer.configure_optimizer(**HYPER)
    width = 2 * D * 4
    for step in range(2):
        before_in, before_out = runtime.bytes_to_device, runtime.bytes_to_host
        seen, calls_without_new = torch.empty(0, dtype=torch.long), 0
        for _ in range(4):
            hidden = torch.randn(5, D)
            rows = selected_rows(on_gpu[0], hidden)
            new = rows[~torch.isin(rows, seen)]
            calls_without_new += new.numel() == 0  # (the backward knows its rows are all resident)
            seen = torch.cat([seen, new])
            layer(hidden).square().sum().backward()
        step_in = runtime.bytes_to_device - before_in
        assert step_in == (seen.numel() + calls_without_new) * D * 4
        assert runtime.bytes_to_host == before_out  # nothing home before the step
        touched = layer.sparse_step().result()
        assert touched.numel() == seen.numel()
        assert runtime.bytes_to_host - before_out == min(48, 4 * 25) * (width + 8)
        # one batch of summed rows per step: the update read it as it came (no fp32 copy)
        assert layer.offload.optimizer._spare.buf.numel() == 0
        layer.master_rows()  # the key rows the step changed go back to the cache (counted)
        with torch.no_grad():
            on_gpu[0].keys.copy_(layer.offload.store.keys())
    runtime.close()


@pytest.mark.parametrize("part", ["value_budget", "gradient_budget"])
def test_a_budget_below_one_call_runs_that_part_per_micro_batch(seed, part):
    """A budget whose per-layer share cannot hold one call's 25 padded ids: that part runs
    per micro-batch (values through the slots; gradient rows home after each backward, in
    the compute dtype), the other stays resident, and training is unchanged."""
    on_gpu, on_cpu, runtime = stacks(gradient_form="rows", **{**tight(), part: 2 * 24 * D * 4})
    train_and_compare(on_gpu, on_cpu, steps=2, micro_batches=3)
    residency = on_cpu[0].offload.residency
    assert (residency.values is None) == (part == "value_budget")
    assert (residency.grads is None) == (part == "gradient_budget")
    runtime.close()


def test_bad_residency_settings_are_named():
    with pytest.raises(ValueError, match="gradient_budget must be 'auto' or an int >= 1"):
        MEFTConfig(gradient_budget=0)
    with pytest.raises(ValueError, match="value_budget must be 'auto' or an int >= 1"):
        MEFTConfig(value_budget=1.5)
    with pytest.raises(ValueError, match="residency must be one of"):
        MEFTConfig(residency="always")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gradient_form", FORMS)
def test_no_host_wait_on_the_training_thread(monkeypatch, gradient_form, backend):
    """The residency bookkeeping runs on the device: steady-state steps make no trapped call
    outside the one global non-finite check (tests/test_host_waits.py's trap and model), the
    kernel launchers (key_value_rows included, under "factors") none at all."""
    import test_host_waits as host_waits

    monkeypatch.setattr(host_waits, "BASE", host_waits.BASE.replace(residency="resident",
                                                                    gradient_form=gradient_form))
    trap = host_waits.run_steps("cpu", backend)
    waits = host_waits.package_waits(trap, kernels=False)
    assert all(w.site.startswith("meft_triton/optimizers/nonfinite.py") for w in waits), trap.report()
    assert len(waits) <= host_waits.COUNTED_STEPS, trap.report()
    assert host_waits.package_waits(trap, kernels=True) == [], trap.report()


def test_zero_copy_reads_the_compute_dtype_shadow(seed):
    """A zero-copy engine reads the bf16 value shadow (half the bytes of the fp32 master over
    the link): training matches the CPU gather, which rounds the fp32 rows while staging, and
    the shadow follows every update."""
    cfg = MEFTConfig(**BASE, placement="cpu", residency="resident")
    results = []
    for strategy in ("cpu_gather", "zero_copy"):
        torch.manual_seed(0)
        engine = FakeCopyEngine(seed=1, async_compute=False)
        engine.strategy = strategy  # what the runtime asks a CudaCopyEngine
        runtime = OffloadRuntime("cpu", torch.bfloat16, D, engine=engine)
        layer = MEFTAdapter(D, cfg, dtype=torch.bfloat16, runtime=runtime)
        layer.configure_optimizer(**HYPER)
        outputs = []
        for _ in range(3):
            for _ in range(2):
                y = layer(torch.randn(5, D, dtype=torch.bfloat16))
                y.float().square().sum().backward()
                outputs.append(y.detach())
            layer.sparse_step()
        store = layer.offload.store
        layer.master_rows()
        assert (store.shadow is not None) == (strategy == "zero_copy")
        if store.shadow is not None:
            assert torch.equal(store.shadow, store.values().to(torch.bfloat16))
        results.append((torch.stack(outputs), store.records.clone()))
        runtime.close()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_an_abandoned_or_failed_fetch_leaves_no_phantom_rows(seed):
    """A call given back before its values (the code between the two stages raised), and a
    copy that fails: the rows they planned are not taken for resident by later calls."""
    engine = FakeCopyEngine(seed=0, async_compute=False)
    on_gpu, on_cpu, runtime = stacks(engine=engine, layers=1)
    layer, hidden = on_cpu[0], torch.randn(5, D)
    engine.pause()  # the copy cannot have run when it is cancelled
    layer.abandon_routing(layer.start_routing(hidden))
    engine.resume()
    engine.fail_next(1)
    with pytest.raises(Exception, match="copy"):
        layer(hidden)
    torch.testing.assert_close(layer(hidden), on_gpu[0](hidden), rtol=1e-6, atol=1e-6)
    engine.check()
    runtime.close()


@pytest.mark.parametrize("gradient_form, tolerance", [("rows", 1e-6), ("factors", 1e-5)])
def test_ist_training_of_a_model_equals_per_micro_batch(seed, gradient_form, tolerance):
    """IST (meft_triton/addons/ist.py) on a tiny Llama under placement "cpu": scoring rounds
    (no-grad passes with scaled outputs), layers frozen in turn, 3 micro-batches per step and
    gradient checkpointing of the decoder layers; residency "resident" with budgets that force
    eviction trains exactly what "per-micro-batch" trains. The factors' one GEMM over all held
    tokens sums in another order than per-micro-batch rows (2e-6 apart measured here)."""
    transformers = pytest.importorskip("transformers")
    from meft_triton import ISTConfig, ISTScheduler, attach_meft, create_meft_optimizer, meft_adapters

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    # 6 tokens x topk 5: 30 padded ids per call; tables of 36 of the 48 rows per layer evict
    tokens = torch.randint(3, 50, (4, 1, 6), generator=torch.Generator().manual_seed(1))
    masters = []
    for residency in ("per-micro-batch", "resident"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        cfg = MEFTConfig(**{**BASE, "residency": residency, "placement": "cpu", "value_budget": 3 * 36 * 16 * 4,
                            "gradient_budget": 3 * 36 * 32 * 4, "gradient_form": gradient_form})
        model = attach_meft(model, cfg)
        model.train()
        opt = create_meft_optimizer(model, lr=1e-2)
        sched = ISTScheduler(model, ISTConfig(ratio=0.34, passes=2, interval=2, seed=7))
        for step in range(4):
            sched.before_step(step, lambda: model(tokens[0], labels=tokens[0]).loss)
            for micro_batch in tokens[1:]:
                model(micro_batch, labels=micro_batch).loss.backward()
            opt.step()
            opt.zero_grad()
        adapters = list(meft_adapters(model).values())
        masters.append([torch.cat(a.master_rows(), dim=1).clone() for a in adapters])
        if residency == "resident":
            assert [a.offload.residency.values.capacity for a in adapters] == [36] * 3
        next(iter(meft_adapters(model).values())).offload.runtime.close()
    for per_micro_batch, resident in zip(*masters):
        torch.testing.assert_close(resident, per_micro_batch, rtol=tolerance, atol=tolerance)
    assert any(not torch.equal(m, masters[0][0]) for m in masters[0][1:])


def test_auto_budgets_follow_the_free_device_memory(seed):
    """"auto" takes half the device memory free at the first call, values first: here room
    for every value row but not for one call's gradient sums, which then go home per
    micro-batch; every layer gets the same answer."""
    key_write_back_slots = 2 * 2 * 48 * D * 4  # two per layer, taken when the state is loaded
    engine = FakeCopyEngine(seed=0, async_compute=False, memory_limit_bytes=key_write_back_slots + 12000)
    on_gpu, on_cpu, runtime = stacks(engine=engine)
    train_and_compare(on_gpu, on_cpu, steps=2, micro_batches=2)
    assert runtime.auto_budgets == (2 * 48 * D * 4, 6000 - 2 * 48 * D * 4)
    for layer in on_cpu:
        assert layer.offload.residency.values.capacity == 48 and layer.offload.residency.grads is None
    runtime.close()


def test_zero_grad_drops_summed_gradient_rows(seed):
    """``zero_grad`` before the step discards a batch: its summed rows never reach the
    optimizer (as under placement "gpu"), and the next batch's do."""
    _, on_cpu, runtime = stacks(layers=1)
    optimizer = OffloadedAdamW(on_cpu, **HYPER)
    hidden, other = torch.randn(5, D), torch.randn(5, D)

    def collected():
        optimizer.collect_step()
        ids, rows = optimizer.sparse[0].accumulated()
        order = torch.argsort(ids)
        return ids[order].clone(), rows[order].clone()

    run(on_cpu, hidden).backward()
    once = collected()
    optimizer.zero_grad()
    before = runtime.bytes_to_host
    run(on_cpu, other).backward()
    optimizer.zero_grad()  # a discarded batch: its sums never cross
    assert runtime.bytes_to_host == before
    run(on_cpu, hidden).backward()
    again = collected()
    assert torch.equal(again[0], once[0]) and torch.equal(again[1], once[1])
    optimizer.zero_grad()
    runtime.close()


@pytest.mark.parametrize("tokens_held", [10, 20, 4])
def test_factors_send_rows_when_the_budget_is_full_and_at_the_step(seed, tokens_held):
    """gradient_form "factors": a budget of ``tokens_held`` tokens per layer holds that many
    tokens of factors (4 micro-batches of 5 per step); the held tokens' rows (their bound,
    min(N, tokens x K_top)) go home when the next backward would not fit and at the step.
    Below one call's tokens each backward sends its rows at once (the bound of one call)."""
    token_bytes = (2 * D) * 4 + BASE["experts_per_token"] * 8 + BASE["topk"] * 16
    on_gpu, on_cpu, runtime = stacks(layers=1, gradient_form="factors", gradient_budget=tokens_held * token_bytes)
    layer = on_cpu[0]
    layer.configure_optimizer(**HYPER)
    row = 2 * D * 4 + 8
    sent = []
    for _ in range(4):
        before = runtime.bytes_to_host
        layer(torch.randn(5, D)).square().sum().backward()
        sent.append(runtime.bytes_to_host - before)
    factors = layer.offload.residency.factors
    # the arenas take what the planner counts per token (GradientFactors.token_bytes), once used
    assert factors.capacity == tokens_held
    assert factors.nbytes == (tokens_held * token_bytes if tokens_held >= 5 else 0)
    before = runtime.bytes_to_host
    layer.sparse_step().result()
    at_step = runtime.bytes_to_host - before
    per_flush = min(48, tokens_held * 5) * row
    if tokens_held == 10:  # two calls per flush: the third backward flushes the first two
        assert sent == [0, 0, per_flush, 0] and at_step == per_flush
    elif tokens_held == 20:
        assert sent == [0, 0, 0, 0] and at_step == per_flush
    else:
        assert sent == [25 * row] * 4 and at_step == 0
    runtime.close()


def test_bad_gradient_form_is_named():
    with pytest.raises(ValueError, match="gradient_form must be one of 'auto', 'rows', 'factors'"):
        MEFTConfig(gradient_form="sums")


@pytest.mark.parametrize("rows_held, form", [(48, "rows"), (47, "factors")])
def test_auto_gradient_form_keeps_sums_only_when_they_hold_every_row(seed, rows_held, form):
    """"auto": a layer's share holding the sums of all N = 48 rows keeps sums (one send per step
    whatever the micro-batches), one row less keeps factors."""
    on_gpu, on_cpu, runtime = stacks(layers=1, gradient_budget=rows_held * 2 * D * 4)
    assert on_cpu[0].config.gradient_form == "auto"
    train_and_compare(on_gpu, on_cpu, steps=1, micro_batches=2)
    residency = on_cpu[0].offload.residency
    assert (residency.grads is not None, residency.factors is not None) == (form == "rows", form == "factors")
    runtime.close()
