"""Transformers and peft as their users expect them: the backbone keeps its key names, adapters
load only into their own architecture, placement "cpu" refuses an optimizer that cannot train
it, MEFT beside peft's LoRA, OPT and BERT-style encoders, a user's target spec.

Tiny random models built from configs (hidden 32 or 16, 2 layers, vocab 100)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from meft_triton import (MEFTConfig, attach_meft, create_meft_optimizer, detach_meft,  # noqa: E402
                         load_adapter, meft_adapters, meft_parameters, save_adapter)

VOCAB = 100
CFG = MEFTConfig(num_neurons=64, num_experts=8, experts_per_token=2, topk=4, backend="torch")
CPU_CFG = CFG.replace(placement="cpu")


def llama(layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def qwen2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in meft_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# ----------------------------------------------------------------- the backbone keeps its names


def test_state_dict_keeps_backbone_names_and_from_pretrained_returns_the_backbone(tmp_path):
    model = llama()
    names = set(model.state_dict())
    attach_meft(model, CFG)
    with torch.no_grad():  # a "trained" backbone weight, so the reload must carry it
        model.model.layers[1].mlp.down_proj.weight.add_(1.0)
    randomize(model)
    keys = set(model.state_dict())
    assert names <= keys
    assert keys - names == {f"model.layers.{i}.mlp.adapter.{n}" for i in range(2)
                            for n in ("router.weight", "keys", "values")}
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    state = reloaded.state_dict()
    for name in names:
        assert torch.equal(state[name], model.state_dict()[name]), name
    detach_meft(model)
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, model(ids()).logits)


def test_trainer_save_model_reloads_as_the_backbone(tmp_path):
    model = llama()
    attach_meft(model, CFG)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                                          max_steps=1, per_device_train_batch_size=2)
    trainer = transformers.Trainer(model=model, args=args,
                                   optimizers=(create_meft_optimizer(model, args), None))
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


# ----------------------------------------------------------------- adapters fit one backbone


def test_load_adapter_refuses_another_architecture_or_layer_count(tmp_path):
    model = attach_meft(llama(), CFG)
    save_adapter(model, tmp_path / "a")
    info = json.loads((tmp_path / "a" / "meft_config.json").read_text())
    assert (info["model_class"], info["model_type"], info["num_layers"]) == ("LlamaForCausalLM", "llama", 2)
    other = qwen2()  # same width and layer count
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*'llama'.*Qwen2ForCausalLM.*'qwen2'"):
        load_adapter(other, tmp_path / "a")
    assert not meft_adapters(other) and all(p.requires_grad for p in other.parameters())
    deeper = llama(layers=3)
    with pytest.raises(ValueError, match="with 2 layers but LlamaForCausalLM has 3"):
        load_adapter(deeper, tmp_path / "a")
    assert not meft_adapters(deeper)
    assert list(meft_adapters(load_adapter(llama(), tmp_path / "a"))) == [0, 1]


# ----------------------------------------------------------------- placement "cpu", any optimizer


def test_cpu_placement_under_a_plain_optimizer_raises_before_anything_changes():
    model = attach_meft(llama(), CPU_CFG).train()
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids(), labels=ids()).loss.backward()
    routers = [p.detach().clone() for p in meft_parameters(model)]
    with pytest.raises(TypeError, match="create_meft_optimizer"):
        plain.step()
    assert all(torch.equal(a, b) for a, b in zip(routers, meft_parameters(model)))
    unrelated = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    unrelated.param_groups[0]["params"][0].grad = torch.ones(2)
    unrelated.step()  # optimizers that hold no MEFT router are left alone
    opt = create_meft_optimizer(model, lr=1e-2)
    opt.zero_grad()
    model(ids(), labels=ids()).loss.backward()
    opt.step()  # the row-sparse optimizer trains
    detach_meft(model)
    plain.step()  # detached: nothing left to guard


def test_cpu_placement_trainer_default_optimizer_raises(tmp_path):
    model = attach_meft(llama(), CPU_CFG)
    data = [{"input_ids": ids(seed)[0], "labels": ids(seed)[0]} for seed in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                                          per_device_train_batch_size=2, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    with pytest.raises(TypeError, match=r"optimizers=\(create_meft_optimizer\(model, args\), None\)"):
        trainer.train()


# ----------------------------------------------------------------- peft


def lora(model, **kwargs):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **kwargs)
    return peft.get_peft_model(model, config)


def test_attach_on_a_lora_peft_model_keeps_lora_trainable(tmp_path):
    pm = lora(llama())
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    attach_meft(pm, CFG)
    now = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable <= now
    assert now - trainable == {n for n, p in pm.named_parameters() if ".adapter." in n}
    opt = create_meft_optimizer(pm, lr=1e-2)
    save_adapter(pm, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "meft_config.json").read_text())["model_class"] == "LlamaForCausalLM"
    pm.train()
    pm(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    detach_meft(pm)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == trainable


def test_helpers_find_meft_inside_a_peft_model_added_on_top(tmp_path):
    model = attach_meft(llama(), CFG)
    randomize(model)
    pm = lora(model)
    assert list(meft_adapters(pm)) == [0, 1]
    assert all(p.requires_grad for p in meft_parameters(pm))  # peft froze all but its own before
    assert create_meft_optimizer(pm, lr=1e-3) is not None
    save_adapter(pm, tmp_path / "a")
    fresh = load_adapter(llama(), tmp_path / "a")
    for a, b in zip(meft_parameters(fresh), meft_parameters(model)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already has MEFT adapters"):
        attach_meft(pm, CFG)


# ----------------------------------------------------------------- any transformers model


def opt_model():
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
        word_embed_proj_dim=16, max_position_embeddings=32)).eval()


def bert_model(arch: str):
    torch.manual_seed(0)
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=40)
    config = transformers.BertConfig(**common) if arch == "bert" else transformers.RobertaConfig(**common)
    return transformers.AutoModel.from_config(config).eval()


def _check_adapter_changes_the_output(model, forward, where):
    before = forward()
    attach_meft(model, CFG)
    adapters = meft_adapters(model)
    assert list(adapters) == [0, 1] and all(a.hidden_size == 16 for a in adapters.values())
    assert torch.equal(forward(), before)  # values start at zero
    assert all(where(i).adapter is adapters[i] for i in range(2))
    randomize(model)
    assert not torch.equal(forward(), before)
    detach_meft(model)
    assert torch.equal(forward(), before)


def test_opt_inline_fc1_fc2():
    model = opt_model()
    layers = model.model.decoder.layers
    with torch.no_grad():
        _check_adapter_changes_the_output(model, lambda: model(ids()).logits, lambda i: layers[i].fc2)
    attach_meft(model, CFG).train()
    randomize(model)
    model(ids(), labels=ids()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in meft_parameters(model))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bert_style_encoders_intermediate_output(arch):
    model = bert_model(arch)
    layers = model.encoder.layer
    with torch.no_grad():
        _check_adapter_changes_the_output(model, lambda: model(ids()).last_hidden_state,
                                          lambda i: layers[i].output.dense)


def test_target_spec_and_its_errors():
    model = opt_model()
    with torch.no_grad():
        before = model(ids()).logits
    attach_meft(model, CFG, target={"input": "fc1", "output": "fc2"})
    assert model.model.decoder.layers[0].fc2.adapter is meft_adapters(model)[0]
    randomize(model)
    with torch.no_grad():
        spec = model(ids()).logits
    detach_meft(model)
    attach_meft(model, CFG)  # by structure: the same site
    randomize(model)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, spec) and not torch.equal(spec, before)
    detach_meft(model)
    with pytest.raises(ValueError, match=r"OPTForCausalLM.*'fc1'.*'fc3'.*target="):
        attach_meft(model, CFG, target=("fc1", "fc3"))
    for bad, err in [(("fc1",), ValueError), (3, TypeError), ({"input": "fc1"}, ValueError),
                     (("fc1", ""), ValueError)]:
        with pytest.raises(err, match="target"):
            attach_meft(model, CFG, target=bad)
    assert not meft_adapters(model) and all(p.requires_grad for p in model.parameters())
