"""Reliability: non-finite gradients, faults at the layer level, NaN/Inf inputs under
placement "cpu", and property tests over random configs (placements agree, save/load is exact).

What the engine-level tests already cover is not repeated here: tests/offload/test_prefetch.py (failed,
cancelled and timed-out copies at acquire, worker crashes, slot OOM, close and interpreter exit
with copies in flight on the bare Prefetcher), tests/optimizers/test_optim.py (SparseRowAdamW's worker
exception surfacing at its next call), tests/integration/test_integration.py (atomic save_adapter, corrupt
adapter files, save/load property for placement "gpu").
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meft_triton import MEFTAdapter, MEFTConfig
from meft_triton.offload import cpu_rowops
from meft_triton import OffloadedAdamW
from meft_triton import MEFTAdamW, NonFiniteGradientError, NonFiniteGradientWarning
from meft_triton.optimizers import NonFiniteRows
from meft_triton.offload import OffloadRuntime
from meft_triton import SparseRowAdamW
from meft_triton.optimizers import clip_grad_norm_
from meft_triton.offload import ConcurrentUseError, CopyFailedError, EngineWorkerError, LayerUpdateError
from fake_copy_engine import FakeCopyEngine
from meft_triton.offload import CPURowStore
from oracle import assert_placements_agree, rel_err

REPO = Path(__file__).resolve().parents[1]
D = 12
BASE = MEFTConfig(num_neurons=48, num_experts=6, experts_per_token=2, topk=5, key_init_std=1.0,
                  value_init_std=1.0, router_init_scale=0.3, backend="torch", placement="cpu")


def cpu_stack(layers: int = 2, seed: int = 0, runtime=None, **changes):
    """``layers`` placement-"cpu" adapters on one runtime, made from ``seed``."""
    torch.manual_seed(seed)
    cfg = BASE.replace(**changes)
    runtime = runtime or OffloadRuntime("cpu", torch.float32, D)
    return [MEFTAdapter(D, cfg, runtime=runtime) for _ in range(layers)], runtime


def state_of(adapters, opt=None):
    """Bitwise copies of everything a step may write: masters, moments, routers, step counts."""
    out = []
    for a in adapters:
        a.offload.wait_for_update()
        store = a.offload.store
        out += [store.records.clone(), store.exp_avg.clone(), store.exp_avg_sq.clone(),
                a.router.weight.detach().clone()]
    if opt is not None:
        out += [torch.tensor([s.step_count for s in opt.sparse])]
        out += [v.clone() for st_ in opt.state.values() for v in st_.values() if torch.is_tensor(v)]
    return out


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------ non-finite gradients


def poisoned_backward(adapters, hidden, bad_token: int | None, bad_layer: int = 1):
    """Both layers read ``hidden``; layer ``bad_layer`` sees a NaN in token ``bad_token``.
    Returns the neurons that token picked in that layer (the rows its NaN reaches)."""
    loss, picked = 0.0, None
    for i, adapter in enumerate(adapters):
        h = hidden.clone()
        if i == bad_layer and bad_token is not None:
            h[bad_token, 1] = float("nan")
        routed = adapter.start_routing(h)
        if i == bad_layer and bad_token is not None:
            picked = sorted(set(routed.neuron_ids[bad_token].tolist()))
        loss = loss + adapter.finish_values(routed).square().sum()
    loss.backward()
    return picked


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_offloaded_adamw_refuses_a_nan_row_names_layer_and_rows_and_writes_nothing(seed, mode):
    adapters, _ = cpu_stack()
    opt = OffloadedAdamW(adapters, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, nonfinite=mode,
                         layer_ids=[5, 9])
    twin, _ = cpu_stack()  # the same run without the poisoned step
    twin_opt = OffloadedAdamW(twin, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    hidden = torch.randn(7, D)
    picked = poisoned_backward(adapters, hidden, bad_token=2)
    before = state_of(adapters, opt)
    if mode == "raise":
        with pytest.raises(NonFiniteGradientError, match="layer 9 keys rows") as info:
            opt.step()
        report = info.value.report
    else:
        with pytest.warns(NonFiniteGradientWarning, match="layer 9 values rows"):
            opt.step()
        report = opt.last_nonfinite
    opt.zero_grad()
    by_part = {(r.layer, r.part): r.rows for r in report}
    assert by_part[(9, "keys")] == tuple(picked) and by_part[(9, "values")] == tuple(picked)
    assert (9, "router") in by_part  # dG = sum_t dg_t h_t^T reaches every expert row
    assert not any(layer == 5 for layer, _ in by_part), "the clean layer is not blamed"
    assert opt.nonfinite_steps == 1
    assert_bitwise(state_of(adapters, opt), before)  # the whole step was skipped
    for a in adapters:
        assert torch.isfinite(a.offload.store.records).all()

    # the poisoned gradients were dropped: the next step equals a run that never saw them
    clean = torch.randn(5, D)
    for stack, o in ((adapters, opt), (twin, twin_opt)):
        poisoned_backward(stack, clean, bad_token=None)
        o.step()
        o.zero_grad()
    assert_bitwise(state_of(adapters, opt), state_of(twin, twin_opt))
    assert [s.step_count for s in opt.sparse] == [1, 1]


def random_grads(num_rows, width, count, gen):
    ids = torch.randperm(num_rows, generator=gen)[:count]
    return ids, torch.randn(count, width, generator=gen), torch.randn(count, width, generator=gen)


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("call", ["step", "step_async"])
def test_sparse_row_adamw_skips_only_its_layer(seed, mode, call):
    """Standalone SparseRowAdamW: the optimizer (one layer) with a NaN/Inf row does not step,
    its rows/moments/step count stay bitwise; the report names the rows; nothing leaks into
    the next step."""
    gen = torch.Generator().manual_seed(seed)
    store = CPURowStore.from_dense(torch.randn(30, 4, generator=gen), torch.randn(30, 4, generator=gen))
    opt = SparseRowAdamW(store, lr=1e-2, weight_decay=0.1, nonfinite=mode, name="L3")
    opt.accumulate(*random_grads(30, 4, 6, gen))  # a clean first step, so moments are non-zero
    opt.step()
    ids, keys, values = random_grads(30, 4, 8, gen)
    keys[1, 2], values[5, 0] = float("nan"), float("-inf")
    opt.accumulate(ids[:4], keys[:4], values[:4])  # two micro-batches, the bad rows in both
    opt.accumulate(ids[4:], keys[4:], values[4:])
    before = [store.records.clone(), store.exp_avg.clone(), store.exp_avg_sq.clone()]
    run = (lambda: getattr(opt, call)()) if call == "step" else (lambda: opt.step_async().result())
    if mode == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"layer L3 keys rows \[%d\]" % ids[1]):
            run()
    else:
        with pytest.warns(NonFiniteGradientWarning):
            assert run().numel() == 0
    assert opt.last_nonfinite == (NonFiniteRows("L3", "keys", (int(ids[1]),)),
                                  NonFiniteRows("L3", "values", (int(ids[5]),)))
    assert opt.step_count == 1 and opt.pending_rows == 0 and opt.nonfinite_steps == 1
    assert_bitwise([store.records, store.exp_avg, store.exp_avg_sq], before)
    opt.accumulate(*random_grads(30, 4, 5, gen))
    opt.step()
    assert opt.step_count == 2 and torch.isfinite(store.records).all()
    opt.close()


def test_global_clip_with_a_nan_layer_skips_every_layer(seed):
    """clip_grad_norm_ over several layers: one NaN layer makes the global norm NaN, and with it
    every layer's clip scale; each layer refuses its step (clean ones report the clip scale)."""
    gen = torch.Generator().manual_seed(seed)
    opts = [SparseRowAdamW(CPURowStore.from_dense(torch.randn(20, 4, generator=gen), torch.randn(20, 4, generator=gen)),
                           nonfinite="skip", name=i) for i in range(2)]
    ids, keys, values = random_grads(20, 4, 5, gen)
    keys[0, 0] = float("nan")
    opts[0].accumulate(ids, keys, values)
    opts[1].accumulate(*random_grads(20, 4, 5, gen))
    before = [o.store.records.clone() for o in opts]
    assert math.isnan(float(clip_grad_norm_(opts, 1.0)))
    with pytest.warns(NonFiniteGradientWarning):
        opts[0].step()
    with pytest.warns(NonFiniteGradientWarning, match="clip scale"):
        opts[1].step()
    assert [o.last_nonfinite[-1].part for o in opts] == ["clip_scale", "clip_scale"]
    assert opts[0].last_nonfinite[0] == NonFiniteRows(0, "keys", (int(ids[0]),))
    for o, b in zip(opts, before):
        assert torch.equal(o.store.records, b) and o.step_count == 0


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_gpu_placement_optimizer_refuses_non_finite_gradients(seed, mode):
    """create_meft_optimizer's placement-"gpu" optimizer (MEFTAdamW): same contract."""
    transformers = pytest.importorskip("transformers")
    from meft_triton import attach_meft, create_meft_optimizer, meft_parameters

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    model = attach_meft(transformers.AutoModelForCausalLM.from_config(config),
                        BASE.replace(placement="gpu", value_init_std=0.05, router_init_scale=50.0), layers=[0, 1])
    opt = create_meft_optimizer(model, lr=1e-2, nonfinite=mode)
    assert isinstance(opt, MEFTAdamW)
    ids = torch.randint(3, 50, (2, 6))
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()  # a clean step first: there is optimizer state to protect
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    adapter = model.model.layers[1].mlp.adapter
    adapter.values.grad[17, 3] = float("inf")
    adapter.keys.grad[4, 0] = float("nan")
    before = [p.detach().clone() for p in meft_parameters(model)]
    before += [v.clone() for s in opt.state.values() for v in s.values()]
    if mode == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"layer 1 keys rows \[4\]; layer 1 values rows \[17\]"):
            opt.step()
    else:
        with pytest.warns(NonFiniteGradientWarning, match=r"layer 1 values rows \[17\]"):
            opt.step()
    after = [p.detach() for p in meft_parameters(model)] + [v for s in opt.state.values() for v in s.values()]
    assert_bitwise(after, before)
    assert opt.nonfinite_steps == 1


# ------------------------------------------------------------------ NaN / Inf input, placement "cpu"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_stays_in_its_token_placement_cpu(seed, backend, bad):
    """Like test_adapter's placement-"gpu" test: a NaN/Inf token gives a non-finite output for
    that token only and the other tokens' outputs are exact. Backward too: even with the bad
    token's output left out of the loss its own dh is non-finite (0 * NaN, as in any PyTorch
    layer), every other token's dh equals the clean run's bitwise."""
    (adapter,), _ = cpu_stack(1, seed=seed, backend=backend, num_neurons=32, num_experts=4, topk=4)
    hidden = torch.randn(5, D)
    keep = [0, 1, 3, 4]
    h_clean = hidden.clone().requires_grad_()
    clean = adapter(h_clean)
    clean[keep].sum().backward()
    hidden[2, 3] = bad
    h = hidden.clone().requires_grad_()
    y = adapter(h)
    assert not y[2].isfinite().all()
    assert torch.equal(y[keep], clean[keep])
    y[keep].sum().backward()
    assert torch.equal(h.grad[keep], h_clean.grad[keep])


# ------------------------------------------------------------------------ faults, layer level


def fail_layer_update(monkeypatch, adapter, times: int | None):
    """Layer ``adapter``'s row update raises (``times`` times, or until undone); the others run."""
    real, left = cpu_rowops.adamw_rows, [times]

    def update(param, *args, **kwargs):
        if param.data_ptr() == adapter.offload.store.records.data_ptr() and left[0] != 0:
            left[0] = None if left[0] is None else left[0] - 1
            raise RuntimeError("injected failure in the row update")
        return real(param, *args, **kwargs)

    monkeypatch.setattr(cpu_rowops, "adamw_rows", update)


def test_a_failed_layer_update_is_completed_and_named(seed, monkeypatch):
    """One layer's CPU update fails on its worker while the routers and the other layer took the
    step: that layer's next forward completes the update (it kept its gradients) and raises
    LayerUpdateError naming the layer, once; every layer then holds exactly what a run without
    the fault holds (step counts [1, 1], outputs equal), and training goes on."""
    adapters, _ = cpu_stack()
    twin, _ = cpu_stack()
    opt, twin_opt = OffloadedAdamW(adapters, lr=1e-2, layer_ids=[4, 7]), OffloadedAdamW(twin, lr=1e-2)
    hidden = torch.randn(6, D)
    poisoned_backward(adapters, hidden, bad_token=None)
    poisoned_backward(twin, hidden, bad_token=None)
    twin_opt.step()
    fail_layer_update(monkeypatch, adapters[1], times=1)
    opt.step()
    adapters[0](hidden)
    with pytest.raises(LayerUpdateError, match="layer 7 failed.*injected failure.*completed"):
        adapters[1](hidden)
    assert [s.step_count for s in opt.sparse] == [1, 1]
    assert_bitwise(state_of(adapters, opt), state_of(twin, twin_opt))
    for a, b in zip(adapters, twin):
        assert torch.equal(a(hidden), b(hidden))  # the key cache holds the completed rows too
    poisoned_backward(adapters, hidden, bad_token=None)
    poisoned_backward(twin, hidden, bad_token=None)
    opt.step()
    twin_opt.step()
    assert_bitwise(state_of(adapters, opt), state_of(twin, twin_opt))  # waits for both updates
    assert [s.step_count for s in opt.sparse] == [2, 2]  # completed steps: read after the wait


def test_a_layer_update_that_keeps_failing_blocks_the_next_step(seed, monkeypatch):
    """While the failed update cannot complete, the layer's forward raises every time (nothing
    reads its stale rows) and the next step raises before it changes anything."""
    adapters, _ = cpu_stack()
    opt = OffloadedAdamW(adapters, lr=1e-2)
    hidden = torch.randn(6, D)
    poisoned_backward(adapters, hidden, bad_token=None)
    fail_layer_update(monkeypatch, adapters[1], times=None)
    opt.step()
    for _ in range(2):
        with pytest.raises(LayerUpdateError, match="layer 1 failed.*kept"):
            adapters[1](hidden)
    poisoned_backward(adapters[:1], hidden, bad_token=None)  # (waited for layer 0's update)

    def everything():  # without waiting for layer 1's update (that raises)
        stores = [a.offload.store for a in adapters]
        return ([t.clone() for s in stores for t in (s.records, s.exp_avg, s.exp_avg_sq)]
                + [a.router.weight.detach().clone() for a in adapters]
                + [v.clone() for st_ in opt.state.values() for v in st_.values() if torch.is_tensor(v)])

    before = everything()
    with pytest.raises(LayerUpdateError, match="layer 1"):
        opt.step()
    assert_bitwise(everything(), before)
    adapters[0].offload.flush_grads()  # (residency "resident": its device sums go home)
    assert adapters[0].offload.summing  # layer 0's new gradients, summed for the next step
    monkeypatch.undo()
    opt.step()  # completes layer 1's first step, then takes the second
    state_of(adapters)
    assert [s.step_count for s in opt.sparse] == [2, 1]  # layer 1 had no gradient rows the second time


def test_failed_copies_surface_where_their_rows_are_needed(seed, monkeypatch):
    """Through a runtime on a fault-injecting engine: a failed host->device copy raises
    CopyFailedError naming the layer at the forward, a failed refetch at the backward, a failed
    gradient copy at the optimizer step; none writes anything, and the next call works (the slot
    went back to the pool)."""
    engine = FakeCopyEngine(max_delay=0.0, async_compute=False, workers=1)
    # per-micro-batch: backward refetches, and each backward's gradient rows go home at once
    adapters, runtime = cpu_stack(runtime=OffloadRuntime("cpu", torch.float32, D, engine=engine),
                                  residency="per-micro-batch")
    opt = OffloadedAdamW(adapters, lr=1e-2)
    hidden = torch.randn(6, D)
    expected = [a(hidden) for a in adapters]
    before = state_of(adapters, opt)

    engine.fail_next(1)
    with pytest.raises(CopyFailedError, match=r"layer 0 \(forward\).*injected copy failure"):
        adapters[0](hidden)
    assert torch.equal(adapters[0](hidden), expected[0])  # works again, same result

    y = adapters[1](hidden)
    engine.fail_next(1)
    with pytest.raises(CopyFailedError, match=r"layer 1 \(backward\)"):
        y.square().sum().backward()

    opt.zero_grad()
    real_copy_out = engine.copy_out

    def copy_out_in_issue_order(tensors):
        # Each gradient copy finishes before the next is issued: the workers pick a random
        # eligible copy, so otherwise the fault could hit layer 0's copy when they fall behind.
        future = real_copy_out(tensors)
        future.exception(timeout=60)  # waits for it (the fault shows in the future, not here)
        return future

    monkeypatch.setattr(engine, "copy_out", copy_out_in_issue_order)
    engine.fail_next(1, kind="out")  # the first gradient copy of the next backward (layer 1)
    poisoned_backward(adapters, hidden, bad_token=None)
    monkeypatch.undo()
    with pytest.raises(CopyFailedError, match="gradient rows of layer 1"):
        opt.step()
    opt.zero_grad()
    assert [s.pending_rows for s in opt.sparse] == [0, 0]  # nothing half-collected is left
    assert_bitwise(state_of(adapters, opt), before)
    poisoned_backward(adapters, hidden, bad_token=None)
    opt.step()
    state_of(adapters)  # waits for the background updates
    assert [s.step_count for s in opt.sparse] == [1, 1]
    engine.check()  # and the slot checker saw no ordering violation


def test_a_crashed_copy_thread_heals_at_the_next_forward(seed):
    """A copy-engine worker thread dies: the call that needed it raises EngineWorkerError, the
    next forward replaces the engine and works (the same outputs as an unbroken twin), training
    goes on, and repeated crashes do not pile up threads."""
    engine = FakeCopyEngine(max_delay=0.0, async_compute=False, workers=1)
    runtime = OffloadRuntime("cpu", torch.float32, D, engine=engine)
    adapters, _ = cpu_stack(runtime=runtime)
    twin, _ = cpu_stack()
    opt, twin_opt = OffloadedAdamW(adapters, lr=1e-2), OffloadedAdamW(twin, lr=1e-2)
    hidden = torch.randn(6, D)
    threads = None
    for crash in range(3):
        def boom(job):
            raise KeyError("bug in the copy thread")

        runtime.engine._submit = boom
        with pytest.raises(EngineWorkerError, match="bug in the copy thread"):
            adapters[0](hidden)
        assert runtime.engine.fault() is not None
        poisoned_backward(adapters, hidden, bad_token=None)  # heals first, then trains
        poisoned_backward(twin, hidden, bad_token=None)
        opt.step()
        twin_opt.step()
        opt.zero_grad()
        twin_opt.zero_grad()
        assert runtime.engine.fault() is None
        assert_bitwise(state_of(adapters, opt), state_of(twin, twin_opt))
        if threads is None:
            threads = threading.active_count()
        assert threading.active_count() <= threads  # the dead engine's threads are gone
    for a, b in zip(adapters, twin):
        assert torch.equal(a(hidden), b(hidden))
    runtime.engine.check()


def test_a_concurrent_forward_from_another_thread_is_one_clear_error(seed):
    """Under placement "cpu" the layers of a model share one slot pool: a forward from a second
    thread while the first thread's call holds slots raises ConcurrentUseError saying why (also
    before any warm-up call sized the slots); once the slots are free, that thread may run."""
    adapters, _ = cpu_stack()
    small, large = torch.randn(1, D), torch.randn(6, D)
    expected = adapters[1](large).clone()
    adapters2, _ = cpu_stack()
    for stack in (adapters, adapters2):  # warmed up, and not warmed up (a larger call to grow)
        routed = stack[0].start_routing(small)
        errors = []
        worker = threading.Thread(target=lambda: errors.append(_raised(lambda: stack[1](large))))
        worker.start()
        worker.join(30)
        assert len(errors) == 1 and isinstance(errors[0], ConcurrentUseError), errors
        assert "one thread at a time" in str(errors[0])
        stack[0].finish_values(routed)
    result = []
    worker = threading.Thread(target=lambda: result.append(adapters[1](large)))
    worker.start()
    worker.join(30)
    assert torch.equal(result[0], expected)


def _raised(call):
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return exc
    return None


def test_runtime_refuses_an_engine_that_would_not_order_its_reads():
    """The layers compute on the calling thread: a fake engine with an asynchronous "compute
    stream" would let them read slots before their copies land (NaN rows: the slots start as
    NaN), so the runtime refuses it."""
    with pytest.raises(ValueError, match="async_compute=False"):
        OffloadRuntime("cpu", torch.float32, D, engine=FakeCopyEngine(async_compute=True))


def test_growing_the_slots_keeps_gradient_copies_in_flight(seed):
    """Regression: a micro-batch needing more active rows than the slots hold replaces the
    prefetcher; gradient rows of the previous micro-batch still being copied to the host used to
    be cancelled with it (CopyCancelledError at the step, the micro-batch's gradients lost)."""
    engine = FakeCopyEngine(max_delay=0.0, async_compute=False, workers=1)
    runtime = OffloadRuntime("cpu", torch.float32, D, engine=engine)
    torch.manual_seed(seed)
    cfg = BASE.replace(placement="gpu")
    on_gpu = MEFTAdapter(D, cfg)
    on_cpu = MEFTAdapter(D, cfg.replace(placement="cpu"), runtime=runtime)
    on_cpu.load_state_dict(on_gpu.state_dict())
    sparse = on_cpu.configure_optimizer(lr=1e-2)
    gate = threading.Event()
    real_copy_out = engine.copy_out

    def late_copy_out(tensors):  # device->host gradient copies finish only when `gate` opens
        inner, outer = real_copy_out(tensors), Future()

        def finish():
            gate.wait(10)
            try:
                outer.set_result(inner.result())
            except BaseException as exc:  # noqa: BLE001
                outer.set_exception(exc)

        threading.Thread(target=finish, daemon=True).start()
        return outer

    engine.copy_out = late_copy_out
    small, large = torch.randn(1, D), torch.randn(40, D)
    on_cpu(small).sum().backward()  # slots sized for one token's rows; its gradient copy waits
    threading.Timer(0.2, gate.set).start()
    on_cpu(large).sum().backward()  # needs bigger slots
    on_gpu(small).sum().backward()
    on_gpu(large).sum().backward()
    on_cpu.offload.collect_grads()
    dense = torch.cat([on_gpu.keys.grad, on_gpu.values.grad], 1)
    assert rel_err(sparse.grad_norm(), torch.linalg.vector_norm(dense)) < 1e-5


def test_exit_with_copies_and_updates_in_flight_does_not_hang():
    """The interpreter exits promptly although an adapter's value-row copy is stuck in flight
    (engine paused), gradient copies are queued and a layer's CPU update is still running."""
    script = textwrap.dedent(
        """
        import time, torch
        from meft_triton import MEFTAdapter, MEFTConfig
        from meft_triton.offload import cpu_rowops
        from meft_triton.offload import OffloadRuntime
        from fake_copy_engine import FakeCopyEngine

        real = cpu_rowops.adamw_rows
        def slow(*a, **k):
            time.sleep(0.5)
            return real(*a, **k)
        cpu_rowops.adamw_rows = slow
        cfg = MEFTConfig(num_neurons=48, num_experts=6, experts_per_token=2, topk=5,
                         backend="torch", placement="cpu")
        engine = FakeCopyEngine(workers=2, async_compute=False)
        runtime = OffloadRuntime("cpu", torch.float32, 12, engine=engine)
        a, b = MEFTAdapter(12, cfg, runtime=runtime), MEFTAdapter(12, cfg, runtime=runtime)
        a.configure_optimizer(lr=1e-2)
        a(torch.randn(4, 12)).sum().backward()
        a.sparse_step()                        # an update running on a worker thread
        engine.pause()                         # copies stay in flight from here on
        b.start_routing(torch.randn(4, 12))    # a value-row copy that never completes
        print("exiting", time.monotonic(), flush=True)  # no close(): atexit, daemon threads must cope
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "exiting" in done.stdout
    # from the script's last line to its exit (CLOCK_MONOTONIC is system-wide); the subprocess
    # timeout above is far larger, so a slow exit fails here, not as a timeout
    assert time.monotonic() - float(done.stdout.split()[-1]) < 20


# ------------------------------------------------------------------------ property tests


@st.composite
def layer_setups(draw):
    experts = draw(st.sampled_from([1, 2, 3, 4, 6]))
    per_expert = draw(st.sampled_from([1, 2, 5, 8]))
    p = draw(st.integers(1, experts))
    cfg = MEFTConfig(num_neurons=experts * per_expert, num_experts=experts, experts_per_token=p,
                     topk=draw(st.integers(1, p * per_expert)), gate=draw(st.sampled_from(["logit", "softmax"])),
                     backend=draw(st.sampled_from(["torch", "torch", "triton"])), key_init_std=1.0,
                     value_init_std=1.0, router_init_scale=draw(st.sampled_from([0.3, 1.0])),
                     backward_rows=draw(st.sampled_from(["refetch", "keep"])))
    d = draw(st.sampled_from([1, 3, 8, 13]))
    lead = draw(st.sampled_from([(1,), (5,), (2, 3), (4, 1)]))
    return cfg, d, lead, draw(st.integers(0, 2**16))


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(setup=layer_setups())
def test_cpu_and_gpu_placements_agree_property(setup):
    """Random valid configs and shapes (any E, S, P, K_top, gate, backend, backward_rows, d,
    leading dims): placement "cpu" gives the forward, dh, dG and the key/value gradient rows of
    placement "gpu" with the same weights (fp32, 1e-5)."""
    cfg, d, lead, seed = setup
    torch.manual_seed(seed)
    on_gpu = MEFTAdapter(d, cfg)
    on_cpu = MEFTAdapter(d, cfg.replace(placement="cpu", residency="per-micro-batch"))  # one backward's rows
    on_cpu.load_state_dict(on_gpu.state_dict())
    rows = assert_placements_agree(on_gpu, on_cpu, torch.randn(*lead, d)).row_ids
    untouched = torch.ones(cfg.num_neurons, dtype=torch.bool)
    untouched[rows] = False  # rows never shipped have no gradient under placement "gpu" either
    assert not on_gpu.keys.grad[untouched].any() and not on_gpu.values.grad[untouched].any()
    on_cpu.offload.runtime.close()


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50)

    def make(seed: int):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config).eval()

    return make


def test_save_load_forward_identical_both_placements_property(tiny_llama, tmp_path_factory):
    """Random configs, layer subsets and placements, adapters drawn from a random seed and
    trained one step: save -> load into a fresh model (whose own init differs) -> forward is
    bitwise identical, and so are the master rows."""
    from meft_triton import attach_meft, create_meft_optimizer, load_adapter, save_adapter
    from meft_triton.integration import meft_state_tensors

    ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(0))

    @st.composite
    def setups(draw):
        experts = draw(st.sampled_from([1, 2, 4]))
        per_expert = draw(st.sampled_from([1, 3, 8]))
        p = draw(st.integers(1, experts))
        cfg = MEFTConfig(num_neurons=experts * per_expert, num_experts=experts, experts_per_token=p,
                         topk=draw(st.integers(1, p * per_expert)), gate=draw(st.sampled_from(["logit", "softmax"])),
                         backend="torch", value_init_std=0.1, placement=draw(st.sampled_from(["gpu", "cpu"])))
        return cfg, draw(st.sampled_from([[0], [1], [0, 1]])), draw(st.integers(0, 2**16))

    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(setups())
    def check(setup):
        cfg, layers, seed = setup
        model = attach_meft(tiny_llama(0), cfg, layers=layers)
        torch.manual_seed(seed)
        for adapter in (m.adapter for m in model.modules() if hasattr(m, "adapter")):
            adapter.reset_parameters()
        model.train()
        opt = create_meft_optimizer(model, lr=1e-2)
        model(ids, labels=ids).loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            expected = model(ids).logits
        directory = tmp_path_factory.mktemp("saved")
        save_adapter(model, directory)
        torch.manual_seed(seed + 1)
        restored = load_adapter(tiny_llama(0), directory)
        with torch.no_grad():
            assert torch.equal(restored(ids).logits, expected)
        saved, loaded = meft_state_tensors(model), meft_state_tensors(restored)
        assert saved.keys() == loaded.keys()
        for name in saved:
            assert torch.equal(saved[name], loaded[name]), name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check()
