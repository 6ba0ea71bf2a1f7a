"""Launch parameters as data: per-device JSON tables under ``configs/`` (like vLLM's fused_moe
configs), falling back to a heuristic default per kernel.

A table is ``configs/<device>.json``, ``<device>`` the CUDA device name with every run of
characters other than letters and digits turned into "_" (``NVIDIA_H200``). It maps a kernel
name to entries by dtype ("bf16", "fp16", "fp32") or "default"; an entry overrides any of the
heuristic's keys. The GPU check writes these tables when a GPU is lent; without one (CPU, the
interpreter, the static report's stand-in driver) the heuristic decides.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
import triton

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _pow2(size, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(size), 1))))


def _expert_grads_default(dtype, pairs_per_expert, neurons_per_expert, width):
    # [BLOCK_S, BLOCK_D] fp32 accumulators for dK and dV: 64 x 64 each at 4 warps keeps 64
    # registers per thread for them (no spills); fp32 operands take twice the shared memory.
    block_s = _pow2(neurons_per_expert, 16, 64)
    return dict(BLOCK_M=_pow2(pairs_per_expert, 16, 32 if dtype == torch.float32 else 64),
                BLOCK_S=block_s, BLOCK_D=_pow2(width, 16, 64 if block_s == 64 else 128),
                num_warps=4, num_stages=2)


#: pairs per expert from which expert_grads takes its "expert_grads_long" entry (a flush of
#: many micro-batches' factors, key_value_rows; one micro-batch at the presets has 6 or 32)
LONG_RUN_PAIRS = 128


def _expert_grads_long_default(dtype, pairs_per_expert, neurons_per_expert, width):
    # long runs of pairs: wider width tiles over 8 warps halve the programs, whose per-program
    # overhead made the issue term 2.3x the floor at paper-7b's flush (static report: 134 ->
    # 83 µs; scale-7b's flush at its bytes floor; no spills). fp32 keeps the short-run tiles
    # (twice the shared memory per operand).
    if dtype == torch.float32:
        return _expert_grads_default(dtype, pairs_per_expert, neurons_per_expert, width)
    return dict(BLOCK_M=32, BLOCK_S=_pow2(neurons_per_expert, 16, 64), BLOCK_D=_pow2(width, 16, 256),
                num_warps=8, num_stages=2)


def _score_grads_default(dtype, pairs_per_expert, neurons_per_expert, width):
    # two [BLOCK_M, BLOCK_S] fp32 accumulators (x K^T and dy V^T); blocks of pairs sized to
    # an expert's run, like the key scores; the kernel loops over S tiles itself
    return dict(BLOCK_M=_pow2(pairs_per_expert, 16, 64), BLOCK_S=_pow2(neurons_per_expert, 16, 64),
                BLOCK_D=64 if dtype == torch.float32 else _pow2(width, 16, 64), num_warps=4, num_stages=3)


def _row_gather_dot_default(dtype, width):
    # 16 tokens (the smallest tensor-core M) x 16 picks per step; 128-wide slices halve the
    # per-slice cost of the ids and the coefficient block, and two stages of the [256, 128]
    # row tile (75 KB) leave room for two or three blocks per SM on sm_80 and sm_90
    return dict(BLOCK_T=16, BLOCK_K=16, BLOCK_D=_pow2(width, 16, 128), num_warps=4, num_stages=2)


def _router_topk_default(dtype, num_tokens, num_experts, width, k_pad):
    # 64 tokens per block: a wgmma tile for 16-bit inputs on sm_90; the launcher then splits
    # the experts until min_programs blocks fill the chip (2 waves of 132 SMs)
    return dict(BLOCK_T=16 if num_tokens <= 16 else 32 if num_tokens <= 32 else 64,
                BLOCK_E=_pow2(num_experts, max(16, k_pad), 64), BLOCK_D=_pow2(width, 16, 64),
                num_warps=4, num_stages=3, min_programs=264)


def _expert_grads_dg_default(dtype, pairs_per_expert, neurons_per_expert, width):
    # dG alone (the factored backward): one 16-row product per block of pairs and no dK/dV
    # accumulators, so 256-wide tiles halve the programs whose overhead bounds it (static
    # report, bf16 sm_90a: 10.2 -> 7.6 µs at paper-7b, 65 -> 36 µs at scale-7b; no spills)
    return dict(_expert_grads_default(dtype, pairs_per_expert, neurons_per_expert, width),
                BLOCK_D=_pow2(width, 16, 128 if dtype == torch.float32 else 256))


HEURISTICS = {"router_topk": _router_topk_default, "expert_grads": _expert_grads_default,
              "expert_grads_long": _expert_grads_long_default, "expert_grads_dg": _expert_grads_dg_default,
              "score_grads": _score_grads_default,
              "row_gather_dot": _row_gather_dot_default}


def device_key(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


@functools.lru_cache(maxsize=None)
def _table(key: str | None) -> dict:
    path = CONFIG_DIR / f"{key}.json"
    if key is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def launch_config(kernel: str, device: torch.device, dtype: torch.dtype, **shape) -> dict:
    """Block sizes, warps and stages for ``kernel`` at this shape: the heuristic default, then
    the device table's entry for the dtype (or its "default") on top."""
    config = HEURISTICS[kernel](dtype, **shape)
    entries = _table(device_key(device)).get(kernel, {})
    config.update(entries.get(DTYPE_NAMES[dtype], entries.get("default", {})))
    return config
