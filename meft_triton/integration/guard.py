"""Placement "cpu" under an optimizer that cannot train it: raise at the first step.

Under placement "cpu" keys and values live in the CPU row store, not in ``nn.Parameter``s, so
an optimizer built from ``model.parameters()`` (the HF Trainer's default) would step only the
routers and leave every key and value unchanged without a word. A global optimizer step
pre-hook, registered only while such adapters are attached, raises before that optimizer
changes anything when it holds a guarded router and is not :class:`OffloadedAdamW`."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..layer.adapter import MEFTAdapter
from ..optimizers.cpu import OffloadedAdamW

# id(router weight) -> weak reference to it: parameters compare elementwise, so no sets of them
_guarded: dict[int, weakref.ref] = {}
_handle: Any = None


def guard_router(adapter: MEFTAdapter) -> None:
    global _handle
    weight = adapter.router.weight
    _guarded[id(weight)] = weakref.ref(weight, lambda _, key=id(weight): _guarded.pop(key, None))
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_check_optimizer)


def unguard_router(adapter: MEFTAdapter) -> None:
    global _handle
    _guarded.pop(id(adapter.router.weight), None)
    if not _guarded and _handle is not None:
        _handle.remove()
        _handle = None


def _check_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if isinstance(optimizer, OffloadedAdamW) or not _guarded:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            ref = _guarded.get(id(param))
            if ref is not None and ref() is param:
                raise TypeError(
                    f"{type(optimizer).__name__} cannot train MEFT adapters with placement 'cpu': their "
                    "keys and values live in the CPU row store, not in parameters, so this step would "
                    "update only the routers. Use create_meft_optimizer(model, args) (for the HF "
                    "Trainer: optimizers=(create_meft_optimizer(model, args), None)).")
