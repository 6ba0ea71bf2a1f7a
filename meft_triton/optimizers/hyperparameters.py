"""The optimizers' hyper-parameter checks: one set of rules for both placements.

Every optimizer :func:`~meft_triton.optimizers.factory.create_meft_optimizer` builds (and
:class:`~meft_triton.optimizers.sparse_adamw.SparseRowAdamW` itself) checks its arguments here,
before anything is created or changed; a bad value raises ``ValueError`` / ``TypeError`` naming
the argument and its allowed range.
"""

from __future__ import annotations

import math
from typing import Any


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_lr(value: Any, name: str = "lr") -> float:
    value = _number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_betas(value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {value!r}")
    out = []
    for i, b in enumerate(value):
        b = _number(f"betas[{i}]", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
        out.append(b)
    return out[0], out[1]


def check_nonneg(name: str, value: Any) -> float:
    value = _number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_max_norm(name: str, value: Any) -> float | None:
    if value is None:
        return None
    value = _number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0 (or None for no clipping), got {value}")
    return value


def check_norm_type(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"norm_type must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > 0 or value == math.inf):
        raise ValueError(f"norm_type must be > 0 or inf, got {value}")
    return value


def check_adamw(lr: Any, betas: Any, eps: Any, weight_decay: Any,
                max_grad_norm: Any = None) -> tuple[float, tuple[float, float], float, float, float | None]:
    """All AdamW hyper-parameters at once, normalised: ``(lr, betas, eps, weight_decay,
    max_grad_norm)``; ``max_grad_norm`` None means no clipping."""
    return (check_lr(lr), check_betas(betas), check_nonneg("eps", eps),
            check_nonneg("weight_decay", weight_decay), check_max_norm("max_grad_norm", max_grad_norm))
