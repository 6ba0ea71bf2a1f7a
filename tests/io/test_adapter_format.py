"""Adapter files across the "Faithful to MEFT" change: low_key_dim saved and checked, and
format-1 adapters loaded with their old meaning or refused (gate "softmax" changed meaning)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meft_triton import MEFTConfig, attach_meft, load_adapter, meft_adapters, save_adapter  # noqa: E402
from meft_triton.integration.attach import is_meft_attached  # noqa: E402
from meft_triton.io import adapter_files  # noqa: E402

CFG = MEFTConfig(num_neurons=46, num_experts=2, experts_per_token=1, topk=30, backend="torch",
                 value_init_std=0.05, low_key_dim=5)  # S = 23, K_top > P*S
PLACEMENTS = [pytest.param("gpu", id="placement_gpu"), pytest.param("cpu", id="placement_cpu")]


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=100,
                                      max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def logits(model):
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def trained_like(config: MEFTConfig):
    """An adapted model whose adapters differ from what a fresh attach under seed 0 draws."""
    model = attach_meft(tiny_model(0), config)
    torch.manual_seed(123)
    for adapter in meft_adapters(model).values():
        adapter.reset_parameters()
    return model


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_low_key_dim_round_trips_and_is_a_compute_field(tmp_path, placement):
    model = trained_like(CFG.replace(placement=placement))
    save_adapter(model, tmp_path)
    info = json.loads((tmp_path / adapter_files.CONFIG_NAME).read_text())
    assert info["format_version"] == adapter_files.FORMAT_VERSION == 2
    assert info["meft_config"]["low_key_dim"] == 5
    restored = load_adapter(tiny_model(0), tmp_path)
    assert torch.equal(logits(restored), logits(model))
    for index, adapter in meft_adapters(restored).items():
        assert adapter.low_key.weight.shape == (5, 16)
        assert torch.equal(adapter.low_key.weight, meft_adapters(model)[index].low_key.weight)
    other = attach_meft(tiny_model(0), CFG.replace(placement=placement, low_key_dim=4))
    with pytest.raises(ValueError, match="low_key_dim: saved 5 vs model 4"):
        load_adapter(other, tmp_path)


def save_as_format_1(model, path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(adapter_files, "FORMAT_VERSION", 1)
        save_adapter(model, path)
    assert json.loads((path / adapter_files.CONFIG_NAME).read_text())["format_version"] == 1


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_format_1_logit_adapter_loads_unchanged(tmp_path, monkeypatch, placement):
    """Gate "logit" meant the same before: a format-1 adapter loads and computes as saved."""
    model = trained_like(CFG.replace(placement=placement, low_key_dim=None))
    save_as_format_1(model, tmp_path, monkeypatch)
    restored = load_adapter(tiny_model(0), tmp_path)
    assert torch.equal(logits(restored), logits(model))


def test_format_1_softmax_adapter_is_refused_with_the_reason(tmp_path, monkeypatch):
    """Format 1's gate "softmax" renormalised over the P chosen experts; today it is MEFT's
    softmax over all E: loading it would silently change what it computes, so it is refused,
    before anything is attached."""
    model = trained_like(CFG.replace(gate="softmax", low_key_dim=None))
    save_as_format_1(model, tmp_path, monkeypatch)
    fresh = tiny_model(0)
    with pytest.raises(ValueError, match=r"format-1 adapter with gate 'softmax'.*renormalised.*all E experts"
                                         r".*Load it with the meft-triton version that saved it"):
        load_adapter(fresh, tmp_path)
    assert not is_meft_attached(fresh)
    attached = attach_meft(tiny_model(0), CFG.replace(gate="softmax", low_key_dim=None))
    before = [t.clone() for a in meft_adapters(attached).values() for t in a.state_dict().values()]
    with pytest.raises(ValueError, match="format-1 adapter with gate 'softmax'"):
        load_adapter(attached, tmp_path)
    after = [t for a in meft_adapters(attached).values() for t in a.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
