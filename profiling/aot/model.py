"""Floors, loop nests and the time model of the static report (see the package docstring).

Per stage, one small function each for the bytes it must move and the FLOPs it must do
(``floor_*``), and one for its source loop nest with trip counts (``loops_*``) taken from the
launch the launcher made (its arguments and grid).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .sass import SourceLoop

CEILINGS_FILE = Path(__file__).resolve().parent.parent / "gpu_ceilings.json"


def load_ceilings(path: Path = CEILINGS_FILE) -> dict:
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def cdiv(a, b) -> int:
    return -(-int(a) // int(b))


# ----------------------------------------------------------------------------- floors
# Each returns (bytes, flops, host_bytes): bytes through HBM, FLOPs (2 per multiply-add),
# bytes read from pinned host memory over PCIe (zero-copy only). es = element size of the
# compute dtype; ids are int32 (4 B) unless said; fp32 tables (gate weights, activations,
# score gradients) 4 B. "U" = distinct neuron rows the routing touches, "Ue" = distinct experts.

def floor_router_topk(c):
    # reads h [T, d] and G [E, d]; writes gate logits + expert ids [T, P] (fp32 + int32)
    return (c["T"] * c["d"] + c["E"] * c["d"]) * c["es"] + c["T"] * c["P"] * 8, \
        2 * c["T"] * c["E"] * c["d"], 0


def floor_router_merge(c):
    # reads at least one split's top-P values + ids [T, P] (fp32 + int32), writes the result
    return c["T"] * c["P"] * 16 + c["T"] * 4, 0, 0


def floor_key_scores(c):
    # reads h [T, d] once, the used experts' keys [Ue*S, d], gate weights [T, P] fp32 and the
    # pair order [T*P] int64; writes candidate scores [T, P*S] fp32
    return ((c["T"] * c["d"] + c["Ue"] * c["S"] * c["d"]) * c["es"] + c["T"] * c["P"] * (4 + 8)
            + c["T"] * c["P"] * c["S"] * 4), 2 * c["T"] * c["P"] * c["S"] * c["d"], 0


def floor_select_topk(c):
    # reads scores [T, P*S] fp32 and expert ids [T, P]; writes neuron ids + activations [T, K]
    return c["T"] * c["P"] * c["S"] * 4 + c["T"] * c["P"] * 4 + c["T"] * c["K"] * 8, 0, 0


def floor_values(c):
    # reads the U selected value rows [U, d] once, activations + ids [T, K]; writes y [T, d]
    return (c["U"] + c["T"]) * c["d"] * c["es"] + c["T"] * c["K"] * 8, 2 * c["T"] * c["K"] * c["d"], 0


def floor_score_grads(c):
    # reads dy, x [T, d], the U selected key and value rows, ids/value ids/activations [T, K],
    # expert ids + gate weights [T, P]; writes dr [T, K] and dw [T, P] fp32.
    # FLOPs: V_j . dy_t and K_j . x_t for every pick
    return ((2 * c["T"] + 2 * c["U"]) * c["d"] * c["es"] + c["T"] * c["K"] * 16
            + c["T"] * c["P"] * 12), 4 * c["T"] * c["K"] * c["d"], 0


def floor_pick_scatter(c):
    # reads neuron ids + activations [T, K] and expert ids [T, P]; writes one fp32 per pick
    return c["T"] * c["K"] * 12 + c["T"] * c["P"] * 4, 0, 0


def floor_pick_gather(c):
    # reads neuron ids [T, K], expert ids [T, P] and one dr per pick; writes dr [T, K] fp32
    return c["T"] * c["K"] * (8 + c["es"]) + c["T"] * c["P"] * 4, 0, 0


def floor_dx(c):
    # reads the U selected key rows and the Ue used router rows, dr + ids [T, K], dw + expert
    # ids [T, P]; writes dx [T, d]. FLOPs: sum_j dr_j K_j + sum_p dw_p G_p
    return ((c["U"] + c["Ue"] + c["T"]) * c["d"] * c["es"] + c["T"] * (c["K"] + c["P"]) * 8), \
        2 * c["T"] * (c["K"] + c["P"]) * c["d"], 0


def floor_dk_dv(c):
    # reads x and dy [T, d], dr + activations [T, K] fp32, the occurrence order [T*K] int64,
    # offsets [U+1] int64; writes dK and dV rows [U, d] fp32
    return (2 * c["T"] * c["d"] * c["es"] + c["T"] * c["K"] * 16 + (c["U"] + 1) * 8
            + 2 * c["U"] * c["d"] * 4), 4 * c["T"] * c["K"] * c["d"], 0


def floor_dg(c):
    # reads x [T, d], dw [T, P] fp32, the order [T*P] int64, offsets [E+1]; writes dG [E, d] fp32
    return (c["T"] * c["d"] * c["es"] + c["T"] * c["P"] * 12 + (c["E"] + 1) * 8
            + c["E"] * c["d"] * 4), 2 * c["T"] * c["P"] * c["d"], 0


def floor_dk_dv_dg(c):
    # the per-expert GEMMs of dK, dV and the "logit" gate's dG in one launch
    return tuple(a + b for a, b in zip(floor_dk_dv(c), floor_dg(c)))


def floor_flush_dk_dv(c):
    # key_value_rows' GEMMs over a flush's T held tokens: reads x and dy [T, d] and the two
    # coefficient tables [T*P, S] in the compute dtype, the pair order [T*P] int64, offsets
    # [E+1] and the row map [N] int32; writes dK and dV rows [U, d] in the compute dtype.
    # FLOPs: the picks' rank-1 terms (the tables' zeros are the kernel's extra work)
    return (2 * c["T"] * c["d"] * c["es"] + 2 * c["T"] * c["P"] * c["S"] * c["es"] + c["T"] * c["P"] * 8
            + (c["E"] + 1) * 8 + c["N"] * 4 + 2 * c["U"] * c["d"] * c["es"]), 4 * c["T"] * c["K"] * c["d"], 0


def floor_zero_padding(c):
    # reads the distinct count; writes zero key and value rows [R - U, d] fp32 past the U
    # distinct ones, R = min(N, T*K) (the row-sparse form's host-known length)
    padding = min(c["N"], c["T"] * c["K"]) - c["U"]
    return 4 + 2 * padding * c["d"] * 4, 0, 0


def floor_softmax_gate_grad(c):
    # reads x [T, d], G [E, d], dense dw [T, E] fp32, lse + weighted dw [T]; writes dg [T, E]
    return ((c["T"] + c["E"]) * c["d"] * c["es"] + c["T"] * c["E"] * (4 + c["es"]) + c["T"] * 8), \
        2 * c["T"] * c["E"] * c["d"], 0


def floor_smt_block_grad(c):
    # reads the columns of dY and of X the blocks cover ([T, rows touched], [T, cols touched]);
    # writes n packed [b, b] blocks. FLOPs: 2 T h w per block
    return (c["T"] * (c["smt_rows"] + c["smt_cols"]) * c["es"]
            + c["smt_blocks"] * c["smt_block"] ** 2 * c["es"]), 2 * c["T"] * c["smt_area"], 0


def floor_zero_copy_gather(c):
    # reads U rows [U, d] from pinned host memory (PCIe) and ids [U] int64; writes [U, d] to HBM
    return c["U"] * c["d"] * c["es"] + c["U"] * 8, 0, c["U"] * c["d"] * c["es"]


# ----------------------------------------------------------------------------- loop nests
# Average trips per enclosing iteration, from the launch's arguments ``a`` and grid ``g``.

def L(name, trips, *children):
    return SourceLoop(name, float(trips), list(children))


def loops_router_topk(a, g):
    # for e0 (this program's split of the experts, BLOCK_E) { for d0 (width, BLOCK_D) {dot} ;
    # online lse ; K merge rounds unrolled }
    experts = min(a["experts_per_split"], a["num_experts"])
    return [L("e", cdiv(experts, a["BLOCK_E"]), L("d", cdiv(a["hidden_size"], a["BLOCK_D"])))]


def loops_router_merge(a, g):
    return []  # straight-line: K unrolled rounds over the splits' candidates


def loops_key_scores(a, g):
    # one d loop in the programs whose pair block is not empty (the rest return at once)
    start, end = a["block_start_ptr"], a["block_end_ptr"]
    live = float((end > start).float().mean()) if start.numel() else 0.0
    return [L("d", live * cdiv(a["hidden_size"], a["BLOCK_D"]))]


def loops_select_topk(a, g):
    c = cdiv(a["num_candidates"], a["BLOCK_C"])
    # the worst case of 32 counting passes: a row stops once exactly K_top keys are above its
    # threshold, which depends on the scores (about 15 passes for distinct random scores at
    # C = 512, K_top = 64; the report's scores are not data)
    if a["RESIDENT"]:
        # over the keys held in registers, then one compaction chunk
        return [L("bits", 32), L("compact", c)]
    # each of the 32 passes streams the candidates, a counting pass, a compaction pass
    return [L("bits", 32, L("cand", c)), L("above", c), L("compact", c)]


def loops_row_gather_sum(a, g):
    loops = [L("picks", cdiv(a["num_picks"], a["BLOCK_K"]))]
    if a["HAS_SECOND"]:
        loops.append(L("picks2", cdiv(a["num_picks2"], a["BLOCK_K"])))
    return loops


def loops_score_grads(a, g):
    # per-expert GEMM over pair blocks (like the key scores): S tiles, each a key-width and a
    # value-width loop, in the programs whose block is not empty
    start, end = a["block_start_ptr"], a["block_end_ptr"]
    live = float((end > start).float().mean()) if start.numel() else 0.0
    return [L("s", live * cdiv(a["neurons_per_expert"], a["BLOCK_S"]),
              L("dk", cdiv(a["key_width"], a["BLOCK_D"])), L("dv", cdiv(a["value_width"], a["BLOCK_D"])))]


def loops_pick_table(a, g):
    return [L("picks", cdiv(a["num_picks"], a["BLOCK_K"]))]


def loops_segment_sum(a, g):
    off = a["offsets_ptr"].long()
    runs = off[1:] - off[:-1]
    avg = float(((runs + a["BLOCK_I"] - 1) // a["BLOCK_I"]).float().mean()) if runs.numel() else 0.0
    return [L("run", avg)]


def loops_expert_grads(a, g):
    # each expert's run of pairs in BLOCK_M steps, averaged over the experts (programs)
    off = a["offsets_ptr"].long()
    runs = off[1:] - off[:-1]
    avg = float(((runs + a["BLOCK_M"] - 1) // a["BLOCK_M"]).float().mean()) if runs.numel() else 0.0
    return [L("pairs", avg)]


def loops_zero_padding(a, g):
    # the programs stride over the padding rows past the device-side count
    padding = max(0, a["num_rows"] - int(a["count_ptr"].item()))
    return [L("rows", padding / (a["BLOCK_R"] * g[0]), L("dk", cdiv(a["key_width"], a["BLOCK_D"])),
              L("dv", cdiv(a["value_width"], a["BLOCK_D"])))]


def loops_softmax_gate_grad(a, g):
    return [L("d", cdiv(a["width"], a["BLOCK_D"]))]


def loops_smt_block_grad(a, g):
    return [L("t", cdiv(a["num_tokens"], a["BLOCK_T"]))]


def loops_zero_copy_gather(a, g):
    return [L("w", cdiv(a["width"], a["BLOCK_W"]))]


@dataclass(frozen=True)
class StageModel:
    floor: Callable
    loops: Callable
    gemm_like: bool   # a GEMM-shaped stage: --check wants tensor-core instructions in 16-bit


STAGES = {
    "router_topk": StageModel(floor_router_topk, loops_router_topk, True),
    "router_merge": StageModel(floor_router_merge, loops_router_merge, False),
    "key_scores": StageModel(floor_key_scores, loops_key_scores, True),
    "select_topk": StageModel(floor_select_topk, loops_select_topk, False),
    "values": StageModel(floor_values, loops_row_gather_sum, True),
    "score_grads": StageModel(floor_score_grads, loops_score_grads, True),
    "pick_scatter": StageModel(floor_pick_scatter, loops_pick_table, False),
    "pick_gather": StageModel(floor_pick_gather, loops_pick_table, False),
    "dx": StageModel(floor_dx, loops_row_gather_sum, True),
    "dK_dV": StageModel(floor_dk_dv, loops_segment_sum, True),
    "dG": StageModel(floor_dg, loops_segment_sum, True),
    "dK_dV_dG": StageModel(floor_dk_dv_dg, loops_expert_grads, True),
    "flush_dK_dV": StageModel(floor_flush_dk_dv, loops_expert_grads, True),
    "factored_dG": StageModel(floor_dg, loops_expert_grads, True),  # expert_grads' dG-alone launch
    "zero_padding": StageModel(floor_zero_padding, loops_zero_padding, False),
    "softmax_gate_grad": StageModel(floor_softmax_gate_grad, loops_softmax_gate_grad, True),
    "smt_block_grad": StageModel(floor_smt_block_grad, loops_smt_block_grad, True),
    "zero_copy_gather": StageModel(floor_zero_copy_gather, loops_zero_copy_gather, False),
}
# gradient_form "factors" (workloads.py): the backward's own stages under their own labels
STAGES.update({f"factored_{name}": STAGES[name] for name in ("pick_scatter", "pick_gather", "score_grads", "dx")})
STAGES.update({f"flush_{name}": STAGES[name] for name in ("pick_scatter", "zero_padding")})


# ----------------------------------------------------------------------------- time model

#: tensor-core products per multiply of an fp32 kernel asking for input_precision "tf32x3"
TF32X3_PRODUCTS = 3


def flop_rate(ceil: dict, dtype: str, tensor_kind: str | None) -> float:
    """FLOP/s for this dtype: the tensor-core rate (times mma_sync_fraction for mma.sync)
    when ``tensor_kind`` is "wgmma"/"mma.sync", fp32 CUDA cores when "none"; ``None`` gives
    the floor's rate (the best the dtype allows at its tolerance: tensor cores for bf16/fp16,
    for fp32 the faster of the CUDA cores and three tf32 products per multiply, "tf32x3").
    The caller counts a tf32x3 kernel's FLOPs three times (:data:`TF32X3_PRODUCTS`)."""
    rates = ceil["flops_per_s"]
    if tensor_kind is None:
        if dtype in ("bf16", "fp16"):
            return rates[f"{dtype}_tensor"]
        return max(rates["fp32"], rates["tf32_tensor"] / TF32X3_PRODUCTS)
    if tensor_kind == "none":
        return rates["fp32"]
    rate = rates[f"{dtype}_tensor"] if dtype in ("bf16", "fp16") else rates["tf32_tensor"]
    return rate * (ceil["mma_sync_fraction"] if tensor_kind == "mma.sync" else 1.0)


def floor_us(ceil: dict, dtype: str, nbytes: float, flops: float, host_bytes: float = 0.0) -> float:
    """max(HBM bytes / bandwidth, host bytes / PCIe bandwidth, FLOPs / rate) in microseconds."""
    return 1e6 * max(nbytes / ceil["hbm_bytes_per_s"], host_bytes / ceil["pcie_bytes_per_s"],
                     flops / flop_rate(ceil, dtype, None))


def issue_us(ceil: dict, instructions_per_warp: float, programs: int, num_warps: int) -> float:
    """Instruction issue time: warp instructions over all SMs' issue slots."""
    per_us = ceil["sms"] * ceil["issue_per_sm_per_clk"] * ceil["clock_mhz"]
    return instructions_per_warp * programs * num_warps / per_us


def predicted_us(ceil, dtype, nbytes, flops, host_bytes, instructions_per_warp, programs,
                 num_warps, tensor_kind) -> dict:
    bytes_us = 1e6 * max(nbytes / ceil["hbm_bytes_per_s"], host_bytes / ceil["pcie_bytes_per_s"])
    compute_us = 1e6 * flops / flop_rate(ceil, dtype, tensor_kind) if flops else 0.0
    issue = issue_us(ceil, instructions_per_warp, programs, num_warps)
    terms = {"bytes_us": bytes_us, "compute_us": compute_us, "issue_us": issue}
    bound = max(terms, key=terms.get)
    return dict(terms, predicted_us=terms[bound], bound_by=bound.removesuffix("_us"))


def limit_shared(ceil: dict) -> int:
    return int(ceil["smem_per_block_bytes"])


def is_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
