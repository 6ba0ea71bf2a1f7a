"""Finding a transformers model's decoder layers and, in each, where its FFN reads its input and
where its output is added, by structure (no list of model classes) or by the user's ``target``.

An FFN *site* is two dotted paths inside one layer: the module whose input is the FFN's input
and the module whose output is the FFN's output (the adapter's output is added to it). By
structure, in this order:

1. a child named ``mlp`` / ``feed_forward`` / ``ffn`` / ... (:data:`MLP_NAMES`): both paths are
   that child (Llama, Mistral, Qwen, Gemma, Phi-3, GPT-NeoX, GPT-2, MoE blocks, ...);
2. projections of a known set kept inline in the layer (:data:`PROJECTION_SETS`, OPT's
   ``fc1``/``fc2``): the first projection reads, the last one's output is the FFN's;
3. ``intermediate`` + ``output.dense`` (BERT / RoBERTa encoders: ``output`` adds the residual
   and normalises after its ``dense``, so the adapter is added to ``output.dense``);
4. the shallowest descendant whose children are a known set of FFN projections.

The decoder stack is the largest ``nn.ModuleList`` in which every layer has a site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

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
                     "dense_h_to_4h", "wi", "fc_in", "dense")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
ENCODER_SITE = ("intermediate", "output.dense")
TARGET_HELP = ("pass target=(input path, output path) inside one layer, e.g. target=('fc1', 'fc2') "
               "or target='mlp' when one module reads the FFN's input and returns its output")


@dataclass(frozen=True)
class FFNSite:
    """Where one layer's FFN reads its input (``input_path``) and where the adapter's output is
    added (``output_path``), as dotted paths inside the layer."""

    input_path: str
    output_path: str


def check_target(target: Any) -> FFNSite | None:
    """Validate a user's ``target``: None (find by structure), a dotted path (one module reads
    and returns), a pair ``(input path, output path)`` or ``{"input": ..., "output": ...}``."""
    if target is None:
        return None
    if isinstance(target, str):
        paths: tuple = (target, target)
    elif isinstance(target, Mapping):
        if set(target) != {"input", "output"}:
            raise ValueError(f"target: a mapping must have exactly the keys 'input' and 'output', "
                             f"got {sorted(map(str, target))}")
        paths = (target["input"], target["output"])
    elif isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(f"target: a sequence must be (input path, output path), got {len(target)} items")
        paths = tuple(target)
    else:
        raise TypeError(f"target must be None, a module path, an (input, output) pair or a mapping, "
                        f"got {type(target).__name__}")
    for path in paths:
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise ValueError(f"target: paths must be non-empty dotted module names inside a layer, got {path!r}")
    return FFNSite(*paths)


def child_names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def projection_set(module: nn.Module) -> tuple[str, ...] | None:
    names = child_names(module)
    return next((group for group in PROJECTION_SETS if all(p in names for p in group)), None)


def find_mlp(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The MLP module of one layer as ``(dotted path inside the layer, module)``, or None: a
    child with a conventional FFN name, else the shallowest strict descendant whose children
    are a known set of FFN projections. The layer itself never counts (see :func:`find_site`)."""
    for name, child in layer.named_children():
        if name in MLP_NAMES:
            return name, child
    frontier = [("", layer)]
    while frontier:
        next_frontier = []
        for prefix, module in frontier:
            for name, child in module.named_children():
                path = f"{prefix}.{name}" if prefix else name
                if projection_set(child) is not None:
                    return path, child
                next_frontier.append((path, child))
        frontier = next_frontier
    return None


def _has_module(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_site(layer: nn.Module, target: FFNSite | None = None) -> FFNSite | None:
    """The FFN site of one layer: ``target`` when given (both paths must exist in the layer),
    else by structure (the module docstring's order); None when there is none."""
    if target is not None:
        ok = _has_module(layer, target.input_path) and _has_module(layer, target.output_path)
        return target if ok else None
    for name, _ in layer.named_children():
        if name in MLP_NAMES:
            return FFNSite(name, name)
    inline = projection_set(layer)
    if inline is not None:
        return FFNSite(inline[0], inline[-1])
    if all(_has_module(layer, path) for path in ENCODER_SITE):
        return FFNSite(*ENCODER_SITE)
    found = find_mlp(layer)
    return FFNSite(found[0], found[0]) if found is not None else None


def find_decoder_layers(model: nn.Module, target: FFNSite | None = None) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the layer stack: the largest ModuleList in which every layer has
    an FFN site (ties: the first in module order). Raises ValueError naming the model class and
    the ``target`` to pass."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if best is not None and len(module) <= len(best[1]):
            continue
        if all(find_site(layer, target) is not None for layer in module):
            best = (name, module)
    if best is None:
        if target is not None:
            raise ValueError(
                f"attach_meft: no nn.ModuleList in {type(model).__name__} has, in every layer, both "
                f"target modules (input {target.input_path!r}, output {target.output_path!r}); "
                f"{TARGET_HELP}")
        raise ValueError(
            f"attach_meft: could not find layers with an FFN in {type(model).__name__}: looked for "
            f"an nn.ModuleList whose every layer has a child named {'/'.join(MLP_NAMES)}, inline "
            f"FFN projections ({'; '.join('/'.join(g) for g in PROJECTION_SETS)}) or "
            f"{' + '.join(ENCODER_SITE)}; {TARGET_HELP}")
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


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])  # GPT-2's Conv1D stores [in, out]
    return None


def mlp_hidden_size(mlp: nn.Module, model: nn.Module) -> int:
    """The width of the FFN's input read at module ``mlp``: its own in_features (a projection),
    its input projection's, else the model config's hidden size."""
    size = _in_features(mlp)
    names = child_names(mlp)
    for name in INPUT_PROJECTIONS:
        if size is None and name in names:
            size = _in_features(getattr(mlp, name))
    size = size if size is not None else config_hidden_size(model)
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
