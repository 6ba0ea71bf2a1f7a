"""Placement "gpu" under DDP with the row-sparse hook and under FSDP2: W gloo ranks (spawned, with
a timeout) on a global batch equal one process on it, and the hook chooses rows where they are
cheaper, sending the bytes the planner predicts."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import dist_scenarios as sc  # noqa: E402
from dist_launch import launch  # noqa: E402
from meft_triton import create_meft_optimizer  # noqa: E402
from meft_triton.distributed import load_sharded_state, save_sharded_state, shard_meft_model  # noqa: E402
from meft_triton.distributed.row_exchange import (dense_allreduce_bytes, sparse_allgather_bytes,  # noqa: E402
                                                  sparse_is_cheaper, touched_rows)
from profiling.plan import profile_from_dict  # noqa: E402
from profiling.plan.data_parallel import Parallel, gradient_bytes  # noqa: E402

TIMEOUT = 240


def one_process(placement: str, **kw) -> dict:
    model = sc.tiny_llama(placement, **kw)
    opt = create_meft_optimizer(model, lr=sc.LR)
    sc.train(model, opt, 3, 2)
    return sc.masters(model)


def check_ranks(results, world, tmp_path):
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} of {world} exited with {rc}:\n{err}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def assert_ranks_equal_one_process(ranks, want):
    """Every rank holds the same masters, equal to the one-process run's to 1e-6."""
    for rank, got in enumerate(ranks):
        assert got["masters"].keys() == want.keys()
        for name, tensor in want.items():
            assert torch.equal(got["masters"][name], ranks[0]["masters"][name]), (rank, name)
            torch.testing.assert_close(got["masters"][name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_equals_one_process_and_sends_rows(tmp_path, world):
    ranks = check_ranks(launch("ddp_gpu", world, tmp_path, timeout=TIMEOUT), world, tmp_path)
    want = one_process("gpu")
    assert_ranks_equal_one_process(ranks, want)
    stats = ranks[0]
    # keys/values of a 64-row table, at most 4 picks x 15 local tokens per rank: rows win
    assert stats["sparse"] > 0 and stats["bytes_sent"] < stats["bytes_dense"], stats
    assert predicted_bytes(ranks, world) == (stats["bytes_sent"], stats["bytes_dense"])


def predicted_bytes(ranks, world):
    """The planner's gradient bytes per rank (python -m profiling.plan --world-size), summed over
    the run's steps, on the rows the run touched: per step, each layer's keys and values, the
    most rows any rank touched (the hook's choice between rows and dense is made on it)."""
    cfg = sc.config("gpu")
    choices = ranks[0]["choices"]
    tables = [most for num_rows, _, most, _ in choices if num_rows == cfg.num_neurons]
    assert all(r["choices"] == choices for r in ranks) and len(tables) == 3 * 2 * 2  # steps x layers x (K, V)
    assert tables[0::2] == tables[1::2]  # a layer's keys and values touch the same rows
    sent = dense = 0
    for step in range(3):
        layers = [{"per_micro_batch": [v], "per_step": v} for v in tables[4 * step:4 * step + 4:2]]
        profile = profile_from_dict({"layers": layers}, layers=2, num_neurons=cfg.num_neurons, micro_batches=1)
        got = gradient_bytes(profile, placement="gpu", num_neurons=cfg.num_neurons, num_experts=cfg.num_experts,
                             hidden=sc.HIDDEN, key_width=sc.HIDDEN, low_key=False, parallel=Parallel(world))
        sent += got["sent"]
        dense += got["dense"]
    return sent, dense


def test_the_cheaper_reduction_is_chosen_by_rows_touched():
    # a [1000, 64] fp32 table on 4 ranks: dense sends 2 * 3/4 * 256000 B = 384000 B per rank
    assert dense_allreduce_bytes(1000 * 64, 4, 4) == 384000
    assert sparse_allgather_bytes(10, 64, 4, 4) == 3 * 10 * (256 + 8)
    assert sparse_is_cheaper(10, (1000, 64), 4, 4)
    assert not sparse_is_cheaper(485, (1000, 64), 4, 4)  # 3 * 485 * 264 = 384120 > 384000
    assert sparse_is_cheaper(484, (1000, 64), 4, 4)
    # break-even fraction of rows: 2 / W * width * 4 / (width * 4 + 8)
    assert math.isclose(484 / 1000, 2 / 4 * 256 / 264, abs_tol=1e-3)


def test_touched_rows_finds_nonzero_and_nonfinite_rows():
    g = torch.zeros(6, 3)
    g[1, 2] = 1.0
    g[4, 0] = float("nan")
    assert touched_rows(g).tolist() == [1, 4]
    with pytest.raises(ValueError, match="grad"):
        touched_rows(torch.zeros(3))


def test_fsdp2_equals_one_process_with_rows_sharded_and_resumes_bitwise(tmp_path):
    world = 2
    ranks = check_ranks(launch("fsdp_gpu", world, tmp_path, timeout=TIMEOUT), world, tmp_path)
    want = one_process("gpu")
    assert_ranks_equal_one_process(ranks, want)
    for rank, got in enumerate(ranks):
        # each rank keeps half of a 64-row table between steps
        assert got["local_key_rows"] == sc.config("gpu").num_neurons // world
        assert "torch.distributed.checkpoint" in got["refused"]
        # a fresh model loaded the sharded checkpoint written after step 2 and took step 3
        for name, tensor in got["masters"].items():
            assert torch.equal(got["resumed"][name], tensor), (rank, name)
    assert (tmp_path / "sharded").is_dir()
    assert not (tmp_path / "sharded.incomplete").exists() and not (tmp_path / "sharded.replaced").exists()
    assert not (tmp_path / "ckpt").exists()


def test_shard_meft_model_rejects_what_it_cannot_shard(tmp_path):
    with pytest.raises(TypeError, match="model"):
        shard_meft_model("model")
    with pytest.raises(ValueError, match="no MEFT adapters"):
        shard_meft_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="placement 'gpu'.*NodeSharedAdamW"):
        shard_meft_model(sc.tiny_llama("cpu"))
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        save_sharded_state(torch.nn.Linear(2, 2), None, tmp_path / "ckpt", step=-1)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load_sharded_state(torch.nn.Linear(2, 2), None, tmp_path / "missing")
    assert not any(tmp_path.iterdir())
