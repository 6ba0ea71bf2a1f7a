"""Data-parallel runs (``--world-size W``, ``--gpus-per-node G``): the CPU RAM of a node and the
gradient bytes each rank sends per optimizer step (meft_triton/distributed).

Every rank trains its own micro-batches of the planned shape (the global batch is W x tokens x
micro-batches); a rank's GPU memory and PCIe bytes are those of one process. What changes:

* CPU RAM per node (placement "cpu", ``NodeSharedAdamW``): the fp32 master rows and their AdamW
  moments are one shared store per node; every other host buffer (gradient accumulators,
  pinned gradient rows, staging, value shadow) is per rank, so G times; the node's leader also
  receives every rank's gradient rows of the step (G x V rows of ids + fp32 rows per layer).
* Gradient bytes a rank sends per step, with the ring-algorithm byte counts of
  ``meft_triton.distributed.row_exchange``:
  - placement "gpu" (DDP with the row-sparse hook): per 2-D gradient the cheaper of a dense
    all-reduce and an all-gather of the rows the rank touched (its V rows per layer, ids +
    fp32 rows); the keys and values tables go by rows when V / N is below about 2 / W, the
    router and the low-key projection (every row touched) go dense, all dense ones in one flat
    all-reduce (one DDP bucket); plus one int64 count per tensor and rank. On the rows a run
    touched this equals the hook's ``RowSparseStats.bytes_sent`` exactly
    (tests/distributed/test_distributed_gpu.py).
  - placement "cpu" (``NodeSharedAdamW``): a rank sends its V gradient rows per layer to its
    node's leader; a leader sends its node's rows (V_node) to every other node's leader and the
    ids the update touched to its node's ranks; routers and L are all-reduced dense. The
    record gives the larger of the two roles. V_node, the rows G ranks touch together, is
    estimated as N (1 - (1 - V / N)^G) (ranks routing independently: exact for uniform
    routing, an upper bound where ranks share popular rows).
  The dense all-reduce of every adapter gradient is given beside it for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

from meft_triton.distributed.row_exchange import ID_BYTES, dense_allreduce_bytes, sparse_allgather_bytes

from .inputs import check_positive
from .routing import RoutingProfile
from .traffic import FP32

#: the per-node CPU RAM component shared by the ranks of a node (one store per node)
SHARED_RAM = "masters + AdamW moments (fp32)"
#: default ranks per node when --gpus-per-node is not given (the common 8-GPU node)
NODE_GPUS = 8


@dataclass(frozen=True)
class Parallel:
    """``world_size`` ranks (one GPU each), ``gpus_per_node`` of them per node."""

    world_size: int = 1
    gpus_per_node: int | None = None

    def __post_init__(self) -> None:
        check_positive("world_size", self.world_size, integer=True)
        if self.gpus_per_node is None:
            object.__setattr__(self, "gpus_per_node", min(self.world_size, NODE_GPUS))
        check_positive("gpus_per_node", self.gpus_per_node, integer=True)
        if self.world_size % self.gpus_per_node:
            raise ValueError(f"gpus_per_node ({self.gpus_per_node}) must divide world_size ({self.world_size})")

    @property
    def nodes(self) -> int:
        return self.world_size // self.gpus_per_node


def node_rows(rows: int, num_neurons: int, ranks: int) -> int:
    """Rows ``ranks`` ranks touch together when each touches ``rows`` of ``num_neurons``
    independently: N (1 - (1 - rows / N)^ranks)."""
    return round(num_neurons * (1.0 - (1.0 - rows / num_neurons) ** ranks))


def node_ram_bytes(rank_ram: dict, profile: RoutingProfile, *, num_neurons: int, row_width: int,
                   parallel: Parallel) -> dict:
    """A node's CPU RAM by component from one rank's (``cpu_ram_bytes``): the shared store once,
    the rest per rank, plus the leader's receive buffers of its ranks' gradient rows."""
    g = parallel.gpus_per_node
    out = {k: (v if k == SHARED_RAM else g * v) for k, v in rank_ram.items()}
    if g > 1:
        rows = sum(min(num_neurons, layer.per_step) for layer in profile.layers)
        out["leader's received gradient rows"] = float(g * rows * (row_width * FP32 + ID_BYTES))
    return out


def gradient_bytes(profile: RoutingProfile, *, placement: str, num_neurons: int, num_experts: int,
                   hidden: int, key_width: int, low_key: bool, parallel: Parallel) -> dict:
    """Per-rank gradient bytes of one optimizer step: ``sent`` (what the run sends),
    ``dense`` (a dense all-reduce of every adapter gradient), ``reduction`` (how the keys and
    values go: "rows", "dense", "mixed" or "none" at world size 1)."""
    w = parallel.world_size
    if w == 1:
        return dict(sent=0.0, dense=0.0, reduction="none")
    layers = len(profile.layers)
    # routers (and L) of every layer: one flat all-reduce, as DDP's bucket or NodeSharedAdamW sends them
    small = [(num_experts, key_width)] + ([(key_width, hidden)] if low_key else [])
    small_numel = layers * sum(n * width for n, width in small)
    dense = dense_allreduce_bytes(small_numel + layers * num_neurons * (key_width + hidden), FP32, w)
    if placement == "gpu":
        sent, dense_numel, by_rows = 0, small_numel, []
        for layer in profile.layers:
            v = min(num_neurons, layer.per_step)
            sent += (w - 1) * ID_BYTES * (2 + len(small))  # every rank's row count per 2-D gradient
            for width in (key_width, hidden):
                rows = sparse_allgather_bytes(v, width, FP32, w)
                by_rows.append(rows < dense_allreduce_bytes(num_neurons * width, FP32, w))
                if by_rows[-1]:
                    sent += rows
                else:
                    dense_numel += num_neurons * width
        sent += dense_allreduce_bytes(dense_numel, FP32, w)
        reduction = "rows" if all(by_rows) else "dense" if not any(by_rows) else "mixed"
        return dict(sent=float(sent), dense=float(dense), reduction=reduction)
    g, nodes = parallel.gpus_per_node, parallel.nodes
    row_bytes = key_width * FP32 + hidden * FP32 + ID_BYTES
    counts = layers * ID_BYTES * (g - 1 + nodes - 1)
    member = leader = counts + dense_allreduce_bytes(small_numel, FP32, w)
    for layer in profile.layers:
        v = min(num_neurons, layer.per_step)
        v_node = node_rows(v, num_neurons, g)
        member += v * row_bytes
        leader += (nodes - 1) * v_node * row_bytes + (g - 1) * v_node * ID_BYTES
    return dict(sent=float(max(member if g > 1 else 0, leader)), dense=float(dense), reduction="rows")
