"""Hugging Face transformers integration: attach MEFT adapters beside every FFN, train, save, load.

Typical use::

    model = AutoModelForCausalLM.from_pretrained(path)
    attach_meft(model, MEFTConfig(num_neurons=8192, num_experts=128))   # backbone frozen
    ...train meft_parameters(model) (or HF Trainer with create_meft_optimizer)...
    save_adapter(model, "out/adapter")
    load_adapter(AutoModelForCausalLM.from_pretrained(path), "out/adapter")  # attaches, then loads

"""

from __future__ import annotations

import importlib.util
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import MEFTConfig
from ..layer.adapter import MEFTAdapter
from ..offload.runtime import OffloadRuntime
from .discovery import FFNSite, check_target, find_decoder_layers, find_site, mlp_hidden_size, module_device, module_dtype
from .guard import guard_router, unguard_router
from .wrapper import AttachedFFN

# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    layer: int
    ffn: AttachedFFN


@dataclass
class _MEFTState:
    config: MEFTConfig
    layers_name: str
    num_layers: int
    target: FFNSite | None
    slots: list[_Slot]
    requires_grad: list[tuple[nn.Parameter, bool]]
    embed_hook: tuple[nn.Module, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


STATE_ATTR = "_meft_state"


def meft_owner(model: nn.Module) -> nn.Module | None:
    """The module :func:`attach_meft` was called on: ``model`` itself or, when MEFT was attached
    before wrapping (a peft ``PeftModel`` around it), the first submodule holding adapters."""
    if STATE_ATTR in model.__dict__:
        return model
    return next((m for m in model.modules() if STATE_ATTR in m.__dict__), None)


def attached_state(model: nn.Module) -> _MEFTState | None:
    owner = meft_owner(model)
    return None if owner is None else owner.__dict__[STATE_ATTR]


def is_meft_attached(model: nn.Module) -> bool:
    return attached_state(model) is not None


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


def attach_meft(
    model: nn.Module,
    config: MEFTConfig,
    layers: str | Sequence[int] = "all",
    *,
    target: str | Sequence[str] | Mapping[str, str] | None = None,
    dtype: torch.dtype | None = torch.float32,
    input_require_grads: bool = True,
) -> nn.Module:
    """Put a MEFT adapter beside the FFN of each chosen layer and freeze the backbone.

    Args:
        model: a transformers model (any ``nn.Module`` with a ModuleList of layers), or a peft
            ``PeftModel`` around one.
        config: the adapters' :class:`MEFTConfig` (the same for every layer).
        layers: ``"all"`` or a list of distinct layer indices.
        target: where each layer's FFN reads its input and where its output is added, as paths
            inside one layer (like peft's ``target_modules``): ``None`` finds them by structure
            (:mod:`~meft_triton.integration.discovery`), ``"mlp"`` one module that does both,
            ``("fc1", "fc2")`` or ``{"input": "fc1", "output": "fc2"}`` two modules.
        dtype: the adapter parameters' dtype. Default float32: an fp32 master that the adapter
            casts to the input's dtype at compute time (bf16/fp16 models, autocast). ``None``:
            the FFN's own parameter dtype.
        input_require_grads: while the model is gradient-checkpointing, make the input
            embeddings' output require grad, so reentrant checkpointing (whose segment inputs
            must require grad) still reaches the adapters behind a frozen embedding. Costs
            nothing without checkpointing.

    Returns the same model, modified in place: no backbone module is replaced (hooks run the
    adapter), so ``state_dict()``/``save_pretrained`` keep the backbone's own key names and the
    adapters appear as ``<FFN output module>.adapter.*``. Adapters are created on each FFN's
    device; later ``model.to(device)`` moves them along, but
    ``model.to(dtype)``/``model.half()`` would also cast the fp32 masters, so cast the backbone
    before attaching. Every parameter other than the adapters gets ``requires_grad=False``,
    unless the model holds peft tuner layers (LoRA, ...): then peft has already chosen what
    trains and no flag is changed. The previous flags are remembered for :func:`detach_meft`.
    Where peft is installed the adapters of a transformers model are
    :class:`~meft_triton.integration.peft_layer.MEFTTunerLayer` s, which peft treats as its own:
    a LoRA added later with ``get_peft_model`` leaves them trainable, and the ``PeftModel``'s
    ``save_pretrained`` (the Trainer's checkpoints) saves and reloads them. Raises
    ``ValueError`` naming the model class (and the ``target`` to pass) when no layers with an
    FFN are found, and ``ValueError``/``TypeError`` for bad
    ``layers``/``target``/``config``/``dtype``; on any error the model is left unchanged.
    """
    return attach_adapters(model, config, layers, target=target, dtype=dtype,
                           input_require_grads=input_require_grads, adapter_class=default_adapter_class())


def default_adapter_class() -> type[MEFTAdapter]:
    """The class :func:`attach_meft` builds adapters from: where peft is installed and imported,
    or transformers is (importing peft then costs under a second),
    :class:`~meft_triton.integration.peft_layer.MEFTTunerLayer`, which peft counts as one of its
    tuner layers (so a LoRA added later keeps MEFT trainable and saves it with its own weights);
    else the plain :class:`MEFTAdapter` (peft alone would import transformers: seconds)."""
    if "peft" not in sys.modules and ("transformers.modeling_utils" not in sys.modules
                                      or importlib.util.find_spec("peft") is None):
        return MEFTAdapter
    from .peft_layer import MEFTTunerLayer

    return MEFTTunerLayer


def attach_adapters(
    model: nn.Module,
    config: MEFTConfig,
    layers: str | Sequence[int],
    *,
    target: str | Sequence[str] | Mapping[str, str] | None,
    dtype: torch.dtype | None,
    input_require_grads: bool,
    adapter_class: type[MEFTAdapter],
) -> nn.Module:
    """:func:`attach_meft` with adapters of ``adapter_class`` (a :class:`MEFTAdapter` subclass):
    the machinery shared with the peft method (:mod:`~meft_triton.integration.peft_method`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, MEFTConfig):
        raise TypeError(f"config must be a MEFTConfig, got {type(config).__name__}")
    _check_dtype(dtype)
    site_spec = check_target(target)
    if is_meft_attached(model):
        raise ValueError(f"attach_meft: {type(model).__name__} already has MEFT adapters; "
                         "call detach_meft(model) first")
    layers_name, stack = find_decoder_layers(model, site_spec)
    indices = check_layers(layers, len(stack))

    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    keep_flags = _has_peft_layers(model)  # before the adapters, which may be peft tuner layers themselves
    slots: list[_Slot] = []
    runtime = None
    try:
        for index in indices:
            layer = stack[index]
            ffn_in = layer.get_submodule(find_site(layer, site_spec).input_path)
            hidden = mlp_hidden_size(ffn_in, model)
            device = module_device(ffn_in, model)
            if config.placement == "cpu" and runtime is None:
                # One slot pool for every layer, in the model's compute dtype (the fp32 masters
                # stay on the CPU); layers register in forward order.
                runtime = OffloadRuntime(device, module_dtype(ffn_in), hidden, transfer=config.transfer,
                                         keep_rows=config.backward_rows == "keep")
            adapter = adapter_class(hidden, config, device=device,
                                    dtype=dtype if dtype is not None else module_dtype(ffn_in),
                                    runtime=runtime)
            ffn = AttachedFFN(layer, find_site(layer, site_spec), adapter)
            ffn.install()
            slots.append(_Slot(index, ffn))
    except BaseException:
        for slot in slots:
            slot.ffn.remove()
        if runtime is not None:
            runtime.close()
        raise

    adapter_params = {id(p) for slot in slots for p in slot.ffn.adapter.parameters()}
    for param in model.parameters():
        if id(param) in adapter_params:
            param.requires_grad_(True)
        elif not keep_flags:
            param.requires_grad_(False)
    if config.placement == "cpu":
        for slot in slots:
            guard_router(slot.ffn.adapter)

    state = _MEFTState(config=config, layers_name=layers_name, num_layers=len(stack),
                       target=site_spec, slots=slots,
                       requires_grad=requires_grad)
    if input_require_grads:
        state.embed_hook = _register_input_grad_hook(model)
    model.__dict__[STATE_ATTR] = state
    return model


def _has_peft_layers(model: nn.Module) -> bool:
    """Whether peft has put tuner layers (LoRA, ...) into the model; peft not imported: no."""
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


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
    state = attached_state(model)
    if state is None:
        raise ValueError(f"detach_meft: {type(model).__name__} has no MEFT adapters attached")
    runtimes, failures = {}, []
    for slot in state.slots:
        unguard_router(slot.ffn.adapter)
        rows = slot.ffn.adapter.offload
        if rows is not None:
            runtimes[id(rows.runtime)] = rows.runtime
            try:
                rows.close()
            except Exception as exc:  # a failed background update: detach anyway, then report it
                failures.append((slot.layer, exc))
    for runtime in runtimes.values():
        runtime.close()
    for slot in state.slots:
        slot.ffn.remove()
    for param, flag in state.requires_grad:
        param.requires_grad_(flag)
    if state.embed_hook is not None:
        module, hook_id = state.embed_hook
        module._forward_hooks.pop(hook_id, None)
    del meft_owner(model).__dict__[STATE_ATTR]
    if failures:
        layer, exc = failures[0]
        raise RuntimeError(f"detach_meft: the model is detached, but layer {layer}'s last background "
                           f"work had failed ({len(failures)} layer(s)): {exc}") from exc
    return model


def meft_adapters(model: nn.Module) -> dict[int, MEFTAdapter]:
    """``{decoder layer index: adapter}`` in layer order; empty when none is attached."""
    state = attached_state(model)
    if state is None:
        return {}
    return {slot.layer: slot.ffn.adapter for slot in state.slots}


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
