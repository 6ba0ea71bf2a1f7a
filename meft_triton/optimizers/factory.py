"""create_meft_optimizer: the optimizer a model's adapters need, for a plain loop or the HF Trainer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..integration.attach import meft_adapters, meft_named_parameters
from .cpu import OffloadedAdamW
from .gpu import MEFTAdamW
from .hyperparameters import check_adamw
from .nonfinite import check_nonfinite_mode


def create_meft_optimizer(
    model: nn.Module,
    args: Any = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    kind: str = "auto",
    nonfinite: str = "raise",
) -> torch.optim.Optimizer:
    """The optimizer a model with MEFT adapters trains with, for a custom loop or the HF Trainer::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          optimizers=(create_meft_optimizer(model, args), None))

    ``args`` (a ``transformers.TrainingArguments``, optional) supplies ``learning_rate``,
    ``weight_decay``, ``adam_beta1/2``, ``adam_epsilon`` and ``max_grad_norm``;
    ``lr``/``weight_decay`` override. With ``optimizers=(opt, None)`` the Trainer builds its LR
    schedule over this optimizer, accumulates gradients over ``gradient_accumulation_steps``
    micro-batches (the loss is scaled by 1/steps, so gradients hold the mean), clips with
    ``max_grad_norm`` over the parameters with ``.grad`` and then calls ``step()`` and
    ``zero_grad()``.

    It steps the MEFT adapters (found inside a peft ``PeftModel`` too) and every other parameter
    that requires grad, e.g. a LoRA's (``get_peft_model`` on top of MEFT, or MEFT attached to a
    LoRA ``PeftModel``): those in one more AdamW parameter group with ``weight_decay``. After
    ``attach_meft`` alone the backbone is frozen and that group is absent.

    ``kind``: ``"adamw"`` (:class:`meft_triton.optimizers.nonfinite.MEFTAdamW`, a ``torch.optim.AdamW``
    over the adapter parameters that checks for non-finite gradients, placement "gpu"),
    ``"sparse"`` (:class:`OffloadedAdamW`, placement "cpu": routers by AdamW, keys and values by
    the row-sparse CPU AdamW, which clips its rows to ``max_grad_norm`` itself), or ``"auto"``
    (the one the adapters' placement needs).

    Every hyper-parameter is checked first, by the same rules for both kinds (``lr`` >= 0,
    ``betas`` in [0, 1), ``eps`` >= 0, ``weight_decay`` >= 0, ``max_grad_norm`` > 0, or 0 / None
    for no clipping, all finite): a bad one raises ``ValueError`` / ``TypeError`` naming it and
    nothing is created or changed.

    ``nonfinite``: ``"raise"`` (default) or ``"skip"``, what a step does when a gradient holds
    NaN/Inf: either way nothing is written (see :mod:`meft_triton.nonfinite`); both kinds check
    every adapter gradient before updating and name the layer, part and rows (``"adamw"`` the
    other parameters' too; ``"sparse"`` checks MEFT's).
    """
    check_nonfinite_mode(nonfinite)
    params = meft_named_parameters(model)
    adapters = list(meft_adapters(model).values())
    adapter_ids = {id(p) for adapter in adapters for p in adapter.parameters()}
    others = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
    if not adapters:
        raise ValueError(f"create_meft_optimizer: {type(model).__name__} has no MEFT adapters; "
                         "call attach_meft first")
    offloaded = adapters[0].offload is not None
    if kind == "auto":
        kind = "sparse" if offloaded else "adamw"
    if kind not in ("adamw", "sparse"):
        raise ValueError(f"kind must be 'auto', 'adamw' or 'sparse', got {kind!r}")
    if (kind == "sparse") != offloaded:
        raise ValueError(f"kind={kind!r} does not fit adapters with placement="
                         f"{adapters[0].config.placement!r}; use kind='auto'")
    betas = (getattr(args, "adam_beta1", 0.9), getattr(args, "adam_beta2", 0.999))
    eps = getattr(args, "adam_epsilon", 1e-8)
    if lr is None:
        lr = getattr(args, "learning_rate", 1e-3)
    if weight_decay is None:
        weight_decay = getattr(args, "weight_decay", 0.0)
    # the HF Trainer reads max_grad_norm 0 (or None) as "no clipping"; a negative one is an error
    max_grad_norm = getattr(args, "max_grad_norm", None)
    if max_grad_norm == 0 and not isinstance(max_grad_norm, bool):
        max_grad_norm = None
    # the same rules for both placements, before anything is created
    lr, betas, eps, weight_decay, max_grad_norm = check_adamw(lr, betas, eps, weight_decay, max_grad_norm)
    others_group = {"params": [p for _, p in others], "weight_decay": weight_decay}
    if kind == "sparse":
        optimizer = OffloadedAdamW(adapters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   max_grad_norm=max_grad_norm, nonfinite=nonfinite,
                                   layer_ids=list(meft_adapters(model)))
        if others:  # stepped by the same AdamW step as the routers
            optimizer.add_param_group(others_group)
        return optimizer
    decay = [p for n, p in params if not n.endswith("router.weight")]
    no_decay = [p for n, p in params if n.endswith("router.weight")]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if others:
        groups.append(others_group)
    return MEFTAdamW(groups, lr=lr, betas=betas, eps=eps, nonfinite=nonfinite,
                     param_names={id(p): n for n, p in [*params, *others]})
