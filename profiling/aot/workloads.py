"""The shapes and the launcher calls of the static report.

Each workload calls a real public launcher of ``meft_triton.kernels`` on CPU tensors of the
real shapes (large float tensors come from ``torch.empty``: never written, so they cost no
memory; the kernels are only compiled). Index tensors hold real routing: each token picks P
distinct experts uniformly at random and K_top of their P*S candidates, so the host-side
bookkeeping (pair blocks, unique rows, segments) and the grids derived from it are what a
launch on uniformly routed tokens gives.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    d: int          # hidden width (keys, values, router all width d: no low-key projection)
    N: int          # neurons
    E: int          # experts
    P: int          # experts per token
    K: int          # K_top
    T: int          # tokens per micro-batch
    smt_block: int  # SMT block side
    smt_blocks: int  # SMT blocks in the launch (one [d, d] matrix)
    flush: int      # micro-batches of gradient factors one key_value_rows launch turns into rows

    @property
    def S(self) -> int:
        return self.N // self.E

    def as_dict(self) -> dict:
        return dict(asdict(self), S=self.S)


#: docs/DESIGN.md, "Semantics"'s presets, and a small odd shape (nothing a power of two). The
#: flushes: what the planner's fastest plan holds (paper-7b on the 24 GB card: 23 micro-batches;
#: scale-7b on an H100: the whole step's 8).
SHAPES = {
    "paper-7b": Shape("paper-7b", d=4096, N=8464, E=368, P=8, K=64, T=256, smt_block=256, smt_blocks=16, flush=23),
    "scale-7b": Shape("scale-7b", d=4096, N=65536, E=1024, P=8, K=64, T=4096, smt_block=256, smt_blocks=16,
                      flush=8),
    "odd": Shape("odd", d=97, N=23 * 7, E=7, P=3, K=5, T=23, smt_block=16, smt_blocks=3, flush=3),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: stage labels, per workload, in launch order of each Triton kernel (the nth launch of a
#: kernel within a workload gets the nth label). A launch not listed here is reported under
#: "<workload>:<kernel>#<n>" without a floor.
STAGE_LABELS = {
    "router_topk": {"_router_topk_kernel": ["router_topk"], "_router_merge_kernel": ["router_merge"]},
    "forward": {"_key_scores_kernel": ["key_scores"], "_select_topk_kernel": ["select_topk"],
                "_row_gather_sum_kernel": ["values"], "_row_gather_dot_kernel": ["values"]},
    "backward": {"_pick_table_kernel": ["pick_scatter", "pick_gather"],
                 "_score_grads_kernel": ["score_grads"], "_row_gather_sum_kernel": ["dx"],
                 "_row_gather_dot_kernel": ["dx"],
                 "_expert_grads_kernel": ["dK_dV_dG"], "_zero_padding_kernel": ["zero_padding"],
                 "_softmax_gate_grad_kernel": ["softmax_gate_grad"]},
    # gradient_form "factors": the backward without its dK/dV GEMMs (dG alone), then a flush, the
    # rows of the held tokens in one launch (kernels/factored_grads.py); labels of their own, so
    # the per-stage tables keep the backward's, and outside the adapter step's total
    "factored_backward": {"_pick_table_kernel": ["factored_pick_scatter", "factored_pick_gather"],
                          "_score_grads_kernel": ["factored_score_grads"], "_row_gather_sum_kernel": ["factored_dx"],
                          "_row_gather_dot_kernel": ["factored_dx"], "_expert_grads_kernel": ["factored_dG"]},
    "factored_rows": {"_pick_table_kernel": ["flush_pick_scatter", "flush_pick_scatter"],
                      "_expert_grads_kernel": ["flush_dK_dV"], "_zero_padding_kernel": ["flush_zero_padding"]},
    "smt": {"_smt_block_grad_kernel": ["smt_block_grad"]},
    "zero_copy": {"_zero_copy_gather_kernel": ["zero_copy_gather"]},
}


KERNEL_MODULES = ("expert_grads", "factored_grads", "router_topk", "row_gather_sum", "score_grads", "smt_block_grad",
                  "sparse_kv_backward", "sparse_kv_forward", "validation", "zero_copy_gather")


def kernel_modules():
    # by import_module: the package re-exports functions under some module names (router_topk)
    return [importlib.import_module(f"meft_triton.kernels.{name}") for name in KERNEL_MODULES]


def _routing(T: int, shape: Shape, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, P] and neuron ids [T, K] (int32) of uniformly routed tokens."""
    E, P, K, S = shape.E, shape.P, shape.K, shape.S
    expert_ids = torch.rand(T, E, generator=g).topk(P, dim=1).indices.to(torch.int32)
    cand = torch.rand(T, P * S, generator=g).topk(min(K, P * S), dim=1).indices
    return expert_ids, (expert_ids.gather(1, cand // S).long() * S + cand % S).to(torch.int32)


def make_inputs(shape: Shape, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    T, d, N, E, P, K, S = shape.T, shape.d, shape.N, shape.E, shape.P, shape.K, shape.S
    expert_ids, neuron_ids = _routing(T, shape, g)
    held = T * shape.flush
    flush_experts, flush_neurons = _routing(held, shape, g)
    inputs = dict(
        flush=dict(hidden=torch.empty(held, d, dtype=dtype), grad_y=torch.empty(held, d, dtype=dtype),
                   expert_ids=flush_experts, neuron_ids=flush_neurons,
                   pick_grads=torch.empty(held, flush_neurons.shape[1]),
                   activations=torch.empty(held, flush_neurons.shape[1])),
        hidden=torch.empty(T, d, dtype=dtype), grad_y=torch.empty(T, d, dtype=dtype),
        router=torch.empty(E, d, dtype=dtype), keys=torch.empty(N, d, dtype=dtype),
        values=torch.empty(N, d, dtype=dtype), expert_ids=expert_ids,
        gate_weights=torch.rand(T, P, generator=g), neuron_ids=neuron_ids,
        activations=torch.rand(T, neuron_ids.shape[1], generator=g),
    )
    # SMT: n blocks spread over one [d, d] weight (row-major order of a coarse grid)
    b = shape.smt_block
    nr = -(-d // b)
    picks = torch.arange(shape.smt_blocks) * max(1, (nr * nr) // shape.smt_blocks)
    r0, c0 = (picks // nr) * b, (picks % nr) * b
    inputs["smt"] = (r0, torch.clamp(r0 + b, max=d), c0, torch.clamp(c0 + b, max=d))
    inputs["unique_rows"] = torch.unique(neuron_ids.long())
    return inputs


def context(shape: Shape, inputs: dict, dtype: torch.dtype, workload: str | None = None) -> dict:
    """What the floors need besides the shape: distinct rows and experts this routing uses
    (``workload`` "factored_rows": those of the flush's held tokens, T of them)."""
    if workload == "factored_rows":
        flush = inputs["flush"]
        return dict(shape.as_dict(), T=shape.T * shape.flush, es=torch.finfo(dtype).bits // 8,
                    U=int(torch.unique(flush["neuron_ids"].long()).numel()),
                    Ue=int(torch.unique(flush["expert_ids"]).numel()))
    r0, r1, c0, c1 = inputs["smt"]
    return dict(shape.as_dict(), es=torch.finfo(dtype).bits // 8,
                U=int(inputs["unique_rows"].numel()),
                Ue=int(torch.unique(inputs["expert_ids"]).numel()),
                smt_rows=int(torch.unique(torch.cat([torch.arange(a, b) for a, b in zip(r0.tolist(), r1.tolist())])).numel()),
                smt_cols=int(torch.unique(torch.cat([torch.arange(a, b) for a, b in zip(c0.tolist(), c1.tolist())])).numel()),
                smt_area=int(((r1 - r0) * (c1 - c0)).sum()))


def run_workloads(shape: Shape, inputs: dict, names=None):
    """Call each launcher once; yields the workload name before each call."""
    from meft_triton.kernels import (key_value_rows, router_topk, sparse_kv_backward, sparse_kv_select,
                                     sparse_kv_values)
    from meft_triton.kernels.smt_block_grad import smt_block_grad
    from meft_triton.kernels.zero_copy_gather import zero_copy_gather_rows

    x = inputs
    calls = {
        "router_topk": lambda: router_topk(x["hidden"], x["router"], shape.P),
        "forward": lambda: (
            sparse_kv_select(x["hidden"], x["keys"], x["expert_ids"], x["gate_weights"], shape.E,
                             shape.K, check_ids=False),
            sparse_kv_values(x["activations"], x["neuron_ids"], x["values"], check_ids=False)),
        "backward": lambda: sparse_kv_backward(
            x["grad_y"], x["hidden"], x["router"], x["keys"], x["values"], x["expert_ids"],
            x["gate_weights"], x["neuron_ids"], x["activations"], gate="logit", dense=False,
            check_ids=False),
        "factored_backward": lambda: sparse_kv_backward(
            x["grad_y"], x["hidden"], x["router"], x["keys"], x["values"], x["expert_ids"],
            x["gate_weights"], x["neuron_ids"], x["activations"], gate="logit", dense=False,
            check_ids=False, factored=True),
        "factored_rows": lambda: key_value_rows(
            *(x["flush"][k] for k in ("hidden", "grad_y", "expert_ids", "neuron_ids", "pick_grads", "activations")),
            shape.N, shape.E, out_dtype=x["hidden"].dtype, check_ids=False),
        "smt": lambda: smt_block_grad(x["grad_y"], x["hidden"], *x["smt"], shape.smt_block,
                                      check_blocks=False),
        "zero_copy": lambda: zero_copy_gather_rows(
            x["values"], x["unique_rows"], torch.empty(x["unique_rows"].numel(), shape.d,
                                                       dtype=x["values"].dtype)),
    }
    for name, call in calls.items():
        if names is None or name in names:
            yield name, call
