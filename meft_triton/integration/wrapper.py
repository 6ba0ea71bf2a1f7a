"""AttachedFFN: a MEFT adapter beside one FFN, attached in place by hooks, run in two stages.

The backbone's modules are not replaced: the adapter is registered as a child ``adapter`` of
the module whose output it adds to, so every backbone parameter keeps its name in
``state_dict()`` / ``save_pretrained`` (a saved adapted model reloads as the plain backbone
with ``from_pretrained``) and the adapters sit under their own prefix."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..layer.adapter import MEFTAdapter
from .discovery import FFNSite

ADAPTER_NAME = "adapter"


class AttachedFFN:
    """One layer's FFN with a MEFT adapter beside it: the output module's output becomes
    ``output + adapter(h)``, h being the input module's input (the first positional argument,
    or ``hidden_states``/``x``). The adapter's output is cast to the output's dtype before the
    add, so a zero adapter leaves the output bitwise unchanged. Outputs that are tuples (MoE
    blocks: ``(hidden, router_logits)``) get the adapter added to the first element.

    The adapter runs in two stages around the backbone FFN, so that placement "cpu" can overlap
    its host->device value-row copy with the FFN:

    * :meth:`start_adapter`, a forward pre-hook on the input module. Under placement "cpu" it
      runs the router and key scoring and launches the copy of the selected value rows.
    * :meth:`finish_adapter`, a forward hook on the output module. Under placement "cpu" it
      waits on the copy's event and runs the value stage.

    Under placement "gpu" ``start_adapter`` hands the input through and ``finish_adapter``
    computes the whole adapter. A forward hook on the layer that always runs (exceptions
    included) gives back what an FFN that raised between the two stages left pending.
    """

    def __init__(self, layer: nn.Module, site: FFNSite, adapter: MEFTAdapter) -> None:
        self.layer, self.site, self.adapter = layer, site, adapter
        self.input_module = layer.get_submodule(site.input_path)
        self.output_module = layer.get_submodule(site.output_path)
        self._pending: list[Any] = []
        self._handles: list[Any] = []

    def install(self) -> None:
        owner = self.output_module
        if ADAPTER_NAME in owner._modules or hasattr(owner, ADAPTER_NAME):
            raise ValueError(f"attach_meft: {type(owner).__name__} at {self.site.output_path!r} already "
                             f"has an attribute {ADAPTER_NAME!r}")
        owner.add_module(ADAPTER_NAME, self.adapter)
        self._handles = [
            self.input_module.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.output_module.register_forward_hook(self._post_hook),
            self.layer.register_forward_hook(self._layer_hook, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._abandon_pending()
        if self.output_module._modules.get(ADAPTER_NAME) is self.adapter:
            del self.output_module._modules[ADAPTER_NAME]

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

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending.append(self.start_adapter(mlp_input(args, kwargs)))

    def _post_hook(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if not self._pending:
            return None  # the output module ran on its own (no FFN input was read): leave it
        pending = self._pending.pop()
        if isinstance(out, Tensor):
            return out + self.finish_adapter(pending).to(out.dtype)
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            return (out[0] + self.finish_adapter(pending).to(out[0].dtype), *out[1:])
        self.cancel_adapter(pending)
        raise TypeError(
            f"attach_meft: {type(module).__name__} at {self.site.output_path!r} returned "
            f"{type(out).__name__}; expected a tensor or a tuple whose first element is a tensor")

    def _layer_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        self._abandon_pending()

    def _abandon_pending(self) -> None:
        while self._pending:
            self.cancel_adapter(self._pending.pop())


def mlp_input(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states an FFN was called with."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("hidden_states", "x", "hidden_state", "input", "inputs"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    raise TypeError("attach_meft: could not find the FFN's input tensor (first positional argument, "
                    "or keyword hidden_states / x)")
