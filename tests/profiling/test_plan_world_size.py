"""The planner's data-parallel input (--world-size, --gpus-per-node): CPU RAM per node with one
shared master per node, and the gradient bytes a rank sends (rows or dense, the cheaper one)."""

import json

import pytest

from meft_triton import MEFTConfig
from profiling.plan import Backbone, Batch, load_gpu, plan, profile_from_dict
from profiling.plan.cli import main
from profiling.plan.data_parallel import Parallel, node_rows

D, LAYERS, N, E = 16, 2, 48, 6
TINY_MODEL = {"hidden_size": D, "num_hidden_layers": LAYERS, "intermediate_size": 32, "vocab_size": 50,
              "num_attention_heads": 2}


def tiny_plan(per_step, parallel=None, **kw):
    backbone = Backbone("tiny", D, LAYERS, 32, 50, 2, 2)
    config = MEFTConfig(num_neurons=N, num_experts=E, experts_per_token=2, topk=5)
    layer = {"per_micro_batch": [min(per_step, 35)] * 2, "per_step": per_step}
    profile = profile_from_dict({"layers": [layer] * LAYERS}, layers=LAYERS, num_neurons=N, micro_batches=2)
    extra = {} if parallel is None else {"parallel": parallel}
    records = plan(load_gpu("h200"), backbone, Batch(7, 2), config, profile, fixed={"backward_rows", "transfer", "gradient_form"},
                   **extra, **kw)
    return {(r["placement"], r["policy"]): r for r in records}


def test_one_process_is_what_it_was_and_sends_nothing():
    default, one = tiny_plan(40), tiny_plan(40, Parallel(1))
    assert default == one
    for r in one.values():
        assert r["world_size"] == 1 and r["grad_bytes_sent_per_rank"] == 0 and r["grad_reduction"] == "none"


def test_a_node_holds_one_master_and_each_rank_its_own_buffers():
    one, four = tiny_plan(40), tiny_plan(40, Parallel(4))
    for policy in ("per-micro-batch", "resident"):
        a, b = one[("cpu", policy)]["cpu_ram_bytes"], four[("cpu", policy)]["cpu_ram_bytes"]
        assert b["masters + AdamW moments (fp32)"] == a["masters + AdamW moments (fp32)"] == LAYERS * N * 2 * D * 12
        for name, value in a.items():
            if name != "masters + AdamW moments (fp32)":
                assert b[name] == 4 * value, name
        # the leader receives 4 ranks' 40 rows per layer: ids + fp32 key and value rows
        assert b["leader's received gradient rows"] == 4 * LAYERS * 40 * (2 * D * 4 + 8)
        assert four[("cpu", policy)]["cpu_ram_total_bytes"] == sum(b.values())
    # two nodes of two: each node holds its own master
    two_nodes = tiny_plan(40, Parallel(4, 2))[("cpu", "resident")]["cpu_ram_bytes"]
    assert two_nodes["masters + AdamW moments (fp32)"] == LAYERS * N * 2 * D * 12
    # one process reads its step's single batch of rows as it came; a leader sums its ranks'
    # rows into the accumulators (as many as per-micro-batch's, per rank of the node)
    assert "gradient accumulators" not in one[("cpu", "resident")]["cpu_ram_bytes"]
    per_rank = one[("cpu", "per-micro-batch")]["cpu_ram_bytes"]["gradient accumulators"]
    assert two_nodes["gradient accumulators"] == 2 * per_rank


def test_placement_gpu_sends_rows_below_the_break_even_and_dense_above():
    router = 2 * 6 * D * 4 // 2  # W = 2: a ring all-reduce sends 2 (W - 1) / W of the bytes
    dense_table = 2 * N * D * 4 // 2
    two = tiny_plan(10, Parallel(2))[("gpu", "none")]
    # per layer: keys and values by rows (10 ids + fp32 rows of 16), the router dense, 3 counts
    assert two["grad_bytes_sent_per_rank"] == LAYERS * (2 * 10 * (D * 4 + 8) + router + 3 * 8)
    assert two["grad_bytes_dense_allreduce"] == LAYERS * (2 * dense_table + router)
    assert two["grad_reduction"] == "rows"
    # 40 of 48 rows on 4 ranks: 3 x 40 x 72 B by rows > 2 x 3/4 x 3072 B dense
    four = tiny_plan(40, Parallel(4))[("gpu", "none")]
    assert four["grad_reduction"] == "dense"
    assert four["grad_bytes_sent_per_rank"] == LAYERS * (2 * 4608 + 2 * 3 * 6 * D * 4 // 4 + 3 * 3 * 8)


def test_placement_cpu_sends_rows_to_the_leader_and_across_nodes():
    rows = 10 * (2 * D * 4 + 8)
    router = 2 * 6 * D * 4 // 2
    one_node = tiny_plan(10, Parallel(2))[("cpu", "resident")]
    # the member sends its rows to the leader; the leader only its ids back, fewer bytes
    assert one_node["grad_bytes_sent_per_rank"] == LAYERS * (rows + 8 + router)
    assert one_node["grad_reduction"] == "rows"
    two_nodes = tiny_plan(10, Parallel(2, 1))[("cpu", "resident")]
    # one rank per node: the leaders exchange their node's rows (10 each)
    assert two_nodes["grad_bytes_sent_per_rank"] == LAYERS * (rows + 8 + router)
    four = tiny_plan(10, Parallel(4, 2))[("cpu", "resident")]
    v_node = node_rows(10, N, 2)
    assert v_node == round(N * (1 - (1 - 10 / N) ** 2)) == 18
    leader = v_node * (2 * D * 4 + 8) + v_node * 8 + 2 * 8 + 2 * 3 * 6 * D * 4 // 4
    assert four["grad_bytes_sent_per_rank"] == LAYERS * leader


def test_cli_reports_per_node_ram_and_gradient_bytes(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY_MODEL))
    argv = ["--model", str(tmp_path / "config.json"), "--gpu", "h200", "--tokens", "7", "--micro-batches", "2",
            "--num-neurons", str(N), "--num-experts", str(E), "--experts-per-token", "2", "--topk", "5"]
    assert main(argv + ["--world-size", "4", "--gpus-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "data parallel: 4 ranks, 2 per node (2 nodes)" in out
    assert "CPU RAM total per node" in out and "gradient MB sent per rank per step" in out
    assert main(argv + ["--world-size", "4", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["world_size"] == 4 and r["gpus_per_node"] == 4 for r in records)
    assert main(argv) == 0
    assert "data parallel" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--world-size", "0"], "world_size must be > 0"),
    (["--world-size", "4", "--gpus-per-node", "3"], "gpus_per_node (3) must divide world_size (4)"),
    (["--world-size", "12"], "gpus_per_node (8) must divide world_size (12)"),
    (["--gpus-per-node", "0"], "gpus_per_node must be > 0"),
])
def test_bad_world_sizes_are_named(capsys, extra, message):
    assert main(["--model", "paper-7b", "--gpu", "h200", *extra]) == 2
    assert message in capsys.readouterr().err
