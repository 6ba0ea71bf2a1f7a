"""Launch parameters as data: a device's JSON table overrides the heuristic default."""

import json

import torch

from meft_triton.kernels import launch_config as lc

SHAPE = dict(pairs_per_expert=5.6, neurons_per_expert=23, width=97)


def test_heuristic_without_a_table():
    cfg = lc.launch_config("expert_grads", torch.device("cpu"), torch.float16, **SHAPE)
    assert cfg == dict(BLOCK_M=16, BLOCK_S=32, BLOCK_D=128, num_warps=4, num_stages=2)


def test_device_table_overrides_by_dtype_then_default(tmp_path, monkeypatch):
    table = {"expert_grads": {"fp16": {"BLOCK_D": 32, "num_warps": 8}, "default": {"BLOCK_M": 64}}}
    (tmp_path / "Some_GPU.json").write_text(json.dumps(table))
    monkeypatch.setattr(lc, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(lc, "device_key", lambda device: "Some_GPU")
    lc._table.cache_clear()
    try:
        half = lc.launch_config("expert_grads", torch.device("cpu"), torch.float16, **SHAPE)
        single = lc.launch_config("expert_grads", torch.device("cpu"), torch.float32, **SHAPE)
    finally:
        lc._table.cache_clear()
    assert half == dict(BLOCK_M=16, BLOCK_S=32, BLOCK_D=32, num_warps=8, num_stages=2)
    assert single == dict(BLOCK_M=64, BLOCK_S=32, BLOCK_D=128, num_warps=4, num_stages=2)


def test_shipped_tables_name_known_kernels_and_keys():
    for path in lc.CONFIG_DIR.glob("*.json"):
        for kernel, entries in json.loads(path.read_text()).items():
            if kernel.startswith("_"):
                continue
            default = lc.HEURISTICS[kernel](torch.float16, **SHAPE)
            for dtype, entry in entries.items():
                assert dtype in (*lc.DTYPE_NAMES.values(), "default"), (path.name, dtype)
                assert set(entry) <= set(default), (path.name, kernel, dtype)


def test_long_runs_of_pairs_take_their_own_entry(monkeypatch):
    """expert_grads launches with >= LONG_RUN_PAIRS pairs per expert (a flush of many
    micro-batches' factors) read "expert_grads_long": wide width tiles on 8 warps in 16-bit,
    the short-run tiles in fp32; a dG-alone launch reads "expert_grads_dg"; the launcher picks
    the entry by what it computes and the run length."""
    long = dict(SHAPE, pairs_per_expert=lc.LONG_RUN_PAIRS)
    cfg = lc.launch_config("expert_grads_long", torch.device("cpu"), torch.bfloat16, **long)
    assert cfg == dict(BLOCK_M=32, BLOCK_S=32, BLOCK_D=128, num_warps=8, num_stages=2)  # width 97 -> 128
    assert lc.launch_config("expert_grads_long", torch.device("cpu"), torch.float32, **long) == \
        lc.launch_config("expert_grads", torch.device("cpu"), torch.float32, **long)
    from meft_triton.kernels import expert_grads as eg

    asked = []
    real = eg.launch_config
    monkeypatch.setattr(eg, "launch_config", lambda name, *a, **k: asked.append(name) or real(name, *a, **k))
    x = torch.zeros(lc.LONG_RUN_PAIRS, 8)
    order = torch.arange(lc.LONG_RUN_PAIRS)
    router = torch.zeros(1, 8)
    key_out = torch.zeros(4, 8)
    for tokens in (lc.LONG_RUN_PAIRS - 1, lc.LONG_RUN_PAIRS):
        table = torch.zeros(tokens, 4)
        eg.expert_grads(table, table, torch.zeros(tokens), x[:tokens], x[:tokens], order[:tokens],
                        torch.tensor([0, tokens]), 1, 4, key_out, key_out.clone())
    eg.expert_grads(None, None, torch.zeros(8), x[:8], x[:8], order[:8], torch.tensor([0, 8]), 1, 4, None, None,
                    router)  # dG alone (the factored backward)
    assert asked == ["expert_grads", "expert_grads_long", "expert_grads_dg"]
