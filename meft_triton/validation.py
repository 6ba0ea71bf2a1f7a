"""Argument checks shared by every module: bad input becomes a ValueError or TypeError that
names the argument and its allowed range, before anything is changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; otherwise raise an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_float(name: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= {minimum}, got {type(value).__name__} {value!r}")
    if not value >= minimum or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value}")
    return float(value)


def check_path(name: str, value: Any, caller: str) -> Path:
    """``value`` as a ``Path`` if it is a ``str`` or ``os.PathLike``; otherwise a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or value == "":
        raise TypeError(f"{caller}: {name} must be a non-empty str or os.PathLike (a directory), "
                        f"got {type(value).__name__} {value!r}")
    return Path(value)


def describe(x: object) -> str:
    """How an unexpected argument looks, for error messages."""
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, on {x.device}"
    return f"{type(x).__name__} {x!r}"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device or host allocation failure (torch reports some only by message)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()
