"""Training state is never lost (issue 7): meft_triton.checkpoint and the adapter files.

Tiny random Llama models on CPU (hidden 32, 2 layers, vocab 100), both placements."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meft_triton import MEFTConfig  # noqa: E402
from meft_triton.integration import (attach_meft, load_adapter, meft_adapters,  # noqa: E402
                                     save_adapter)

VOCAB = 100
CFG = MEFTConfig(num_neurons=64, num_experts=8, experts_per_token=2, topk=4, backend="torch",
                 value_init_std=0.05)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def token_batch(seed: int, rows: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


# (ids must not be "gpu": conftest skips items with a "gpu" keyword where CUDA is missing)
PLACEMENTS = [pytest.param("gpu", id="placement_gpu"), pytest.param("cpu", id="placement_cpu")]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_adapter_file_holds_the_cpu_master_rows(tmp_path, placement):
    """Regression: placement "cpu" keys/values live in the row store, not in parameters, and
    save_adapter used to write only the routers (a reload matched only when the fresh model's
    random init happened to repeat the same seed)."""
    model = attach_meft(tiny_model(0), CFG.replace(placement=placement))
    torch.manual_seed(123)
    for adapter in meft_adapters(model).values():
        adapter.reset_parameters()  # other weights than a fresh attach under seed 0 draws
    ids = token_batch(1)
    save_adapter(model, tmp_path)
    restored = load_adapter(tiny_model(0), tmp_path)
    assert torch.equal(logits(restored, ids), logits(model, ids))
    for index, adapter in meft_adapters(restored).items():
        for got, want in zip(adapter.master_rows(), meft_adapters(model)[index].master_rows()):
            assert torch.equal(got, want)
