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
