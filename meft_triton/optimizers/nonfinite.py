"""Non-finite gradients: find them, name their layer and rows, skip the step or raise.

A NaN or Inf in a gradient must never reach the fp32 master (placement "cpu": the CPU row
store; placement "gpu": the parameters), because AdamW would spread it into the moments and
every later step. Every optimizer the package builds takes ``nonfinite``:

``"raise"`` (default)  the step is not applied and :class:`NonFiniteGradientError` is raised,
                       naming each layer, part (router / keys / values) and row.
``"skip"``             the step is not applied (parameters, moments and step counts untouched,
                       the offending gradients dropped), a :class:`NonFiniteGradientWarning`
                       names the rows, and training goes on with the next batch.

What "the step" is: for :class:`meft_triton.optimizers.OffloadedAdamW` and :class:`MEFTAdamW`
the whole optimizer step over every layer (like ``torch.amp.GradScaler`` skipping a step on
inf), so all layers keep one step count; for a standalone
:class:`meft_triton.optimizers.SparseRowAdamW` its one layer. Either records the event in
``nonfinite_steps`` (a count) and ``last_nonfinite`` (the report).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

NONFINITE_MODES = ("raise", "skip")
_SHOW_ROWS = 16


def check_nonfinite_mode(value: Any) -> str:
    if value not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE_MODES))}, got {value!r}")
    return value


@dataclass(frozen=True)
class NonFiniteRows:
    """Rows of one gradient that hold a NaN or Inf.

    ``layer``: the decoder-layer index (or the optimizer's ``name``, or None); ``part``:
    ``"router"``, ``"keys"``, ``"values"`` or ``"clip_scale"`` (the global-norm clip of several
    layers was non-finite because another layer's gradients were); ``rows``: neuron ids (keys,
    values) or expert ids (router), ascending; empty for ``"clip_scale"``."""

    layer: Any
    part: str
    rows: tuple[int, ...]

    def describe(self) -> str:
        where = "" if self.layer is None else f"layer {self.layer} "
        if self.part == "clip_scale":
            return f"{where}(gradient clip scale is non-finite: the global norm over layers is)"
        shown = ", ".join(map(str, self.rows[:_SHOW_ROWS]))
        more = f", ... ({len(self.rows)} rows)" if len(self.rows) > _SHOW_ROWS else ""
        return f"{where}{self.part} rows [{shown}{more}]"


def describe(report: Sequence[NonFiniteRows]) -> str:
    return "; ".join(r.describe() for r in report)


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN/Inf; the step was not applied. ``report``: the
    :class:`NonFiniteRows` found (layer, part, rows)."""

    def __init__(self, report: Sequence[NonFiniteRows], what: str = "the optimizer step") -> None:
        self.report = tuple(report)
        super().__init__(f"non-finite gradient, {what} was not applied (nothing written to the "
                         f"parameters or moments): {describe(self.report)}")


class NonFiniteGradientWarning(RuntimeWarning):
    """A step was skipped because a gradient held NaN/Inf (``nonfinite="skip"``)."""


def nonfinite_rows(rows: Tensor) -> Tensor | None:
    """Indices (int64, ascending) of the rows of a 2-D tensor holding a NaN or Inf, or None.

    One read pass when everything is finite (a sum is finite only if every term is); the
    per-row search runs only when the sum is not (which finite values can also cause by
    overflow: those give None)."""
    if rows.numel() == 0 or bool(torch.isfinite(rows.sum())):
        return None
    bad = (~torch.isfinite(rows)).reshape(rows.shape[0], -1).any(dim=1).nonzero().flatten()
    return bad.cpu() if bad.numel() else None


def act_on(report: Sequence[NonFiniteRows], mode: str, what: str) -> None:
    """Raise (mode "raise") or warn (mode "skip") about a non-empty report."""
    if mode == "raise":
        raise NonFiniteGradientError(report, what)
    warnings.warn(f"non-finite gradient, {what} skipped (nothing written to the parameters or "
                  f"moments): {describe(report)}", NonFiniteGradientWarning, stacklevel=3)


def all_finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: True when every element is finite, computed
    without a host read. A sum is finite only if every term is (finite values that overflow
    it give a false alarm, which the per-row search then clears)."""
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])
    return torch.isfinite(sums).all()


def read_flag(flag: Tensor) -> bool:
    """The one host read of an optimizer step: the value of :func:`all_finite_flag`."""
    return bool(flag)


def dense_report(named_grads: Iterable[tuple[Any, str, Tensor | None]]) -> list[NonFiniteRows]:
    """Non-finite rows of dense gradients ``(layer, part, grad)`` (grad None: skipped): one
    device reduction over all of them and one host read when everything is finite."""
    items = [(layer, part, g) for layer, part, g in named_grads if g is not None]
    if not items or read_flag(all_finite_flag([g for _, _, g in items])):
        return []
    report = []
    for layer, part, g in items:
        bad = nonfinite_rows(g.detach().reshape(g.shape[0], -1) if g.dim() else g.detach().reshape(1, 1))
        if bad is not None:
            report.append(NonFiniteRows(layer, part, tuple(bad.tolist())))
    return report


__all__ = [
    "NONFINITE_MODES",
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
    "NonFiniteRows",
    "all_finite_flag",
    "check_nonfinite_mode",
    "dense_report",
    "nonfinite_rows",
    "read_flag",
]
