"""transformers integration: attach/detach, training, save/load, checkpointing, Trainer.

Tiny random Llama / Mistral / Qwen2 models on CPU (hidden 32, 2 layers, vocab 100)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from meft_triton import MEFTAdapter, MEFTConfig  # noqa: E402
from meft_triton import integration as integ
from meft_triton.io import adapter_files  # noqa: E402
from meft_triton import (OffloadedAdamW, attach_meft, create_meft_optimizer, detach_meft, load_adapter, meft_adapters, meft_parameters, save_adapter)

from oracle import adapter_tensors, take_grad_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 100
CFG = MEFTConfig(num_neurons=256, num_experts=16, experts_per_token=4, topk=8, backend="torch")


def tiny_config(arch: str):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.eval()


def batch(seed: int = 1, rows: int = 4, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=gen)


def randomize_adapters(model, seed: int = 3, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in meft_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


ARCHS = ["llama", "mistral", "qwen2"]


# ---------------------------------------------------------------------------------- attach


@pytest.mark.parametrize("arch", ARCHS)
def test_attach_freezes_backbone_and_starts_equal(arch):
    model = tiny_model(arch)
    ids = batch()
    before = logits(model, ids)
    n_backbone = sum(p.numel() for p in model.parameters())
    assert attach_meft(model, CFG) is model

    adapters = meft_adapters(model)
    assert list(adapters) == [0, 1]
    for i, adapter in adapters.items():
        mlp = model.model.layers[i].mlp
        assert type(mlp).__name__.endswith("MLP") and mlp.adapter is adapter  # adapted in place
        assert isinstance(adapter, MEFTAdapter) and adapter.hidden_size == 32
        assert adapter.keys.dtype == torch.float32
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in meft_parameters(model)}
    assert sum(p.numel() for p in meft_parameters(model)) == 2 * 32 * (16 + 2 * 256)
    assert sum(p.numel() for p in model.parameters()) == n_backbone + 2 * 32 * (16 + 2 * 256)
    # values start at zero: the adapted model equals the base model exactly
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(ValueError, match="already has MEFT adapters"):
        attach_meft(model, CFG)


def test_training_lowers_loss():
    model = tiny_model("llama")
    attach_meft(model, CFG)
    model.train()
    ids = batch()
    opt = torch.optim.AdamW(meft_parameters(model), lr=1e-2)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), n
            assert p.grad is None, n


def test_layers_subset_and_bad_layers():
    model = tiny_model("qwen2")
    attach_meft(model, CFG, layers=[1])
    assert list(meft_adapters(model)) == [1]
    assert not hasattr(model.model.layers[0].mlp, "adapter")
    assert model.model.layers[1].mlp.adapter is meft_adapters(model)[1]
    detach_meft(model)
    for bad, err, msg in [([2], ValueError, r"out of range \[0, 2\)"),
                          ([-1], ValueError, "out of range"),
                          ([0, 0], ValueError, "duplicates"),
                          ([], ValueError, "at least one"),
                          ([True], TypeError, "ints"),
                          ([0.0], TypeError, "ints"),
                          ("some", ValueError, "'all'"),
                          (3, TypeError, "list of ints")]:
        with pytest.raises(err, match=msg):
            attach_meft(model, CFG, layers=bad)
        assert not meft_adapters(model)
        assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="MEFTConfig"):
        attach_meft(model, CFG.to_dict())
    with pytest.raises(TypeError, match="dtype"):
        attach_meft(model, CFG, dtype=torch.int32)


def test_adapter_dtype_option():
    model = tiny_model("llama").to(torch.bfloat16)
    attach_meft(model, CFG)
    assert all(p.dtype == torch.float32 for p in meft_parameters(model))
    detach_meft(model)
    attach_meft(model, CFG, dtype=None)
    assert all(p.dtype == torch.bfloat16 for p in meft_parameters(model))
    ids = batch()
    randomize_adapters(model)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in meft_parameters(model))


class NoMLPModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_no_mlp_clear_error():
    model = NoMLPModel()
    with pytest.raises(ValueError, match=r"NoMLPModel.*target=\('fc1', 'fc2'\)"):
        attach_meft(model, CFG)
    with pytest.raises(ValueError, match=r"NoMLPModel.*'0'.*'missing'"):
        attach_meft(model, CFG, target=("0", "missing"))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class FFNByStructure(nn.Module):
    """A decoder stack whose MLP has an unusual name but fc1/fc2 projections."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.channel_mixer = nn.Module()
            self.channel_mixer.fc1 = nn.Linear(16, 24)
            self.channel_mixer.fc2 = nn.Linear(24, 16)

    def __init__(self):
        super().__init__()
        self.misc = nn.ModuleList([nn.Linear(2, 2)])
        self.stack = nn.ModuleList(self.Block() for _ in range(3))


def test_structure_detection_and_other_architectures():
    model = FFNByStructure()
    name, stack = integ.find_decoder_layers(model)
    assert name == "stack" and len(stack) == 3
    assert integ.find_mlp(stack[0])[0] == "channel_mixer"
    for arch_config in [
        transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=VOCAB),
        transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                bos_token_id=1, eos_token_id=2),
    ]:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(arch_config).eval()
        ids = batch()
        before = logits(model, ids)
        attach_meft(model, CFG)
        assert list(meft_adapters(model)) == [0, 1], type(model).__name__
        assert all(a.hidden_size == 32 for a in meft_adapters(model).values())
        assert torch.equal(logits(model, ids), before), type(model).__name__


# ---------------------------------------------------------------------------------- detach


def test_detach_restores_original_model():
    model = tiny_model("mistral")
    model.lm_head.weight.requires_grad_(False)  # mixed flags must come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mlps = [layer.mlp for layer in model.model.layers]
    names = [n for n, _ in model.named_parameters()]
    hooks = len(model.get_input_embeddings()._forward_hooks)
    ids = batch()
    before = logits(model, ids)

    attach_meft(model, CFG)
    randomize_adapters(model)
    assert not torch.equal(logits(model, ids), before)
    assert detach_meft(model) is model

    assert [layer.mlp for layer in model.model.layers] == mlps
    assert all(layer.mlp is m for layer, m in zip(model.model.layers, mlps))
    assert [n for n, _ in model.named_parameters()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert len(model.get_input_embeddings()._forward_hooks) == hooks
    assert not any(isinstance(m, MEFTAdapter) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.layers.modules())
    assert torch.equal(logits(model, ids), before)
    assert meft_adapters(model) == {}
    with pytest.raises(ValueError, match="no MEFT adapters"):
        detach_meft(model)


def test_detach_cpu_placement_releases_threads_and_reports_a_failed_update(monkeypatch):
    """Placement "cpu": detach waits for the in-flight updates, then stops the copy engine and the
    optimizer workers; a failed background update still detaches, then raises naming the layer."""
    import threading

    from meft_triton.offload import cpu_rowops

    threads = threading.active_count()
    ids = batch()
    before = logits(tiny_model("llama"), ids)
    for fail in (False, True):
        model = attach_meft(tiny_model("llama"), CPU_CFG)
        opt = create_meft_optimizer(model, lr=1e-2)
        model.train()
        model(ids, labels=ids).loss.backward()
        if fail:
            def boom(*args, **kwargs):
                raise RuntimeError("injected failure in the row update")

            monkeypatch.setattr(cpu_rowops, "adamw_rows", boom)
        opt.step()
        if fail:
            with pytest.raises(RuntimeError, match="detached, but layer 0's last background work had failed"):
                detach_meft(model)
            monkeypatch.undo()
        else:
            detach_meft(model)
        assert meft_adapters(model) == {} and torch.equal(logits(model.eval(), ids), before)
        assert threading.active_count() <= threads, "engine or optimizer threads left running"


# ---------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model = tiny_model(arch)
    attach_meft(model, CFG)
    randomize_adapters(model)
    ids = batch()
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter.safetensors", "meft_config.json"]
    info = json.loads((tmp_path / "a" / "meft_config.json").read_text())
    assert info["layers"] == [0, 1] and info["hidden_size"] == 32 and info["format_version"] == 2
    assert MEFTConfig.from_dict(info["meft_config"]) == CFG
    assert len(info["weights_sha256"]) == 64

    fresh = tiny_model(arch)  # same backbone seed, no adapters: load attaches from the file
    load_adapter(fresh, tmp_path / "a")
    assert list(meft_adapters(fresh)) == [0, 1]
    assert torch.equal(logits(fresh, ids), expected)
    # loading into already-attached adapters copies in place
    other = tiny_model(arch)
    attach_meft(other, CFG.replace(backend="auto", key_init_std=0.1))
    params_before = meft_parameters(other)
    load_adapter(other, tmp_path / "a")
    assert all(a is b for a, b in zip(meft_parameters(other), params_before))
    assert torch.equal(logits(other, ids), expected)


def test_load_rejects_mismatches(tmp_path):
    model = tiny_model("llama")
    attach_meft(model, CFG)
    save_adapter(model, tmp_path)
    cases = [
        (dict(config=CFG.replace(topk=4)), "topk: saved 8 vs model 4"),
        (dict(config=CFG.replace(gate="softmax")), "gate"),
        (dict(layers=[0]), r"layers \[0, 1\].*layers \[0\]"),
        (dict(dtype=torch.bfloat16), "float32 in the file but torch.bfloat16"),
    ]
    for kwargs, msg in cases:
        target = tiny_model("llama")
        attach_meft(target, kwargs.get("config", CFG), layers=kwargs.get("layers", "all"),
                    dtype=kwargs.get("dtype", torch.float32))
        snapshot = [p.detach().clone() for p in meft_parameters(target)]
        with pytest.raises(ValueError, match=msg):
            load_adapter(target, tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(meft_parameters(target), snapshot))
    wider = transformers.AutoModelForCausalLM.from_config(
        tiny_config("llama").__class__(**{**tiny_config("llama").to_dict(), "hidden_size": 48}))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(wider, tmp_path)
    assert not meft_adapters(wider) and all(p.requires_grad for p in wider.parameters())
    with pytest.raises(ValueError, match="attach=False"):
        load_adapter(tiny_model("llama"), tmp_path, attach=False)
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_model("llama"), tmp_path / "missing")


def _saved(tmp_path, seed):
    model = tiny_model("llama")
    attach_meft(model, CFG)
    randomize_adapters(model, seed=seed)
    save_adapter(model, tmp_path)
    return model


def test_corrupt_and_truncated_files_detected(tmp_path):
    ids = batch()
    model = _saved(tmp_path, seed=5)
    expected = logits(model, ids)
    weights = tmp_path / "adapter.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(tiny_model("llama"), tmp_path)
    flipped = bytearray(good)
    flipped[-7] ^= 0x40  # one bit inside the tensor data
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(tiny_model("llama"), tmp_path)
    weights.write_bytes(good)
    (tmp_path / "meft_config.json").write_text('{"format": "meft-triton-ad')
    with pytest.raises(ValueError, match="meft_config.json is truncated or corrupt"):
        load_adapter(tiny_model("llama"), tmp_path)
    save_adapter(model, tmp_path)  # repair
    assert torch.equal(logits(load_adapter(tiny_model("llama"), tmp_path), ids), expected)


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch):
    ids = batch()
    first = _saved(tmp_path, seed=5)
    expected = logits(first, ids)
    second = tiny_model("llama")
    attach_meft(second, CFG)
    randomize_adapters(second, seed=6)

    import safetensors.torch as st

    real_save = st.save_file

    def crash_mid_write(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(st, "save_file", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(second, tmp_path)
    monkeypatch.setattr(st, "save_file", real_save)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "meft_config.json"]
    assert torch.equal(logits(load_adapter(tiny_model("llama"), tmp_path), ids), expected)

    real_replace = os.replace
    calls = []

    def crash_on_replace(src, dst):
        calls.append(dst)
        raise OSError("disk full at rename")

    monkeypatch.setattr(adapter_files.os, "replace", crash_on_replace)
    with pytest.raises(OSError):
        save_adapter(second, tmp_path)
    monkeypatch.setattr(adapter_files.os, "replace", real_replace)
    assert len(calls) == 1
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "meft_config.json"]
    assert torch.equal(logits(load_adapter(tiny_model("llama"), tmp_path), ids), expected)

    # killed between the two renames: the new weights file is whole and verifies on its own
    def crash_on_second(src, dst):
        if str(dst).endswith("meft_config.json"):
            raise OSError("killed before the second rename")
        real_replace(src, dst)

    monkeypatch.setattr(adapter_files.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        save_adapter(second, tmp_path)
    monkeypatch.setattr(adapter_files.os, "replace", real_replace)
    with pytest.warns(UserWarning, match="does not describe"):
        loaded = load_adapter(tiny_model("llama"), tmp_path)
    assert torch.equal(logits(loaded, ids), logits(second, ids))


@pytest.fixture(scope="module")
def shared_llama():
    return tiny_model("llama")


def test_save_load_property(shared_llama, tmp_path_factory):
    """Random valid configs, layer subsets and dtypes: save -> load -> forward is identical."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @st.composite
    def setups(draw):
        experts = draw(st.sampled_from([1, 2, 4, 8]))
        per_expert = draw(st.sampled_from([1, 3, 8]))
        p = draw(st.integers(1, experts))
        cfg = MEFTConfig(num_neurons=experts * per_expert, num_experts=experts,
                         experts_per_token=p, topk=draw(st.integers(1, p * per_expert)),
                         gate=draw(st.sampled_from(["logit", "softmax"])), backend="torch")
        layers = draw(st.sampled_from([[0], [1], [0, 1]]))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
        return cfg, layers, dtype, draw(st.integers(0, 2**16))

    ids = batch(rows=2, length=6)

    @hypothesis.settings(max_examples=12, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(setups())
    def check(setup):
        cfg, layers, dtype, seed = setup
        model = shared_llama
        attach_meft(model, cfg, layers=layers, dtype=dtype)
        try:
            randomize_adapters(model, seed=seed, std=0.2)
            expected = logits(model, ids)
            directory = tmp_path_factory.mktemp("prop")
            save_adapter(model, directory)
        finally:
            detach_meft(model)
        load_adapter(model, directory)
        try:
            assert list(meft_adapters(model)) == layers
            assert all(p.dtype == dtype for p in meft_parameters(model))
            assert torch.equal(logits(model, ids), expected)
        finally:
            detach_meft(model)

    check()


# ---------------------------------------------------------------------------------- checkpointing


def _adapter_grads(model, ids):
    model.train()
    for p in meft_parameters(model):
        p.grad = None
    model(ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in meft_parameters(model)]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_gradients(reentrant):
    model = tiny_model("llama")
    attach_meft(model, CFG)
    randomize_adapters(model)
    ids = batch()
    plain = _adapter_grads(model, ids)
    assert all(g.abs().sum() > 0 for g in plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = _adapter_grads(model, ids)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_needs_the_input_grad_hook():
    """Why attach_meft(input_require_grads=True) exists: behind a frozen embedding, reentrant
    checkpoint segments see no input requiring grad and the adapters get no gradient."""
    model = tiny_model("llama")
    attach_meft(model, CFG, input_require_grads=False)
    randomize_adapters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        loss = model(batch(), labels=batch()).loss
    assert not loss.requires_grad or all(p.grad is None for p in meft_parameters(model))


def test_bf16_autocast_cpu():
    model = tiny_model("qwen2")
    attach_meft(model, CFG)
    randomize_adapters(model)
    model.train()
    ids = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for p in meft_parameters(model):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------- Trainer


def test_create_meft_optimizer():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="attach_meft first"):
        create_meft_optimizer(model)
    attach_meft(model, CFG)
    opt = create_meft_optimizer(model, lr=3e-3, weight_decay=0.1)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in meft_parameters(model)}
    assert opt.param_groups[0]["lr"] == 3e-3
    with pytest.raises(ValueError, match="kind='sparse' does not fit adapters with placement='gpu'"):
        create_meft_optimizer(model, kind="sparse")


def test_hf_trainer_trains_only_adapters(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_model("llama")
    attach_meft(model, CFG)
    ids = batch(rows=8)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        gradient_accumulation_steps=2, max_grad_norm=1.0, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    values = [a.values.detach().clone() for a in meft_adapters(model).values()]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   optimizers=(create_meft_optimizer(model, args), None))
    trainer.train()
    for n, p in model.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), n
    assert any(not torch.equal(a.values, v) for a, v in zip(meft_adapters(model).values(), values))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_hf_trainer_checkpoints_resume_exactly(tmp_path, placement):
    """Trainer checkpoints (save_strategy="steps") hold the adapters, for placement "cpu" the
    master rows of the row store, and the optimizer; resuming from step 3 of 6 ends bitwise
    where the uninterrupted run ends."""
    pytest.importorskip("accelerate")
    ids = batch(rows=8)
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def run(resume=None):
        model = attach_meft(tiny_model("llama"), CPU_CFG.replace(placement=placement))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=[], save_strategy="steps", save_steps=3, use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                       optimizers=(create_meft_optimizer(model, args), None))
        trainer.train(resume_from_checkpoint=resume)
        return adapter_tensors(meft_adapters(model).values())

    full = run()
    resumed = run(str(tmp_path / "checkpoint-3"))
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
    untrained = attach_meft(tiny_model("llama"), CPU_CFG.replace(placement=placement))
    fresh = adapter_tensors(meft_adapters(untrained).values())
    assert not any(torch.equal(a, b) for a, b in zip(full, fresh)), "training changed every tensor"


# ---------------------------------------------------------------------------------- example


def run_finetune_example(*argv: str) -> list[dict]:
    """examples/finetune.py's main, in-process, on one thread."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_example", ROOT / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    threads = torch.get_num_threads()
    try:
        return module.main(["--tiny", "--threads", "1", *argv])
    finally:
        torch.set_num_threads(threads)


def test_finetune_example_tiny(capsys):
    """examples/finetune.py --tiny runs in-process: all five methods train MEFT's parameter
    count (SMT's blocks included), every loss falls, MEFT learns facts."""
    rows = run_finetune_example()
    out = capsys.readouterr().out
    assert "| method" in out and "fact acc" in out
    assert [r["method"] for r in rows] == ["meft", "lora", "dense", "meft+ist", "smt"]
    assert "all taken" not in rows[-1]["config"], rows[-1]
    budget = rows[0]["trainable params"]
    for r in rows:
        assert r["loss last"] < r["loss first"] - 0.5, r
        assert abs(r["trainable params"] - budget) / budget < 0.02, r
    assert rows[0]["fact acc"] > 0.5, rows[0]


def test_finetune_example_cpu_placement_reports_rows_moved():
    """--placement cpu: MEFT trains through the row store; IST on 1 of 2 layers per step sends
    about half the gradient rows home."""
    meft, ist = run_finetune_example("--placement", "cpu", "--methods", "meft,meft+ist", "--steps", "40")
    assert meft["loss last"] < meft["loss first"] - 0.5, meft
    assert meft["H2D MiB/step"] > 0 and meft["D2H MiB/step"] > 0
    assert 0.35 < ist["D2H MiB/step"] / meft["D2H MiB/step"] < 0.65, (meft, ist)


@pytest.mark.gpu
def test_finetune_example_on_cuda_end_to_end():
    """The example on a GPU: MEFT + IST under placement "cpu" (Triton kernels, CUDA copy engine,
    bf16 autocast) and SMT (its Triton block-gradient kernel) train; IST halves the rows sent home."""
    meft, ist, smt = run_finetune_example("--device", "cuda", "--bf16", "--placement", "cpu",
                                          "--methods", "meft,meft+ist,smt", "--steps", "30")
    for row in (meft, ist, smt):
        assert row["loss last"] < row["loss first"], row
    assert 0.35 < ist["D2H MiB/step"] / meft["D2H MiB/step"] < 0.65, (meft, ist)


# ---------------------------------------------------------------------------- placement "cpu"

CPU_CFG = CFG.replace(placement="cpu", value_init_std=0.05)


def test_cpu_placement_matches_gpu_placement_and_trains():
    on_gpu = attach_meft(tiny_model("llama"), CPU_CFG.replace(placement="gpu"))
    on_cpu = attach_meft(tiny_model("llama"), CPU_CFG)
    runtimes = {id(a.offload.runtime) for a in meft_adapters(on_cpu).values()}
    assert len(runtimes) == 1, "all layers share one slot pool"
    for index, adapter in meft_adapters(on_cpu).items():
        adapter.load_state_dict(meft_adapters(on_gpu)[index].state_dict())
    ids = batch()
    torch.testing.assert_close(logits(on_cpu, ids), logits(on_gpu, ids))

    on_cpu.train()
    opt = create_meft_optimizer(on_cpu, lr=1e-2)
    assert isinstance(opt, OffloadedAdamW)
    losses = []
    for _ in range(20):
        loss = on_cpu(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert not any(p.requires_grad for n, p in on_cpu.named_parameters() if "adapter" not in n)


@pytest.mark.parametrize(("residency", "backward_rows"),
                         [("resident", "refetch"), ("per-micro-batch", "refetch"), ("per-micro-batch", "keep")])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_cpu_placement_gradients_with_layers_frozen_at_random(residency, backward_rows, checkpointing, accumulation):
    """IST's traffic pattern on a 3-layer model: each step trains a random subset of layers,
    after a no-grad scoring forward, with gradient checkpointing and accumulation; every trained
    layer's key/value gradient rows and router gradient equal placement "gpu"'s."""
    import random

    def model(placement):
        torch.manual_seed(0)
        config = tiny_config("llama")
        config.num_hidden_layers = 3
        m = attach_meft(transformers.AutoModelForCausalLM.from_config(config),
                        CPU_CFG.replace(placement=placement, residency=residency, backward_rows=backward_rows))
        if checkpointing:
            m.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        return m.train()

    on_gpu, on_cpu = model("gpu"), model("cpu")
    gpu_layers, cpu_layers = list(meft_adapters(on_gpu).values()), list(meft_adapters(on_cpu).values())
    for a, b in zip(gpu_layers, cpu_layers):
        b.load_state_dict(a.state_dict())
    rng = random.Random(0)
    for step in range(6):
        trained = [i for i in range(3) if rng.random() < 0.4] or [rng.randrange(3)]
        for layers in (gpu_layers, cpu_layers):
            for i, layer in enumerate(layers):
                layer.requires_grad_(i in trained)
                layer.zero_grad()
        with torch.no_grad():
            probe = batch(seed=100 + step, rows=2, length=5 + rng.randrange(6))
            on_gpu(probe), on_cpu(probe)
        for micro in range(accumulation):
            ids = batch(seed=step * 10 + micro, rows=2, length=5 + rng.randrange(6))
            on_gpu(ids, labels=ids).loss.backward()
            on_cpu(ids, labels=ids).loss.backward()
        for i in trained:
            ids_, rows = take_grad_rows(cpu_layers[i].offload)
            want = torch.cat([gpu_layers[i].keys.grad[ids_], gpu_layers[i].values.grad[ids_]], dim=1)
            torch.testing.assert_close(rows, want, rtol=1e-4, atol=1e-6, msg=f"step {step} layer {i}")
            untouched = gpu_layers[i].keys.grad.clone()
            untouched[ids_] = 0
            assert (untouched == 0).all(), f"step {step} layer {i}: rows missing from the CPU side"
            torch.testing.assert_close(cpu_layers[i].router.weight.grad, gpu_layers[i].router.weight.grad,
                                       rtol=1e-4, atol=1e-6)


def test_cpu_placement_recovers_from_an_ffn_that_raises(monkeypatch):
    """An exception in the backbone FFN between the adapter's two stages (out of memory, say)
    gives the copy slot back: after any number of them training goes on, no slot is leaked."""
    model = attach_meft(tiny_model("llama"), CPU_CFG).train()
    opt = create_meft_optimizer(model, lr=1e-2)
    ids = batch()
    mlp = model.model.layers[1].mlp

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    for _ in range(3):  # more failures than slots
        monkeypatch.setattr(mlp, "forward", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            model(ids, labels=ids)
        monkeypatch.undo()
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    runtime = meft_adapters(model)[0].offload.runtime
    assert runtime.prefetcher.free_slots() == runtime.num_slots


def test_offloaded_zero_grad_discards_a_batch():
    """``backward(); opt.zero_grad()`` leaves no trace under placement "cpu", as under "gpu":
    the gradient rows in flight or collected are dropped with the routers' .grad."""
    def train(discard_first: bool):
        model = attach_meft(tiny_model("llama"), CPU_CFG).train()
        opt = create_meft_optimizer(model, lr=1e-2)
        if discard_first:
            model(batch(seed=5), labels=batch(seed=5)).loss.backward()
            opt.zero_grad()
        ids = batch(seed=6)
        model(ids, labels=ids).loss.backward()
        opt.step()
        return adapter_tensors(meft_adapters(model).values())

    assert all(torch.equal(a, b) for a, b in zip(train(False), train(True)))


def test_cpu_placement_save_load_round_trip(tmp_path):
    model = attach_meft(tiny_model("qwen2"), CPU_CFG)
    ids = batch()
    save_adapter(model, tmp_path / "meft")
    restored = load_adapter(tiny_model("qwen2"), tmp_path / "meft")
    assert meft_adapters(restored)[0].config.placement == "cpu"
    assert torch.equal(logits(restored, ids), logits(model, ids))


def test_offloaded_optimizer_state_round_trip():
    """The state, saved and loaded into a fresh model and optimizer, gives the same next step
    as the run that did not stop (a load that restored nothing would step from zero moments)."""
    def setup():
        model = attach_meft(tiny_model("llama"), CPU_CFG).train()
        return model, create_meft_optimizer(model, lr=1e-2, weight_decay=0.01)

    model, opt = setup()
    for step in range(2):
        ids = batch(seed=step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    assert len(state["meft_sparse"]) == 2
    buf = io.BytesIO()
    torch.save({"opt": state, "adapters": [a.state_dict() for a in meft_adapters(model).values()]}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model2, opt2 = setup()
    for adapter, adapter_state in zip(meft_adapters(model2).values(), saved["adapters"]):
        adapter.load_state_dict(adapter_state)
    opt2.load_state_dict(saved["opt"])
    for m, o in ((model, opt), (model2, opt2)):
        ids = batch(seed=7)
        m(ids, labels=ids).loss.backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(adapter_tensors(meft_adapters(model).values()),
                                                 adapter_tensors(meft_adapters(model2).values())))
    with pytest.raises(ValueError, match="sparse optimizer states"):
        opt.load_state_dict({**state, "meft_sparse": state["meft_sparse"][:1]})
