"""MEFTAdapter: the sparse key-value adapter layer that sits beside an FFN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..config import MEFTConfig
from ..validation import check_int
from . import compiled_offload
from .backend import resolve_backend


class Projection(nn.Module):
    """A bias-free linear map holding ``weight`` [out, in], initialised as ``nn.Linear``.

    Not an ``nn.Linear`` on purpose: tools that wrap every linear layer of a model (peft's
    ``target_modules="all-linear"``) must leave the adapter's router and low-key projection
    alone. The adapter reads ``weight`` directly; the state-dict key stays ``<name>.weight``.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

def check_hidden(hidden: Tensor, hidden_size: int, device: torch.device) -> None:
    """Reject inputs the adapter cannot compute on, naming the argument and what is allowed."""
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden must have shape [..., {hidden_size}] (the adapter's hidden_size), "
            f"got {tuple(hidden.shape)}"
        )
    if hidden.device != device:
        raise ValueError(f"hidden is on {hidden.device} but the adapter's parameters are on {device}")


class MEFTAdapter(nn.Module):
    """MEFT's sparse key-value memory with a Key-Experts router (docs/DESIGN.md, "Semantics").

    Parameters: ``router.weight`` [E, r], ``keys`` [N, r], ``values`` [N, d], and with
    ``config.low_key_dim = r`` the shared projection ``low_key.weight`` [r, d] (without it r = d
    and ``low_key`` is None). ``forward(h)`` takes ``h [..., d]`` (the FFN's input) and returns
    ``y [..., d]`` to add to the FFN's output; the router and the keys read x = L h. The
    computation runs in ``h``'s dtype: parameters of another dtype are cast (so fp32 masters
    under bf16 autocast work). Under placement "cpu" keys and values live in a CPU row store,
    not in parameters, and ``router.weight.requires_grad`` switches the whole layer's training
    (rows and L included).
    """

    def __init__(self, hidden_size: int, config: MEFTConfig, device=None, dtype=None,
                 runtime=None) -> None:
        super().__init__()
        if not isinstance(config, MEFTConfig):
            raise TypeError(f"config must be a MEFTConfig, got {type(config).__name__}")
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.key_size = hidden_size if config.low_key_dim is None else config.low_key_dim
        # L keeps nn.Linear's default initialisation, as MEFT's code does (its add_up_low_key)
        self.low_key = (None if config.low_key_dim is None
                        else Projection(hidden_size, config.low_key_dim, **factory))
        self.router = Projection(self.key_size, config.num_experts, **factory)
        self.offload = None
        if config.placement == "gpu":
            self.keys = nn.Parameter(torch.empty(config.num_neurons, self.key_size, **factory))
            self.values = nn.Parameter(torch.empty(config.num_neurons, hidden_size, **factory))
            self.reset_parameters()
            return
        from ..offload.rows import OffloadedRows
        from ..offload.runtime import OffloadRuntime

        keys, values = self._initial_rows(torch.device("cpu"), torch.float32)
        with torch.no_grad():
            self.router.weight.copy_(self._initial_router(keys))
        compute_device = self.router.weight.device
        if runtime is None:
            runtime = OffloadRuntime(compute_device, self.router.weight.dtype, hidden_size,
                                     transfer=config.transfer, keep_rows=config.backward_rows == "keep")
        self.offload = OffloadedRows(self, runtime, keys, values)

    def _initial_rows(self, device, dtype) -> tuple[Tensor, Tensor]:
        cfg = self.config
        keys = torch.randn(cfg.num_neurons, self.key_size, device=device, dtype=dtype) * cfg.key_init_std
        values = torch.randn(cfg.num_neurons, self.hidden_size, device=device, dtype=dtype) * cfg.value_init_std
        return keys, values

    def _initial_router(self, keys: Tensor) -> Tensor:
        cfg = self.config
        expert_keys = keys.view(cfg.num_experts, cfg.neurons_per_expert, self.key_size)
        return expert_keys.mean(dim=1) * cfg.router_init_scale

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MEFT's initialisation: K ~ N(0, std^2), V = 0 (the adapted model starts equal to the
        base model), each router row = its expert's mean key row times ``router_init_scale``
        (in the r-space of the keys); L gets nn.Linear's default initialisation."""
        if self.low_key is not None:
            self.low_key.reset_parameters()
        if self.offload is not None:
            keys, values = self._initial_rows(torch.device("cpu"), torch.float32)
            self.offload.store.keys().copy_(keys)
            self.offload.store.values().copy_(values)
            self.offload.refresh_key_cache()
        else:
            keys, values = self._initial_rows(self.keys.device, self.keys.dtype)
            self.keys.copy_(keys)
            self.values.copy_(values)
        self.router.weight.copy_(self._initial_router(keys))

    def backend_for(self, hidden: Tensor) -> str:
        """The backend a call with ``hidden`` uses: "triton" or "torch"."""
        return resolve_backend(self.config.backend, hidden)

    def forward(self, hidden: Tensor) -> Tensor:
        if self.offload is not None:
            return self.finish_values(self.start_routing(hidden))
        check_hidden(hidden, self.hidden_size, self.keys.device)
        cfg = self.config
        x = self.key_input(hidden.reshape(-1, self.hidden_size))
        router_weight, keys, values = (
            p if p.dtype == x.dtype else p.to(x.dtype)
            for p in (self.router.weight, self.keys, self.values)
        )
        if self.backend_for(hidden) == "torch":
            y = reference.meft_forward(x, router_weight, keys, values,
                                       cfg.experts_per_token, cfg.topk, cfg.gate)
        else:
            from .autograd import sparse_adapter

            y = sparse_adapter(x, router_weight, keys, values,
                               cfg.experts_per_token, cfg.topk, cfg.gate)
        return y.reshape(hidden.shape)

    def key_input(self, flat: Tensor) -> Tensor:
        """x = L h [T, r] in ``flat``'s dtype: what the router and the keys read (``flat``
        itself without ``low_key_dim``). Autograd carries dx back to L and h."""
        if self.low_key is None:
            return flat
        return F.linear(flat, self.low_key.weight.to(flat.dtype))

    # -- placement "cpu" -----------------------------------------------------------------------
    # ``offload`` is a property so that attaching a row store also registers the adapter for
    # the compiled path (layer/compiled_offload.py): the compiled graph reads the handle, and it
    # must exist before the first call is traced.
    @property
    def offload(self):
        """Placement "cpu": the layer's :class:`~meft_triton.offload.rows.OffloadedRows`
        (None under placement "gpu")."""
        return self.__dict__["_offload_rows"]

    @offload.setter
    def offload(self, rows) -> None:
        self.__dict__["_offload_rows"] = rows
        self.__dict__["offload_handle"] = None if rows is None else compiled_offload.register_layer(self)

    def start_routing(self, hidden: Tensor):
        """Placement "cpu", stage 1 (before the backbone FFN): route, select, start the copy.
        Under ``torch.compile`` the stage is one opaque op (:mod:`.compiled_offload`)."""
        self._require_cpu_placement("start_routing")
        check_hidden(hidden, self.hidden_size, self.router.weight.device)
        if torch.compiler.is_compiling():
            return compiled_offload.start(self, hidden)
        return self.offload.start_routing(hidden)

    def finish_values(self, routed) -> Tensor:
        """Placement "cpu", stage 2 (after the FFN): y from the copied value rows."""
        self._require_cpu_placement("finish_values")
        if isinstance(routed, compiled_offload.CompiledRouting):
            return compiled_offload.finish(self, routed)
        return self.offload.finish_values(routed)

    def abandon_routing(self, routed) -> None:
        """Placement "cpu": give back a ``start_routing`` whose ``finish_values`` will not run
        (the code between them raised); its copy is cancelled and its slot freed (a compiled
        call's when its token is dropped)."""
        self._require_cpu_placement("abandon_routing")
        if not isinstance(routed, compiled_offload.CompiledRouting):
            self.offload.abandon(routed)

    def configure_optimizer(self, **hyper):
        """Placement "cpu": the row-sparse AdamW (meft_triton.optimizers.SparseRowAdamW keywords)
        that trains this layer's keys and values; the router (and ``low_key``) are trained by
        your optimizer."""
        from ..optimizers.sparse_adamw import SparseRowAdamW

        self._require_cpu_placement("configure_optimizer")
        optimizer = SparseRowAdamW(self.offload.store, **hyper)
        self.offload.use_optimizer(optimizer)
        return optimizer

    def sparse_step(self):
        """Placement "cpu": hand this step's gradient rows to the row-sparse AdamW and start its
        update on a worker thread (the next forward waits for it). Returns its Future."""
        self._require_cpu_placement("sparse_step")
        self.offload.collect_grads()
        return self.offload.step()

    def master_rows(self) -> tuple[Tensor, Tensor]:
        """The fp32 keys and values: the parameters (placement "gpu") or the CPU master."""
        if self.offload is None:
            return self.keys, self.values
        self.offload.wait_for_update()
        return self.offload.store.keys(), self.offload.store.values()

    def _require_cpu_placement(self, what: str) -> None:
        if self.offload is None:
            raise RuntimeError(f"{what} is for placement='cpu'; this adapter has placement='gpu'")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.offload is not None:
            # contiguous copies: the master rows are strided views of the [N, r + d] row store, and
            # savers (safetensors, transformers' save_pretrained) need whole contiguous tensors
            keys, values = self.master_rows()
            destination[prefix + "keys"] = keys.contiguous()
            destination[prefix + "values"] = values.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.offload is not None:
            for name, target in zip(("keys", "values"), self.master_rows()):
                key = prefix + name
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                tensor = state_dict[key]
                if tuple(tensor.shape) != tuple(target.shape):
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                      f"{tuple(tensor.shape)}, the adapter has {tuple(target.shape)}")
                    continue
                with torch.no_grad():
                    target.copy_(tensor)
            self.offload.refresh_key_cache()
            state_dict = {k: v for k, v in state_dict.items() if k not in (prefix + "keys", prefix + "values")}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"hidden_size={self.hidden_size}, num_neurons={cfg.num_neurons}, "
                f"num_experts={cfg.num_experts}, experts_per_token={cfg.experts_per_token}, "
                f"topk={cfg.topk}, gate={cfg.gate!r}, backend={cfg.backend!r}, "
                f"placement={cfg.placement!r}, low_key_dim={cfg.low_key_dim}")


def adapter_parameter_count(hidden_size: int, config: MEFTConfig) -> int:
    """Trainable parameters of one adapter: router [E, r] + keys [N, r] + values [N, d], plus
    L [r, d] with ``low_key_dim`` (r = d without it)."""
    if config.low_key_dim is None:
        return hidden_size * (config.num_experts + 2 * config.num_neurons)
    r = config.low_key_dim
    return r * (config.num_experts + config.num_neurons + hidden_size) + hidden_size * config.num_neurons


__all__ = ["MEFTAdapter", "adapter_parameter_count", "check_hidden"]
