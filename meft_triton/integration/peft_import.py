"""MEFT registered with peft whenever peft is in the process, whatever the import order.

``PeftModel.from_pretrained`` of a saved MEFT adapter needs ``peft_type: "MEFT"`` registered
first. Importing peft from ``import meft_triton`` would cost seconds (it imports transformers),
and a script's imports are usually sorted with ``meft_triton`` before ``peft``. So
``import meft_triton`` registers MEFT at once when peft is already imported, and otherwise
leaves a one-shot import hook that registers it right after peft's own import finishes (the
hook removes itself on the first import of ``peft``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any


def register_now() -> None:
    """Import :mod:`~meft_triton.integration.peft_method` (which registers MEFT). A peft with a
    "MEFT" method of its own gets a warning here, not a failed import; ``MEFTPeftConfig`` raises
    the same error when asked for."""
    try:
        from . import peft_method  # noqa: F401
    except RuntimeError as exc:
        warnings.warn(f"meft_triton is not registered with peft: {exc}", RuntimeWarning, stacklevel=3)


class RegisteringLoader(importlib.abc.Loader):
    """peft's own loader, followed by :func:`register_now` once peft's package has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register_now()

    def __getattr__(self, name: str) -> Any:  # resources, get_data, ...: the real loader's
        return getattr(self.loader, name)


class PeftImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of ``peft`` it leaves ``sys.meta_path``, lets
    the other finders find peft, and wraps the loader they return."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft":
            return None
        remove_hook()
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return None
        spec.loader = RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Register MEFT now if peft is imported, else once it is (idempotent)."""
    if "peft" in sys.modules:
        register_now()
    elif not any(isinstance(finder, PeftImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, PeftImportHook())


def remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, PeftImportHook)]


__all__ = ["PeftImportHook", "RegisteringLoader", "install", "register_now", "remove_hook"]
