"""Which backbone an adapter belongs to: recorded by save_adapter, checked by load_adapter, so an
adapter never loads into another architecture or layer count of the same width without a word."""

from __future__ import annotations

from typing import Any

from torch import nn

from .attach import attached_state
from .discovery import check_target, find_decoder_layers


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (``get_base_model``), else ``model``."""
    get = getattr(model, "get_base_model", None)
    inner = get() if callable(get) else model
    return inner if isinstance(inner, nn.Module) else model


def model_identity(model: nn.Module) -> dict[str, Any]:
    """``{"model_class", "model_type", "num_layers", "target"}`` of the backbone (peft unwrapped):
    the class name, ``config.model_type`` (None without a config), the layer count (None when
    no layers are found) and the ``target`` MEFT was attached with (None: by structure)."""
    inner = base_model(model)
    state = attached_state(model)
    if state is not None:
        num_layers = state.num_layers
        target = None if state.target is None else [state.target.input_path, state.target.output_path]
    else:
        target = None
        try:
            num_layers = len(find_decoder_layers(inner)[1])
        except ValueError:
            num_layers = None
    config = getattr(inner, "config", None)
    return {"model_class": type(inner).__name__, "model_type": getattr(config, "model_type", None) or None,
            "num_layers": num_layers, "target": target}


def check_same_backbone(saved: dict[str, Any], model: nn.Module, caller: str) -> None:
    """Raise ValueError naming both when ``saved`` (a :func:`model_identity` written by an
    earlier save; fields it lacks are not checked) describes another architecture or layer count
    than ``model``. The architecture is ``model_type`` where both have one (so a causal-LM
    adapter loads into the same backbone with another head), else the class name."""
    here = model_identity(model) if saved.get("target") is None else _identity_at(model, saved["target"])
    old_class, new_class = saved.get("model_class"), here["model_class"]
    if saved.get("model_type") and here["model_type"]:
        differs = saved["model_type"] != here["model_type"]
    else:
        differs = old_class is not None and old_class not in (new_class, "PeftModel")
    if differs:
        raise ValueError(
            f"{caller}: the adapter was saved from {old_class} (model_type {saved.get('model_type')!r}) but "
            f"the model is {new_class} (model_type {here['model_type']!r}); an adapter only fits the "
            "architecture it was trained on")
    if saved.get("num_layers") is not None and here["num_layers"] is not None \
            and saved["num_layers"] != here["num_layers"]:
        raise ValueError(f"{caller}: the adapter was saved from {old_class} with {saved['num_layers']} layers "
                         f"but {new_class} has {here['num_layers']}")


def _identity_at(model: nn.Module, target: Any) -> dict[str, Any]:
    identity = model_identity(model)
    if attached_state(model) is None:
        try:
            identity["num_layers"] = len(find_decoder_layers(base_model(model), check_target(target))[1])
        except ValueError:
            identity["num_layers"] = None
    return identity
