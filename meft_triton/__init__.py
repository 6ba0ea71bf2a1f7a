"""meft-triton: MEFT sparse key-value adapters with fused Triton kernels.

Public API: :class:`MEFTConfig`, :class:`MEFTAdapter`, and the oracle :mod:`meft_triton.reference`.
"""

from . import reference
from .adapter import MEFTAdapter, adapter_parameter_count
from .config import MEFTConfig

__version__ = "0.1.0"

__all__ = ["MEFTAdapter", "MEFTConfig", "adapter_parameter_count", "reference", "__version__"]
