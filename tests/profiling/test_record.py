"""python -m profiling.plan.record: a routing profile from a model's real FFN inputs, what the
planner's --routing reads."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from meft_triton import MEFTAdapter, MEFTConfig, meft_adapters  # noqa: E402
from oracle import selected_rows  # noqa: E402
from profiling.plan import profile_from_dict  # noqa: E402
from profiling.plan.cli import main as plan_main  # noqa: E402
from profiling.plan.record import main, record_profile  # noqa: E402

CFG = MEFTConfig(num_neurons=48, num_experts=6, experts_per_token=2, topk=5)
WORDS = "the a of to in and is was for on with as by at it from that this be are".split()


def tiny_llama(layers=3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=len(WORDS) + 2)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_profile_counts_the_rows_each_layer_picks(seed, monkeypatch):
    """Each layer's distinct picks per micro-batch and their running union, against the
    reference's selections on the inputs the adapters saw (captured separately), and the model
    is left without adapters."""
    model = tiny_llama()
    ids = torch.randint(0, len(WORDS) + 2, (4, 7))
    seen: dict[int, list[torch.Tensor]] = {}
    forward = MEFTAdapter.forward

    def spy(adapter, hidden, *args, **kwargs):
        seen.setdefault(id(adapter), []).append(selected_rows(adapter, hidden.detach()))
        return forward(adapter, hidden, *args, **kwargs)

    monkeypatch.setattr(MEFTAdapter, "forward", spy)
    profile = record_profile(model, ids, CFG, seed=3)
    assert meft_adapters(model) == {}
    assert len(profile["layers"]) == 3 and profile["num_neurons"] == 48
    for layer, picks in zip(profile["layers"], seen.values()):
        assert layer["per_micro_batch"] == [p.numel() for p in picks]
        assert layer["cumulative"] == [torch.unique(torch.cat(picks[:m + 1])).numel() for m in range(4)]
        assert layer["per_step"] == layer["cumulative"][-1] < 48
    profile_from_dict(profile, layers=3, num_neurons=48, micro_batches=4)  # what --routing accepts


def test_command_line_writes_what_the_planner_reads(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "tiny"
    tiny_llama(2).save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 3))
    out = tmp_path / "routing.json"
    base = ["--model", str(folder), "--text", str(text), "--num-neurons", "48", "--num-experts", "6",
            "--experts-per-token", "2", "--topk", "5", "--out", str(out)]
    assert main([*base, "--tokens", "9", "--micro-batches", "3"]) == 0
    profile = json.loads(out.read_text())
    assert "text.txt" in profile["source"] and len(profile["layers"]) == 2
    assert "of rows in the first micro-batch" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 16, "num_hidden_layers": 2,
                                                      "intermediate_size": 32, "vocab_size": 22,
                                                      "num_attention_heads": 2}))
    assert plan_main(["--model", str(tmp_path / "config.json"), "--gpu", "h200", "--tokens", "9",
                      "--micro-batches", "3", "--num-neurons", "48", "--num-experts", "6", "--experts-per-token",
                      "2", "--topk", "5", "--routing", str(out)]) == 0
    assert str(out) in capsys.readouterr().out  # the plan names its routing source
    assert main([*base, "--tokens", "40", "--micro-batches", "3"]) == 2
    assert "--text holds 60 tokens; 3 micro-batches of 40 need 120" in capsys.readouterr().err
    assert main([*base, "--tokens", "0", "--micro-batches", "3"]) == 2
    assert "--tokens must be >= 1" in capsys.readouterr().err
