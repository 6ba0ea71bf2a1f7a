"""``MEFTConfig(residency="resident", value_budget="auto", gradient_budget="auto")``: the
resident policy's device budgets, sized from the device memory left, by the planner's byte
formulas (traffic.py: each row the step touches once each way; at most every row).

The runtime calls :func:`resident_budgets` at a model's first forward, when it knows the
layers, the shapes and the compute dtype, but not the routing profile or the micro-batches
per step: it plans for the worst case, every row touched, and shrinks from there.
"""

from __future__ import annotations

from .traffic import FP32

#: share of the device memory free at the first forward the budgets may take (the rest is for
#: activations, the optimizer states on the device and the allocator's slack)
FREE_SHARE = 0.5


def resident_budgets(*, layers: int, num_neurons: int, hidden: int, key_width: int, id_bound: int, es: int,
                     free_bytes: float | None) -> tuple[int, int]:
    """``(value_budget, gradient_budget)`` in device bytes for all ``layers`` together.

    Full need: every row resident in the compute dtype (``es`` bytes), every row's fp32 key and
    value gradient summed. Floor: one call's ``id_bound`` rows per layer (the runtime's minimum).
    With ``free_bytes`` None (no device memory to share: CPU compute) the full need; else
    the full need if it fits in ``FREE_SHARE`` of it, otherwise what fits above the floors,
    shared in proportion to the full needs (never below the floors: the runtime then names
    the budget that does not fit)."""
    for name, value in (("layers", layers), ("num_neurons", num_neurons), ("hidden", hidden),
                        ("key_width", key_width), ("id_bound", id_bound), ("es", es)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    value_row, grad_row = hidden * es, (key_width + hidden) * FP32
    need_v, need_g = layers * num_neurons * value_row, layers * num_neurons * grad_row
    floor_v, floor_g = layers * id_bound * value_row, layers * id_bound * grad_row
    if free_bytes is None or need_v + need_g <= FREE_SHARE * free_bytes:
        return need_v, need_g
    above = max(0.0, FREE_SHARE * free_bytes - floor_v - floor_g)
    extra_v, extra_g = need_v - floor_v, need_g - floor_g
    share = above / (extra_v + extra_g) if extra_v + extra_g else 0.0
    return floor_v + int(share * extra_v), floor_g + int(share * extra_g)
