"""Hugging Face transformers integration: find a model's FFNs, attach a MEFT adapter beside each
in place (:class:`AttachedFFN`), attach and detach."""

from .attach import (attach_meft, attached_state, detach_meft, is_meft_attached, meft_adapters,
                     meft_named_parameters, meft_owner, meft_parameters, meft_state_tensors)
from .discovery import FFNSite, find_decoder_layers, find_mlp, find_site
from .wrapper import AttachedFFN

__all__ = ["AttachedFFN", "FFNSite", "attach_meft", "attached_state", "detach_meft", "find_decoder_layers",
           "find_mlp", "find_site", "is_meft_attached", "meft_adapters", "meft_named_parameters", "meft_owner",
           "meft_parameters", "meft_state_tensors"]
