"""profiling.gpu_check without a GPU (one line, no traceback), its summary parsers on synthetic
stage outputs, and the per-device pytest-benchmark baseline (save, compare, fail, skip)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from profiling import gpu_check, perf_gate


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
@pytest.mark.parametrize("flags, code", [((), 0), (("--require-cuda",), 3)])
def test_without_cuda_one_line_and_documented_exit_code(flags, code):
    proc = subprocess.run([sys.executable, "-m", "profiling.gpu_check", *flags], cwd=perf_gate.ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code
    assert proc.stderr == ""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_summary_rows_from_stage_outputs(tmp_path):
    ok = gpu_check.Stage("x", [], rc=0)
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>')
    assert gpu_check.rows_tests(gpu_check.Stage("t", [], rc=1), junit)[0].value == "7 passed, 1 failed, 2 skipped"

    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"checks": [
        {"name": "triton_step_vs_reference", "ratio": 0.05, "threshold": 0.5, "status": "pass", "error": None},
        {"name": "h2d_gather_vs_pinned_memcpy", "ratio": float("nan"), "threshold": 2.0,
         "status": "ERROR (provisional)", "error": "RuntimeError: boom"}]}))
    rows = gpu_check.rows_gate(ok, gate)
    assert [r.result for r in rows] == ["pass", "ERROR (provisional)"] and rows[1].note == "RuntimeError: boom"

    kernels = tmp_path / "kernels.csv"
    kernels.write_text("impl,fwd_ms,step_ms,fwd_floor_ms,step_floor_ms,fwd_vs_floor,step_vs_floor,"
                       "fwd_speedup_of_triton,step_speedup_of_triton\n"
                       "triton,1.2,3.0,1.0,1.5,1.2,2.0,1.0,1.0\n"
                       "reference,12,60,1.0,1.5,12,40,10,20\n"
                       "meft-original,,,1.0,1.5,,,,\n")
    rows = {r.what: r for r in gpu_check.rows_kernels(ok, kernels)}
    assert rows["Triton forward / floor (LLaMA-7B shapes)"].result == "met"
    assert rows["Triton forward+backward / floor (LLaMA-7B shapes)"].result == "MISSED"
    assert rows["Triton forward+backward speedup over reference"].value == "20x"
    assert rows["Triton forward speedup over meft-original"].value == "OOM"

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    nan = math.nan
    (sweep / "sweep.csv").write_text(
        "kind,mode,impl,placement,transfer,backward_rows,num_neurons,rows,h2d_cpu_gather_GBps,h2d_zero_copy_GBps,"
        "pinned_h2d_GBps,copy_hidden_share,achieved_vs_memcpy\n"
        f"transfer,cuda,transfer,,,,16384,1024,5,6,20,{nan},{nan}\n"
        f"transfer,cuda,transfer,,,,16384,16384,18,12,20,{nan},{nan}\n"
        f"step,cuda,meft,cpu,cpu_gather,refetch,4096,,,,,0.99,0.7\n"
        f"step,cuda,meft,cpu,cpu_gather,refetch,16384,,,,,0.95,0.8\n"
        f"step,cuda,meft,cpu,zero_copy,keep,16384,,,,,0.5,0.3\n"
        f"step,cuda,meft,gpu,,,16384,,,,,{nan},{nan}\n")
    rows = gpu_check.rows_sweep(ok, sweep)
    got = {r.what: (r.value, r.result) for r in rows}
    assert got["H2D active rows / pinned memcpy [cpu_gather]"] == ("0.9", "met")
    assert got["H2D active rows / pinned memcpy [zero_copy]"] == ("0.6", "MISSED")
    assert got["copy hidden [meft cpu_gather/refetch N=16384]"] == ("0.95", "met")
    assert got["copy hidden [meft zero_copy/keep N=16384]"] == ("0.5", "MISSED")
    assert len(rows) == 4

    empty = tmp_path / "none"
    empty.mkdir()
    assert {r.result for r in gpu_check.rows_sweep(ok, empty)} == {"n/a"}
    table = gpu_check.format_summary(rows, "header")
    assert table.splitlines()[2].startswith("| what | value | target | result")


def test_benchmark_baseline_is_per_device(tmp_path, monkeypatch):
    assert perf_gate.benchmark_baseline("gpu", "nvidia-h100-80gb-hbm3") == \
        perf_gate.BASELINES / "nvidia-h100-80gb-hbm3" / "benchmarks-gpu.json"
    # no baseline for this device: compare is skipped (exit 0), nothing runs
    monkeypatch.setattr(perf_gate, "BASELINES", tmp_path)
    assert perf_gate.benchmark_command("compare", tmp_path / "out.json", "gpu") is None
    assert perf_gate.run_benchmarks("compare", "gpu", 30.0) == 0


def test_benchmark_compare_fails_on_a_slower_median(tmp_path):
    """Save a baseline of one small benchmark, compare with it (pass, with any slowdown up to 10^4x
    allowed), then with a baseline of 1 ns per 2 MiB copy, which no machine reaches
    (pytest-benchmark's --benchmark-compare-fail must fail at 100x allowed). Neither outcome
    depends on how fast the save ran: under load one save's median was 500x its compare's."""
    baseline = tmp_path / "dev" / "benchmarks.json"
    select = ["-k", "test_memcpy_same_bytes and values"]
    one_file = ("tests/perf/test_gather_benchmark.py",)
    save = perf_gate.benchmark_command("save", baseline, None, baseline=baseline, paths=one_file) + select
    proc = subprocess.run(save, cwd=perf_gate.ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    compare = perf_gate.benchmark_command("compare", tmp_path / "now.json", None, 999999.0, baseline, one_file) + select
    proc = subprocess.run(compare, cwd=perf_gate.ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    data = json.loads(baseline.read_text())
    for bench in data["benchmarks"]:
        for key in ("min", "max", "mean", "median"):
            bench["stats"][key] = 1e-9
    baseline.write_text(json.dumps(data))
    compare = perf_gate.benchmark_command("compare", tmp_path / "now.json", None, 10000.0, baseline, one_file) + select
    proc = subprocess.run(compare, cwd=perf_gate.ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Performance has regressed" in proc.stdout + proc.stderr


def test_stage_runner_kills_a_stage_past_its_limit(tmp_path):
    log = tmp_path / "stage.log"
    rc, timed_out, seconds = gpu_check._run([sys.executable, "-c", "import time; print('hi', flush=True); "
                                             "time.sleep(60)"], log, timeout=2)
    assert (rc, timed_out) == (None, True) and seconds < 30
    assert "hi" in log.read_text() and "killed after 2 s" in log.read_text()
    rc, timed_out, _ = gpu_check._run([sys.executable, "-c", "raise SystemExit(3)"], log, timeout=30)
    assert (rc, timed_out) == (3, False)


def test_orchestration_with_cuda_pretended(tmp_path, monkeypatch, capsys):
    """main() end to end as on a GPU machine, with CUDA pretended in this process only: the
    stages' subprocesses see no GPU (their gpu tests skip), kernel bench and sweep are skipped.
    Checks the results folder, the bootstrapped per-device baseline and the copy-out."""
    from profiling import environment

    results = tmp_path / "results" / "test-device" / "now-gpu-check"
    results.mkdir(parents=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(environment, "device_name", lambda: "test-device")
    monkeypatch.setattr(environment, "results_dir", lambda kind=None: results)
    monkeypatch.setattr(gpu_check, "machine_record", lambda: {"device": "pretend", "driver": "0"})
    monkeypatch.setattr(gpu_check, "ROOT", perf_gate.ROOT)
    monkeypatch.setattr(perf_gate, "BASELINES", tmp_path / "baselines")
    copy = tmp_path / "out"
    code = gpu_check.main(["--skip", "kernel-bench,sweep", "--copy-to", str(copy)])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((results / "summary.json").read_text())
    status = {s["name"]: (s["rc"], s["skipped"]) for s in summary["stages"]}
    assert status["gpu-tests"][0] == 0 and status["gpu-benchmarks"][0] == 0 and status["perf-gate"][0] == 0
    assert status["kernel-bench"][1] == "--skip" and status["sweep"][1] == "--skip"
    baseline = tmp_path / "baselines" / "test-device" / "benchmarks-gpu.json"
    # Every benchmark skips in the GPU-less subprocess; pytest-benchmark >= 5.3 then writes no
    # JSON, and no baseline may be bootstrapped from nothing.
    produced = (results / "benchmarks-gpu.json").is_file()
    assert baseline.is_file() == produced
    assert summary["new_baseline"] == (str(baseline) if produced else "")
    assert (copy / "now-gpu-check" / "summary.md").is_file()
    assert (copy / "benchmarks-gpu.json").is_file() == produced
    assert "PASS: every stage passed" in out and "| stage gpu-tests |" in out
