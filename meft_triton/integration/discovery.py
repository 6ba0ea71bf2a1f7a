"""Finding a transformers model's decoder layers, their MLPs and the MLPs' hidden size, by
structure (no list of model classes).

The decoder stack is the largest ``nn.ModuleList`` whose every child holds an MLP-like
submodule. Inside a layer the MLP is the child named ``mlp`` / ``feed_forward`` / ``ffn`` /
... (:data:`MLP_NAMES`), or else the shallowest descendant whose children include a known set
of FFN projections (:data:`PROJECTION_SETS`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "mlp_block", "ffn_layer", "feedforward")
PROJECTION_SETS = (
    ("gate_proj", "up_proj", "down_proj"),
    ("gate_up_proj", "down_proj"),
    ("up_proj", "down_proj"),
    ("fc1", "fc2"),
    ("w1", "w2"),
    ("c_fc", "c_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("wi", "wo"),
    ("fc_in", "fc_out"),
)
# The projection that reads the MLP's input, in order of preference, for the hidden size.
INPUT_PROJECTIONS = ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "c_fc",
                     "dense_h_to_4h", "wi", "fc_in")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


def child_names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def looks_like_ffn(module: nn.Module) -> bool:
    names = child_names(module)
    return any(all(p in names for p in group) for group in PROJECTION_SETS)


def find_mlp(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The MLP of one decoder layer as ``(dotted path inside the layer, module)``, or None.

    A child with a conventional FFN name wins; otherwise the shallowest strict descendant whose
    children are a known set of FFN projections. The layer itself never counts (OPT-style layers
    keep fc1/fc2 inline and have no MLP module to wrap)."""
    for name, child in layer.named_children():
        if name in MLP_NAMES:
            return name, child
    frontier = [("", layer)]
    while frontier:
        next_frontier = []
        for prefix, module in frontier:
            for name, child in module.named_children():
                path = f"{prefix}.{name}" if prefix else name
                if looks_like_ffn(child):
                    return path, child
                next_frontier.append((path, child))
        frontier = next_frontier
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the decoder stack: the largest ModuleList whose every child has
    an MLP (ties: the first in module order). Raises ValueError naming the model class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if best is not None and len(module) <= len(best[1]):
            continue
        if all(find_mlp(layer) is not None for layer in module):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"attach_meft: could not find decoder layers with an MLP in {type(model).__name__}: "
            "looked for an nn.ModuleList whose every layer has a child named "
            f"{'/'.join(MLP_NAMES)} or a submodule with FFN projections "
            f"({'; '.join('/'.join(g) for g in PROJECTION_SETS)})"
        )
    return best


def config_hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:  # noqa: BLE001 - odd configs: fall back to the top-level one
            pass
    for key in HIDDEN_SIZE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def mlp_hidden_size(mlp: nn.Module, model: nn.Module) -> int:
    """The width of the MLP's input: its input projection's in_features, else the model config's
    hidden size."""
    for name in INPUT_PROJECTIONS:
        proj = getattr(mlp, name, None) if name in child_names(mlp) else None
        if isinstance(proj, nn.Linear):
            return proj.in_features
        weight = getattr(proj, "weight", None)
        if type(proj).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2:
            return int(weight.shape[0])  # GPT-2's Conv1D stores [in, out]
    size = config_hidden_size(model)
    if size is None:
        raise ValueError(
            f"attach_meft: cannot tell the hidden size of {type(mlp).__name__} in "
            f"{type(model).__name__}: no input projection with in_features and no "
            f"{'/'.join(HIDDEN_SIZE_KEYS)} in model.config"
        )
    return size


def module_device(module: nn.Module, fallback: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    for tensor in fallback.parameters():
        return tensor.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
