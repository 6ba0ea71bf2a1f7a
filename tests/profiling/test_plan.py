"""The planner (python -m profiling.plan): its bytes against the runtime's counters, its choices
and its errors. No timing: predicted times are formulas, checked only for their structure."""

import json
import math

import pytest
import torch

from meft_triton import MEFTAdapter, MEFTConfig
from meft_triton.offload import OffloadRuntime
from profiling.plan import Batch, load_gpu, plan, profile_from_dict, resolve_model, uniform_profile
from profiling.plan.cli import main

D, LAYERS, TOKENS, MICRO_BATCHES = 16, 2, 7, 3
CFG = dict(num_neurons=48, num_experts=6, experts_per_token=2, topk=5)
TINY_MODEL = {"hidden_size": D, "num_hidden_layers": LAYERS, "intermediate_size": 32, "vocab_size": 50,
              "num_attention_heads": 2}


def run_library(backward_rows, residency="per-micro-batch", tokens=TOKENS, **changes):
    """A few micro-batches and one optimizer step of placement "cpu" on CPU (bf16 rows, so the
    compute dtype and fp32 differ on the wire); returns the runtime and the distinct rows each
    layer's calls touched per micro-batch, and the rows each layer's update touched."""
    torch.manual_seed(0)
    runtime = OffloadRuntime("cpu", torch.bfloat16, D, keep_rows=backward_rows == "keep")
    cfg = MEFTConfig(**CFG, placement="cpu", backend="torch", backward_rows=backward_rows, residency=residency,
                     key_init_std=1.0, value_init_std=1.0, router_init_scale=0.3, **changes)
    adapters = [MEFTAdapter(D, cfg, dtype=torch.bfloat16, runtime=runtime) for _ in range(LAYERS)]
    for a in adapters:
        a.configure_optimizer(lr=1e-2)
    tickets = [[] for _ in adapters]
    for _ in range(MICRO_BATCHES):
        x = torch.randn(tokens, D, dtype=torch.bfloat16)
        for layer, a in enumerate(adapters):
            routed = a.start_routing(x)
            # distinct ids: a call pads its ids with repeats of the last one (copied once)
            tickets[layer].append(torch.unique(routed.neuron_ids))
            x = x + a.finish_values(routed)
        x.float().square().sum().backward()
    touched = [a.sparse_step().result() for a in adapters]
    for a in adapters:
        a.master_rows()  # waits for the update: its key rows go back to the device cache
    return runtime, tickets, touched


def profile_json(tickets):
    return {"num_neurons": CFG["num_neurons"], "layers": [
        {"per_micro_batch": [ids.numel() for ids in per_mb],
         "per_step": torch.unique(torch.cat(per_mb)).numel(),
         "cumulative": [torch.unique(torch.cat(per_mb[:m + 1])).numel() for m in range(len(per_mb))]}
        for per_mb in tickets]}


def planned(tmp_path, capsys, tickets, backward_rows, tokens=TOKENS, extra=()):
    """The planner's --json records for the routing the library saw."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_MODEL))
    (tmp_path / "routing.json").write_text(json.dumps(profile_json(tickets)))
    argv = ["--model", str(tmp_path / "config.json"), "--gpu", "rtx-4090", "--tokens", str(tokens),
            "--micro-batches", str(MICRO_BATCHES), "--routing", str(tmp_path / "routing.json"),
            "--backward-rows", backward_rows, "--transfer", "cpu_gather", "--json"]
    argv += [a for k, v in CFG.items() for a in ("--" + k.replace("_", "-"), str(v))]
    assert main([*argv, *extra]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("backward_rows", ["refetch", "keep"])
def test_per_micro_batch_bytes_equal_the_runtime_counters(tmp_path, capsys, backward_rows):
    runtime, tickets, touched = run_library(backward_rows)
    profile = profile_json(tickets)
    # the rows the step touched (what the key cache gets back) are the union of the tickets' rows
    assert [layer["per_step"] for layer in profile["layers"]] == [t.numel() for t in touched]
    assert runtime.bytes_to_device > 0 and runtime.bytes_to_host > 0
    records = planned(tmp_path, capsys, tickets, backward_rows)
    [today] = [r for r in records if r["placement"] == "cpu" and r["policy"] == "per-micro-batch"]
    assert today["h2d_bytes_per_step"] == runtime.bytes_to_device
    assert today["d2h_bytes_per_step"] == runtime.bytes_to_host
    assert today["pcie_bytes_per_step"] == runtime.bytes_to_device + runtime.bytes_to_host


@pytest.mark.parametrize("gradient_form", ["rows", "factors"])
@pytest.mark.parametrize("backward_rows", ["refetch", "keep"])
def test_resident_bytes_equal_the_runtime_counters(tmp_path, capsys, backward_rows, gradient_form):
    """The same with residency "resident" (T x K_top >= N: a call's padded ids are N long, the
    bound of the gradient rows sent home once per step), either gradient form."""
    tokens = CFG["num_neurons"] // CFG["topk"] + 1
    runtime, tickets, touched = run_library(backward_rows, "resident", tokens, gradient_form=gradient_form)
    assert [torch.unique(torch.cat(per_mb)).numel() for per_mb in tickets] == [t.numel() for t in touched]
    records = planned(tmp_path, capsys, tickets, backward_rows, tokens, extra=["--gradient-form", gradient_form])
    [resident] = [r for r in records if r["placement"] == "cpu" and r["policy"] == "resident"]
    assert resident["gradient_form"] == gradient_form
    assert resident["h2d_bytes_per_step"] == runtime.bytes_to_device
    assert resident["d2h_bytes_per_step"] == runtime.bytes_to_host
    assert resident["pcie_bytes_per_step"] == runtime.bytes_to_device + runtime.bytes_to_host
    assert resident["pcie_bytes_per_step"] < 0.5 * min(
        r["pcie_bytes_per_step"] for r in records if r["policy"] == "per-micro-batch")


def test_a_gradient_budget_below_one_call_is_planned_as_the_runtime_runs_it(tmp_path, capsys):
    """A gradient budget holding half of each layer's rows while a call's padded ids are N long:
    the runtime keeps no gradient sums (each backward's rows go home), and the planner plans
    that, not half a table: its bytes equal the counters."""
    tokens = CFG["num_neurons"] // CFG["topk"] + 1
    budget = LAYERS * (CFG["num_neurons"] // 2) * 2 * D * 4
    runtime, tickets, _ = run_library("refetch", "resident", tokens, gradient_budget=budget, gradient_form="rows")
    records = planned(tmp_path, capsys, tickets, "refetch", tokens,
                      extra=["--grad-budget-gb", str(budget / 2**30), "--gradient-form", "rows"])
    [resident] = [r for r in records if r["placement"] == "cpu" and r["policy"] == "resident"]
    assert resident["grad_budget_bytes"] == 0
    assert resident["d2h_bytes_per_step"] == runtime.bytes_to_host
    assert resident["h2d_bytes_per_step"] == runtime.bytes_to_device


def test_factor_flushes_are_planned_as_the_runtime_runs_them(tmp_path, capsys):
    """gradient_form "factors" with a budget holding two of the three micro-batches' factors:
    the third backward sends the first two's rows (their bound, min(N, 2 T K_top)), the step
    the third's (min(N, T K_top)); the planner's bytes equal the counters."""
    token_bytes = 2 * D * 2 + CFG["experts_per_token"] * 8 + CFG["topk"] * 16  # bf16 x and dy, ids, coefficients
    budget = LAYERS * 2 * TOKENS * token_bytes
    runtime, tickets, _ = run_library("refetch", "resident", gradient_form="factors", gradient_budget=budget)
    records = planned(tmp_path, capsys, tickets, "refetch",
                      extra=["--gradient-form", "factors", "--grad-budget-gb", str(budget / 2**30)])
    [resident] = [r for r in records if r["placement"] == "cpu" and r["policy"] == "resident"]
    row = 2 * D * 2 + 8
    bound = min(CFG["num_neurons"], TOKENS * CFG["topk"])
    assert resident["d2h_bytes_per_step"] == LAYERS * (min(CFG["num_neurons"], 2 * bound) + bound) * row
    assert resident["d2h_bytes_per_step"] == runtime.bytes_to_host
    assert resident["h2d_bytes_per_step"] == runtime.bytes_to_device
    assert "gradient accumulators" in resident["cpu_ram_bytes"]  # rows came home during the step


def test_resident_at_full_budget_moves_each_row_once_each_way():
    backbone, _ = resolve_model("paper-7b")
    config = MEFTConfig(**CFG)
    batch = Batch(TOKENS, MICRO_BATCHES)
    profile = profile_from_dict({"layers": [{"per_micro_batch": [20, 30, 25], "per_step": 40}] * 32},
                                layers=32, num_neurons=48, micro_batches=MICRO_BATCHES)
    records = plan(load_gpu("h200"), backbone, batch, config, profile)
    by = {(r["placement"], r["policy"], r["backward_rows"], r["transfer"]): r for r in records
          if r["gradient_form"] == "rows"}
    resident = by[("cpu", "resident", "refetch", "cpu_gather")]
    factors = next(r for r in records if r["gradient_form"] == "factors" and r["backward_rows"] == "refetch"
                   and r["transfer"] == "cpu_gather")
    # every micro-batch's factors fit: the same single send at the step, the same bytes
    assert factors["pcie_bytes_per_step"] == resident["pcie_bytes_per_step"]
    d, rows = backbone.hidden_size, 32 * 40
    assert resident["pcie_floor_bytes_per_step"] == 2 * rows * (d + d) * 2
    # + int64 ids; the gradient sums go home padded to their host-known bound, min(N, M x T K_top)
    # = 48 rows per layer of which 40 are distinct (the count stays on the device)
    padding = 32 * (48 - 40) * ((d + d) * 2 + 8)
    assert resident["pcie_bytes_per_step"] == resident["pcie_floor_bytes_per_step"] + rows * 8 + padding
    today = by[("cpu", "per-micro-batch", "refetch", "cpu_gather")]
    per_mb_rows, padded = 32 * (20 + 30 + 25), 32 * MICRO_BATCHES * min(48, TOKENS * CFG["topk"])
    # values forward + again in backward (bf16); gradient rows fp32 + ids, padded to min(N, T K_top)
    # rows per layer per micro-batch; key rows after the step
    assert today["pcie_bytes_per_step"] == per_mb_rows * 2 * d * 2 + padded * (2 * d * 4 + 8) + rows * d * 2
    # zero_copy reads the compute-dtype shadow over the link, every padded id of a call
    zero = by[("cpu", "per-micro-batch", "refetch", "zero_copy")]
    assert zero["h2d_bytes_per_step"] == zero["pcie_bytes_per_step"] - (today["pcie_bytes_per_step"]
                                                                         - today["h2d_bytes_per_step"])
    assert zero["h2d_bytes_per_step"] == padded * 2 * d * 2 + rows * d * 2
    for r in records:
        assert r["predicted_step_s"] == pytest.approx(r["compute_s"] + r["exposed_pcie_s"] + r["exposed_cpu_s"])


def test_a_resident_budget_below_the_need_costs_bytes():
    backbone, defaults = resolve_model("paper-7b")
    config = MEFTConfig(**{k: defaults[k] for k in CFG})
    batch = Batch(defaults["tokens"], defaults["micro_batches"])
    profile = uniform_profile(layers=32, num_neurons=config.num_neurons, tokens=batch.tokens, topk=config.topk,
                              micro_batches=batch.micro_batches)
    full = plan(load_gpu("h200"), backbone, batch, config, profile, fixed={"backward_rows", "transfer"})
    small = plan(load_gpu("h200", {"memory_bytes": 22 * 2**30}), backbone, batch, config, profile,
                 fixed={"backward_rows", "transfer"})
    full_r, small_r = (next(r for r in rs if r["policy"] == "resident" and r["gradient_form"] == "rows")
                       for rs in (full, small))
    # over the floor: the ids, and one row per call that finds every row resident (0.2 %)
    assert full_r["pcie_bytes_per_step"] < 1.005 * full_r["pcie_floor_bytes_per_step"]
    assert small_r["grad_budget_bytes"] < full_r["grad_budget_bytes"]
    assert small_r["pcie_bytes_per_step"] > 1.5 * small_r["pcie_floor_bytes_per_step"]
    assert small_r["total_gpu_bytes"] <= small_r["usable_gpu_bytes"]


def test_uniform_profile_matches_design_presets():
    for name, fraction in (("paper-7b", 0.86), ("scale-7b", 0.98)):
        _, p = resolve_model(name)
        profile = uniform_profile(layers=1, num_neurons=p["num_neurons"], tokens=p["tokens"], topk=p["topk"],
                                  micro_batches=p["micro_batches"])
        layer = profile.layers[0]
        assert layer.per_micro_batch[0] / p["num_neurons"] == pytest.approx(fraction, abs=0.005)
        expected_step = p["num_neurons"] * (1 - math.exp(-p["micro_batches"] * p["tokens"] * p["topk"] / p["num_neurons"]))
        assert layer.per_step == round(expected_step)
        assert sum(layer.first_touch) == layer.per_step


def test_paper_setting_on_the_consumer_card(capsys):
    """Uniform routing: placement "gpu" is over on GPU memory; placement "cpu" fits. The fp32
    gradient sums do not fit beside the resident values, so under gradient_form "rows" every
    backward's rows go home (summed as they land: two micro-batches' rows pinned at a time);
    the factors of a third of the step's micro-batches do fit, so under "factors" rows go home
    three times per step, and that is the fastest."""
    assert main(["--model", "paper-7b", "--gpu", "rtx-4090"]) == 0
    out = capsys.readouterr().out
    assert "| gpu | none | – | – | – | no |" in out  # fp32 keys, values and AdamW state do not fit in 24 GB
    assert "| cpu | resident | rows | refetch | cpu_gather | yes |" in out
    assert "| cpu | resident | factors | refetch | cpu_gather | yes |" in out
    assert "| CPU: pinned gradient rows (in flight) | – | 16.5 | 8.3 | 8.3 |" in out
    line = out.strip().splitlines()[-1]
    assert line.startswith("MEFTConfig(")
    config = eval(line.split("  #")[0], {"MEFTConfig": MEFTConfig})  # noqa: S307 - our own output
    assert config.placement == "cpu" and config.num_neurons == 8464 and config.gradient_form == "factors"


def test_nothing_fits_names_the_component_over(capsys):
    assert main(["--model", "paper-7b", "--gpu", "rtx-4090", "--memory-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "nothing fits" in out and "GPU memory over by" in out and "backbone 12.55 GiB" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-70b", "--gpu", "h200"], "model must be one of paper-7b, scale-7b"),
    (["--model", "paper-7b", "--gpu", "h200", "--tokens", "-3"], "tokens must be > 0"),
    (["--model", "paper-7b", "--gpu", "h200", "--pcie-gbs", "0"], "--pcie-gbs must be > 0"),
    (["--model", "paper-7b", "--gpu", "h200", "--num-experts", "7"], "divisible by num_experts"),
])
def test_bad_input_is_named(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_files_are_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    assert main(["--model", str(tmp_path / "config.json"), "--gpu", "h200", "--tokens", "8",
                 "--micro-batches", "2"]) == 2
    assert "has no 'hidden_size'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gpu must be one of"):
        load_gpu("rtx-3090")
    with pytest.raises(ValueError, match="3 layers, the model has 2"):
        profile_from_dict({"layers": [{"per_micro_batch": 1, "per_step": 1}] * 3}, layers=2, num_neurons=8,
                          micro_batches=1)
    with pytest.raises(ValueError, match=r"per_step must be in \[max\(per_micro_batch\)=5"):
        profile_from_dict({"layers": [{"per_micro_batch": [5, 2], "per_step": 4}]}, layers=1, num_neurons=8,
                          micro_batches=2)
    with pytest.raises(ValueError, match=r"per_micro_batch\[0\] must be in \[0, num_neurons=8\]"):
        profile_from_dict({"layers": [{"per_micro_batch": [9], "per_step": 9}]}, layers=1, num_neurons=8,
                          micro_batches=1)
