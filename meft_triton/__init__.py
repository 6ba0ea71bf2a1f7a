"""meft-triton: MEFT sparse key-value adapters with fused Triton kernels and CPU offload.

Public API: :class:`MEFTConfig` (with the paper's preset :meth:`MEFTConfig.paper_7b` and MEFT's
expert-count rule :func:`meft_num_experts`), :class:`MEFTAdapter`, the transformers integration
(:func:`attach_meft`, :func:`detach_meft`, :func:`save_adapter`, :func:`load_adapter`,
:func:`create_meft_optimizer`), MEFT as a peft method (``MEFTPeftConfig``, ``MEFTModel``), the
row-sparse CPU optimizer :class:`SparseRowAdamW`, training checkpoints
(:func:`save_training_state`, :func:`load_training_state`), the non-finite gradient error
:class:`NonFiniteGradientError`, IST layer selection (:class:`ISTConfig`,
:class:`ISTScheduler`, ``ISTCallback`` for the HF Trainer), the SMT baseline (:class:`SMTConfig`,
:class:`SMTWarmup`, :func:`apply_smt`, :func:`create_smt_optimizer`), and the oracle
:mod:`meft_triton.reference`.
"""

from . import reference
from .addons.ist import ISTConfig, ISTScheduler
from .addons.smt import SMTConfig, SMTWarmup, apply_smt, create_smt_optimizer
from .config import MEFTConfig, meft_num_experts
from .integration import attach_meft, detach_meft, meft_adapters, meft_parameters
from .integration.peft_import import install as install_peft_registration
from .io import load_adapter, load_training_state, read_training_state, save_adapter, save_training_state
from .layer import MEFTAdapter, adapter_parameter_count
from .optimizers import (MEFTAdamW, NonFiniteGradientError, NonFiniteGradientWarning, OffloadedAdamW,
                         SparseRowAdamW)
from .optimizers.factory import create_meft_optimizer

__version__ = "0.1.0"

# MEFT registered with peft now if peft is imported, else right after its import (an import hook)
install_peft_registration()


def __getattr__(name: str):
    # ISTCallback subclasses transformers.TrainerCallback: importing meft_triton does not import
    # transformers until it is asked for.
    if name == "ISTCallback":
        from .addons import ist

        return ist.ISTCallback
    if name in ("MEFTPeftConfig", "MEFTModel"):
        # peft (and with it transformers) is imported, and MEFT registered with it, on first use
        from .integration import peft_method

        return getattr(peft_method, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ISTCallback", "ISTConfig", "ISTScheduler", "SMTConfig", "SMTWarmup", "apply_smt",
    "create_smt_optimizer", "MEFTModel", "MEFTPeftConfig",
    "MEFTAdamW", "MEFTAdapter", "MEFTConfig", "NonFiniteGradientError", "NonFiniteGradientWarning",
    "OffloadedAdamW", "SparseRowAdamW", "__version__",
    "adapter_parameter_count", "attach_meft", "create_meft_optimizer", "detach_meft",
    "load_adapter", "load_training_state", "meft_adapters", "meft_num_experts", "meft_parameters",
    "read_training_state",
    "reference", "save_adapter", "save_training_state",
]
