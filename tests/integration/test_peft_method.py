"""MEFT as a peft method (MEFTPeftConfig / MEFTModel) and MEFT beside peft's LoRA, both placements:
get_peft_model, save_pretrained (adapter only) -> PeftModel.from_pretrained, the Trainer's adapter
checkpoints and resume, LoRA on top of attach_meft, create_meft_optimizer training LoRA too,
LoRA "all-linear" leaving MEFT alone.

Tiny random Llama models built from a config (hidden 32, 2 layers, vocab 100)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import PeftConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from meft_triton import (MEFTAdapter, MEFTConfig, MEFTPeftConfig, attach_meft,  # noqa: E402
                         create_meft_optimizer, load_adapter, meft_adapters, meft_parameters, save_adapter)
from meft_triton.integration import peft_method  # noqa: E402
from meft_triton.integration.attach import attach_adapters  # noqa: E402
from meft_triton.integration.peft_layer import MEFTTunerLayer  # noqa: E402

VOCAB = 100
SIZES = dict(num_neurons=64, num_experts=8, experts_per_token=2, topk=4, backend="torch", value_init_std=0.05)
PLACEMENTS = ["gpu", "cpu"]


def llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def qwen2():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def fresh_llama():
    """The same backbone as llama(), with the random generator moved on, so adapters attached to
    it start elsewhere than the saved ones (a load that did nothing shows)."""
    model = llama()
    torch.manual_seed(7)
    return model


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def lora_config(target_modules=("q_proj", "v_proj")):
    return peft.LoraConfig(r=2, lora_alpha=2, target_modules=list(target_modules) if isinstance(
        target_modules, tuple) else target_modules, lora_dropout=0.0)


def meft_state(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, a in meft_adapters(model).items()
            for k, v in a.state_dict().items()}


# ----------------------------------------------------------------- registration and config


def test_registration_is_idempotent_and_the_config_is_meft_config(tmp_path):
    peft_method.register()
    peft_method.register()
    mappings = (peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING)
    # classes of an earlier import of the same module (importlib.reload) are replaced
    stale = [type(cls.__name__, (cls,), {"__module__": peft_method.__name__}) for cls in
             (peft_method.MEFTPeftConfig, peft_method.MEFTModel)]
    for mapping, cls in zip(mappings, stale):
        mapping["MEFT"] = cls
    peft_method.register()
    assert mappings[0]["MEFT"] is peft_method.MEFTPeftConfig
    # another library's method of that name is refused
    mappings[0]["MEFT"] = type("OtherConfig", (peft.config.PeftConfig,), {})
    try:
        with pytest.raises(RuntimeError, match="already has a method registered as 'MEFT'"):
            peft_method.register()
    finally:
        mappings[0]["MEFT"] = peft_method.MEFTPeftConfig
    assert peft.utils.PeftType("MEFT") is peft.utils.PeftType.MEFT
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["MEFT"] is peft_method.MEFTModel
    config = MEFTPeftConfig(**SIZES, layers=(1,), target=("mlp", "mlp"))
    assert config.meft_config() == MEFTConfig(**SIZES)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is MEFTPeftConfig and loaded.meft_config() == config.meft_config()
    assert (loaded.layers, loaded.target, loaded.peft_type) == ([1], ["mlp", "mlp"], "MEFT")
    with pytest.raises(ValueError, match="num_experts"):
        MEFTPeftConfig(num_neurons=64, num_experts=7)
    with pytest.raises(ValueError, match="dtype"):
        MEFTPeftConfig(**SIZES, dtype="int8")
    with pytest.raises(ValueError, match="target"):
        MEFTPeftConfig(**SIZES, target=("fc1",))


def test_a_new_process_importing_meft_triton_before_peft_loads_a_saved_adapter(tmp_path):
    model = llama()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, MEFTPeftConfig(**SIZES))
    pm.save_pretrained(tmp_path / "meft")
    torch.save(logits(pm), tmp_path / "want.pt")
    script = f"""
import sys, torch
import meft_triton  # before peft: MEFT is registered once peft is imported
assert "peft" not in sys.modules
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}),
                                  {str(tmp_path / "meft")!r})
with torch.no_grad():
    got = model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits
assert torch.equal(got, torch.load({str(tmp_path / "want.pt")!r}))
assert not any(type(f).__name__ == "PeftImportHook" for f in sys.meta_path)
"""
    torch.save(ids(), tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)


# ----------------------------------------------------------------- get_peft_model round trip


@pytest.mark.parametrize("low_key_dim", [None, 8])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_get_peft_model_save_pretrained_from_pretrained(tmp_path, placement, low_key_dim):
    base = logits(llama())
    pm = get_peft_model(llama(), MEFTPeftConfig(**SIZES, placement=placement, low_key_dim=low_key_dim))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in pm.named_parameters() if ".mlp.adapter." in n}
    assert all(isinstance(a, MEFTTunerLayer) for a in meft_adapters(pm).values())
    out = logits(pm)
    assert not torch.equal(out, base)
    pm.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} <= {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    parts = ("keys", "router.weight", "values") + (() if low_key_dim is None else ("low_key.weight",))
    assert sorted(saved) == sorted(f"base_model.model.model.layers.{i}.mlp.adapter.{n}" for i in range(2)
                                   for n in parts)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["backbone"]["model_type"] == "llama"

    loaded = PeftModel.from_pretrained(fresh_llama(), tmp_path)  # fresh adapters, then the saved weights
    assert torch.equal(logits(loaded), out)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode, as peft loads
    trainable_again = PeftModel.from_pretrained(fresh_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable_again.named_parameters() if p.requires_grad} == trainable
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded), base)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*Qwen2ForCausalLM"):
        PeftModel.from_pretrained(qwen2(), tmp_path)


def test_save_adapter_and_helpers_find_meft_in_the_peft_model(tmp_path):
    config = MEFTPeftConfig(**SIZES)
    pm = get_peft_model(llama(), config)
    other = qwen2()
    with pytest.raises(ValueError, match="pass a new MEFTPeftConfig"):  # config records its backbone
        get_peft_model(other, config)
    assert not meft_adapters(other)
    assert list(meft_adapters(pm)) == [0, 1]
    save_adapter(pm, tmp_path / "a")
    assert torch.equal(logits(load_adapter(fresh_llama(), tmp_path / "a")), logits(pm))
    with pytest.raises(ValueError, match="already has MEFT adapters"):
        pm.add_adapter("second", MEFTPeftConfig(**SIZES))
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    unloaded = pm.unload()
    assert not meft_adapters(unloaded) and torch.equal(logits(unloaded), logits(llama()))


def test_a_missing_tensor_in_the_file_is_an_error(tmp_path):
    pm = get_peft_model(llama(), MEFTPeftConfig(**SIZES))
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.mlp.adapter.values"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['base_model.model.model.layers.1.mlp.adapter.values'\]"):
        PeftModel.from_pretrained(llama(), tmp_path)


# ----------------------------------------------------------------- the HF Trainer


def _trainer(model, out, max_steps):
    data = [{"input_ids": ids(seed)[0], "labels": ids(seed)[0]} for seed in range(8)]
    args = transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=max_steps,
                                          per_device_train_batch_size=2, save_strategy="steps", save_steps=2,
                                          learning_rate=1e-2, lr_scheduler_type="constant", seed=0,
                                          data_seed=0, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=data,
                                optimizers=(create_meft_optimizer(model, args), None))


def meft_peft_model(model, placement):
    return get_peft_model(model, MEFTPeftConfig(**SIZES, placement=placement))


def lora_over_attached_meft(model, placement):
    return get_peft_model(attach_meft(model, MEFTConfig(**SIZES, placement=placement)), lora_config())


@pytest.mark.parametrize("build", [meft_peft_model, lora_over_attached_meft])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_trainer_checkpoints_hold_the_adapters_only_and_resume(tmp_path, placement, build):
    full = build(llama(), placement)
    start = {n: p.detach().clone() for n, p in full.named_parameters() if "lora_" in n} | meft_state(full)
    _trainer(full, tmp_path / "full", 4).train()
    trained = {n: p.detach().clone() for n, p in full.named_parameters() if "lora_" in n} | meft_state(full)
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert all(not torch.equal(trained[k], start[k]) for k in start if "lora_B" in k)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert "adapter_model.safetensors" in files and "optimizer.pt" in files
    assert not files & {"model.safetensors", "pytorch_model.bin"}

    resumed = build(fresh_llama(), placement)
    _trainer(resumed, tmp_path / "resumed", 4).train(resume_from_checkpoint=str(checkpoint))
    now = {n: p.detach().clone() for n, p in resumed.named_parameters() if "lora_" in n} | meft_state(resumed)
    assert now.keys() == trained.keys()
    for key, tensor in now.items():
        torch.testing.assert_close(tensor, trained[key], rtol=1e-5, atol=1e-6, msg=key)


def test_placement_cpu_under_the_trainers_default_optimizer_raises(tmp_path):
    pm = get_peft_model(llama(), MEFTPeftConfig(**SIZES, placement="cpu"))
    data = [{"input_ids": ids(seed)[0], "labels": ids(seed)[0]} for seed in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                                          per_device_train_batch_size=2, save_strategy="no")
    start = meft_state(pm)
    with pytest.raises(TypeError, match="create_meft_optimizer"):
        transformers.Trainer(model=pm, args=args, train_dataset=data).train()
    assert all(torch.equal(v, start[k]) for k, v in meft_state(pm).items())


# ----------------------------------------------------------------- beside peft's LoRA


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_lora_on_top_of_attach_meft_keeps_meft_trainable_and_one_optimizer_trains_both(placement):
    model = attach_meft(llama(), MEFTConfig(**SIZES, placement=placement))
    pm = get_peft_model(model, lora_config())
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    assert {n for n, f in flags.items() if f} == {n for n in flags if "lora_" in n or ".mlp.adapter." in n}
    assert any(".mlp.adapter." in n for n in flags) and any("lora_" in n for n in flags)
    opt = create_meft_optimizer(pm, lr=1e-2)
    lora_b = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_B" in n}
    routers = [p.detach().clone() for p in meft_parameters(pm)]
    pm.train()
    pm(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    named = dict(pm.named_parameters())
    assert all(not torch.equal(named[n], before) for n, before in lora_b.items())
    assert all(not torch.equal(p, before) for p, before in zip(meft_parameters(pm), routers))
    pm.eval()
    with pm.disable_adapter():  # LoRA and MEFT off: the backbone's own output
        assert torch.equal(logits(pm), logits(llama()))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_lora_peft_model_saves_and_reloads_the_meft_beside_it(tmp_path, placement):
    config = MEFTConfig(**SIZES, placement=placement)
    pm = get_peft_model(attach_meft(llama(), config), lora_config())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = logits(pm)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert any(".mlp.adapter.values" in k for k in keys) and any("lora_B" in k for k in keys)
    loaded = PeftModel.from_pretrained(attach_meft(fresh_llama(), config), tmp_path)
    assert torch.equal(logits(loaded), out)


@pytest.mark.parametrize("adapter_class", [MEFTAdapter, MEFTTunerLayer])
def test_all_linear_lora_leaves_meft_router_and_low_key_alone(adapter_class):
    model = attach_adapters(llama(), MEFTConfig(**SIZES, low_key_dim=8), "all", target=None, dtype=torch.float32,
                            input_require_grads=True, adapter_class=adapter_class)
    pm = get_peft_model(model, lora_config("all-linear"))
    wrapped = {n for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert any(n.endswith("mlp.down_proj") for n in wrapped)  # all-linear did wrap the backbone
    assert not [n for n in wrapped if ".adapter." in n or n.endswith(".adapter")]
    for adapter in meft_adapters(pm).values():
        assert type(adapter) is adapter_class
        assert not isinstance(adapter.router, LoraLayer) and not isinstance(adapter.low_key, LoraLayer)
