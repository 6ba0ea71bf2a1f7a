"""The placement planner: what fits on a GPU and what a step costs, before any run.

    python -m profiling.plan --model paper-7b --gpu rtx-4090
    python -m profiling.plan --model scale-7b --gpu h100-sxm --json
    python -m profiling.plan --model PATH/config.json --gpu h200 --tokens 2048 --micro-batches 8 \\
        --num-neurons 32768 --num-experts 512 --routing profile.json

For placement "gpu" and for placement "cpu" under each residency policy (``MEFTConfig.residency``:
"per-micro-batch", every micro-batch moves its rows; "resident", rows stay on the device for
the step) and each backward_rows / transfer not fixed on the command line, it prints GPU and
CPU bytes by component, PCIe bytes per optimizer step against their floor and the predicted
step time split into GPU compute, exposed PCIe and exposed CPU optimizer time; then the fastest
configuration that fits as a ``MEFTConfig(...)``, or what is over and by how much.

Modules: inputs (GPU presets from profiling/gpu_presets.json, the backbone, the batch),
routing (rows touched per micro-batch and per step), traffic (PCIe bytes per policy), memory
(bytes by component), timing (the time model), data_parallel (world size: CPU RAM per node,
gradient bytes each rank sends), planner (one record per candidate), auto (the resident
budgets of ``MEFTConfig(value_budget="auto")``), cli; record (``python -m
profiling.plan.record``: a routing profile from a transformers model reading real text).
Every number is a prediction from these formulas; the byte counts of both policies equal the
runtime's counters on the same routing at full budgets (tests/profiling/test_plan.py, and the
sweep's placement-"cpu" rows, which put both side by side).
"""

from .data_parallel import Parallel
from .inputs import GPU, Backbone, Batch, load_gpu, resolve_model
from .planner import Budgets, best, plan, why_nothing_fits
from .routing import RoutingProfile, load_profile, profile_from_dict, uniform_profile

__all__ = ["GPU", "Backbone", "Batch", "Budgets", "Parallel", "RoutingProfile", "best", "load_gpu", "load_profile",
           "plan", "profile_from_dict", "resolve_model", "uniform_profile", "why_nothing_fits"]
