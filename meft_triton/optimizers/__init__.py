"""Optimizers: the row-sparse CPU AdamW, the non-finite policy, the optimizer of each placement
and :func:`create_meft_optimizer`, which picks the one a model's adapters need."""

from .cpu import OffloadedAdamW
from .gpu import MEFTAdamW
from .nonfinite import NonFiniteGradientError, NonFiniteGradientWarning, NonFiniteRows
from .sparse_adamw import SparseRowAdamW, clip_grad_norm_

__all__ = ["MEFTAdamW", "NonFiniteGradientError", "NonFiniteGradientWarning", "NonFiniteRows", "OffloadedAdamW",
           "SparseRowAdamW", "clip_grad_norm_"]

# create_meft_optimizer (in .factory) needs the transformers integration, which imports this
# package: it is exported by meft_triton itself.
