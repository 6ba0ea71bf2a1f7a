"""``MEFTConfig(residency="resident", value_budget="auto", gradient_budget="auto")``: the
resident policy's device budgets, sized from the device memory left, by the planner's byte
formulas (traffic.py: each row the step touches once each way; at most every row).

The runtime calls :func:`resident_budgets` at a model's first forward, when it knows the
layers, the shapes and the compute dtype, but not the routing profile or the micro-batches
per step: it plans for the worst case, every row touched, and shrinks from there.
"""

from __future__ import annotations

from .routing import LayerRouting
from .traffic import FP32, layer_traffic

#: share of the device memory free at the first forward the budgets may take (the rest is for
#: activations, the optimizer states on the device and the allocator's slack)
FREE_SHARE = 0.5


def resident_budgets(*, layers: int, num_neurons: int, hidden: int, key_width: int, es: int,
                     free_bytes: float | None) -> tuple[int, int]:
    """``(value_budget, gradient_budget)`` in device bytes for all ``layers`` together.

    Full need: every row resident in the compute dtype (``es`` bytes), every row's fp32 key and
    value gradient summed. With ``free_bytes`` None (the memory left is unknown) the full
    need; else ``FREE_SHARE`` of it (on CPU compute: of the host's available RAM), values first (their table saves the most bytes
    per byte of budget: each resident row spares a copy per micro-batch, forward and
    backward), then the gradient sums. A layer whose share holds less than one call's rows
    runs that part per micro-batch (meft_triton/offload/resident.py). Under
    ``gradient_form="factors"`` the same gradient bytes hold factors instead of sums (the
    micro-batches per step are unknown here; the planner sizes them exactly)."""
    for name, value in (("layers", layers), ("num_neurons", num_neurons), ("hidden", hidden),
                        ("key_width", key_width), ("es", es)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if free_bytes is not None and not free_bytes >= 0:
        raise ValueError(f"free_bytes must be None or a number >= 0, got {free_bytes!r}")
    traffic = layer_traffic(LayerRouting((num_neurons,), num_neurons, (num_neurons,)), policy="resident",
                            hidden=hidden, key_width=key_width, es=es, backward_rows="refetch",
                            transfer="cpu_gather", id_bound=num_neurons)
    need_v = layers * int(traffic.h2d_mb[0])  # every row in once, in the compute dtype
    need_g = layers * num_neurons * (key_width + hidden) * FP32
    if free_bytes is None:
        return need_v, need_g
    avail = int(FREE_SHARE * free_bytes)
    value = min(need_v, avail)
    return value, min(need_g, avail - value)
