"""Soak: a few hundred optimizer steps of a tiny transformers model with placement
"cpu", random micro-batch sizes and gradient accumulation, periodic checkpoints, a "crash"
in the middle and a resume from the last checkpoint into a fresh model: the final adapters and
optimizer state equal the uninterrupted run's, bitwise."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meft_triton import MEFTConfig  # noqa: E402
from meft_triton import load_training_state, save_training_state  # noqa: E402
from meft_triton import attach_meft, create_meft_optimizer, meft_adapters
from meft_triton.integration import meft_state_tensors

STEPS, EVERY, CRASH_AFTER = 300, 50, 170  # the resume starts from the checkpoint of step 150
VOCAB = 64
CFG = MEFTConfig(num_neurons=64, num_experts=8, experts_per_token=2, topk=4, backend="torch",
                 placement="cpu", value_init_std=0.02)


class Args:  # the TrainingArguments fields create_meft_optimizer reads
    learning_rate = 3e-3
    weight_decay = 0.01
    max_grad_norm = 1.0


def build(model_seed: int, adapter_seed: int):
    torch.manual_seed(model_seed)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                      max_position_embeddings=32)
    model = attach_meft(transformers.AutoModelForCausalLM.from_config(config), CFG)
    torch.manual_seed(adapter_seed)
    for adapter in meft_adapters(model).values():
        adapter.reset_parameters()
    model.train()
    opt = create_meft_optimizer(model, Args())
    warmup = 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1.0 - s / STEPS))
    return model, opt, sched


def train(model, opt, sched, start: int, stop: int, ckpt_dir, losses: list) -> None:
    """Steps start..stop-1. Micro-batch count and sizes come from Python's RNG, the tokens from
    torch's: a resume is exact only if the checkpoint restored both."""
    for step in range(start, stop):
        accumulate = random.randint(1, 3)
        total = 0.0
        for _ in range(accumulate):
            rows, length = random.randint(1, 4), random.randint(3, 12)
            ids = torch.randint(3, VOCAB, (rows, length))
            loss = model(ids, labels=ids).loss / accumulate
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(total)
        if (step + 1) % EVERY == 0:
            save_training_state(model, opt, ckpt_dir, step=step + 1, scheduler=sched,
                                extra={"loss": total})


def final_state(model, opt) -> list[torch.Tensor]:
    out = [t.clone() for t in meft_state_tensors(model).values()]
    state = opt.state_dict()
    out += [v for st in state["state"].values() for v in st.values() if torch.is_tensor(v)]
    for sparse in state["meft_sparse"]:
        out += [sparse["exp_avg"].clone(), sparse["exp_avg_sq"].clone(), torch.tensor(sparse["step"])]
    return out


@pytest.fixture
def one_thread():
    """Tiny matrices: on a busy 2-core machine torch's second thread only adds stalls (6x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_soak_resume_equals_uninterrupted_run(tmp_path, one_thread):
    random.seed(1234)
    model, opt, sched = build(0, 7)
    first = [t.clone() for t in meft_state_tensors(model).values()]
    losses: list[float] = []
    train(model, opt, sched, 0, 150, tmp_path / "ckpt", losses)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "at_150")  # what a crash at step 170 would find
    train(model, opt, sched, 150, STEPS, tmp_path / "ckpt", losses)
    expected = final_state(model, opt)
    assert all(torch.isfinite(t).all() for t in expected)
    assert sum(losses[-20:]) < sum(losses[:20]), "the run learns"
    assert not all(torch.equal(a, b) for a, b in zip(first, expected))

    # The "crashed" run: trained to step 130, lost everything in memory; a fresh process builds
    # the model from another seed (nothing can match by luck) and resumes from the checkpoint.
    random.seed(999)
    torch.manual_seed(999)
    model2, opt2, sched2 = build(0, 31)
    step = load_training_state(model2, opt2, tmp_path / "at_150", scheduler=sched2)
    assert step == 150 < CRASH_AFTER
    train(model2, opt2, sched2, step, STEPS, tmp_path / "at_150", [])
    got = final_state(model2, opt2)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert [s.step_count for s in opt2.sparse] == [s.step_count for s in opt.sparse]
    assert opt.nonfinite_steps == opt2.nonfinite_steps == 0
