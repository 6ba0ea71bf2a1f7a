"""MEFTMLP: a transformers FFN with a MEFT adapter beside it, run in two stages around the FFN."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..layer.adapter import MEFTAdapter


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
