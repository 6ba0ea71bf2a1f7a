"""The profiling sweep: files and columns, plots, byte accounting, the library's
placement-"cpu" pipeline and its counters, flag checks.

CPU only, tiny shapes; the whole file runs in well under a minute.
"""

import json
import math

import pandas as pd
import pytest
import torch

from profiling import metrics, plots, sweep
from profiling.sweep import transfer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--hidden-size", "16", "--layers", "3", "--max-layers", "2", "-N", "64,128", "-E", "4", "-P", "2",
        "-K", "4", "-T", "8", "--repeats", "1", "--warmup", "0", "--transfer-rows", "16,64",
        "--threads", "1", "--no-progress", "--dtype", "float32", "-M", "1", "2"]
PLOTS = ("tokens_per_s_vs_N.png", "gpu_memory_vs_N.png", "transfer_GBps_vs_rows.png", "step_breakdown.png",
         "pcie_bytes_vs_micro_batches.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    assert sweep.main([*TINY, "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # --threads is undone afterwards
    return out, pd.read_csv(out / "sweep.csv")


def test_every_column_is_described_next_to_the_csv(tiny_run):
    out, df = tiny_run
    assert list(sweep.COLUMNS) == sweep.COLUMN_NAMES == list(df.columns)
    table = (out / "columns.md").read_text().splitlines()
    assert table[0] == "| column | unit | meaning |"
    described = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert list(described) == sweep.COLUMN_NAMES
    assert "| step_ms | ms |" in described["step_ms"] and "| bytes |" in described["h2d_bytes_measured"]
    for unit, meaning in sweep.COLUMNS.values():
        assert meaning and unit in ("", "ms", "bytes", "rows", "count", "ratio", "GB/s", "tokens/s")


def test_an_undescribed_column_is_refused(tmp_path):
    with pytest.raises(ValueError, match="undescribed sweep columns: made_up"):
        sweep.check_described([*sweep.COLUMN_NAMES, "made_up"])
    df = pd.DataFrame([dict.fromkeys([*sweep.COLUMN_NAMES, "made_up"], 1.0)])
    with pytest.raises(ValueError, match="made_up"):
        sweep.write_outputs(df, {"mode": "cpu"}, tmp_path, plots=False)
    assert not list(tmp_path.iterdir())


def test_sweep_writes_csv_json_meta_table_and_plots(tiny_run, capsys):
    out, df = tiny_run
    for name in ("sweep.csv", "sweep.json", "columns.md", "meta.json", "summary.md", *PLOTS):
        assert (out / name).is_file(), name
    records = json.loads((out / "sweep.json").read_text())
    assert len(records) == len(df) and list(records[0]) == sweep.COLUMN_NAMES
    meta = json.loads((out / "meta.json").read_text())
    assert meta["machine"]["torch"] == torch.__version__ and meta["wall_s"] > 0
    assert "| N " in (out / "summary.md").read_text()

    steps = df[df["kind"] == "step"]
    # the same points with and without CUDA: placement "cpu" is the library's MEFTAdapter only
    expected = {("meft", "gpu"), ("meft", "cpu"), ("reference", "gpu"), ("meft-original", "gpu"), ("dense", "gpu"),
                ("lora", "gpu")}
    assert set(zip(steps["impl"], steps["placement"])) == expected
    assert sorted(steps["num_neurons"].unique()) == [64, 128]
    assert (steps["layers"] == 3).all() and (steps["layers_run"] == 2).all()
    assert steps["step_ms"].notna().all(), steps[["impl", "note"]]
    assert (steps["tokens_per_s"] > 0).all()
    cpu_rows = steps[steps["placement"] == "cpu"]
    assert set(cpu_rows["backward_rows"]) == {"refetch", "keep"}
    assert (cpu_rows["h2d_bytes_per_step"] > 0).all() and (cpu_rows["d2h_bytes_per_step"] > 0).all()
    # the library's own counters, and the rows copied again through its Prefetcher and copy engine
    assert (cpu_rows["h2d_bytes_measured"] > 0).all() and (cpu_rows["d2h_bytes_measured"] > 0).all()
    for text in cpu_rows["adapter_counters"]:
        assert set(json.loads(text)) == {"bytes_to_device", "bytes_to_host", "rows_reused"}
    assert (cpu_rows["copy_ms"] > 0).all() and (cpu_rows["achieved_GBps"] > 0).all()
    assert cpu_rows["copy_hidden_share"].between(0, 1).all()
    assert (steps[steps["placement"] == "gpu"]["h2d_bytes_per_step"] == 0).all()
    # placement "cpu" keeps less on the device than placement "gpu" at the same N
    for n in (64, 128):
        at_n = steps[(steps["num_neurons"] == n) & (steps["impl"] == "meft")]
        assert at_n[at_n["placement"] == "cpu"]["adapter_gpu_bytes"].max() < \
            at_n[at_n["placement"] == "gpu"]["adapter_gpu_bytes"].min()
    transfers = df[df["kind"] == "transfer"]
    assert sorted(transfers["rows"]) == [16, 64] and (transfers["gather_GBps"] > 0).all()
    if not torch.cuda.is_available():
        # what cannot be measured here is NaN and explained, not a crash
        assert steps["gpu_peak_alloc_bytes"].isna().all() and steps["pcie_rx_GBps"].isna().all()
        assert steps["note"].str.contains("NVML").all()
        ref = steps[(steps["impl"] == "reference")]
        assert ref["t_router_ms"].notna().all() and ref["t_optimizer_ms"].notna().all()
        # placement "cpu" on CPU compute: the wait for the library's value-row copy, timed on its own
        assert (cpu_rows["t_copy_wait_ms"] >= 0).all()
        assert steps[steps["placement"] == "gpu"]["t_copy_wait_ms"].isna().all()


def test_main_prints_table_and_one_gpu_line(tmp_path, capsys):
    args = [*TINY, "-N", "64", "--placement", "cpu", "--backward-rows", "keep", "--baselines", "none",
            "--transfer-rows", "16", "--no-plots", "--out", str(tmp_path)]
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "| N " in printed and "| rows " in printed
    gpu_lines = [line for line in printed.splitlines() if "need a GPU" in line]
    assert len(gpu_lines) == (0 if torch.cuda.is_available() else 1)
    assert not list(tmp_path.glob("*.png"))


def test_plots_are_pngs_with_expected_series(tiny_run, tmp_path):
    out, df = tiny_run
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name

    fig, labels = plots.plot_tokens_per_s(df, tmp_path / "t.png")
    main = "meft"
    per_micro_batch = f"{main}, placement=cpu (per-micro-batch, cpu_gather, refetch)"
    for label in (f"{main}, placement=gpu", per_micro_batch,
                  f"{main}, placement=cpu (per-micro-batch, cpu_gather, keep)",
                  f"{main}, placement=cpu (resident, cpu_gather)", "MEFT original (dense-masked)",
                  "dense adapter, same N", "LoRA, same GPU memory"):
        assert label in labels
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == labels
    assert all(len(line.get_xdata()) == 2 for line in fig.axes[0].get_lines())  # one point per N

    _, labels = plots.plot_memory(df, tmp_path / "m.png")
    assert f"{main}, placement=gpu [accounting]" in labels
    assert f"{per_micro_batch} [accounting]" in labels

    _, labels = plots.plot_transfer(df, tmp_path / "p.png")
    assert "host gather fp32 (offload.gather.cpu_gather)" in labels and "plain host memcpy, same bytes" in labels
    assert "training steps, placement=cpu (rows per layer)" in labels

    _, labels = plots.plot_breakdown(df, tmp_path / "b.png")
    assert {"backward", "optimizer"} <= set(labels)
    if not torch.cuda.is_available():  # the staged reference and placement "cpu"'s copy wait
        assert {"router", "keys", "copy wait", "values"} <= set(labels)
    fig, labels = plots.plot_pcie_bytes(df, tmp_path / "x.png")
    assert f"{main}, placement=cpu (resident, cpu_gather) [measured]" in labels
    assert f"{per_micro_batch} [planner]" in labels and labels[-1].startswith("floor")
    assert all(list(line.get_xdata()) == [1, 2] for line in fig.axes[0].get_lines())  # -M 1 2, one N
    for name in ("t.png", "m.png", "p.png", "b.png", "x.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_sweep_bytes_equal_counters_planner_and_hand_count(tmp_path, micro_batches):
    """P = E and K_top = P*S: every token selects every neuron, so every layer touches all N = 16
    rows in every micro-batch. 2 layers, d = 8, fp32 (4 B), M micro-batches per optimizer step.
    The library's counters, the planner's prediction for the routing the step saw, and the hand
    count agree exactly; "resident" moves each row once each way (+ the ids), whatever M is."""
    d, n, layers, m = 8, 16, 2, micro_batches
    args = ["--hidden-size", str(d), "--layers", str(layers), "--max-layers", str(layers), "-N", str(n), "-E", "2",
            "-P", "2", "-K", str(n), "-T", "4", "-M", str(m), "--placement", "cpu", "--backward-rows", "refetch",
            "--residency", "per-micro-batch", "resident", "--baselines", "none", "--repeats", "2", "--warmup", "1",
            "--transfer-rows", "4", "--threads", "1", "--no-plots", "--no-progress", "--dtype", "float32",
            "--out", str(tmp_path)]
    assert sweep.main(args) == 0
    df = pd.read_csv(tmp_path / "sweep.csv")
    rows = df[df["kind"] == "step"].set_index("residency")
    assert set(rows.index) == {"per-micro-batch", "resident"}
    row_bytes, id_bytes = d * 4, 8
    floor = layers * 2 * n * 2 * row_bytes  # each row once each way: key (r = d) + value
    hand = {
        # per micro-batch: value rows forward + refetched in backward, fp32 key+value gradient rows
        # with ids; after the step: the n key rows the update changed into the key cache
        "per-micro-batch": (layers * (m * 2 * n + n) * row_bytes, layers * m * n * (2 * row_bytes + id_bytes)),
        # each value row once (it stays for the step; a later call with every row on the device
        # still hands the engine one row), gradient rows summed and sent once
        "resident": (layers * (n + (m - 1) + n) * row_bytes, layers * n * (2 * row_bytes + id_bytes)),
    }
    for residency, (h2d, d2h) in hand.items():
        row = rows.loc[residency]
        assert row["unique_rows_layers"] == f"{n};{n}" and row["rows_touched_per_step"] == n
        assert (row["h2d_bytes_measured"], row["d2h_bytes_measured"]) == (h2d, d2h), residency
        assert (row["h2d_bytes_per_step"], row["d2h_bytes_per_step"]) == (h2d, d2h), residency
        assert row["pcie_floor_bytes_per_step"] == floor
        assert row["pcie_vs_floor"] == pytest.approx((h2d + d2h) / floor)
    if m == 1:  # the floor + the gradient rows' ids
        assert rows.loc["resident", "pcie_vs_floor"] == pytest.approx(1 + id_bytes / (2 * 2 * row_bytes))


def test_transfer_rows_go_through_the_library_pipeline(monkeypatch):
    """Transfer rows: the host gather is offload.gather.cpu_gather (what the "cpu_gather" engine runs),
    and the engine round trips are the library's Prefetcher on offload.default_engine."""
    gathered = []
    real_gather = transfer.cpu_gather
    monkeypatch.setattr(transfer, "cpu_gather", lambda rows, ids, out: gathered.append(out.dtype) or
                        real_gather(rows, ids, out))
    shape = sweep.Shape("tiny", 8, 1, 1, 32, 1, 1, 1, 1, "bfloat16")
    out = transfer.measure_transfer_rows(shape, 16, repeats=1, cuda=False)
    assert set(gathered) == {torch.float32, torch.bfloat16}
    assert out["gather_GBps"] > 0 and out["gather_cast_GBps"] > 0 and out["host_memcpy_GBps"] > 0
    assert all(math.isnan(out[c]) for c in ("h2d_cpu_gather_GBps", "h2d_zero_copy_GBps", "d2h_GBps"))

    prefetched = []
    real_prefetch = transfer.Prefetcher.prefetch
    monkeypatch.setattr(transfer.Prefetcher, "prefetch",
                        lambda self, layer, ids: prefetched.append(ids.numel()) or real_prefetch(self, layer, ids))
    store = transfer.transfer_store(32, 8)
    h2d, d2h = transfer.engine_GBps(store, transfer.random_rows(32, 16), torch.bfloat16, torch.device("cpu"),
                                    "cpu_gather", repeats=1)
    assert h2d > 0 and d2h > 0 and set(prefetched) == {16}
    transfer.transfer_store.cache_clear()


def test_memory_accounting_and_lora_rank():
    gpu = metrics.adapter_memory_bytes("gpu", num_neurons=16, num_experts=2, hidden_size=8, layers=2,
                                       row_dtype_bytes=2, max_unique_rows=4)
    assert gpu == {"gpu_bytes": 2 * 16 * (2 + 2 * 16) * 8, "host_bytes": 0}
    cpu = metrics.adapter_memory_bytes("cpu", num_neurons=16, num_experts=2, hidden_size=8, layers=2,
                                       row_dtype_bytes=2, max_unique_rows=4)
    # router (16 B/param) + bf16 key cache per layer, two slots of 4 bf16 rows, one layer's fp32 grad rows
    assert cpu["gpu_bytes"] == 2 * (16 * 2 * 8 + 16 * 8 * 2) + 2 * 4 * 8 * 2 + 4 * 2 * 8 * 4
    assert cpu["host_bytes"] == 2 * 3 * 16 * 2 * 8 * 4 + 4 * 8 * 2 + 4 * 2 * 8 * 4
    assert metrics.lora_rank_for_bytes(16 * 2 * 8 * 5, 8) == 5
    assert metrics.lora_rank_for_bytes(1, 8) == 1


@pytest.mark.parametrize("argv, flag", [
    (["-N", "-5"], "--num-neurons"),
    (["--num-neurons=0"], "--num-neurons"),
    (["--tokens", "0"], "--tokens"),
    (["--hidden-size", "-1"], "--hidden-size"),
    (["-N", "100", "-E", "7"], "--num-neurons"),
    (["-N", "100"], "--num-experts"),
    (["-N", "256", "-E", "8", "-P", "9"], "--experts-per-token"),
    (["-N", "256", "-E", "8", "-P", "2", "-K", "65"], "--topk"),
    (["--placement", "tpu"], "--placement"),
    (["--transfer", "carrier-pigeon"], "--transfer"),
    (["--backward-rows", "sometimes"], "--backward-rows"),
    (["--dtype", "float8"], "--dtype"),
    (["--preset", "gpt-5"], "--preset"),
    (["--baselines", "none,dense"], "--baselines"),
    (["--repeats", "0"], "--repeats"),
])
def test_flags_reject_nonsense(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        sweep.parse_args(argv, cuda=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err or flag in err, err


def test_topk_message_names_the_bound(capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["-N", "256", "-E", "8", "-P", "2", "-K", "65"], cuda=False)
    assert "65 > --experts-per-token x --num-neurons / --num-experts = 2 x 256 / 8 = 64" in capsys.readouterr().err


def test_quick_defaults_follow_the_device_and_flags_override():
    cpu = sweep.parse_args(["--quick"], cuda=False)
    gpu = sweep.parse_args(["--quick"], cuda=True)
    assert cpu.preset == ["tiny"] and gpu.preset == ["llama-7b"]
    assert gpu.dtype == ["bfloat16"] and "zero_copy" in gpu.transfer
    override = sweep.parse_args(["--quick", "-N", "512,1024", "--tokens", "32 64"], cuda=False)
    assert override.num_neurons == [512, 1024] and override.tokens == [32, 64]
    points, skipped = sweep.build_points(sweep.parse_args(["--quick", "--transfer", "cpu_gather,zero_copy"],
                                                          cuda=False), cuda=False)
    assert not any(p.transfer == "zero_copy" for p in points) and skipped


def test_unmeasurable_things_are_nan_not_errors():
    monitor = metrics.NvmlMonitor()
    with monitor:
        pass
    if not torch.cuda.is_available():
        assert monitor.error and math.isnan(monitor.peak_used_bytes) and math.isnan(monitor.pcie_tx_GBps)
        value, why = metrics.pinned_memcpy_GBps(1024)
        assert math.isnan(value) and why
    current, peak = metrics.host_rss_bytes()
    assert current > 0 and peak >= current * 0.5


def test_markdown_table():
    text = metrics.markdown_table([{"a": 1.23456, "b": "x|y"}, {"a": float("nan"), "b": None}], ["a", "b"])
    lines = text.splitlines()
    assert lines[0].startswith("| a") and set(lines[1]) <= {"|", "-"}
    assert "1.23" in lines[2] and "x\\|y" in lines[2]
    assert len(lines) == 4


def test_cross_row_columns_speedup_and_hidden_copy_estimate():
    """speedup_vs_reference divides by the reference step of the same shape; without adapter
    copy timers the hidden share is 1 - (step cpu - step gpu) / copy time, clamped to [0, 1]."""
    base = dict.fromkeys(sweep.COLUMN_NAMES, float("nan"))
    shape = dict(kind="step", preset="tiny", hidden_size=8, num_neurons=64, num_experts=4, experts_per_token=2,
                 topk=4, tokens=8, dtype="float32")
    rows = [
        {**base, **shape, "impl": "reference", "placement": "gpu", "step_ms": 40.0},
        {**base, **shape, "impl": "meft", "placement": "gpu", "step_ms": 10.0},
        {**base, **shape, "impl": "meft", "placement": "cpu", "step_ms": 12.0, "copy_ms": 8.0},
        {**base, **shape, "impl": "meft", "placement": "cpu", "step_ms": 30.0, "copy_ms": 8.0},
    ]
    df = sweep.add_cross_row_columns(pd.DataFrame(rows, columns=sweep.COLUMN_NAMES))
    assert list(df["speedup_vs_reference"]) == [1.0, 4.0, 40 / 12, 40 / 30]
    assert df.loc[2, "copy_hidden_share"] == pytest.approx(0.75)
    assert df.loc[3, "copy_hidden_share"] == 0.0
    assert math.isnan(df.loc[1, "copy_hidden_share"])


def test_backbone_ffn_runs_beside_every_adapter(tmp_path):
    """--backbone ffn: a frozen FFN per layer (placement "cpu" wraps it between the adapter's
    start_routing and finish_values); its forward is its own stage of the breakdown."""
    args = [*TINY, "-N", "64", "--backbone", "ffn", "--backward-rows", "refetch", "--transfer-rows", "16",
            "--no-plots", "--out", str(tmp_path)]
    assert sweep.main(args) == 0
    df = pd.read_csv(tmp_path / "sweep.csv")
    steps = df[df["kind"] == "step"]
    assert (steps["backbone"] == "ffn").all()
    assert steps["step_ms"].notna().all(), steps[["impl", "note"]]
    assert (steps["t_backbone_ms"] > 0).all()
    assert (df[df["kind"] == "transfer"]["backbone"] == "none").all()


@pytest.mark.parametrize("residency", ["per-micro-batch", "resident"])
def test_ist_ratio_axis_halves_gradient_rows_to_host(tmp_path, residency):
    """MEFT + IST: with half the layers trained per step, half the gradient bytes go home."""
    code = sweep.main(["--preset", "tiny", "-N", "1024", "-T", "64", "--placement", "cpu", "-M", "2",
                       "--residency", residency, "--backward-rows", "refetch", "--ist-ratio", "1", "0.5",
                       "--baselines", "none", "--transfer-rows", "64", "--repeats", "2", "--warmup", "1",
                       "--no-plots", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    df = pd.read_csv(tmp_path / "sweep.csv")
    meft = df[(df.kind == "step") & (df.impl == "meft")].set_index("ist_ratio")
    assert meft.loc[0.5, "d2h_bytes_measured"] == pytest.approx(meft.loc[1.0, "d2h_bytes_measured"] / 2, rel=0.1)


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2", "x"])
def test_ist_ratio_rejects_nonsense(bad, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--ist-ratio", bad], cuda=False)
    assert "ist-ratio" in capsys.readouterr().err
