"""PCIe bytes per optimizer step under each residency policy, per layer and per micro-batch.

``per-micro-batch`` is what meft_triton/offload does today, counted exactly as its runtime
counts (``OffloadRuntime.bytes_to_device`` / ``bytes_to_host``):

* forward (offload/rows.py ``start_routing``): the micro-batch's distinct active value rows,
  U x d in the compute dtype;
* backward (``_OffloadedValues.backward``): the same U rows again with
  ``backward_rows="refetch"``, nothing with ``"keep"`` (the prefetcher kept the forward's
  rows); then the gradient rows to the host in fp32, key and value side by side, plus their
  int64 ids (8 B each). The backward's row ids have the host-known length B = min(N, T x K_top)
  (meft_triton/layer/backend.py ``unique_ids``: the distinct count stays on the device; the
  ids after the U distinct ones repeat the last) and all B rows cross: B x ((r + d) x 4 + 8) B;
* after the step (offload/key_cache.py ``write_back``): the key rows the update changed (every
  row the step touched, V x r) into the device key cache in the compute dtype.

``resident`` (``MEFTConfig(residency="resident")``, meft_triton/offload/resident.py), counted
exactly as its runtime counts with budgets that hold every row:

* forward: the rows the micro-batch touches first in the step (the rows the previous step
  changed were dropped from the device), at least one: a call that finds every row resident
  still hands the copy engine one row (the padded-ids contract has no empty list);
* backward: nothing (with room for every row nothing is evicted, and the host knows it);
* gradient rows: summed on the device and sent home once per step in the compute dtype, with
  their int64 ids: the host-known bound of the distinct rows, min(N, M x B) for M
  micro-batches of B = min(N, T x K_top) padded ids each (N when ``num_neurons`` is not given
  and B = N; else an estimate, max(B, V));
* the key write-back as today.

``resident`` with ``gradient_form="factors"`` (resident.py ``GradientFactors``): a layer's gradient
budget holds the factors of ``factor_period`` micro-batches (F >= 1); the next backward first
sends the held ones' rows home, min(N, F x B) of them (their host-known bound), and the step
sends the rest's, min(N, (M - F floor((M - 1) / F)) x B): with room for the whole step, that
is the rows form's single send.

With budgets smaller than what the step needs, a share 1 - f of the rows is assumed evicted:
those are fetched again by every call that uses them, forward and backward, and that share
of the gradient rows crosses after every micro-batch. This interpolates linearly between the
exact ends: an estimate.

The floor (DESIGN.md, "Performance model"): each row the step touches crosses once each way in
the compute dtype, 2 V (r + d) bytes x its element size; ids are not part of it.

``transfer="zero_copy"``: the gather kernel reads, over the link, the compute-dtype shadow of
the value rows the row store keeps (``CPURowStore.value_shadow``), so the wire carries what
the counters count; but it reads every one of a call's B padded ids (their distinct count is
device data the kernel does not trim), under either policy: B rows per call instead of U (or
of the resident policy's new rows). Residency "resident" therefore wants ``"cpu_gather"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .routing import LayerRouting

POLICIES = ("per-micro-batch", "resident")
ID_BYTES = 8     # int64 row ids beside gradient rows
FP32 = 4


@dataclass(frozen=True)
class LayerTraffic:
    """One layer's bytes in one optimizer step. ``*_mb``: per micro-batch, during its compute;
    ``boundary_*``: between the step's last backward and the next step's forward."""

    h2d_mb: tuple[float, ...]         # as the runtime counts them
    d2h_mb: tuple[float, ...]
    wire_h2d_mb: tuple[float, ...]    # what crosses the link (differs under zero_copy)
    boundary_h2d: float               # key rows into the device cache
    boundary_d2h: float               # summed gradient rows (resident)
    floor: float

    @property
    def h2d(self) -> float:
        return sum(self.h2d_mb) + self.boundary_h2d

    @property
    def d2h(self) -> float:
        return sum(self.d2h_mb) + self.boundary_d2h

    @property
    def wire(self) -> float:
        return sum(self.wire_h2d_mb) + self.boundary_h2d + self.d2h


def layer_traffic(routing: LayerRouting, *, policy: str, hidden: int, key_width: int, es: int,
                  backward_rows: str, transfer: str, id_bound: int, value_share: float = 1.0,
                  grad_share: float = 1.0, num_neurons: int | None = None,
                  factor_period: int | None = None) -> LayerTraffic:
    """Bytes of one layer. ``id_bound``: min(N, T x K_top), the length of a call's padded ids.
    ``value_share`` / ``grad_share`` (resident only): the share of the step's rows the value
    and gradient budgets hold (1: all). ``num_neurons``: N (resident: bounds the gradient rows
    sent home). ``factor_period`` (resident, gradient_form "factors"): the micro-batches whose
    factors the gradient budget holds (>= 1; ``grad_share`` is then unused)."""
    d, r, v = hidden, key_width, routing.per_step
    refetch = backward_rows == "refetch"
    floor = 2.0 * v * (r + d) * es
    keys_back = float(v * r * es)
    zero_copy = transfer == "zero_copy"
    if policy == "per-micro-batch":
        fetches = [(id_bound if zero_copy else u) * (2 if refetch else 1) for u in routing.per_micro_batch]
        h2d = tuple(float(n * d * es) for n in fetches)
        return LayerTraffic(
            h2d_mb=h2d, d2h_mb=(float(id_bound * ((r + d) * FP32 + ID_BYTES)),) * len(routing.per_micro_batch),
            wire_h2d_mb=h2d, boundary_h2d=keys_back, boundary_d2h=0.0, floor=floor)
    if policy != "resident":
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    for name, share in (("value_share", value_share), ("grad_share", grad_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {share}")
    evicted_v, evicted_g = 1.0 - value_share, 1.0 - grad_share
    h2d = []
    for u, new in zip(routing.per_micro_batch, routing.first_touch):
        forward = id_bound if zero_copy else max(1.0, new + evicted_v * (u - new))
        backward = 0.0 if not evicted_v else id_bound if zero_copy else max(1.0, evicted_v * u)
        h2d.append((forward + backward) * d * es)
    grad_row = (r + d) * es + ID_BYTES
    micro_batches = len(routing.per_micro_batch)
    if factor_period is not None:
        if factor_period < 1 or num_neurons is None:
            raise ValueError(f"factor_period must be >= 1 with num_neurons given, got {factor_period}")
        flush = float(min(num_neurons, factor_period * id_bound) * grad_row)
        d2h = tuple(flush if m and m % factor_period == 0 else 0.0 for m in range(micro_batches))
        held = micro_batches - factor_period * ((micro_batches - 1) // factor_period)
        return LayerTraffic(h2d_mb=tuple(h2d), d2h_mb=d2h, wire_h2d_mb=tuple(h2d), boundary_h2d=keys_back,
                            boundary_d2h=float(min(num_neurons, held * id_bound) * grad_row), floor=floor)
    d2h = tuple(evicted_g * id_bound * grad_row for _ in routing.per_micro_batch)
    if num_neurons is not None:
        sent = min(num_neurons, micro_batches * id_bound)
    else:
        sent = max(id_bound, v) if micro_batches > 1 else id_bound
    return LayerTraffic(h2d_mb=tuple(h2d), d2h_mb=d2h, wire_h2d_mb=tuple(h2d), boundary_h2d=keys_back,
                        boundary_d2h=grad_share * sent * grad_row, floor=floor)
