"""The adapter layer: :class:`MEFTAdapter`, its autograd glue (custom ops over the kernels) and
the one backend dispatch both placements use."""

from .adapter import MEFTAdapter, adapter_parameter_count
from .backend import resolve_backend

__all__ = ["MEFTAdapter", "adapter_parameter_count", "resolve_backend"]
