"""MEFTTunerLayer: a MEFT adapter that peft recognises as one of its tuner layers.

peft decides what belongs to an adapter *structurally*: everything held by a ``BaseTunerLayer``
counts as adapter state. Being one is what makes peft

* keep MEFT trainable when a LoRA is added on top (``get_peft_model`` freezes every parameter
  that no tuner layer holds, and restores the flags of existing ones),
* save MEFT's weights with the ``PeftModel`` (``save_pretrained``, the Trainer's adapter-only
  checkpoints) and load them back (``load_adapter``, ``resume_from_checkpoint``),
* skip MEFT's modules when it looks for modules to wrap (``target_modules="all-linear"``),
* switch MEFT off inside ``with peft_model.disable_adapter():``.

It is the same layer as :class:`~meft_triton.layer.adapter.MEFTAdapter` (same parameters, state
dict and computation); :func:`~meft_triton.integration.attach.attach_meft` builds its adapters
from this class where peft is installed (see ``default_adapter_class``).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from ..layer.adapter import MEFTAdapter


class RowStoreEntry(nn.Module):
    """Placement "cpu": an empty child named ``keys`` / ``values`` standing for the state-dict
    entry of that name, which comes from the CPU row store (not a parameter or buffer: those
    would move to the device with the model). peft finds an adapter's state by the names of its
    tuner layers' children, parameters and buffers; this name is how a LoRA ``PeftModel``'s
    ``save_pretrained`` and ``load_adapter`` include MEFT's master rows."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def extra_repr(self) -> str:
        return f"the CPU row store's {self.name}"


class DisabledRouting:
    """What :meth:`MEFTTunerLayer.start_routing` returns while the adapter is disabled."""

    def __init__(self, hidden: Tensor) -> None:
        self.hidden = hidden


class MEFTTunerLayer(MEFTAdapter, BaseTunerLayer):
    """:class:`MEFTAdapter` as a peft tuner layer. Its adapter state is the whole module (MEFT
    holds one adapter per layer: no per-adapter-name dictionaries), and while peft disables
    adapters it adds zero (the FFN's output is left bitwise unchanged)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.offload is not None:
            for name in ("keys", "values"):
                self.add_module(name, RowStoreEntry(name))

    @property
    def weight(self) -> Tensor:
        # BaseTunerLayer.weight reads the wrapped base layer's weight; MEFT wraps nothing, and
        # that property would recurse: there is no ``weight`` (hasattr gives False)
        raise AttributeError(f"{type(self).__name__} has no 'weight': its parameters are router.weight, "
                             "keys, values (and low_key.weight)")

    @property
    def bias(self) -> Tensor:
        raise AttributeError(f"{type(self).__name__} has no 'bias'")

    def merge(self, safe_merge: bool = False, adapter_names: Any = None) -> None:
        raise ValueError("MEFT adapters cannot be merged into the backbone's weights (a sparse key-value "
                         "memory is not a weight delta); keep them attached or save them with save_pretrained")

    def unmerge(self) -> None:
        raise ValueError("MEFT adapters are never merged, so there is nothing to unmerge")

    def forward(self, hidden: Tensor) -> Tensor:
        if self.disable_adapters:
            return torch.zeros_like(hidden)
        return super().forward(hidden)

    def start_routing(self, hidden: Tensor):
        if self.disable_adapters:
            return DisabledRouting(hidden)
        return super().start_routing(hidden)

    def finish_values(self, routed) -> Tensor:
        if isinstance(routed, DisabledRouting):
            return torch.zeros_like(routed.hidden)
        return super().finish_values(routed)

    def abandon_routing(self, routed) -> None:
        if not isinstance(routed, DisabledRouting):
            super().abandon_routing(routed)


__all__ = ["DisabledRouting", "MEFTTunerLayer", "RowStoreEntry"]
