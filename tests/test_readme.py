"""The README's code as a newcomer pastes it: every ```python block runs, in order, in one Python
session (later blocks use the earlier ones' `model`, `path`, `args`, `ds`), with tiny sizes.

The only changes are the substitutions below (model path, sizes, steps); each must still match
the README, so a block that drifts fails here instead of in a reader's terminal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = [  # (as written, as run here)
    ('"path/to/llama"', None),  # the tiny model's folder, filled in by the test
    ("num_neurons=65536, num_experts=1024", "num_neurons=512, num_experts=32"),
    ("num_neurons=8192, num_experts=128", "num_neurons=256, num_experts=16"),
    ("hidden_size=4096", "hidden_size=64"),
    ("torch.randn(16, 4096", "torch.randn(16, 64"),
    ("(64, 128)", "(4, 8)"),
    ("max_steps=100", "max_steps=2"),
    ("per_device_train_batch_size=8", "per_device_train_batch_size=2"),
]


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    code = blocks("python")
    assert len(code) >= 3
    source = "\n".join(code)
    for written, tiny in TINY:
        assert written in source, f"README no longer has {written!r}: update TINY"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(code):
        for written, tiny in TINY:
            block = block.replace(written, repr(str(tmp_path / "llama")) if tiny is None else tiny)
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "out" / "meft" / "adapter.safetensors").is_file()


def test_setup_block_holds_the_cpu_only_install():
    setup = blocks("bash")[0]
    comment = [line for line in setup.splitlines() if "cpu" in line.lower()]
    assert comment and all(line.lstrip().startswith("#") for line in comment), setup
    assert any("download.pytorch.org/whl/cpu" in line for line in comment)
