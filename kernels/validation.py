"""Argument checks and block-size helpers shared by the launchers.

Every launcher validates before it launches: a bad argument must become a ValueError or
TypeError that names it, never a Triton crash or an out-of-bounds read.
"""

from __future__ import annotations

import os

import torch
import triton

# Read once, when the kernels are imported: triton.jit decides interpreted-or-compiled then too.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {tensor.dtype}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_devices(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and one Triton can run on (CUDA, or CPU when interpreted)."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, device = next(iter(devices.items()))
    for name, other in devices.items():
        if other != device:
            raise ValueError(f"{name} is on {other} but {first_name} is on {device}: "
                             "all tensors must be on one device")
    if device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "the Triton kernels got CPU tensors; on CPU they run only under Triton's "
            "interpreter: set TRITON_INTERPRET=1 before importing meft_triton/kernels, "
            "or use backend='auto' or 'torch'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton kernels run on CUDA tensors, got device {device}")
    return device


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    first_name, dtype = next(iter(dtypes.items()))
    for name, other in dtypes.items():
        if other != dtype:
            raise TypeError(f"{name} has dtype {other} but {first_name} has {dtype}: "
                            "cast them to one compute dtype")
    return dtype


def check_ids_in_range(name: str, ids: torch.Tensor, upper: int) -> None:
    """Ids index rows: one out of range would read outside a tensor, so check on the host.

    This synchronizes; launchers call it only for ids a caller passes in, not ids a kernel made.
    """
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= upper):
        raise ValueError(f"{name} must hold ids in [0, {upper}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use tf32 tensor cores three times per product ("tf32x3": each operand split
    into a tf32 part and a tf32 remainder, hi*hi + hi*lo + lo*hi, fp32 accumulation): the
    relative error per product is about 2^-21, next to fp32's 2^-24 and well inside the fp32
    tolerance of the oracle tests (2e-5), at a third of the tf32 rate (still 2.5x the fp32
    CUDA cores of an H200). A single tf32 product keeps 10 mantissa bits (~5e-4), far outside
    that tolerance, and would move near-tied scores across the selection. The interpreter
    multiplies in fp32 whatever this says; the ``gpu`` tests check the compiled products.
    fp16/bf16 inputs use tensor cores with fp32 accumulation either way (the argument is then
    ignored)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def pow2_block(size: int, low: int, high: int) -> int:
    """The power of two covering ``size``, clamped to [low, high]."""
    return max(low, min(high, triton.next_power_of_2(max(size, 1))))


def check_int_arg(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [{low}, {high}], got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value
