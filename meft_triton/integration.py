"""Hugging Face transformers integration: attach MEFT adapters beside every FFN, train, save, load.

Typical use::

    model = AutoModelForCausalLM.from_pretrained(path)
    attach_meft(model, MEFTConfig(num_neurons=8192, num_experts=128))   # backbone frozen
    ...train meft_parameters(model) (or HF Trainer with create_meft_optimizer)...
    save_adapter(model, "out/adapter")
    load_adapter(AutoModelForCausalLM.from_pretrained(path), "out/adapter")  # attaches, then loads

How the decoder layers and their MLPs are found (by structure, no list of model classes):
the decoder stack is the largest ``nn.ModuleList`` whose every child holds an MLP-like
submodule. Inside a layer the MLP is the child named ``mlp`` / ``feed_forward`` / ``ffn`` /
... (:data:`MLP_NAMES`), or else the shallowest descendant whose children include a known set of
FFN projections (``gate_proj/up_proj/down_proj``, ``gate_up_proj/down_proj``, ``fc1/fc2``,
``w1/w2``, ``c_fc/c_proj``, ``dense_h_to_4h/dense_4h_to_h``, ``wi/wo``, ``fc_in/fc_out``).
Layers whose FFN is not a module of its own (OPT keeps ``fc1``/``fc2`` directly in the decoder
layer) are not supported and get a :class:`ValueError` naming the model class.

Each MLP is replaced by :class:`MEFTMLP`, which computes ``mlp(x) + adapter(x)`` (MEFT's parallel
adapter reads the FFN's input). :func:`detach_meft` puts the original modules and the original
``requires_grad`` flags back.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .adapter import MEFTAdapter
from .config import MEFTConfig
from .nonfinite import MEFTAdamW, NonFiniteRows, act_on, check_nonfinite_mode, dense_report
from .offload import OffloadRuntime
from .optim import clip_grad_norm_

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
COMPUTE_FIELDS = ("num_neurons", "num_experts", "experts_per_token", "topk", "gate")

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "meft_config.json"
FORMAT_NAME = "meft-triton-adapter"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------


class MEFTMLP(nn.Module):
    """An FFN with a MEFT adapter beside it: ``forward(x) = base(x) + adapter(x)``.

    ``base`` is the original MLP module, untouched; attributes it has that this wrapper lacks
    (``gate_proj``, ``act_fn``, ...) are reachable through the wrapper. The adapter reads the
    MLP's input (the first positional argument, or ``hidden_states``/``x``) and its output is
    cast to the MLP output's dtype before the add, so a zero adapter leaves the output bitwise
    unchanged. MLPs returning a tuple (MoE blocks: ``(hidden, router_logits)``) get the adapter
    added to the first element.

    The adapter runs in two stages around the backbone FFN, so that placement "cpu" can overlap
    its host->device value-row copy with the FFN:

    * :meth:`start_adapter` runs *before* the FFN. Under placement "cpu" it runs the router and
      key scoring on the device and launches the copy of the selected value rows.
    * :meth:`finish_adapter` runs *after* the FFN. Under placement "cpu" it waits on the copy's
      event and runs the value stage.

    Under placement "gpu" ``start_adapter`` hands the input through and ``finish_adapter``
    computes the whole adapter.
    """

    def __init__(self, base: nn.Module, adapter: MEFTAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or "base" not in modules or name in ("base", "adapter"):
                raise
            return getattr(modules["base"], name)

    def start_adapter(self, hidden: Tensor) -> Any:
        """Stage 1, before the backbone FFN. Returns a pending state for :meth:`finish_adapter`."""
        if self.adapter.offload is not None:
            return self.adapter.start_routing(hidden)
        return hidden

    def finish_adapter(self, pending: Any) -> Tensor:
        """Stage 2, after the backbone FFN: the adapter's output ``y``, same shape as the input."""
        if self.adapter.offload is not None:
            return self.adapter.finish_values(pending)
        return self.adapter(pending)

    def cancel_adapter(self, pending: Any) -> None:
        """Give back a :meth:`start_adapter` whose :meth:`finish_adapter` will not run (the FFN
        between them raised, e.g. out of memory): its copy slot returns to the pool."""
        if self.adapter.offload is not None:
            self.adapter.abandon_routing(pending)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = mlp_input(args, kwargs)
        pending = self.start_adapter(hidden)
        try:
            out = self.base(*args, **kwargs)
        except BaseException:
            self.cancel_adapter(pending)
            raise
        if isinstance(out, Tensor):
            return out + self.finish_adapter(pending).to(out.dtype)
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            first = out[0] + self.finish_adapter(pending).to(out[0].dtype)
            return (first, *out[1:])
        self.cancel_adapter(pending)
        raise TypeError(
            f"MEFTMLP: the wrapped {type(self.base).__name__} returned {type(out).__name__}; "
            "expected a tensor or a tuple whose first element is a tensor"
        )


def mlp_input(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states an MLP was called with."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("hidden_states", "x", "hidden_state", "input", "inputs"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    raise TypeError("MEFTMLP: could not find the MLP's input tensor (first positional argument, "
                    "or keyword hidden_states / x)")


# --------------------------------------------------------------------------------------------
# Finding the decoder layers and their MLPs
# --------------------------------------------------------------------------------------------


def _child_names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _looks_like_ffn(module: nn.Module) -> bool:
    names = _child_names(module)
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
                if _looks_like_ffn(child):
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


def _config_hidden_size(model: nn.Module) -> int | None:
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
        proj = getattr(mlp, name, None) if name in _child_names(mlp) else None
        if isinstance(proj, nn.Linear):
            return proj.in_features
        weight = getattr(proj, "weight", None)
        if type(proj).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2:
            return int(weight.shape[0])  # GPT-2's Conv1D stores [in, out]
    size = _config_hidden_size(model)
    if size is None:
        raise ValueError(
            f"attach_meft: cannot tell the hidden size of {type(mlp).__name__} in "
            f"{type(model).__name__}: no input projection with in_features and no "
            f"{'/'.join(HIDDEN_SIZE_KEYS)} in model.config"
        )
    return size


def _module_device(module: nn.Module, fallback: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    for tensor in fallback.parameters():
        return tensor.device
    return torch.device("cpu")


def _module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    layer: int
    parent: nn.Module
    attr: str
    wrapper: MEFTMLP


@dataclass
class _MEFTState:
    config: MEFTConfig
    layers_name: str
    slots: list[_Slot]
    requires_grad: list[tuple[nn.Parameter, bool]]
    embed_hook: tuple[nn.Module, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


STATE_ATTR = "_meft_state"


def _state(model: nn.Module) -> _MEFTState | None:
    return model.__dict__.get(STATE_ATTR)


def is_meft_attached(model: nn.Module) -> bool:
    return _state(model) is not None


def check_layers(layers: Any, num_layers: int) -> list[int]:
    """Validate ``layers`` ("all" or a list of distinct ints in [0, num_layers)); sorted list."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {layers!r}")
        return list(range(num_layers))
    if not isinstance(layers, (list, tuple, range)):
        raise TypeError(f"layers must be 'all' or a list of ints, got {type(layers).__name__}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer, got an empty list")
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"layers must hold ints, got {type(index).__name__} {index!r}")
        if not 0 <= index < num_layers:
            raise ValueError(f"layers: index {index} is out of range [0, {num_layers}) "
                             f"(the model has {num_layers} decoder layers)")
    duplicates = sorted({i for i in layers if layers.count(i) > 1})
    if duplicates:
        raise ValueError(f"layers must not repeat an index, got duplicates {duplicates}")
    return sorted(layers)


def _check_dtype(dtype: Any) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")


def _resolve_path(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        parent = getattr(parent, part)
    return parent, parts[-1]


def attach_meft(
    model: nn.Module,
    config: MEFTConfig,
    layers: str | Sequence[int] = "all",
    *,
    dtype: torch.dtype | None = torch.float32,
    input_require_grads: bool = True,
) -> nn.Module:
    """Put a MEFT adapter beside the MLP of each chosen decoder layer and freeze the backbone.

    Args:
        model: a transformers causal LM (any ``nn.Module`` with a ModuleList of decoder layers).
        config: the adapters' :class:`MEFTConfig` (the same for every layer).
        layers: ``"all"`` or a list of distinct decoder-layer indices.
        dtype: the adapter parameters' dtype. Default float32: an fp32 master that the adapter
            casts to the input's dtype at compute time (bf16/fp16 models, autocast). ``None``:
            the MLP's own parameter dtype.
        input_require_grads: while the model is gradient-checkpointing, make the input
            embeddings' output require grad, so reentrant checkpointing (whose segment inputs
            must require grad) still reaches the adapters behind a frozen embedding. Costs
            nothing without checkpointing.

    Returns the same model, modified in place. Adapters are created on each MLP's device; later
    ``model.to(device)`` moves them along, but ``model.to(dtype)``/``model.half()`` would also
    cast the fp32 masters, so cast the backbone before attaching. Every parameter of the model
    other than the adapters gets ``requires_grad=False``; the previous flags are remembered for
    :func:`detach_meft`. Raises ``ValueError`` naming the model class when no decoder layers
    with an MLP are found, and ``ValueError``/``TypeError`` for bad ``layers``/``config``/
    ``dtype``; on any error the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, MEFTConfig):
        raise TypeError(f"config must be a MEFTConfig, got {type(config).__name__}")
    _check_dtype(dtype)
    if is_meft_attached(model):
        raise ValueError(f"attach_meft: {type(model).__name__} already has MEFT adapters; "
                         "call detach_meft(model) first")
    layers_name, stack = find_decoder_layers(model)
    indices = check_layers(layers, len(stack))

    found = []
    for index in indices:
        path, mlp = find_mlp(stack[index])
        if isinstance(mlp, MEFTMLP):
            raise ValueError(f"attach_meft: layer {index} of {type(model).__name__} already "
                             "holds a MEFTMLP not registered with this model")
        found.append((index, path, mlp))

    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    slots = []
    runtime = None
    try:
        for index, path, mlp in found:
            hidden = mlp_hidden_size(mlp, model)
            device = _module_device(mlp, model)
            if config.placement == "cpu" and runtime is None:
                # One slot pool for every layer, in the model's compute dtype (the fp32 masters
                # stay on the CPU); layers register in forward order.
                runtime = OffloadRuntime(device, _module_dtype(mlp), hidden, transfer=config.transfer,
                                         keep_rows=config.backward_rows == "keep")
            adapter = MEFTAdapter(hidden, config, device=device,
                                  dtype=dtype if dtype is not None else _module_dtype(mlp),
                                  runtime=runtime)
            wrapper = MEFTMLP(mlp, adapter)
            parent, attr = _resolve_path(stack[index], path)
            setattr(parent, attr, wrapper)
            slots.append(_Slot(index, parent, attr, wrapper))
    except BaseException:
        for slot in slots:
            setattr(slot.parent, slot.attr, slot.wrapper.base)
        if runtime is not None:
            runtime.close()
        raise

    adapter_params = {id(p) for slot in slots for p in slot.wrapper.adapter.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in adapter_params)

    state = _MEFTState(config=config, layers_name=layers_name, slots=slots,
                       requires_grad=requires_grad)
    if input_require_grads:
        state.embed_hook = _register_input_grad_hook(model)
    model.__dict__[STATE_ATTR] = state
    return model


def _is_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has activation checkpointing on (newer name first)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _register_input_grad_hook(model: nn.Module) -> tuple[nn.Module, int] | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(embeddings, nn.Module):
        return None
    model_ref = weakref.ref(model)

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        owner = model_ref()
        if (owner is not None and isinstance(output, Tensor) and torch.is_grad_enabled()
                and output.is_floating_point() and not output.requires_grad
                and owner.training and _is_checkpointing(owner)):
            output.requires_grad_(True)

    handle = embeddings.register_forward_hook(hook)
    return embeddings, handle.id


def detach_meft(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_meft`: put the original MLP modules back, restore every parameter's
    previous ``requires_grad`` flag and remove the input-grad hook. Returns the model; the
    adapters are dropped (save them first). Placement "cpu": in-flight copies and optimizer
    updates finish first, then the copy engine, the slots and the optimizer threads are released
    (an optimizer created for these adapters cannot step any more)."""
    state = _state(model)
    if state is None:
        raise ValueError(f"detach_meft: {type(model).__name__} has no MEFT adapters attached")
    runtimes, failures = {}, []
    for slot in state.slots:
        rows = slot.wrapper.adapter.offload
        if rows is not None:
            runtimes[id(rows.runtime)] = rows.runtime
            try:
                rows.close()
            except Exception as exc:  # a failed background update: detach anyway, then report it
                failures.append((slot.layer, exc))
    for runtime in runtimes.values():
        runtime.close()
    for slot in state.slots:
        setattr(slot.parent, slot.attr, slot.wrapper.base)
    for param, flag in state.requires_grad:
        param.requires_grad_(flag)
    if state.embed_hook is not None:
        module, hook_id = state.embed_hook
        module._forward_hooks.pop(hook_id, None)
    del model.__dict__[STATE_ATTR]
    if failures:
        layer, exc = failures[0]
        raise RuntimeError(f"detach_meft: the model is detached, but layer {layer}'s last background "
                           f"work had failed ({len(failures)} layer(s)): {exc}") from exc
    return model


def meft_adapters(model: nn.Module) -> dict[int, MEFTAdapter]:
    """``{decoder layer index: adapter}`` in layer order; empty when none is attached."""
    state = _state(model)
    if state is None:
        return {}
    return {slot.layer: slot.wrapper.adapter for slot in state.slots}


def meft_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (router, keys, values of every adapted layer)."""
    return [p for adapter in meft_adapters(model).values() for p in adapter.parameters()]


def meft_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``("layers.{i}.{router.weight|keys|values}", parameter)`` pairs: the trainable
    parameters. Under placement "cpu" keys and values are not parameters (they live in the CPU
    row store): :func:`meft_state_tensors` has every tensor an adapter is made of."""
    return [(f"layers.{i}.{name}", p) for i, adapter in meft_adapters(model).items()
            for name, p in adapter.named_parameters()]


def meft_state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``{"layers.{i}.{router.weight|keys|values}": tensor}``: what :func:`save_adapter` writes.
    Under placement "gpu" the parameters; under placement "cpu" the router parameter and the
    fp32 master keys/values of the CPU row store (after any in-flight optimizer update)."""
    return {f"layers.{i}.{name}": t.detach() for i, adapter in meft_adapters(model).items()
            for name, t in adapter.state_dict(keep_vars=True).items()}


# --------------------------------------------------------------------------------------------
# Optimizer / Trainer
# --------------------------------------------------------------------------------------------


class OffloadedAdamW(torch.optim.AdamW):
    """One ``torch.optim.Optimizer`` for a model whose adapters have placement "cpu".

    The routers (device parameters) get a plain AdamW (no weight decay); each layer's keys and
    values get its row-sparse AdamW (:class:`meft_triton.optim.SparseRowAdamW`, lazy: only rows
    that fired move, with decoupled ``weight_decay``) on the CPU master. ``step()`` steps the
    routers, hands every layer's gradient rows to its sparse optimizer, clips them to
    ``max_grad_norm`` by their global norm across layers (the HF Trainer's own clipping sees
    only the routers' ``.grad``), and starts each layer's update on its worker thread with the
    learning rate of ``param_groups[0]`` (so LR schedulers drive both); a layer's next forward
    waits for its update. A layer with no gradient rows this step (frozen, e.g. left out by
    :class:`meft_triton.ist.ISTScheduler`) is skipped: no worker job, step count and moments
    unchanged. ``state_dict()`` holds the routers' state and every sparse optimizer's (moments
    and step count).

    Non-finite gradients (``nonfinite``, see :mod:`meft_triton.nonfinite`): before anything is
    updated, ``step()`` checks the routers' gradients and every layer's gradient rows; if any
    holds NaN/Inf the *whole* step is not applied (routers, every layer's master rows, moments
    and step counts untouched; the gradient rows dropped) and it raises
    :class:`~meft_triton.nonfinite.NonFiniteGradientError` (``"raise"``, default) or warns and
    returns (``"skip"``), naming the decoder layer (``layer_ids``, default 0, 1, ...), the part
    and the rows. ``nonfinite_steps`` counts such steps, ``last_nonfinite`` holds the report.
    """

    def __init__(self, adapters: Sequence[MEFTAdapter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_grad_norm: float | None = None, *,
                 nonfinite: str = "raise", layer_ids: Sequence[int] | None = None) -> None:
        self.adapters = list(adapters)
        if not self.adapters or any(a.offload is None for a in self.adapters):
            raise ValueError("OffloadedAdamW needs adapters with placement='cpu'")
        self.layer_ids = list(range(len(self.adapters)) if layer_ids is None else layer_ids)
        if len(self.layer_ids) != len(self.adapters):
            raise ValueError(f"layer_ids has {len(self.layer_ids)} entries for {len(self.adapters)} adapters")
        super().__init__([a.router.weight for a in self.adapters], lr=lr, betas=betas, eps=eps,
                         weight_decay=0.0)
        self.max_grad_norm = max_grad_norm
        self.nonfinite = check_nonfinite_mode(nonfinite)
        self.nonfinite_steps = 0
        self.last_nonfinite: tuple[NonFiniteRows, ...] | None = None
        self.sparse = [a.configure_optimizer(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                             nonfinite=nonfinite, name=layer)
                       for a, layer in zip(self.adapters, self.layer_ids)]

    def nonfinite_report(self) -> list[NonFiniteRows]:
        """Non-finite rows among the routers' ``.grad`` and the layers' collected gradient rows."""
        report = dense_report((layer, "router", a.router.weight.grad)
                              for layer, a in zip(self.layer_ids, self.adapters))
        for sparse in self.sparse:
            report += sparse.nonfinite_report()
        return report

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            for adapter in self.adapters:
                adapter.offload.collect_grads()
        except BaseException:
            # a failed gradient copy (CopyFailedError): the step is abandoned as a whole, with
            # no half-collected gradients left behind for the next one
            for adapter in self.adapters:
                adapter.offload.discard_grads()
            raise
        report = self.nonfinite_report()
        if report:
            for sparse in self.sparse:
                sparse.zero_grad()
            self.nonfinite_steps += 1
            self.last_nonfinite = tuple(report)
            act_on(report, self.nonfinite, "the optimizer step")
            return loss
        super().step()
        if self.max_grad_norm is not None:
            clip_grad_norm_(self.sparse, self.max_grad_norm)
        lr = self.param_groups[0]["lr"]
        for adapter, sparse in zip(self.adapters, self.sparse):
            sparse.lr = lr
            if sparse.pending_rows == 0:
                # No gradient rows (a frozen layer, e.g. not chosen by IST this step): no worker
                # job, and its step count and moments stay put (an empty SparseRowAdamW.step
                # would still advance t), as torch AdamW skips a parameter whose grad is None.
                continue
            adapter.sparse_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The routers' ``.grad`` as torch does, and every layer's gradient rows not yet stepped
        (so ``backward(); zero_grad()`` discards a batch, as it does under placement "gpu")."""
        super().zero_grad(set_to_none)
        for adapter in self.adapters:
            adapter.offload.discard_grads()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["meft_sparse"] = [sparse.state_dict() for sparse in self.sparse]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        sparse_states = state_dict.pop("meft_sparse", None)
        if sparse_states is None or len(sparse_states) != len(self.sparse):
            raise ValueError(f"the state has {0 if sparse_states is None else len(sparse_states)} "
                             f"sparse optimizer states, this model has {len(self.sparse)} offloaded layers")
        super().load_state_dict(state_dict)
        for adapter, sparse, state in zip(self.adapters, self.sparse, sparse_states):
            adapter.offload.wait_for_update()
            sparse.load_state_dict(state)


def create_meft_optimizer(
    model: nn.Module,
    args: Any = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    kind: str = "auto",
    nonfinite: str = "raise",
) -> torch.optim.Optimizer:
    """An optimizer over the adapter parameters only, for a custom loop or the HF Trainer::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          optimizers=(create_meft_optimizer(model, args), None))

    ``args`` (a ``transformers.TrainingArguments``, optional) supplies ``learning_rate``,
    ``weight_decay``, ``adam_beta1/2``, ``adam_epsilon`` and ``max_grad_norm``;
    ``lr``/``weight_decay`` override. With ``optimizers=(opt, None)`` the Trainer builds its LR
    schedule over this optimizer, accumulates gradients over ``gradient_accumulation_steps``
    micro-batches (the loss is scaled by 1/steps, so gradients hold the mean), clips with
    ``max_grad_norm`` over the parameters with ``.grad`` and then calls ``step()`` and
    ``zero_grad()``.

    ``kind``: ``"adamw"`` (:class:`meft_triton.nonfinite.MEFTAdamW`, a ``torch.optim.AdamW``
    over the adapter parameters that checks for non-finite gradients, placement "gpu"),
    ``"sparse"`` (:class:`OffloadedAdamW`, placement "cpu": routers by AdamW, keys and values by
    the row-sparse CPU AdamW, which clips its rows to ``max_grad_norm`` itself), or ``"auto"``
    (the one the adapters' placement needs).

    ``nonfinite``: ``"raise"`` (default) or ``"skip"``, what a step does when a gradient holds
    NaN/Inf: either way nothing is written (see :mod:`meft_triton.nonfinite`); both kinds check
    every adapter gradient before updating and name the layer, part and rows.
    """
    check_nonfinite_mode(nonfinite)
    params = meft_named_parameters(model)
    adapters = list(meft_adapters(model).values())
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
    if kind == "sparse":
        return OffloadedAdamW(adapters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              max_grad_norm=getattr(args, "max_grad_norm", None) or None,
                              nonfinite=nonfinite, layer_ids=list(meft_adapters(model)))
    decay = [p for n, p in params if not n.endswith("router.weight")]
    no_decay = [p for n, p in params if n.endswith("router.weight")]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return MEFTAdamW(groups, lr=lr, betas=betas, eps=eps, nonfinite=nonfinite,
                     param_names={id(p): n for n, p in params})


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def _tensor_digest(metadata: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """sha256 over the header metadata (minus the digest itself) and every tensor's name,
    dtype, shape and bytes: makes the weights file verifiable on its own."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "digest"},
                        sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hidden_size_of(adapters: dict[int, MEFTAdapter]) -> int | list[int]:
    sizes = [a.hidden_size for a in adapters.values()]
    return sizes[0] if len(set(sizes)) == 1 else sizes


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the model's adapters to directory ``path`` (created if missing); returns it.

    Writes ``adapter.safetensors`` (tensors ``layers.{i}.router.weight|keys|values`` in the
    adapters' dtype, under placement "cpu" the fp32 master keys/values of the CPU row store,
    after any in-flight optimizer update; its header metadata repeats the config, layers and hidden size plus a
    sha256 digest of metadata and tensors, so the file verifies on its own) and
    ``meft_config.json`` (format version, MEFTConfig, layers, hidden size, dtype and the sha256
    of the whole weights file).

    Atomic: both files are written to temp files in ``path``, fsynced, then moved into place
    with ``os.replace`` (weights first: that rename is the commit point). A save interrupted
    before it leaves the previous adapter untouched; one interrupted between the two renames
    leaves the new, complete weights file with a stale JSON, which :func:`load_adapter`
    detects (checksum), verifies through the file's own digest and loads with a warning. Either
    way a load sees a whole adapter, never a mix. Temp files are removed on errors; a hard kill
    can leave ``.*.tmp`` files behind, which loading ignores.
    """
    from safetensors.torch import save_file

    state = _state(model)
    adapters = meft_adapters(model)
    if state is None or not adapters:
        raise ValueError(f"save_adapter: {type(model).__name__} has no MEFT adapters attached")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_adapter: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    tensors = {name: t.to("cpu").contiguous().clone()
               for name, t in meft_state_tensors(model).items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    info: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meft_config": state.config.to_dict(),
        "layers": list(adapters),
        "hidden_size": _hidden_size_of(adapters),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "model_class": type(model).__name__,
        "name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
    }
    metadata = {"meft": json.dumps(info, sort_keys=True)}
    metadata["digest"] = _tensor_digest(metadata, tensors)

    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_weights = directory / f".{WEIGHTS_NAME}.{token}.tmp"
    tmp_config = directory / f".{CONFIG_NAME}.{token}.tmp"
    try:
        save_file(tensors, str(tmp_weights), metadata=metadata)
        _fsync_file(tmp_weights)
        info["weights_file"] = WEIGHTS_NAME
        info["weights_bytes"] = tmp_weights.stat().st_size
        info["weights_sha256"] = _file_sha256(tmp_weights)
        info["weights_digest"] = metadata["digest"]
        with open(tmp_config, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_weights, directory / WEIGHTS_NAME)  # commit point
        os.replace(tmp_config, directory / CONFIG_NAME)
        _fsync_dir(directory)
    finally:
        for tmp in (tmp_weights, tmp_config):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    return directory


def _read_weights(weights: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors = {}
        with safe_open(str(weights), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"load_adapter: {weights} is truncated or corrupt "
                         f"(safetensors could not read it: {exc})") from exc
    return tensors, metadata


def _read_info(config_path: Path) -> dict[str, Any] | None:
    if not config_path.exists():
        return None
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapter: {config_path} is truncated or corrupt: {exc}") from exc
    if not isinstance(info, dict):
        raise ValueError(f"load_adapter: {config_path} does not hold a JSON object")
    return info


def _check_format(info: dict[str, Any], where: Path) -> None:
    if info.get("format") != FORMAT_NAME:
        raise ValueError(f"load_adapter: {where} is not a meft-triton adapter "
                         f"(format {info.get('format')!r}, expected {FORMAT_NAME!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"load_adapter: {where} has format_version {version!r}; this "
                         f"meft-triton reads versions 1..{FORMAT_VERSION}")


def saved_config(info: dict[str, Any], caller: str, path: Any) -> tuple[MEFTConfig, list[int]]:
    """The MEFTConfig and layer indices recorded by :func:`save_adapter`."""
    try:
        return MEFTConfig.from_dict(info["meft_config"]), [int(i) for i in info["layers"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{caller}: {path} holds an invalid MEFT config: {exc}") from exc


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a saved adapter directory without touching a model.

    Returns ``(info, tensors)``. Raises ``FileNotFoundError`` for a missing directory or weights
    file and ``ValueError`` for a truncated or corrupt file (size/checksum/digest mismatch, bad
    header) or an unknown format version."""
    directory = Path(path)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {directory}")
    info = _read_info(directory / CONFIG_NAME)
    if info is not None:
        _check_format(info, directory / CONFIG_NAME)
    trusted = (info is not None and weights.stat().st_size == info.get("weights_bytes")
               and _file_sha256(weights) == info.get("weights_sha256"))
    tensors, metadata = _read_weights(weights)
    try:
        header_info = json.loads(metadata["meft"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"load_adapter: {weights} is truncated or corrupt "
                         "(no valid 'meft' header metadata)") from exc
    if not trusted:
        digest = metadata.get("digest")
        if digest is None or _tensor_digest(metadata, tensors) != digest:
            raise ValueError(
                f"load_adapter: {weights} is truncated or corrupt: its sha256/size does not match "
                f"{CONFIG_NAME} and its own digest does not match its contents")
        if info is not None:
            warnings.warn(
                f"load_adapter: {directory / CONFIG_NAME} does not describe {weights} (a save "
                "interrupted after the weights were committed?); the weights file passed its own "
                "checksum, loading it with the config stored in its header", stacklevel=3)
        _check_format(header_info, weights)
        info = header_info
    return info, tensors


def _same_compute_config(a: MEFTConfig, b: MEFTConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in COMPUTE_FIELDS)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    attach: bool = True,
    input_require_grads: bool = True,
) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` into ``model``; returns the model.

    If the model has no adapters and ``attach`` is true (the default), they are first attached
    with :func:`attach_meft` using the saved config, layers and dtype (backbone frozen). If it
    already has adapters, the saved config must match theirs in every field that changes the
    computation (``num_neurons``, ``num_experts``, ``experts_per_token``, ``topk``, ``gate``;
    ``backend`` and the init settings may differ), the saved layers must equal the attached
    layers, and every tensor's shape and dtype must equal the parameter's. Any mismatch, a
    missing/extra tensor, or a truncated/corrupt file raises ``ValueError`` naming what
    differs, and the model's adapters are left unchanged (adapters attached by this call are
    detached again). Values are copied into the existing
    parameters in place (optimizers holding them stay valid).
    """
    info, tensors = read_adapter(path)
    config, saved_layers = saved_config(info, "load_adapter", path)

    attached_here = False
    if not is_meft_attached(model):
        if not attach:
            raise ValueError(f"load_adapter: {type(model).__name__} has no MEFT adapters and "
                             "attach=False")
        # the routers' dtype (placement "cpu" keeps fp32 master keys/values whatever it is)
        dtypes = {t.dtype for name, t in tensors.items() if name.endswith("router.weight")}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        attach_meft(model, config, saved_layers, dtype=dtype,
                    input_require_grads=input_require_grads)
        attached_here = True
    try:
        _check_and_copy(model, config, saved_layers, tensors)
    except BaseException:
        if attached_here:
            detach_meft(model)
        raise
    return model


def _check_and_copy(model: nn.Module, config: MEFTConfig, saved_layers: list[int],
                    tensors: dict[str, Tensor]) -> None:
    state = _state(model)
    adapters = meft_adapters(model)

    if list(adapters) != saved_layers:
        raise ValueError(f"load_adapter: the file holds adapters for layers {saved_layers} but "
                         f"the model has them on layers {list(adapters)}")
    if not _same_compute_config(config, state.config):
        diff = {f: (getattr(config, f), getattr(state.config, f)) for f in COMPUTE_FIELDS
                if getattr(config, f) != getattr(state.config, f)}
        raise ValueError("load_adapter: saved MEFTConfig differs from the attached one "
                         + ", ".join(f"{k}: saved {a!r} vs model {b!r}" for k, (a, b) in diff.items()))
    params = meft_state_tensors(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"load_adapter: tensor names differ: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, param in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"load_adapter: {name} has shape {tuple(t.shape)} in the file but "
                             f"{tuple(param.shape)} in the model (hidden size or config differs)")
        if t.dtype != param.dtype:
            raise ValueError(f"load_adapter: {name} is {t.dtype} in the file but {param.dtype} in "
                             "the model; attach with attach_meft(..., dtype=...) to match")
    with torch.no_grad():
        for i, adapter in adapters.items():
            # in place; placement "cpu" copies into the row store and refreshes its key cache
            prefix = f"layers.{i}."
            adapter.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


__all__ = [
    "MEFTMLP",
    "attach_meft",
    "check_layers",
    "create_meft_optimizer",
    "detach_meft",
    "find_decoder_layers",
    "find_mlp",
    "is_meft_attached",
    "load_adapter",
    "meft_adapters",
    "meft_named_parameters",
    "meft_parameters",
    "meft_state_tensors",
    "read_adapter",
    "save_adapter",
]
