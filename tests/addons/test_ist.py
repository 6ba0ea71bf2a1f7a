"""IST layer selection: score rule, sampling statistics, frozen layers stay untouched
(placement "gpu" with torch AdamW and placement "cpu" with OffloadedAdamW), the output-scale
hook, the HF Trainer callback, and the device->host bytes / CPU optimizer time with and
without IST.

``python tests/addons/test_ist.py [steps]`` prints the measurement table (tiny Llama, placement
"cpu", 4 layers, rho = 0.25)."""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meft_triton import MEFTAdapter, MEFTConfig  # noqa: E402
from meft_triton import OffloadedAdamW, attach_meft, create_meft_optimizer, meft_adapters, meft_parameters
from meft_triton import ISTConfig, ISTScheduler
from meft_triton.addons.ist import OutputScale, scaled_adapter_outputs  # noqa: E402
from oracle import adapter_tensors  # noqa: E402

VOCAB = 100
CFG = MEFTConfig(num_neurons=256, num_experts=16, experts_per_token=4, topk=8, backend="torch",
                 value_init_std=0.05)


def tiny_model(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def batch(seed: int = 1, rows: int = 4, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=gen)


def small_adapters(count: int, placement: str = "gpu"):
    cfg = MEFTConfig(num_neurons=32, num_experts=4, experts_per_token=2, topk=4, backend="torch",
                     value_init_std=0.1, placement=placement)
    torch.manual_seed(0)
    if placement == "gpu":
        return [MEFTAdapter(8, cfg) for _ in range(count)]
    from meft_triton.offload import OffloadRuntime

    runtime = OffloadRuntime("cpu", torch.float32, 8)
    return [MEFTAdapter(8, cfg, runtime=runtime) for _ in range(count)]


# ------------------------------------------------------------------------------ config


def test_config_validation_and_counts():
    cfg = ISTConfig()
    assert (cfg.interval, cfg.passes, cfg.suppression, cfg.score_lr, cfg.ratio) == (10, 3, 0.25, 10.0, 0.25)
    assert cfg.train_layers(32) == 8 and cfg.train_layers(2) == 1 and cfg.train_layers(6) == 2
    assert cfg.scored_layers(32) == 16 and cfg.scored_layers(3) == 2
    for bad, err in [(dict(ratio=0.0), ValueError), (dict(ratio=1.5), ValueError),
                     (dict(interval=0), ValueError), (dict(passes=1.5), TypeError),
                     (dict(mode="random"), ValueError), (dict(suppression=-1.0), ValueError),
                     (dict(sample_fraction=0.0), ValueError), (dict(eval_mode=1), TypeError),
                     (dict(reuse_bytes=-1), ValueError)]:
        with pytest.raises(err):
            ISTConfig(**bad)
    with pytest.raises(TypeError, match="MEFTAdapter"):
        ISTScheduler([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="no MEFT adapters"):
        ISTScheduler(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ------------------------------------------------------------------------------ score rule


def test_score_update_literal_case():
    """Scores 0, score_lr 10, sets {0} and {1}, losses 0 and ln 2: r = (1, 0.5), a = (+-0.25),
    sigmoid'(0) = 0.25, so s = (+0.625, -0.625, 0)."""
    sched = ISTScheduler(small_adapters(3), ISTConfig(score_lr=10.0))
    adv = sched.update_scores([[0], [1]], [0.0, math.log(2.0)])
    assert adv.tolist() == [0.25, -0.25]
    assert sched.scores.tolist() == [0.625, -0.625, 0.0]


def test_score_update_hand_computed_overlapping_sets():
    sched = ISTScheduler(small_adapters(4), ISTConfig(score_lr=7.0))
    start = [0.0, 1.0, -1.0, 0.5]
    sched.scores = torch.tensor(start, dtype=torch.float64)
    sets, losses = [[0, 1], [1, 2], [3, 0]], [1.0, 2.0, 0.5]
    # by hand, scalar by scalar
    r = [math.exp(-v) for v in losses]
    mean = sum(r) / 3
    a = [x - mean for x in r]
    sig = [1 / (1 + math.exp(-s)) for s in start]
    expected = list(start)
    for k, layers in enumerate(sets):
        for i in layers:
            expected[i] += 7.0 * a[k] * sig[i] * (1 - sig[i])  # scores from before the round
    sched.update_scores(sets, losses)
    for got, want in zip(sched.scores.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    # a layer suppressed where the loss barely rose (high reward) gains score: trained less
    assert expected[3] > start[3] and expected[2] < start[2]
    with pytest.raises(ValueError, match="one loss per set"):
        sched.update_scores([[0]], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        sched.update_scores([[0]], [float("nan")])


def test_scoring_round_suppresses_the_sampled_layers():
    """score() evaluates loss_fn once per pass with exactly that pass's adapters scaled by
    `suppression`, without a graph, and applies the rule to the recorded losses."""
    adapters = small_adapters(4)
    sched = ISTScheduler(adapters, ISTConfig(passes=3, suppression=0.25, seed=5))
    h = torch.randn(5, 8)
    full = [a(h).detach() for a in adapters]
    seen = []

    def loss_fn():
        outs = [a(h) for a in adapters]
        assert not any(o.requires_grad for o in outs)
        scaled = [i for i, (o, f) in enumerate(zip(outs, full)) if torch.allclose(o, 0.25 * f)
                  and not torch.allclose(o, f)]
        seen.append(scaled)
        return sum(o.square().sum() for o in outs)

    round_ = sched.score(loss_fn)
    assert seen == round_.sets and all(len(s) == 2 for s in seen)
    check = ISTScheduler(small_adapters(4), ISTConfig(passes=3))
    check.update_scores(round_.sets, round_.losses)
    assert torch.equal(check.scores, sched.scores)
    # hooks are gone afterwards
    assert all(torch.equal(a(h), f) for a, f in zip(adapters, full))


@pytest.mark.parametrize("placement", ["gpu", "cpu"], ids=["placement-device", "placement-host"])
def test_output_scale_hook_both_placements(placement):
    adapters = small_adapters(2, placement)
    h = torch.randn(6, 8)
    with torch.no_grad():
        base = [a(h).clone() for a in adapters]
        with scaled_adapter_outputs([adapters[1]], 0.25):
            scaled = [a(h).clone() for a in adapters]
        after = [a(h).clone() for a in adapters]
    assert torch.equal(scaled[0], base[0]) and torch.equal(after[1], base[1])
    torch.testing.assert_close(scaled[1], 0.25 * base[1])
    if placement == "cpu":
        handle = OutputScale(adapters[0], 0.5)
        with pytest.raises(RuntimeError, match="already scaled"):
            OutputScale(adapters[0], 0.5)
        handle.remove()
        assert "finish_values" not in adapters[0].__dict__
        adapters[0].offload.runtime.close()


def test_scoring_through_the_model_wrapper_cpu_placement():
    """Under placement "cpu" MEFTMLP calls start_routing/finish_values directly: the scale
    still applies, and scoring moves no gradient bytes to the host."""
    model = attach_meft(tiny_model(2), CFG.replace(placement="cpu"))
    ids = batch()
    with torch.no_grad():
        base = model(ids, labels=ids).loss.item()
        adapters = list(meft_adapters(model).values())
        with scaled_adapter_outputs(adapters, 0.0):
            off = model(ids, labels=ids).loss.item()
    runtime = adapters[0].offload.runtime
    sched = ISTScheduler(model, ISTConfig(passes=2))
    sched.score(lambda: model(ids, labels=ids).loss)
    assert off != base and runtime.bytes_to_host == 0
    assert all(loss != base for loss in sched.last_round.losses)


def scoring_round(reuse_bytes: int, passes: int = 3, device: str = "cpu", backend: str = "auto",
                  rows: int = 8, length: int = 16, residency: str = "per-micro-batch"):
    """One scoring round over a tiny placement-"cpu" Llama; returns the round, the bytes it
    copied host->device and the rows it reused. backend "auto": the reference on CPU, the
    Triton kernels and the CUDA copy engine on CUDA. ``reuse_bytes`` is a per-micro-batch
    mechanism: under "resident" the value rows stay on the device anyway."""
    model = attach_meft(tiny_model(3).to(device), CFG.replace(placement="cpu", backend=backend, residency=residency))
    runtime = next(iter(meft_adapters(model).values())).offload.runtime
    ids = batch(rows=rows, length=length).to(device)
    sched = ISTScheduler(model, ISTConfig(passes=passes, reuse_bytes=reuse_bytes, seed=3))
    sched.score(lambda: model(ids, labels=ids).loss)
    copied, reused = runtime.bytes_to_device, runtime.rows_reused
    assert runtime.row_cache is None  # dropped at the end of the round
    runtime.close()
    return sched.last_round, copied, reused


@pytest.mark.parametrize("device,backend", [("cpu", "auto"), ("cpu", "triton"),
                                            pytest.param("cuda", "auto", marks=pytest.mark.gpu)])
def test_scoring_passes_reuse_rows_already_on_the_device(device, backend):
    """Placement "cpu": a round's later passes copy only the rows they add, with the same losses
    (on CPU also through the Triton kernels, under the interpreter)."""
    # the Triton interpreter on CPU: a smaller (odd) batch, the same checks
    shape = dict(rows=3, length=7) if (device, backend) == ("cpu", "triton") else {}
    off, copied_off, reused_off = scoring_round(reuse_bytes=0, device=device, backend=backend, **shape)
    on, copied_on, reused_on = scoring_round(reuse_bytes=1 << 30, device=device, backend=backend, **shape)
    assert reused_off == 0 and reused_on > 0
    assert on.losses == off.losses and on.sets == off.sets
    # three passes over one batch: everything after the first pass is mostly reuse
    assert copied_on < 0.6 * copied_off, (copied_on, copied_off)
    row_bytes = 32 * 4  # d = 32, float32
    assert copied_off - copied_on == reused_on * row_bytes
    # a budget too small for any layer's rows: nothing is kept, every pass copies everything
    _, copied_tiny, reused_tiny = scoring_round(reuse_bytes=row_bytes, device=device, backend=backend, **shape)
    assert (copied_tiny, reused_tiny) == (copied_off, 0)
    # residency "resident": the value rows the first pass copied serve the later ones
    resident, copied_resident, _ = scoring_round(reuse_bytes=0, device=device, backend=backend,
                                                 residency="resident", **shape)
    assert resident.losses == off.losses and resident.sets == off.sets
    assert copied_resident < 0.6 * copied_off, (copied_resident, copied_off)


def test_row_cache_is_bypassed_with_autograd():
    """Training forwards inside a reusing_rows block take the normal slot path (their backward
    needs it); only no-grad passes read or fill the cache (residency "per-micro-batch": under
    "resident" the value table serves both)."""
    model = attach_meft(tiny_model(2), CFG.replace(placement="cpu", residency="per-micro-batch"))
    runtime = next(iter(meft_adapters(model).values())).offload.runtime
    ids = batch()
    with runtime.reusing_rows(1 << 30) as cache:
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert cache.used_bytes == 0 and runtime.rows_reused == 0
        with torch.no_grad():
            model(ids, labels=ids)
            filled = cache.used_bytes
            model(ids, labels=ids)
        assert filled > 0 and runtime.rows_reused > 0
        with pytest.raises(RuntimeError, match="nest"):
            with runtime.reusing_rows(1):
                pass
    runtime.close()


# ------------------------------------------------------------------------------ sampling


def inclusion_probabilities(weights: list[float], k: int) -> list[float]:
    """Exact P(layer i among k successive draws without replacement), by enumeration."""
    n = len(weights)
    prob = [0.0] * n
    for order in itertools.permutations(range(n), k):
        p, left = 1.0, sum(weights)
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        for i in order:
            prob[i] += p
    return prob


@pytest.mark.parametrize("num_layers,ratio", [(4, 0.25), (5, 0.4)])
def test_selection_frequencies_follow_the_weights(num_layers, ratio):
    sched = ISTScheduler(small_adapters(num_layers), ISTConfig(ratio=ratio, seed=1234))
    sched.scores = torch.linspace(-1.5, 2.0, num_layers, dtype=torch.float64)
    weights = torch.sigmoid(-sched.scores).tolist()
    k = sched.config.train_layers(num_layers)
    draws = 6000
    counts = torch.zeros(num_layers)
    for _ in range(draws):
        picked = sched.sample_train_layers()
        assert len(picked) == k == len(set(picked))
        counts[picked] += 1
    expected = torch.tensor(inclusion_probabilities(weights, k)) * draws
    if k == 1:  # multinomial: Pearson chi-square, df = L - 1, 99.9% quantile for df = 3 is 16.27
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 16.27, (chi2, counts, expected)
    p = expected / draws
    sigma = (draws * p * (1 - p)).sqrt()
    assert ((counts - expected).abs() < 4 * sigma).all(), (counts, expected)
    # the low-score layer (most important) is trained most often
    assert counts.argmax() == 0


def test_uniform_mode_is_the_control():
    sched = ISTScheduler(small_adapters(4), ISTConfig(mode="uniform", seed=3, interval=1))
    sched.scores = torch.tensor([-3.0, 0.0, 1.0, 3.0], dtype=torch.float64)  # ignored
    calls = []
    counts = torch.zeros(4)
    for step in range(4000):
        counts[sched.before_step(step, lambda: calls.append(1) or 0.0)] += 1
    assert not calls, "uniform mode runs no scoring passes"
    assert ((counts - 1000).abs() < 4 * math.sqrt(4000 * 0.25 * 0.75)).all(), counts
    importance = ISTScheduler(small_adapters(2), ISTConfig(interval=5))
    with pytest.raises(ValueError, match="needs loss_fn"):
        importance.before_step(0)
    assert len(importance.before_step(1)) == 1  # not a scoring step


def test_select_freezes_and_release_restores():
    adapters = small_adapters(4)
    sched = ISTScheduler(adapters, ISTConfig(mode="uniform", seed=0))
    for a in adapters:
        for p in a.parameters():
            p.grad = torch.zeros_like(p)
    chosen = sched.before_step(0)
    for i, a in enumerate(adapters):
        for p in a.parameters():
            assert p.requires_grad == (i in chosen)
            assert (p.grad is not None) == (i in chosen)
    state = sched.state_dict()
    nxt = sched.sample_train_layers()
    sched.load_state_dict(state)
    assert sched.sample_train_layers() == nxt and sched.selected == chosen
    sched.release()
    assert all(p.requires_grad for a in adapters for p in a.parameters())


# ------------------------------------------------------------------------------ frozen state


def snapshot_gpu(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters() if "adapter" in n}
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            state[id(p)] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return params, state


def test_unselected_layers_bit_identical_gpu_placement_torch_adamw():
    model = attach_meft(tiny_model(4), CFG)
    model.train()
    ids = batch()
    opt = create_meft_optimizer(model, lr=1e-2, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)  # MEFTAdamW: AdamW with the non-finite check
    for _ in range(2):  # every layer has optimizer state before IST starts
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # stale zero grads: select() must still drop them
    sched = ISTScheduler(model, ISTConfig(interval=1, seed=7))
    adapters = list(meft_adapters(model).values())
    for _ in range(3):
        chosen = sched.before_step(0, lambda: model(ids, labels=ids).loss)
        assert len(chosen) == 1
        params, state = snapshot_gpu(model, opt)
        model(ids, labels=ids).loss.backward()
        opt.step()
        for i, adapter in enumerate(adapters):
            prefix = f"model.layers.{sched.layer_ids[i]}.mlp.adapter."
            changed = [not torch.equal(p, params[prefix + n]) for n, p in adapter.named_parameters()]
            for p in adapter.parameters():
                before = state[id(p)]
                after = opt.state[p]
                same = (after["step"] == before["step"]
                        and torch.equal(after["exp_avg"], before["exp_avg"])
                        and torch.equal(after["exp_avg_sq"], before["exp_avg_sq"]))
                assert same == (i not in chosen), (i, chosen)
            assert any(changed) == (i in chosen), (i, chosen)
            if i not in chosen:
                assert not any(changed)
        opt.zero_grad(set_to_none=False)


def snapshot_cpu(adapters, opt):
    out = []
    for a, sparse in zip(adapters, opt.sparse):
        a.offload.wait_for_update()
        s = a.offload.store
        out.append(dict(records=s.records.clone(), m=s.exp_avg.clone(), v=s.exp_avg_sq.clone(),
                        t=sparse.step_count, router=a.router.weight.detach().clone(),
                        router_state={k: (v.clone() if torch.is_tensor(v) else v)
                                      for k, v in opt.state.get(a.router.weight, {}).items()}))
    return out


def test_unselected_layers_bit_identical_cpu_placement_offloaded_adamw():
    model = attach_meft(tiny_model(4), CFG.replace(placement="cpu"))
    model.train()
    ids = batch()
    opt = create_meft_optimizer(model, lr=1e-2, weight_decay=0.01)
    assert isinstance(opt, OffloadedAdamW)
    adapters = list(meft_adapters(model).values())
    runtime = adapters[0].offload.runtime
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    sched = ISTScheduler(model, ISTConfig(interval=1, seed=11))
    for _ in range(3):
        chosen = sched.before_step(0, lambda: model(ids, labels=ids).loss)
        before = snapshot_cpu(adapters, opt)
        host_bytes = runtime.bytes_to_host
        loss = model(ids, labels=ids).loss
        loss.backward()
        for i, a in enumerate(adapters):
            a.offload.flush_grads()  # residency "resident": the step's device sums go home now
            sent = len(a.offload.summing) + len(a.offload.pending_grads)  # (summed as they land)
            assert (sent > 0) == (i in chosen), "no gradient rows move"
        moved = runtime.bytes_to_host - host_bytes
        opt.step()
        for i, a in enumerate(adapters):
            if i not in chosen:
                assert a.offload.pending_step is None, "no optimizer work for a frozen layer"
        after = snapshot_cpu(adapters, opt)
        for i, (b, c) in enumerate(zip(before, after)):
            same = {k: (torch.equal(b[k], c[k]) if torch.is_tensor(b[k]) else b[k] == c[k])
                    for k in ("records", "m", "v", "t", "router")}
            same["router_state"] = all(
                torch.equal(b["router_state"][k], c["router_state"][k]) if torch.is_tensor(b["router_state"][k])
                else b["router_state"][k] == c["router_state"][k] for k in b["router_state"])
            if i in chosen:
                assert not any(same.values()), (i, same)
                assert c["t"] == b["t"] + 1
            else:
                assert all(same.values()), (i, same)
        assert moved > 0
        opt.zero_grad()
    runtime.close()


# ------------------------------------------------------------------------------ HF Trainer


def test_hf_trainer_callback(tmp_path):
    pytest.importorskip("accelerate")
    from meft_triton import ISTCallback

    model = attach_meft(tiny_model(4), CFG)
    ids = batch(rows=8)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        gradient_accumulation_steps=2, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    sched = ISTScheduler(model, ISTConfig(interval=2, seed=0))
    opt = create_meft_optimizer(model, args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   optimizers=(opt, None), callbacks=[ISTCallback(sched)])
    trainer.train()
    assert sched.steps_selected == 6 and int(sched.selection_counts.sum()) == 6
    assert sched.last_round is not None and sched.last_round.step == 4
    assert not torch.equal(sched.scores, torch.zeros(4, dtype=torch.float64))
    steps = [int(opt.state[p]["step"]) for p in meft_parameters(model) if p in opt.state]
    assert sum(steps) / 3 == 6, "each step trains exactly one layer's three parameters"
    assert all(p.requires_grad for p in meft_parameters(model)), "released at the end"


def test_hf_trainer_callback_saves_and_resumes_the_scheduler(tmp_path):
    """A Trainer checkpoint carries the IST state; resuming from it continues the same run."""
    pytest.importorskip("accelerate")
    from meft_triton import ISTCallback
    from meft_triton.addons.ist import read_scheduler_state

    ids = batch(rows=8)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    fixed = {"input_ids": ids[:4], "labels": ids[:4]}

    def run(max_steps, resume=None):
        model = attach_meft(tiny_model(4), CFG)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
            learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=3, use_cpu=True,
            disable_tqdm=True, dataloader_num_workers=0, seed=0)
        sched = ISTScheduler(model, ISTConfig(interval=2, seed=0))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                       optimizers=(create_meft_optimizer(model, args), None),
                                       callbacks=[ISTCallback(sched, batch=fixed)])
        trainer.train(resume_from_checkpoint=resume)
        return sched

    full = run(6)
    saved = read_scheduler_state(tmp_path / "checkpoint-3" / "ist_scheduler.pt")
    assert saved["steps_selected"] == 3 and not torch.equal(saved["scores"], torch.zeros(4, dtype=torch.float64))
    resumed = run(6, resume=str(tmp_path / "checkpoint-3"))
    assert resumed.steps_selected == 6 and torch.equal(resumed.selection_counts, full.selection_counts)
    assert torch.equal(resumed.scores, full.scores)
    with pytest.warns(UserWarning, match="start again from zero"):
        (tmp_path / "checkpoint-3" / "ist_scheduler.pt").unlink()
        run(6, resume=str(tmp_path / "checkpoint-3"))


def test_training_checkpoint_holds_the_ist_state(tmp_path):
    from meft_triton import load_training_state, save_training_state

    model = attach_meft(tiny_model(4), CFG)
    ids = batch()
    sched = ISTScheduler(model, ISTConfig(interval=1, seed=5))
    for step in range(3):
        sched.before_step(step, lambda: model(ids, labels=ids).loss)
    save_training_state(model, None, tmp_path / "ckpt", step=3, ist=sched)
    fresh = ISTScheduler(model, ISTConfig(interval=1, seed=5))
    assert load_training_state(model, None, tmp_path / "ckpt", ist=fresh) == 3
    assert torch.equal(fresh.scores, sched.scores) and fresh.selected == sched.selected
    assert fresh.sample_train_layers() == sched.sample_train_layers()  # the generator too
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        load_training_state(model, None, tmp_path / "ckpt", ist=ISTScheduler(list(meft_adapters(model).values())[:2]))
    with pytest.raises(TypeError, match="ist must be an ISTScheduler"):
        save_training_state(model, None, tmp_path / "ckpt", step=3, ist=object())
    save_training_state(model, None, tmp_path / "plain", step=3)
    with pytest.raises(ValueError, match="without an IST scheduler state"):
        load_training_state(model, None, tmp_path / "plain", ist=fresh)


def test_cpu_placement_ist_run_resumes_bitwise(tmp_path):
    """Placement "cpu" + IST + OffloadedAdamW: saving at step 5 and resuming in a fresh model
    ends steps 5..9 bitwise where the uninterrupted run ends (rows, routers, layer scores)."""
    from meft_triton import load_training_state, save_training_state

    def make():
        model = attach_meft(tiny_model(4), CFG.replace(placement="cpu")).train()
        return model, create_meft_optimizer(model, lr=1e-2), ISTScheduler(model, ISTConfig(interval=2, seed=1))

    def train(model, opt, sched, steps):
        for step in steps:
            ids = batch(seed=step)
            sched.before_step(step, lambda: model(ids, labels=ids).loss)
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    def tensors(model):
        return adapter_tensors(meft_adapters(model).values())

    model, opt, sched = make()
    train(model, opt, sched, range(5))
    save_training_state(model, opt, tmp_path / "ckpt", step=5, ist=sched)
    train(model, opt, sched, range(5, 10))
    resumed, resumed_opt, resumed_sched = make()
    assert load_training_state(resumed, resumed_opt, tmp_path / "ckpt", ist=resumed_sched) == 5
    train(resumed, resumed_opt, resumed_sched, range(5, 10))
    assert all(torch.equal(a, b) for a, b in zip(tensors(model), tensors(resumed)))
    assert torch.equal(sched.scores, resumed_sched.scores)


# ------------------------------------------------------------------------------ measurement


@contextlib.contextmanager
def timed_row_updates():
    """Record the duration of every SparseRowAdamW row update (it runs on worker threads)."""
    from meft_triton import SparseRowAdamW

    real_apply, durations = SparseRowAdamW._apply, []

    def timed_apply(self, acc, hp):
        start = time.perf_counter()
        try:
            return real_apply(self, acc, hp)
        finally:
            durations.append(time.perf_counter() - start)

    SparseRowAdamW._apply = timed_apply
    try:
        yield durations
    finally:
        SparseRowAdamW._apply = real_apply


def measure(use_ist: bool, steps: int, ratio: float = 0.25, layers: int = 4, seed: int = 0,
            reuse_bytes: int = 1 << 30, residency: str = "per-micro-batch") -> dict:
    """Placement "cpu" (``residency``: the README's table is "per-micro-batch", where
    ``reuse_bytes`` applies), OffloadedAdamW, tiny Llama: per step, the device->host bytes (mean), the
    host->device bytes (mean; with IST it includes the scoring passes every 10 steps),
    the optimizer step (``opt.step()`` plus waiting for the row-sparse updates; median), the
    row-sparse updates alone (sum over layers; median) and the whole step (median and mean; a
    step includes the scoring passes when it runs them). Medians resist other processes on a
    shared machine."""
    cfg = MEFTConfig(num_neurons=4096, num_experts=64, experts_per_token=4, topk=16,
                     backend="torch", value_init_std=0.05, placement="cpu", residency=residency)
    model = attach_meft(tiny_model(layers, seed), cfg)
    model.train()
    ids = batch(rows=8, length=16)
    opt = create_meft_optimizer(model, lr=1e-3)
    adapters = list(meft_adapters(model).values())
    runtime = adapters[0].offload.runtime
    sched = (ISTScheduler(model, ISTConfig(ratio=ratio, interval=10, seed=seed, reuse_bytes=reuse_bytes))
             if use_ist else None)
    host_bytes, opt_times, update_times, step_times = 0, [], [], []
    with timed_row_updates() as durations:
        for step in range(steps):
            start = time.perf_counter()
            if sched is not None:
                sched.before_step(step, lambda: model(ids, labels=ids).loss)
            before = runtime.bytes_to_host
            model(ids, labels=ids).loss.backward()
            t0 = time.perf_counter()
            opt.step()
            host_bytes += runtime.bytes_to_host - before  # residency "resident" sends its sums at the step
            for a in adapters:
                a.offload.wait_for_update()
            opt_times.append(time.perf_counter() - t0)
            update_times.append(sum(durations))
            durations.clear()
            opt.zero_grad()
            step_times.append(time.perf_counter() - start)
    runtime.close()
    ms = lambda values: 1e3 * statistics.median(values)  # noqa: E731
    return dict(bytes_to_host=host_bytes / steps, bytes_to_device=runtime.bytes_to_device / steps,
                optimizer_ms=ms(opt_times), row_update_ms=ms(update_times),
                step_ms=ms(step_times), mean_step_ms=1e3 * statistics.fmean(step_times))


@pytest.mark.parametrize("residency", ["resident", "per-micro-batch"])
def test_ist_cuts_host_bytes_by_about_one_minus_rho(residency):
    full = measure(False, steps=4, residency=residency)
    ist = measure(True, steps=4, residency=residency)
    ratio = ist["bytes_to_host"] / full["bytes_to_host"]
    print(f"bytes_to_host/step: full {full['bytes_to_host']:.0f}, IST {ist['bytes_to_host']:.0f} "
          f"(ratio {ratio:.3f}); optimizer ms/step: full {full['optimizer_ms']:.2f}, "
          f"IST {ist['optimizer_ms']:.2f}")
    assert 0.15 < ratio < 0.35, ratio  # one of four layers per step: about rho = 0.25


if __name__ == "__main__":
    import sys

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    torch.set_num_threads(1)
    rows = {"all layers": measure(False, steps), "IST rho=0.25": measure(True, steps),
            "IST rho=0.25, no scoring reuse": measure(True, steps, reuse_bytes=0)}
    print(f"placement cpu (residency per-micro-batch), tiny Llama d=32 x 4 layers, N=4096 E=64 P=4 K=16, 8x16 tokens, "
          f"{steps} steps, torch {torch.__version__}, 1 thread")
    print("| run | device->host bytes/step (mean) | host->device bytes/step (mean) | optimizer step ms "
          "(median) | of which row-sparse updates ms (median) | step ms (median) | step ms (mean) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['bytes_to_host']:,.0f} | {r['bytes_to_device']:,.0f} | {r['optimizer_ms']:.2f} | "
              f"{r['row_update_ms']:.2f} | {r['step_ms']:.1f} | {r['mean_step_ms']:.1f} |")
    full, ist = rows["all layers"], rows["IST rho=0.25"]
    print(f"IST / all: bytes {ist['bytes_to_host'] / full['bytes_to_host']:.3f}, optimizer step "
          f"{ist['optimizer_ms'] / full['optimizer_ms']:.3f}, row-sparse updates "
          f"{ist['row_update_ms'] / full['row_update_ms']:.3f}")
