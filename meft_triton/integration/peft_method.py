"""MEFT as a peft method: :class:`MEFTPeftConfig` and the tuner :class:`MEFTModel`, registered
with ``peft.utils.register_peft_method`` under the name ``"meft"``.

Typical use::

    from peft import PeftModel, get_peft_model
    from meft_triton import MEFTPeftConfig

    model = get_peft_model(model, MEFTPeftConfig(num_neurons=8192, num_experts=128))
    ...train (HF Trainer: optimizers=(create_meft_optimizer(model, args), None))...
    model.save_pretrained("out/meft")          # adapter_model.safetensors + adapter_config.json
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), "out/meft")

The tuner attaches through the same machinery as :func:`~meft_triton.integration.attach.attach_meft`
(hooks beside each FFN, backbone keys unchanged); the adapters are
:class:`~meft_triton.integration.peft_layer.MEFTTunerLayer` s.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType, register_peft_method
from torch import Tensor, nn

from ..config import MEFTConfig
from ..layer.adapter import MEFTAdapter
from .attach import attach_adapters, attached_state, detach_meft, meft_adapters
from .discovery import check_target
from .identity import check_same_backbone, model_identity
from .peft_layer import MEFTTunerLayer

METHOD_NAME = "meft"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MEFTPeftSettings(PeftConfig):
    """Where and how :class:`MEFTPeftConfig` attaches; its other fields are MEFTConfig's."""

    layers: Union[str, list[int]] = "all"
    target: Union[str, list[str], dict[str, str], None] = None
    dtype: Optional[str] = "float32"
    input_require_grads: bool = True
    backbone: Optional[dict[str, Any]] = field(default=None, metadata={"help": "set when attached"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = meft_peft_type()
        self.meft_config()  # MEFTConfig's checks, naming the field
        if isinstance(self.layers, (tuple, range)):
            self.layers = list(self.layers)  # JSON-storable; checked against the model's layers on attach
        if isinstance(self.target, tuple):
            self.target = list(self.target)
        check_target(self.target)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}")
        if not isinstance(self.input_require_grads, bool):
            raise TypeError(f"input_require_grads must be a bool, got {type(self.input_require_grads).__name__}")

    def meft_config(self) -> MEFTConfig:
        """The :class:`MEFTConfig` these fields describe."""
        return MEFTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MEFTConfig)})


def _meft_config_field(f: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
    if f.default is dataclasses.MISSING:
        return f.name, f.type, field(default_factory=f.default_factory)
    return f.name, f.type, field(default=f.default)


# MEFTConfig's fields are taken from MEFTConfig itself, so the two cannot drift apart
MEFTPeftConfig = dataclasses.make_dataclass(
    "MEFTPeftConfig", [_meft_config_field(f) for f in dataclasses.fields(MEFTConfig)],
    bases=(MEFTPeftSettings,), namespace={"__doc__": """MEFT's settings as a peft
    config: ``get_peft_model(model, MEFTPeftConfig(num_neurons=..., ...))``.

    Every :class:`~meft_triton.config.MEFTConfig` field (same names, defaults and checks), and:
    ``layers`` (``"all"`` or decoder layer indices), ``target`` (where each layer's FFN reads its
    input and adds its output, like ``attach_meft``'s: None finds it by structure), ``dtype``
    (the adapter parameters' dtype as a name: ``"float32"`` masters by default, ``None`` the
    FFN's own) and ``input_require_grads``, which mean what they mean for ``attach_meft``.
    ``backbone`` is filled in when the adapter is attached (class, ``model_type``, layer count):
    loading the saved adapter into another architecture or layer count raises ``ValueError``.
    """})
MEFTPeftConfig.__module__ = __name__  # (make_dataclass takes module= only from Python 3.12)


class MEFTModel(BaseTuner):
    """The peft tuner of MEFT: attaches a :class:`MEFTTunerLayer` beside each chosen FFN.

    One MEFT adapter per model (its weights carry no adapter name); a second raises
    ``ValueError``. peft's merging does not apply (``merge_and_unload`` raises); ``unload()`` and
    ``delete_adapter`` detach it. ``with peft_model.disable_adapter():`` turns it off.
    """

    prefix: str = f"{METHOD_NAME}_"
    tuner_layer_cls = MEFTTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, Tensor]] = None) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, MEFTPeftConfig):
            raise TypeError(f"MEFTModel takes a MEFTPeftConfig, got {type(config).__name__}")
        if attached_state(model) is not None:
            raise ValueError(f"{type(model).__name__} already has MEFT adapters (one MEFT adapter per model); "
                             f"cannot add {adapter_name!r}")
        if config.backbone is not None:
            try:
                check_same_backbone(config.backbone, model, "MEFTModel")
            except ValueError as exc:
                raise ValueError(f"{exc} (the config's 'backbone' records the model it was first attached "
                                 "to; for another model pass a new MEFTPeftConfig)") from None
        attach_adapters(model, config.meft_config(), config.layers, target=config.target,
                        dtype=None if config.dtype is None else DTYPES[config.dtype],
                        input_require_grads=config.input_require_grads, adapter_class=MEFTTunerLayer)
        if config.backbone is None:
            config.backbone = model_identity(model)
        if config.inference_mode:
            for adapter in meft_adapters(model).values():
                adapter.requires_grad_(False)
        names = {id(m): n for n, m in model.named_modules()}
        self.targeted_module_names.extend(names[id(a)] for a in meft_adapters(model).values())

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("MEFTModel attaches whole layers through inject_adapter, not module by module")

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False, adapter_names: Any = None) -> nn.Module:
        if merge:
            raise ValueError("MEFT adapters cannot be merged into the backbone's weights (a sparse key-value "
                             "memory is not a weight delta); use unload() to remove them")
        if attached_state(self.model) is not None:
            detach_meft(self.model)
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        detach_meft(self.model)
        del self.peft_config[adapter_name]
        self.active_adapter = []

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                state_dict: dict[str, Tensor], unwanted_adapter_names: list[str]) -> dict[str, Tensor]:
        # every entry under a MEFT adapter, the CPU row store's master rows included (under
        # placement "cpu" keys and values are state-dict entries, not parameters)
        prefixes = tuple(f"{name}." for name, _ in adapter_modules(model))
        return {key: value for key, value in state_dict.items() if key.startswith(prefixes)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # MEFT's keys hold no adapter name (one MEFT adapter per model)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                           state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        # load_state_dict(strict=False) would leave a missing tensor at its random start, and peft
        # reports only keys holding its prefix: check the file against the model first
        expected = adapter_entry_names(model)
        if not any(key.startswith("base_model.model.") for key in expected):
            state_dict = {key.removeprefix("base_model.model."): value for key, value in state_dict.items()}
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"the MEFT adapter file does not fit the model: missing {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                             f"{' ...' if len(unexpected) > 4 else ''}")
        return state_dict


def adapter_modules(model: nn.Module) -> list[tuple[str, MEFTAdapter]]:
    """``(state-dict prefix, adapter)`` of every MEFT adapter in ``model`` (FSDP's wrapper prefix
    dropped, as peft drops it from the state dict)."""
    return [(name.removeprefix("_fsdp_wrapped_module."), module) for name, module in model.named_modules()
            if isinstance(module, MEFTAdapter)]


def adapter_entry_names(model: nn.Module) -> set[str]:
    """The state-dict keys of every MEFT adapter in ``model``, without building the state dict
    (under placement "cpu" that would copy every layer's master rows)."""
    names = set()
    for prefix, adapter in adapter_modules(model):
        names.update(f"{prefix}.{name}" for name, _ in adapter.named_parameters())
        names.update(f"{prefix}.{name}" for name, _ in adapter.named_buffers())
        if adapter.offload is not None:
            names.update((f"{prefix}.keys", f"{prefix}.values"))
    return names


def meft_peft_type() -> PeftType:
    """``PeftType.MEFT``, added to peft's enum when it lacks it.

    ``register_peft_method`` accepts only names already in ``PeftType`` (peft's own methods list
    theirs there). Adding one member the way ``enum`` itself defines members (name, value, the
    three lookup tables) is the smallest change that lets the documented registration run and
    every ``PeftType(...)`` / ``PeftType.MEFT`` / ``.value`` use in peft and transformers work;
    nothing else of peft is changed. A peft that ships its own ``MEFT`` member is used as is.
    """
    name = METHOD_NAME.upper()
    if name not in PeftType.__members__:
        member = str.__new__(PeftType, name)
        member._name_, member._value_ = name, name
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
        PeftType._member_names_.append(name)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
    member = PeftType[name]
    if not isinstance(member, enum.Enum) or member.value != name:
        raise RuntimeError(f"peft's PeftType.{name} is {member!r}, not the value {name!r} MEFT registers under")
    return member


def register() -> None:
    """Register MEFT with peft (idempotent): ``get_peft_model``, ``PeftConfig.from_pretrained``
    and ``PeftModel.from_pretrained`` then know ``peft_type: "MEFT"``. Raises ``RuntimeError``
    if peft already has another method of that name."""
    peft_type = meft_peft_type()
    config_cls, tuner_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type), PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if config_cls is MEFTPeftConfig and tuner_cls is MEFTModel:
        return
    if config_cls is None and tuner_cls is None:
        register_peft_method(name=METHOD_NAME, config_cls=MEFTPeftConfig, model_cls=MEFTModel)
        return
    if getattr(config_cls, "__module__", None) == __name__ and getattr(tuner_cls, "__module__", None) == __name__:
        # this module imported again (importlib.reload): its new classes replace the old ones
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type], PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = MEFTPeftConfig, MEFTModel
        return
    raise RuntimeError(f"peft already has a method registered as {peft_type.value!r} "
                       f"({getattr(config_cls, '__qualname__', config_cls)}); meft-triton cannot register its own")


register()

__all__ = ["MEFTModel", "MEFTPeftConfig", "MEFTPeftSettings", "adapter_entry_names", "adapter_modules",
           "meft_peft_type", "register"]
