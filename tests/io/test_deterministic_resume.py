"""Key/value gradients are bitwise reproducible at any CPU thread count: two identical runs
give the same rows, and a run resumed from a saved training state equals the uninterrupted one.

The shapes are large enough (512 tokens x 32 picks x width 64) for torch's CPU kernels to go
parallel: indexing's backward, which the reference path used to gather rows with, then adds
the gradient rows of a repeated neuron with atomics in a thread-dependent order."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meft_triton import (MEFTConfig, attach_meft, create_meft_optimizer, load_training_state,  # noqa: E402
                         meft_adapters, save_training_state)

CFG = MEFTConfig(num_neurons=512, num_experts=16, experts_per_token=4, topk=32, backend="torch",
                 value_init_std=0.02)
PLACEMENTS = [pytest.param("gpu", id="placement_gpu"), pytest.param("cpu", id="placement_cpu")]
STEPS = 4


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def setup_run(placement):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=100,
                                      max_position_embeddings=64)
    model = attach_meft(transformers.AutoModelForCausalLM.from_config(config), CFG.replace(placement=placement))
    model.train()
    return model, create_meft_optimizer(model, lr=1e-2)


def train(model, optimizer, steps: range) -> None:
    for step in steps:
        ids = torch.randint(3, 100, (8, 64), generator=torch.Generator().manual_seed(step))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def rows(model) -> list[torch.Tensor]:
    return [t.detach().clone() for adapter in meft_adapters(model).values() for t in adapter.master_rows()]


@pytest.mark.parametrize("threads", [2, 4], indirect=True)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_identical_runs_and_a_resume_are_bitwise_equal(tmp_path, placement, threads):
    runs = []
    for _ in range(2):
        model, optimizer = setup_run(placement)
        train(model, optimizer, range(STEPS))
        runs.append(rows(model))
    model, optimizer = setup_run(placement)
    train(model, optimizer, range(STEPS // 2))
    save_training_state(model, optimizer, tmp_path / "ckpt", step=STEPS // 2)
    del model, optimizer
    resumed, optimizer = setup_run(placement)
    assert load_training_state(resumed, optimizer, tmp_path / "ckpt") == STEPS // 2
    train(resumed, optimizer, range(STEPS // 2, STEPS))
    runs.append(rows(resumed))
    for other in runs[1:]:
        for want, got in zip(runs[0], other):
            assert torch.equal(got, want)
    untrained = rows(setup_run(placement)[0])
    assert not any(torch.equal(got, before) for got, before in zip(runs[0], untrained))  # it trained
