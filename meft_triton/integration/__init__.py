"""Hugging Face transformers integration: find a model's FFNs, wrap each with a MEFT adapter
(:class:`MEFTMLP`), attach and detach."""

from .attach import (attach_meft, attached_state, detach_meft, is_meft_attached, meft_adapters,
                     meft_named_parameters, meft_parameters, meft_state_tensors)
from .discovery import find_decoder_layers, find_mlp
from .wrapper import MEFTMLP

__all__ = ["MEFTMLP", "attach_meft", "attached_state", "detach_meft", "find_decoder_layers", "find_mlp",
           "is_meft_attached", "meft_adapters", "meft_named_parameters", "meft_parameters", "meft_state_tensors"]
