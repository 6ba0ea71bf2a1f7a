"""The optimizer of placement "gpu": torch's AdamW over the adapters, refusing non-finite steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .hyperparameters import check_adamw
from .nonfinite import NonFiniteRows, act_on, check_nonfinite_mode, dense_report


class MEFTAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that refuses non-finite gradients (placement "gpu").

    What :func:`meft_triton.optimizers.factory.create_meft_optimizer` returns for placement "gpu".
    Before each step it checks every gradient (one host synchronization per step); if any holds
    NaN/Inf the whole step is skipped (``nonfinite="skip"``: warning, parameters, moments and
    step counts untouched) or :class:`NonFiniteGradientError` is raised (``"raise"``), naming the
    layer, the part and the rows. ``param_names`` maps each parameter to a name
    ``"layers.{i}.{router.weight|keys|values}"`` (the names of ``save_adapter``) for the report.
    """

    def __init__(self, params, *, param_names: dict[int, str] | None = None, nonfinite: str = "raise",
                 **adamw_kwargs: Any) -> None:
        self.nonfinite = check_nonfinite_mode(nonfinite)
        super().__init__(params, **adamw_kwargs)
        for i, group in enumerate(self.param_groups):  # the rules of placement "cpu" too
            try:
                check_adamw(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{exc}" + (f" (param_groups[{i}])" if len(self.param_groups) > 1 else "")) from None
        self.param_names = dict(param_names or {})
        self.nonfinite_steps = 0
        self.last_nonfinite: tuple[NonFiniteRows, ...] | None = None

    def _where(self, p: Tensor) -> tuple[Any, str]:
        name = self.param_names.get(id(p))
        if name is None:
            return None, "parameter"
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "layers" and parts[1].isdigit():
            return int(parts[1]), "router" if parts[2] == "router" else parts[2]
        return None, name

    def nonfinite_report(self) -> list[NonFiniteRows]:
        """The non-finite rows of the current gradients (empty when all are finite)."""
        return dense_report((*self._where(p), p.grad) for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        report = self.nonfinite_report()
        if report:
            self.nonfinite_steps += 1
            self.last_nonfinite = tuple(report)
            act_on(report, self.nonfinite, "the optimizer step")
            return loss
        super().step()
        return loss
