"""The optimizer of placement "cpu": AdamW for the routers, the row-sparse CPU AdamW per layer."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import wait as wait_futures
from typing import Any, Sequence

import torch


from .hyperparameters import check_adamw, check_lr
from .nonfinite import NonFiniteRows, act_on, check_nonfinite_mode, dense_report
from .sparse_adamw import clip_grad_norm_


class OffloadedAdamW(torch.optim.AdamW):
    """One ``torch.optim.Optimizer`` for a model whose adapters have placement "cpu".

    The routers (device parameters) get a plain AdamW (no weight decay), and so do the low-key
    projections L of ``low_key_dim`` (in a second parameter group, with ``weight_decay`` as
    placement "gpu" gives them); each layer's keys and
    values get its row-sparse AdamW (:class:`meft_triton.optimizers.SparseRowAdamW`, lazy: only rows
    that fired move, with decoupled ``weight_decay``) on the CPU master. ``step()`` steps the
    routers, hands every layer's gradient rows to its sparse optimizer, clips them to
    ``max_grad_norm`` by their global norm across layers (the HF Trainer's own clipping sees
    only the routers' ``.grad``), and starts each layer's update on its worker thread with the
    learning rate of ``param_groups[0]`` (so LR schedulers drive both); a layer's next forward
    waits for its update. A layer with no gradient rows this step (frozen, e.g. left out by
    :class:`meft_triton.addons.ist.ISTScheduler`) is skipped: no worker job, step count and moments
    unchanged. ``state_dict()`` holds the routers' state and every sparse optimizer's (moments
    and step count).

    Non-finite gradients (``nonfinite``, see :mod:`meft_triton.nonfinite`): before anything is
    updated, ``step()`` checks the routers' gradients and every layer's gradient rows; if any
    holds NaN/Inf the *whole* step is not applied (routers, every layer's master rows, moments
    and step counts untouched; the gradient rows dropped) and it raises
    :class:`~meft_triton.optimizers.nonfinite.NonFiniteGradientError` (``"raise"``, default) or warns and
    returns (``"skip"``), naming the decoder layer (``layer_ids``, default 0, 1, ...), the part
    and the rows. ``nonfinite_steps`` counts such steps, ``last_nonfinite`` holds the report.
    """

    def __init__(self, adapters: Sequence[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_grad_norm: float | None = None, *,
                 nonfinite: str = "raise", layer_ids: Sequence[int] | None = None) -> None:
        # every argument checked before any adapter's optimizer is replaced
        lr, betas, eps, weight_decay, max_grad_norm = check_adamw(lr, betas, eps, weight_decay, max_grad_norm)
        nonfinite = check_nonfinite_mode(nonfinite)
        self.adapters = list(adapters)
        if not self.adapters or any(a.offload is None for a in self.adapters):
            raise ValueError("OffloadedAdamW needs adapters with placement='cpu'")
        self.layer_ids = list(range(len(self.adapters)) if layer_ids is None else layer_ids)
        if len(self.layer_ids) != len(self.adapters):
            raise ValueError(f"layer_ids has {len(self.layer_ids)} entries for {len(self.adapters)} adapters")
        groups = [{"params": [a.router.weight for a in self.adapters], "weight_decay": 0.0}]
        low_keys = [a.low_key.weight for a in self.adapters if a.low_key is not None]
        if low_keys:  # a second group only when there is one: older states keep loading
            groups.append({"params": low_keys, "weight_decay": weight_decay})
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm
        self.nonfinite = check_nonfinite_mode(nonfinite)
        self.nonfinite_steps = 0
        self.last_nonfinite: tuple[NonFiniteRows, ...] | None = None
        self.sparse = [a.configure_optimizer(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                             nonfinite=nonfinite, name=layer)
                       for a, layer in zip(self.adapters, self.layer_ids)]

    def nonfinite_report(self) -> list[NonFiniteRows]:
        """Non-finite rows among the routers' and low-key projections' ``.grad`` and the layers'
        collected gradient rows."""
        report = dense_report((layer, part, p.grad) for layer, a in zip(self.layer_ids, self.adapters)
                              for part, p in (("router", a.router.weight),
                                              ("low_key", None if a.low_key is None else a.low_key.weight))
                              if p is not None)
        for sparse in self.sparse:
            report += sparse.nonfinite_report()
        return report

    def collect_step(self) -> float:
        """The first part of a step, before anything is written: finish every layer's previous
        update, check the learning rate and collect every layer's gradient rows (all of them or,
        after a failed gradient copy, none). Returns the learning rate."""
        for adapter in self.adapters:
            adapter.offload.wait_for_update()  # the previous step, complete in every layer
        lr = check_lr(self.param_groups[0]["lr"], "param_groups[0]['lr']")
        try:
            # every layer's copy home is under way before the one wait for all of them
            for adapter in self.adapters:
                adapter.offload.flush_grads()
            self._collect_layers()
        except BaseException:
            # a failed gradient copy (CopyFailedError): the step is abandoned as a whole, with
            # no half-collected gradients left behind for the next one
            for adapter in self.adapters:
                adapter.offload.discard_grads()
            raise
        return lr

    def _collect_layers(self) -> None:
        """Every layer's gradient rows into its accumulator, the layers in parallel on worker
        threads (host-memory bound; each layer sums its own rows in arrival order, so the sums
        are a serial collection's), with one wait for all of them, failed or not."""
        sharing = Counter(id(adapter.offload.runtime) for adapter in self.adapters)  # a model's layers share one
        jobs = []
        for adapter in self.adapters:
            runtime = adapter.offload.runtime
            threads = max(1, min(sharing[id(runtime)], os.cpu_count() or 1))
            jobs.append(runtime.collector(threads).submit(adapter.offload.collect_grads))
        wait_futures(jobs)
        for job in jobs:
            job.result()  # the first failure (a failed gradient copy) is the step's

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the routers and every layer, all or nothing: everything that can refuse
        the step (a previous layer update that cannot complete, a bad learning rate, a failed
        gradient copy, non-finite gradients) does so before the first write."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self.collect_step()
        report = self.nonfinite_report()
        if report:
            for sparse in self.sparse:
                sparse.zero_grad()
            self.nonfinite_steps += 1
            self.last_nonfinite = tuple(report)
            act_on(report, self.nonfinite, "the optimizer step")
            return loss
        if self.max_grad_norm is not None:
            clip_grad_norm_(self.sparse, self.max_grad_norm)
        super().step()
        for adapter, sparse in zip(self.adapters, self.sparse):
            sparse.lr = lr
            if sparse.pending_rows == 0:
                # No gradient rows (a frozen layer, e.g. not chosen by IST this step): no worker
                # job, and its step count and moments stay put (an empty SparseRowAdamW.step
                # would still advance t), as torch AdamW skips a parameter whose grad is None.
                continue
            adapter.offload.step()  # its rows were collected above
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The routers' ``.grad`` as torch does, and every layer's gradient rows not yet stepped
        (so ``backward(); zero_grad()`` discards a batch, as it does under placement "gpu")."""
        super().zero_grad(set_to_none)
        for adapter in self.adapters:
            adapter.offload.discard_grads()

    def state_dict(self) -> dict[str, Any]:
        for adapter in self.adapters:
            adapter.offload.wait_for_update()  # (a failed update completes, and its rows reach the cache)
        state = super().state_dict()
        state["meft_sparse"] = [sparse.state_dict() for sparse in self.sparse]
        return state

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError`` naming what does not fit unless :meth:`load_state_dict` can load
        ``state_dict`` into every layer; changes nothing."""
        sparse_states = state_dict.get("meft_sparse") if isinstance(state_dict, dict) else None
        if not isinstance(sparse_states, list) or len(sparse_states) != len(self.sparse):
            raise ValueError(f"the state has {len(sparse_states) if isinstance(sparse_states, list) else 0} "
                             f"sparse optimizer states, this model has {len(self.sparse)} offloaded layers")
        for layer, sparse, state in zip(self.layer_ids, self.sparse, sparse_states):
            try:
                sparse.check_state_dict(state)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"the sparse optimizer state of layer {layer} does not fit: {exc}") from exc

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict)
        sparse_states = state_dict.pop("meft_sparse")
        for adapter in self.adapters:
            adapter.offload.wait_for_update()
        super().load_state_dict(state_dict)
        for sparse, state in zip(self.sparse, sparse_states):
            sparse.load_state_dict(state)
