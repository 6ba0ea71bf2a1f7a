"""Placement "cpu" on several processes: one row store, one row-sparse AdamW per node.

:class:`NodeSharedAdamW` is :class:`~meft_triton.optimizers.OffloadedAdamW` for data-parallel
ranks whose row stores are shared per node (:func:`~.shared_store.share_row_stores`). One
``step()``, on every rank at once:

1. each rank moves its gradient rows (summed over its micro-batches) into its layer
   accumulators, as one process does;
2. the rows go to the node's leader (a gloo ``gather`` of ids + rows per layer);
3. with several nodes the leaders exchange their node's summed rows (``all_gather`` of ids +
   rows among the leaders) and each sums every node's rows in node order, so every node
   applies bit-identical updates to its identical master (replicated per node, not sharded:
   the forward of every rank reads rows anywhere in the table every micro-batch, which must
   not wait on another node; only gradient rows cross nodes, once per step);
4. the leader checks for non-finite gradients, clips, steps the routers and runs every layer's
   row-sparse AdamW on the shared store (mean over the world: rows divided by the world size);
5. the leader broadcasts the outcome to its node: the ids each layer's update touched (every
   rank writes just those key rows into its device key cache and steps its routers), or the
   non-finite report (every rank skips or raises alike), or the leader's error.

Routers and low-key projections are dense parameters: with ``reduce_params=True`` (default)
their gradients are all-reduced to the mean here; pass False when a
``DistributedDataParallel`` wrapper already reduces them (the HF Trainer under torchrun).
The update is synchronous (the others read the shared rows right after), so it does not
overlap the next forward as one process's does. A collective that fails because another rank
died raises :class:`~.topology.PeerFailedError` on the survivors.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..optimizers.cpu import OffloadedAdamW
from ..optimizers.nonfinite import act_on
from ..optimizers.sparse_adamw import clip_grad_norm_
from .row_exchange import all_gather_counts, all_gather_rows, gather_rows, sum_rows_into
from .shared_store import share_row_stores
from .topology import NodeTopology, PeerFailedError, collectives


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]], num_rows: int, width: int):
    """Sum row-sparse parts (in order) into (ids ascending, rows) of their union."""
    if not parts:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, width)
    ids = torch.unique(torch.cat([i for i, _ in parts]))
    dense_index = torch.full((num_rows,), -1, dtype=torch.int64)
    dense_index[ids] = torch.arange(ids.numel())
    out = torch.empty(ids.numel(), width)
    sum_rows_into(out, [(dense_index[i], r) for i, r in parts])
    return ids, out


class NodeSharedAdamW(OffloadedAdamW):
    """:class:`OffloadedAdamW` with one master per node (module docstring). ``topology`` comes
    from :func:`~.topology.node_topology`; with ``share=True`` (default) the adapters' row stores
    are shared per node here (:func:`share_row_stores`). Every other argument as for
    :class:`OffloadedAdamW`. ``rows_sent`` / ``bytes_sent`` count this rank's gradient rows and
    the bytes it sent (ids + rows) in the row exchanges."""

    def __init__(self, adapters: Sequence[Any], topology: NodeTopology, *, share: bool = True,
                 reduce_params: bool = True, **hyper: Any) -> None:
        if not isinstance(topology, NodeTopology):
            raise TypeError(f"topology must be a NodeTopology, got {type(topology).__name__}")
        if not isinstance(reduce_params, bool):
            raise TypeError(f"reduce_params must be a bool, got {type(reduce_params).__name__}")
        super().__init__(adapters, **hyper)
        self.topology = topology
        self.reduce_params = reduce_params
        self.rows_sent = 0
        self.bytes_sent = 0
        if share:
            share_row_stores(self.adapters, topology)

    def _reduce_params(self) -> None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # the default group: the parameters' own device and backend
        flat.div_(self.topology.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _exchange_rows(self) -> None:
        """Steps 2-3: this rank's rows to the leader(s); the leader's accumulators get the mean."""
        topo = self.topology
        local = [sparse.accumulated() for sparse in self.sparse]
        counts = all_gather_counts([ids.numel() for ids, _ in local], topo.node)
        received = []
        for k, (ids, rows) in enumerate(local):
            self.rows_sent += ids.numel()
            self.bytes_sent += 0 if topo.is_leader else ids.numel() * (8 + rows.shape[1] * 4)
            received.append(gather_rows(ids, rows, counts[:, k], topo.leader_rank, topo.node))
        for sparse in self.sparse:
            sparse.zero_grad()
        if not topo.is_leader:
            return
        summed = [_merge(parts, s.store.num_rows, s.store.row_width) for parts, s in zip(received, self.sparse)]
        if topo.num_nodes > 1:
            node_counts = all_gather_counts([ids.numel() for ids, _ in summed], topo.leaders)
            merged = []
            for k, ((ids, rows), s) in enumerate(zip(summed, self.sparse)):
                self.bytes_sent += (topo.num_nodes - 1) * ids.numel() * (8 + rows.shape[1] * 4)
                parts = all_gather_rows(ids, rows, node_counts[:, k], topo.leaders)
                merged.append(_merge(parts, s.store.num_rows, s.store.row_width))
            summed = merged
        for (ids, rows), sparse in zip(summed, self.sparse):
            if ids.numel():
                sparse.accumulate(ids, *sparse.store.split(rows.div_(topo.world_size)))

    def _leader_step(self, lr: float) -> tuple:
        report = self.nonfinite_report()
        if report:
            return ("nonfinite", tuple(report))
        if self.max_grad_norm is not None:
            clip_grad_norm_(self.sparse, self.max_grad_norm)
        started = []
        for sparse in self.sparse:
            sparse.lr = lr
            # no rows (a frozen layer): no update, the step count stays, as in OffloadedAdamW
            started.append(sparse.step_async() if sparse.pending_rows else None)
        touched = [None if fut is None else sparse.wait() for fut, sparse in zip(started, self.sparse)]
        return ("ok", touched)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        topo = self.topology
        lr = self.collect_step()
        with collectives("the MEFT gradient reduction"):
            if self.reduce_params:
                self._reduce_params()
            self._exchange_rows()
        outcome: list[Any] = [None]
        error = None
        if topo.is_leader:
            try:
                outcome = [self._leader_step(lr)]
            except BaseException as exc:  # the node must not wait for an outcome that never comes
                error = exc
                outcome = [("error", f"{type(exc).__name__}: {exc}")]
        with collectives("the MEFT optimizer step (waiting for the node's leader)"):
            dist.broadcast_object_list(outcome, src=topo.leader_rank, group=topo.node)
        if error is not None:
            raise error
        kind, payload = outcome[0]
        if kind == "error":
            raise PeerFailedError(f"rank {topo.rank}: the optimizer step on the node's leader "
                                  f"(rank {topo.leader_rank}) failed: {payload}")
        if kind == "nonfinite":
            for sparse in self.sparse:
                sparse.zero_grad()
            self.nonfinite_steps += 1
            self.last_nonfinite = payload
            act_on(list(payload), self.nonfinite, "the optimizer step")
            return loss
        torch.optim.AdamW.step(self)  # routers and L: the same (reduced) gradients on every rank
        for adapter, touched in zip(self.adapters, payload):
            if touched is not None:
                adapter.offload.rows_changed(touched, elsewhere=not topo.is_leader)
        return loss
