"""The perf gate bites: it fails a deliberately slowed build and passes the normal one.

``MEFT_PERF_SLOWDOWN`` makes the slowed build (see ``profiling/perf_gate.py``): ``optim`` adds a
needless pass over the touched rows to ``SparseRowAdamW.step``; ``gather`` copies every gathered
row twice. The gate runs in a subprocess with ``--quick`` shapes (a few seconds per run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from meft_triton import SparseRowAdamW

from meft_triton.optimizers.sparse_adamw import perf_slowdown
from meft_triton.offload import CPURowStore
from profiling import perf_gate

OPTIM = {"optim_vs_dense_adamw", "optim_vs_byte_floor"}
GATHER = {"store_gather_vs_memcpy", "cpu_gather_vs_memcpy"}


def run_gate(tmp_path, slowdown: str | None, *args: str):
    env = {k: v for k, v in os.environ.items() if k != "MEFT_PERF_SLOWDOWN"}
    if slowdown is not None:
        env["MEFT_PERF_SLOWDOWN"] = slowdown
    out = tmp_path / f"gate-{slowdown}.json"
    proc = subprocess.run([sys.executable, "-m", "profiling.perf_gate", "--quick", "--json", str(out), *args],
                          cwd=perf_gate.ROOT, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    res = json.loads(out.read_text())
    failed = {c["name"] for c in res["checks"] if c["status"] == "FAIL"}
    return proc, failed


def test_gate_passes_normal_build(tmp_path):
    proc, failed = run_gate(tmp_path, None)
    assert proc.returncode == 0 and not failed
    assert "PASS" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("slowdown, slowed", [("optim", OPTIM), ("gather", GATHER)])
def test_gate_fails_slowed_build(tmp_path, slowdown, slowed):
    proc, failed = run_gate(tmp_path, slowdown)
    assert proc.returncode == 1
    assert failed == slowed  # exactly the slowed hot path's ratios fail; the others pass
    verdict = proc.stdout.splitlines()[-1]
    assert verdict.startswith("FAIL:") and all(name in verdict for name in slowed)
    assert f"SLOWED BUILD (MEFT_PERF_SLOWDOWN): {slowdown}" in proc.stdout


def test_thresholds_catch_a_2x_slowdown():
    """Every check of every profile has a threshold above the typical ratio measured when it
    was set (noise headroom) and below twice it (a 2x slower hot path fails)."""
    table = perf_gate.load_thresholds()["profiles"]
    for name in perf_gate.PROFILES:
        assert set(table[name]) == set(perf_gate.CPU_CHECKS) | set(perf_gate.CUDA_CHECKS), name
        for check, entry in table[name].items():
            if entry.get("provisional"):
                assert entry["threshold"] > 0, (name, check)
                continue
            assert entry["typical"] < entry["threshold"] < 2 * entry["typical"], (name, check)


def test_slowdown_switch_parsing(monkeypatch):
    for flag, optim, gather in [("", False, False), ("1", True, True), ("all", True, True), ("optim", True, False),
                                ("gather", False, True), ("optim,gather", True, True), ("0", False, False)]:
        monkeypatch.setenv("MEFT_PERF_SLOWDOWN", flag)
        assert (perf_slowdown("optim"), perf_slowdown("gather")) == (optim, gather), flag


def test_slowed_build_computes_the_same(monkeypatch):
    """The needless work changes no result: optimizer step and both gathers are bit-identical."""
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen)
    ids = torch.tensor([3, 17, 5, 63, 0])
    gk, gv = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
    results = []
    for flag in ("", "1"):
        monkeypatch.setenv("MEFT_PERF_SLOWDOWN", flag)
        store = CPURowStore.from_dense(keys, values, pin_memory=False)
        opt = SparseRowAdamW(store, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
        for _ in range(2):
            opt.accumulate(ids, gk, gv)
            opt.step()
        with perf_gate.slowed_gather() as slowed:
            assert slowed == (flag == "1")
            rows = store.gather(ids).rows
            staged = perf_gate.gather.cpu_gather(store.values(), ids, torch.empty(5, 16))
        results.append((store.records.clone(), store.exp_avg.clone(), store.exp_avg_sq.clone(), rows, staged))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert perf_gate.gather.gather_chunk.__name__ == "gather_chunk"  # the patch was undone
