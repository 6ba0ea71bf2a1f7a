"""The routing profile: how many distinct rows each layer touches per micro-batch and per step.

Bytes and residency depend on it (DESIGN.md, "Performance model"). Either measured (a JSON
file, e.g. what the sweep records from real hidden states, or what a test reads off the
prefetcher's tickets) or the uniform formula: T tokens picking K_top of N rows uniformly touch
U = N (1 - exp(-T K_top / N)) rows per micro-batch and N (1 - exp(-M T K_top / N)) over the
M micro-batches of a step.

JSON layout (one entry per adapted layer, in forward order)::

    {"num_neurons": 8464,                       # optional: checked against the MEFT config
     "layers": [{"per_micro_batch": [7280, 7301, ...],   # one count per micro-batch (or one int for all)
                 "per_step": 8460,                        # distinct rows over the whole step
                 "cumulative": [7280, 8290, ...]},        # optional: distinct rows after each micro-batch
                ...]}

Without ``cumulative`` the rows a micro-batch touches for the first time in the step are
estimated by drawing each micro-batch's rows uniformly from a live set sized so that the step
touches ``per_step`` rows (only the resident policy's timing uses it; no byte count does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LayerRouting:
    per_micro_batch: tuple[int, ...]
    per_step: int
    cumulative: tuple[int, ...]

    @property
    def first_touch(self) -> tuple[int, ...]:
        """Rows each micro-batch touches that no earlier micro-batch of the step did."""
        prev = (0,) + self.cumulative[:-1]
        return tuple(c - p for c, p in zip(self.cumulative, prev))


@dataclass(frozen=True)
class RoutingProfile:
    layers: tuple[LayerRouting, ...]
    source: str

    def micro_batches(self) -> int:
        return len(self.layers[0].per_micro_batch)


def _live_set_union(per_mb: list[int], per_step: int) -> list[int]:
    """Distinct rows after each micro-batch if each draws its rows uniformly from S live rows,
    S chosen (bisection) so that the step touches ``per_step``."""
    def union(s: float) -> list[float]:
        miss, out = 1.0, []
        for u in per_mb:
            miss *= 1.0 - min(u, s) / s
            out.append(s * (1.0 - miss))
        return out

    lo, hi = float(max(per_mb)), float(max(per_step, max(per_mb))) * 1e6
    if per_step <= max(per_mb):
        hi = lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if union(mid)[-1] > per_step:
            hi = mid
        else:
            lo = mid
    steps = [max(u, min(per_step, round(x))) for u, x in zip(per_mb, union(lo))]
    steps[-1] = per_step
    for i in range(1, len(steps)):  # a union never shrinks
        steps[i] = max(steps[i], steps[i - 1])
    return steps


def _layer(entry: dict, where: str, num_neurons: int, micro_batches: int) -> LayerRouting:
    if not isinstance(entry, dict) or "per_micro_batch" not in entry or "per_step" not in entry:
        raise ValueError(f"{where} must be an object with 'per_micro_batch' and 'per_step'")
    per_mb = entry["per_micro_batch"]
    if isinstance(per_mb, int) and not isinstance(per_mb, bool):
        per_mb = [per_mb] * micro_batches
    if not isinstance(per_mb, list) or len(per_mb) != micro_batches:
        raise ValueError(f"{where}.per_micro_batch must be an int or a list of {micro_batches} ints "
                         f"(one per micro-batch), got {per_mb!r}")
    step = entry["per_step"]
    for name, v in [(f"{where}.per_micro_batch[{i}]", u) for i, u in enumerate(per_mb)] + [(f"{where}.per_step", step)]:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if not 0 <= v <= num_neurons:
            raise ValueError(f"{name} must be in [0, num_neurons={num_neurons}], got {v}")
    if step < max(per_mb) or step > sum(per_mb):
        raise ValueError(f"{where}.per_step must be in [max(per_micro_batch)={max(per_mb)}, "
                         f"sum(per_micro_batch)={sum(per_mb)}], got {step}")
    cumulative = entry.get("cumulative")
    if cumulative is None:
        cumulative = _live_set_union(per_mb, step) if step else [0] * micro_batches
    elif (not isinstance(cumulative, list) or len(cumulative) != micro_batches or cumulative[-1] != step
          or any(isinstance(c, bool) or not isinstance(c, int) for c in cumulative)
          or any(b < a for a, b in zip(cumulative, cumulative[1:]))
          or any(c < u for c, u in zip(cumulative, per_mb))):
        raise ValueError(f"{where}.cumulative must be {micro_batches} non-decreasing ints, each at least "
                         f"that micro-batch's count, ending at per_step={step}; got {cumulative!r}")
    return LayerRouting(tuple(per_mb), step, tuple(cumulative))


def profile_from_dict(data: dict, *, layers: int, num_neurons: int, micro_batches: int,
                      source: str = "dict") -> RoutingProfile:
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise ValueError(f"routing profile {source}: expected an object with a 'layers' list")
    if data.get("num_neurons", num_neurons) != num_neurons:
        raise ValueError(f"routing profile {source} was recorded at num_neurons={data['num_neurons']}, "
                         f"the plan has num_neurons={num_neurons}")
    if len(data["layers"]) != layers:
        raise ValueError(f"routing profile {source} has {len(data['layers'])} layers, the model has {layers}")
    return RoutingProfile(tuple(_layer(e, f"layers[{i}]", num_neurons, micro_batches)
                                for i, e in enumerate(data["layers"])), source)


def load_profile(path: str | Path, **shape) -> RoutingProfile:
    """A profile from a JSON file; ``shape`` as :func:`profile_from_dict`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"routing: no such file {str(path)!r}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"routing: {path} is not valid JSON: {exc}") from None
    return profile_from_dict(data, source=str(path), **shape)


def uniform_profile(*, layers: int, num_neurons: int, tokens: int, topk: int, micro_batches: int) -> RoutingProfile:
    """Every layer routes uniformly: the rows touched after m micro-batches are
    N (1 - exp(-m T K_top / N))."""
    def touched(m: int) -> int:
        return round(num_neurons * -math.expm1(-m * tokens * topk / num_neurons))

    cumulative = tuple(touched(m) for m in range(1, micro_batches + 1))
    layer = LayerRouting((touched(1),) * micro_batches, cumulative[-1], cumulative)
    return RoutingProfile((layer,) * layers, "uniform")
