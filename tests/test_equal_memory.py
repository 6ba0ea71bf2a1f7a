"""examples/equal_memory.py: the footprint accounting by hand, and its quick path at a tiny size."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "equal_memory.py")
MiB = 2**20


@pytest.fixture(scope="module")
def eq():
    spec = importlib.util.spec_from_file_location("equal_memory", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["equal_memory"] = module
    spec.loader.exec_module(module)
    return module


def test_footprints_by_hand(eq):
    assert eq.lora_gpu_bytes(8, 1000) == 16 * 8 * 1000
    assert eq.dense_gpu_bytes(10, 64, 2) == 40_960                      # 16 B x (64x10 + 10x64) x 2 layers
    assert eq.meft_shape(3) == (144, 48)                                 # N = 16 j^2, E = 16 j
    assert eq.meft_params(144, 48, 64, 2) == 2 * 64 * (48 + 2 * 144)     # 43,008
    assert eq.meft_gpu_gpu_bytes(144, 48, 64, 2) == 688_128              # 16 B x 43,008
    assert eq.meft_active_rows(144, 100, 16) == 144                      # capped at N
    assert eq.meft_active_rows(10_000, 100, 16) == 1_600                 # tokens x K_top
    # router 2 x 16 x 48 x 64 = 98,304; key cache 2 x 144 x 64 x 4 = 73,728;
    # 2 slots x 144 x 64 x 4 = 73,728; gradient rows 2 x 144 x 128 x 4 = 147,456
    assert eq.meft_cpu_gpu_bytes(144, 48, 64, 2, 144) == 393_216
    assert eq.meft_cpu_gpu_bytes(144, 48, 64, 2, 144, compute_bytes=2) == 98_304 + 147_456
    assert eq.meft_cpu_host_bytes(144, 64, 2) == 2 * 3 * 144 * 128 * 4
    assert eq.smt_gpu_bytes(10, 8, 4096) == 16 * 10 * 64 + 4 * 4096
    assert eq.largest_fitting(lambda s: 10 * s, 95) == 9
    assert eq.largest_fitting(lambda s: 10 * s, 100) == 10
    assert eq.largest_fitting(lambda s: 10 * s, 5) == 0


def test_quick_path_tiny(eq, tmp_path):
    out = tmp_path / "eq.csv"
    budgets = [8, 32]
    rows, summary = eq.main(["--quick", "--facts", "32", "--steps", "6", "--lrs", "3e-3", "--seeds", "0",
                             "--budgets-mib", *map(str, budgets), "--workers", "0", "--csv", str(out)])
    with open(out) as f:
        reader = csv.DictReader(f)
        table = list(reader)
        columns = reader.fieldnames
    for c in ("budget_bytes", "method", "size", "gpu_bytes", "accuracy", "lr", "seed", "params",
              "train_accuracy", "wall_s"):
        assert c in columns
    assert len(table) == len(budgets) * len(eq.METHODS)
    assert {r["method"] for r in table} == set(eq.METHODS)
    assert sorted((int(r["budget_bytes"]), r["method"]) for r in table) == sorted(
        (b * MiB, m) for b in budgets for m in eq.METHODS)  # each (budget, method) exactly once
    assert os.path.getsize(tmp_path / "eq.png") > 1000

    by = {(int(r["budget_bytes"]), r["method"]): r for r in table}
    bb, _ = eq._backbone(eq.parse_args(["--quick", "--facts", "32"]), 0)
    io = eq.linear_io(bb.model)
    assert io == 2 * (128 + 96 + 96 + 128 + 3 * 240)  # d=64, kv width 32, FFN 176, 2 layers
    for (budget, method), r in by.items():
        assert int(r["size"]) > 0, (budget, method)
        assert 0 < int(r["gpu_bytes"]) <= budget, (budget, method, r["gpu_bytes"])
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["train_accuracy"]) <= 1.0
        assert math.isfinite(float(r["loss_last"]))
    for mib in budgets:
        budget = mib * MiB
        lora, cpu = by[(budget, "lora")], by[(budget, "meft-cpu")]
        rank = budget // (16 * io)
        assert int(lora["size"]) == rank and int(lora["params"]) == rank * io
        # MEFT placement "cpu" buys far more parameters than LoRA at the same GPU memory ...
        assert int(cpu["params"]) >= 4 * int(lora["params"]), (mib, cpu["params"], lora["params"])
        # ... and the size chosen is the largest that fits: the next one on MEFT's rule does not
        j = math.isqrt(int(cpu["size"]) // 16)
        tokens = 16 * bb.train_embeds.shape[1]
        n, e = eq.meft_shape(j + 1)
        assert eq.meft_cpu_gpu_bytes(n, e, 64, 2, eq.meft_active_rows(n, tokens, 16)) > budget
        # without the memory trick (placement "gpu") it is about LoRA's size
        assert int(by[(budget, "meft-gpu")]["params"]) <= int(lora["params"]) * 1.01
        assert int(by[(budget, "meft-eqparams")]["params"]) <= int(lora["params"])
