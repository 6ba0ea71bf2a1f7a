"""MEFTAdapter: the sparse key-value adapter layer that sits beside an FFN."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from . import reference
from .config import MEFTConfig, check_int

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    """MEFT's sparse key-value memory with a Key-Experts router (DESIGN.md section 2).

    Parameters: ``router.weight`` [E, d], ``keys`` [N, d], ``values`` [N, d]. ``forward(h)``
    takes ``h [..., d]`` (the FFN's input) and returns ``y [..., d]`` to add to the FFN's
    output. The computation runs in ``h``'s dtype: parameters of another dtype are cast (so
    fp32 masters under bf16 autocast work).
    """

    def __init__(self, hidden_size: int, config: MEFTConfig, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, MEFTConfig):
            raise TypeError(f"config must be a MEFTConfig, got {type(config).__name__}")
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(hidden_size, config.num_experts, bias=False, **factory)
        self.keys = nn.Parameter(torch.empty(config.num_neurons, hidden_size, **factory))
        self.values = nn.Parameter(torch.empty(config.num_neurons, hidden_size, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MEFT's initialisation: K ~ N(0, std^2), V = 0 (the adapted model starts equal to the
        base model), each router row = its expert's mean key row times ``router_init_scale``."""
        cfg = self.config
        self.keys.normal_(0.0, cfg.key_init_std)
        if cfg.value_init_std > 0:
            self.values.normal_(0.0, cfg.value_init_std)
        else:
            self.values.zero_()
        expert_keys = self.keys.view(cfg.num_experts, cfg.neurons_per_expert, self.hidden_size)
        self.router.weight.copy_(expert_keys.mean(dim=1) * cfg.router_init_scale)

    def backend_for(self, hidden: Tensor) -> str:
        """The backend a call with ``hidden`` uses: "triton" or "torch"."""
        backend = self.config.backend
        if backend == "auto":
            return "triton" if hidden.is_cuda and hidden.dtype in KERNEL_DTYPES else "torch"
        return backend

    def forward(self, hidden: Tensor) -> Tensor:
        check_hidden(hidden, self.hidden_size, self.keys.device)
        cfg = self.config
        flat = hidden.reshape(-1, self.hidden_size)
        router_weight, keys, values = (
            p if p.dtype == flat.dtype else p.to(flat.dtype)
            for p in (self.router.weight, self.keys, self.values)
        )
        if self.backend_for(hidden) == "torch":
            y = reference.meft_forward(flat, router_weight, keys, values,
                                       cfg.experts_per_token, cfg.topk, cfg.gate)
        else:
            from .ops import sparse_adapter

            y = sparse_adapter(flat, router_weight, keys, values,
                               cfg.experts_per_token, cfg.topk, cfg.gate)
        return y.reshape(hidden.shape)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"hidden_size={self.hidden_size}, num_neurons={cfg.num_neurons}, "
                f"num_experts={cfg.num_experts}, experts_per_token={cfg.experts_per_token}, "
                f"topk={cfg.topk}, gate={cfg.gate!r}, backend={cfg.backend!r}")


def adapter_parameter_count(hidden_size: int, config: MEFTConfig) -> int:
    """Trainable parameters of one adapter: router + keys + values."""
    return hidden_size * (config.num_experts + 2 * config.num_neurons)


__all__ = ["MEFTAdapter", "adapter_parameter_count", "check_hidden"]
