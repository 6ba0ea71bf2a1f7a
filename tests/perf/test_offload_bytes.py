"""PCIe bytes per optimizer step of placement "cpu" against their floor, by residency policy.

    python -m pytest -m perf tests/perf/test_offload_bytes.py -s    # the table
    python tests/perf/test_offload_bytes.py                          # the same, as a script

A CPU-sized shape with paper-7b's rows-touched fraction (T x K_top / N = 1.97: a micro-batch
touches 86 % of a layer's rows under uniform routing, DESIGN.md "Performance model") and 8
micro-batches per step, bf16 compute dtype, on the synchronous CPU engine. Bytes are the
runtime's counters (``OffloadRuntime.bytes_to_device`` / ``bytes_to_host``), key write-back
included; the floor is each row the step touched once each way in the compute dtype,
2 V (r + d) x 2 B per layer. Bytes, not time: deterministic, so the resident policy's target
(at most 1.2x the floor) is asserted.

The "tight" rows give both gradient forms the same gradient budget, three micro-batches'
factors (a third of the fp32 sums a layer needs, less than one call's padded ids): the rows
form then sends every backward's rows home, the factors form every third micro-batch's.
"""

from __future__ import annotations

import torch

from meft_triton import MEFTAdapter, MEFTConfig
from meft_triton.offload import OffloadRuntime

LAYERS, D, TOKENS, MICRO_BATCHES, STEPS = 2, 64, 126, 8, 3
SHAPE = dict(num_neurons=1024, num_experts=32, experts_per_token=4, topk=16, backend="torch",
             key_init_std=1.0, value_init_std=0.02, router_init_scale=0.3)
TARGET = 1.2
#: three micro-batches' gradient factors per layer, all layers (bf16 x and dy, int64 ids, fp32 coefficients)
TIGHT_BUDGET = LAYERS * 3 * TOKENS * (2 * D * 2 + SHAPE["experts_per_token"] * 8 + SHAPE["topk"] * 16)
CASES = {"per-micro-batch": dict(residency="per-micro-batch"), "resident": dict(residency="resident"),
         "resident, rows, tight": dict(residency="resident", gradient_form="rows", gradient_budget=TIGHT_BUDGET),
         "resident, factors, tight": dict(residency="resident", gradient_form="factors", gradient_budget=TIGHT_BUDGET)}


def bytes_per_step(case: str) -> list[dict]:
    """One record per optimizer step after the first: bytes each way and the floor."""
    torch.manual_seed(0)
    runtime = OffloadRuntime("cpu", torch.bfloat16, D)
    cfg = MEFTConfig(**SHAPE, placement="cpu", **CASES[case])
    adapters = [MEFTAdapter(D, cfg, dtype=torch.bfloat16, runtime=runtime) for _ in range(LAYERS)]
    for a in adapters:
        a.configure_optimizer(lr=1e-3)
    es = 2
    records = []
    for step in range(STEPS):
        before = runtime.bytes_to_device, runtime.bytes_to_host
        for _ in range(MICRO_BATCHES):
            x = torch.randn(TOKENS, D, dtype=torch.bfloat16)
            for a in adapters:
                x = x + a(x)
            x.float().square().mean().backward()
        touched = [a.sparse_step().result() for a in adapters]
        for a in adapters:
            a.master_rows()  # the changed key rows go back to the device cache (counted)
        floor = sum(2 * t.numel() * (a.key_size + D) * es for a, t in zip(adapters, touched))
        if step:  # the first step also warms the slots up
            records.append(dict(case=case, h2d=runtime.bytes_to_device - before[0],
                                d2h=runtime.bytes_to_host - before[1], floor=floor,
                                touched=sum(t.numel() for t in touched) / (LAYERS * cfg.num_neurons)))
    runtime.close()
    return records


def table() -> tuple[str, dict[str, float]]:
    lines = ["| residency | h2d MB/step | d2h MB/step | floor MB/step | x floor | rows touched/step |",
             "|---|---|---|---|---|---|"]
    worst = {}
    for case in CASES:
        for r in bytes_per_step(case):
            ratio = (r["h2d"] + r["d2h"]) / r["floor"]
            worst[case] = max(worst.get(case, 0.0), ratio)
            lines.append(f"| {case} | {r['h2d'] / 1e6:.2f} | {r['d2h'] / 1e6:.2f} | {r['floor'] / 1e6:.2f} | "
                         f"{ratio:.3f} | {r['touched']:.1%} |")
    return "\n".join(lines), worst


def test_bytes_per_step_against_the_floor():
    text, worst = table()
    print(f"\nplacement cpu, {LAYERS} layers, d={D}, N={SHAPE['num_neurons']}, T={TOKENS}, "
          f"K_top={SHAPE['topk']}, {MICRO_BATCHES} micro-batches/step, bf16\n{text}")
    assert worst["resident"] <= TARGET, text
    assert worst["per-micro-batch"] > 4 * worst["resident"], text
    assert worst["resident, rows, tight"] > 2 * worst["resident, factors, tight"], text


if __name__ == "__main__":
    print(table()[0])
