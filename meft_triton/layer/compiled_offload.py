"""Placement "cpu" under ``torch.compile``: the two-stage offloaded call as opaque custom ops.

The offloaded layer's host-side schedule (prefetcher tickets, slot locks, futures, rows whose
count is device data) is Python that Dynamo cannot trace. Three ``torch.library`` custom ops
hide it behind static shapes:

``meft_triton::offload_start``     (before the backbone FFN) ``OffloadedRows.start_routing``:
                                   route, select, start the value-row copy. Returns a token.
``meft_triton::offload_values``    (after the FFN) ``OffloadedRows.finish_values``: y [..., d].
``meft_triton::offload_backward``  the backward of ``offload_values``: d hidden, d router, d L.

The compiled graph passes integers, not objects: each adapter gets a layer handle when its
row store is attached (:func:`register_layer`), and each call an in-flight token that
``offload_start`` returns and the other two read. Both are CPU int64 scalar tensors, graph
inputs rather than constants Dynamo would guard on, so one compiled graph serves every adapter
of the same shapes (per-layer "regional" compilation compiles once, not once per layer).

The ops run the very ``OffloadedRows`` methods the eager path runs, so eager and compiled calls
share one schedule. The dispatcher runs a custom op's implementation with autograd excluded;
the ops switch it back on for the call (:func:`autograd_inside_op`), keep the autograd graph
``finish_values`` records (its backward ships the key/value gradient rows home) and run it in
``offload_backward``. A call whose token is dropped without a backward (an evaluation with
grad enabled, an exception between the stages) is given back then: its copy is cancelled and
its graph freed.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: adapter handle -> adapter (weakly: a dropped adapter leaves the registry)
LAYERS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
#: token -> the call between its stages (or between its forward and its backward)
CALLS: dict[int, "OffloadedCall"] = {}
NEXT_HANDLE = itertools.count(1)


@dataclass
class OffloadedCall:
    """One call of an offloaded layer between its ops."""

    adapter: Any
    hidden: Tensor          # the leaf the call's own autograd graph starts from
    routed: Any = None      # RoutedTokens until finish_values consumed them
    output: Tensor | None = None  # finish_values' y, with its autograd graph, until the backward


def register_layer(adapter) -> Tensor:
    """A handle the compiled graph can carry for ``adapter`` (a CPU int64 scalar; the registry
    holds the adapter weakly)."""
    handle = next(NEXT_HANDLE)
    LAYERS[handle] = adapter
    return torch.tensor(handle, dtype=torch.int64)


@contextmanager
def autograd_inside_op():
    """Undo the dispatcher's "below autograd" for the block: a custom op's implementation runs
    with autograd excluded, and the offloaded call records (and later runs) its own graph."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def _forget(token: int) -> None:
    """The token died: a call still between its stages gives its copy back; a call awaiting a
    backward that will never come frees its graph."""
    call = CALLS.pop(token, None)
    if call is not None and call.routed is not None:
        call.adapter.offload.abandon(call.routed)


@torch.library.custom_op("meft_triton::offload_start", mutates_args=())
def offload_start(hidden: Tensor, layer: Tensor, grad_enabled: bool, hidden_grad: bool) -> Tensor:
    """Stage 1 of adapter ``layer`` on ``hidden`` [..., d]; the token of the call (CPU int64)."""
    adapter = LAYERS[int(layer)]
    with autograd_inside_op(), torch.set_grad_enabled(grad_enabled):
        leaf = hidden.detach().requires_grad_(grad_enabled and hidden_grad)
        routed = adapter.offload.start_routing(leaf)
    key = next(NEXT_HANDLE)
    CALLS[key] = OffloadedCall(adapter, leaf, routed)
    token = torch.tensor(key, dtype=torch.int64)
    # not at interpreter exit: the runtime may be closed by then, and nothing is left to free
    weakref.finalize(token, _forget, key).atexit = False
    return token


@offload_start.register_fake
def _offload_start_fake(hidden, layer, grad_enabled, hidden_grad):
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("meft_triton::offload_values", mutates_args=())
def offload_values(hidden: Tensor, router_weight: Tensor, low_key_weight: Tensor | None, token: Tensor,
                   grad_enabled: bool) -> Tensor:
    """Stage 2: y [..., d] in ``hidden``'s dtype. ``hidden``, ``router_weight`` and
    ``low_key_weight`` are what y is differentiated in (the call reads the adapter's own)."""
    call = CALLS[int(token)]
    routed, call.routed = call.routed, None
    with autograd_inside_op(), torch.set_grad_enabled(grad_enabled):
        y = call.adapter.offload.finish_values(routed)
    if y.requires_grad:
        call.output = y
    else:
        CALLS.pop(int(token), None)
    return y.detach().contiguous()


@offload_values.register_fake
def _offload_values_fake(hidden, router_weight, low_key_weight, token, grad_enabled):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("meft_triton::offload_backward", mutates_args=())
def offload_backward(grad_y: Tensor, token: Tensor, hidden: Tensor, router_weight: Tensor,
                     low_key_weight: Tensor | None, wanted: list[bool]) -> list[Tensor]:
    """d hidden, d router_weight, d low_key_weight of the call ``token`` (``wanted[i]`` False:
    an empty tensor, not computed); its backward also sends the key/value gradient rows home."""
    call = CALLS.pop(int(token))
    adapter = call.adapter
    low_key = None if adapter.low_key is None else adapter.low_key.weight
    sources = [call.hidden, adapter.router.weight, low_key]
    inputs = [source for source, want in zip(sources, wanted) if want]
    with autograd_inside_op():
        grads = iter(torch.autograd.grad(call.output, inputs, grad_y, allow_unused=True) if inputs else ())
    out = []
    for like, want in zip((hidden, router_weight, low_key_weight), wanted):
        if not want:
            out.append(grad_y.new_empty(0))
            continue
        grad = next(grads)
        out.append(torch.zeros_like(like) if grad is None else grad.to(like.dtype).contiguous())
    return out


@offload_backward.register_fake
def _offload_backward_fake(grad_y, token, hidden, router_weight, low_key_weight, wanted):
    return [like.new_empty(like.shape) if want else grad_y.new_empty(0)
            for like, want in zip((hidden, router_weight, low_key_weight), wanted)]


def _setup_context(ctx, inputs, output):
    hidden, router_weight, low_key_weight, token, _ = inputs
    ctx.save_for_backward(token, hidden, router_weight, low_key_weight)


def _backward(ctx, grad_y):
    token, hidden, router_weight, low_key_weight = ctx.saved_tensors
    wanted = list(ctx.needs_input_grad[:3])
    grads = torch.ops.meft_triton.offload_backward(grad_y.contiguous(), token, hidden, router_weight,
                                                   low_key_weight, wanted)
    return *(grad if want else None for grad, want in zip(grads, wanted)), None, None


offload_values.register_autograd(_backward, setup_context=_setup_context)


@dataclass
class CompiledRouting:
    """What the compiled ``start_routing`` hands to ``finish_values``."""

    hidden: Tensor
    token: Tensor
    grad_enabled: bool


def start(adapter, hidden: Tensor) -> CompiledRouting:
    """Stage 1 as the op (what ``MEFTAdapter.start_routing`` runs under ``torch.compile``)."""
    grad_enabled = torch.is_grad_enabled()
    token = torch.ops.meft_triton.offload_start(hidden, adapter.offload_handle, grad_enabled,
                                                hidden.requires_grad)
    return CompiledRouting(hidden, token, grad_enabled)


def finish(adapter, routing: CompiledRouting) -> Tensor:
    """Stage 2 as the op."""
    low_key = None if adapter.low_key is None else adapter.low_key.weight
    return torch.ops.meft_triton.offload_values(routing.hidden, adapter.router.weight, low_key,
                                                routing.token, routing.grad_enabled)
