"""The kernel bench's static predictions (its GPU timing runs only where a GPU is lent)."""

import json

from profiling.kernel_bench import RESULTS, static_prediction

SHAPE = dict(T=4, d=8, N=16, E=2, P=1, K=3)


def record(workload, us, dtype="bf16", **shape):
    return dict(workload=workload, dtype=dtype, predicted_us=us, shape_params={**SHAPE, "S": 8, **shape})


def test_static_prediction_sums_the_phases_of_the_matching_records(tmp_path):
    folder = tmp_path / "static-sm90a"
    folder.mkdir()
    folder.joinpath("records.json").write_text(json.dumps([
        record("router_topk", 10.0), record("forward", 20.0), record("forward", 5.0),
        record("backward", 30.0), record("smt", 1000.0),             # not an adapter phase
        record("backward", 1000.0, dtype="fp32"), record("forward", 1000.0, T=5),
        dict(record("backward", None), compiled=False),              # a launch that did not compile
    ]))
    got = static_prediction((9, 0), "bfloat16", SHAPE, results=tmp_path)
    assert got == {"fwd_ms": 0.035, "step_ms": 0.065, "flush_ms": 0.0}
    assert static_prediction((9, 0), "bfloat16", {**SHAPE, "T": 6}, results=tmp_path) is None
    assert static_prediction((8, 0), "bfloat16", SHAPE, results=tmp_path) is None  # no sm80 records
    assert static_prediction((8, 6), "bfloat16", SHAPE, results=tmp_path) is None  # no static target


def test_static_prediction_reads_the_committed_baseline():
    """At the scale-7b preset (the bench's default shape) the bf16 step is the committed
    report's adapter step: the records are found by their shape parameters."""
    records = json.loads((RESULTS / "static-sm90a" / "records.json").read_text())
    scale = [r for r in records if r.get("shape") == "scale-7b" and r["dtype"] == "bf16"
             and r.get("workload") in ("router_topk", "forward", "backward")]
    got = static_prediction((9, 0), "bfloat16", dict(T=4096, d=4096, N=65536, E=1024, P=8, K=64))
    assert abs(got["step_ms"] - sum(r["predicted_us"] for r in scale) / 1e3) < 1e-12
    assert 0 < got["fwd_ms"] < got["step_ms"]


def test_static_prediction_of_a_flush_matches_its_micro_batches(tmp_path):
    folder = tmp_path / "static-sm90a"
    folder.mkdir()
    folder.joinpath("records.json").write_text(json.dumps([
        record("factored_rows", 7.0, flush=3), record("factored_rows", 2.0, flush=3),
        record("factored_rows", 1000.0, flush=4)]))
    assert static_prediction((9, 0), "bfloat16", {**SHAPE, "flush": 3}, results=tmp_path)["flush_ms"] == 0.009


def test_factored_step_and_flush_closures_run(seed):
    """The bench's factored contender and its flush on CPU (the interpreter), at a tiny shape:
    the flush's rows are those of the micro-batches' dK, dV summed (one launch vs the sum of
    per-micro-batch launches)."""
    import torch

    from meft_triton.kernels import key_value_rows
    from profiling.kernel_bench import adapter_problem, flush_factors, triton_passes

    problem = adapter_problem(6, 16, 24, 4, torch.float32, device="cpu")
    _, _, factored_step = triton_passes(problem, 2, 3)
    row_ids, rows = factored_step()
    assert rows.shape == (row_ids.numel(), 32)
    flush = flush_factors(problem, 2, 3, micro_batches=3)
    assert flush[0].shape == (18, 16)
    whole = key_value_rows(*flush, 24, 4)
    parts = [key_value_rows(*(t[i * 6:(i + 1) * 6] for t in flush), 24, 4) for i in range(3)]
    dense = torch.zeros(24, 32).index_add_(0, whole.row_ids, whole.rows)
    summed = sum(torch.zeros(24, 32).index_add_(0, p.row_ids, p.rows) for p in parts)
    torch.testing.assert_close(dense, summed, rtol=1e-5, atol=1e-5)
