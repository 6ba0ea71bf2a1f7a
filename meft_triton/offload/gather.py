"""Host row gathers: ``out[i] = host_rows[ids[i]]``, on CPU threads or by a zero-copy GPU kernel.

The transfer strategies of :class:`~meft_triton.offload.cuda_engine.CudaCopyEngine`, by name.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import Tensor

from ..validation import describe
from . import cpu_rowops
from .workers import DaemonPool

ID_DTYPES = (torch.int32, torch.int64)


def _check_rows_ids_out(host_rows: Tensor, ids: Tensor, out: Tensor) -> int:
    if not isinstance(host_rows, Tensor) or host_rows.dim() != 2:
        raise ValueError(f"host_rows must be a 2-D tensor [N, width], got {describe(host_rows)}")
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype not in ID_DTYPES:
        raise ValueError(f"ids must be a 1-D int32/int64 tensor, got {describe(ids)}")
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError(f"out must be a 2-D tensor, got {describe(out)}")
    n = ids.numel()
    if tuple(out.shape) != (n, host_rows.shape[1]):
        raise ValueError(
            f"out must have shape [len(ids), width] = [{n}, {host_rows.shape[1]}], got {tuple(out.shape)}"
        )
    if not host_rows.is_floating_point() or not out.is_floating_point():
        raise TypeError(f"host_rows and out must be floating point, got {host_rows.dtype} and {out.dtype}")
    return n


def distinct_prefix(ids: Tensor) -> int:
    """How many of host ``ids`` to copy: all but the repeats of the last id at the end (the
    padding of :meth:`CopyEngine.copy_in <meft_triton.offload.engine.CopyEngine.copy_in>`)."""
    n = ids.numel()
    if n < 2:
        return n
    tail = int((ids == ids[-1]).flip(0).cumprod(0).sum())
    return n - tail + 1


def cpu_gather(
    host_rows: Tensor, ids: Tensor, out: Tensor, *, pool: "DaemonPool | None" = None, min_rows_per_task: int = 256,
    num_threads: int | None = None,
) -> Tensor:
    """``out[i] = host_rows[ids[i]]`` on the CPU (cast to ``out.dtype``): the one host row gather
    of the package (the CUDA engine's staging copy, the row store's ``gather``). Split over
    ``pool``'s threads when given, else over ``num_threads`` threads of the compiled row loop.
    ``host_rows`` may be a strided view (e.g. the value half of [N, 2d] neuron rows); ``ids``
    should be sorted (sequential reads); ``out`` is typically a pinned staging buffer."""
    n = _check_rows_ids_out(host_rows, ids, out)
    if host_rows.device.type != "cpu" or ids.device.type != "cpu" or out.device.type != "cpu":
        raise ValueError("cpu_gather needs host_rows, ids and out on the CPU")
    if n == 0:
        return out
    ids = ids.to(torch.int64).contiguous()  # what the compiled row loop reads
    bounds = [0, n]
    if pool is not None and n >= 2 * min_rows_per_task:
        tasks = min(pool.size + 1, n // min_rows_per_task)
        bounds = [n * k // tasks for k in range(tasks + 1)]
    threads = 1 if len(bounds) > 2 else num_threads
    futures = [pool.submit(gather_chunk, host_rows, ids, out, a, b, 1) for a, b in zip(bounds[1:-1], bounds[2:])]
    gather_chunk(host_rows, ids, out, bounds[0], bounds[1], threads)
    for f in futures:
        f.result()  # re-raises a chunk's error
    return out


def gather_chunk(host_rows: Tensor, ids: Tensor, out: Tensor, a: int, b: int, threads: int | None) -> None:
    """Rows ``a`` .. ``b`` of :func:`cpu_gather` (the unit its threads share, and the one place a
    host row is copied: the perf gate's slowed build wraps it)."""
    if out.dtype == host_rows.dtype and host_rows.stride(1) == 1 and out.is_contiguous():
        cpu_rowops.gather_rows(host_rows, ids[a:b], out[a:b], num_threads=threads)
    else:  # gather and round to the compute dtype in one pass (fewer bytes to the device)
        out[a:b].copy_(host_rows.index_select(0, ids[a:b]))


#: Where :func:`zero_copy_gather` finds its Triton launcher: ``module.function(host_rows, ids,
#: out)``. The kernel owner provides it in ``kernels/``; the contract is zero_copy_gather's.
ZERO_COPY_KERNEL = ("meft_triton.kernels.zero_copy_gather", "zero_copy_gather_rows")
_zero_copy_launcher: Callable[..., Any] | None = None


def _load_zero_copy_kernel() -> Callable[..., Any]:
    global _zero_copy_launcher
    if _zero_copy_launcher is None:
        module_name, fn_name = ZERO_COPY_KERNEL
        try:
            module = importlib.import_module(module_name)
            _zero_copy_launcher = getattr(module, fn_name)
        except (ImportError, AttributeError) as exc:
            raise NotImplementedError(
                f"the zero-copy gather kernel is not available: {module_name}.{fn_name}(host_rows, ids, out) "
                f"is missing ({exc}); use CudaCopyEngine(strategy='cpu_gather')"
            ) from exc
    return _zero_copy_launcher


def zero_copy_gather(host_rows: Tensor, ids: Tensor, out: Tensor) -> Tensor:
    """``out[i] = host_rows[ids[i]]`` (cast to ``out.dtype``) by a GPU kernel that reads the
    *pinned* host rows directly through unified virtual addressing: no staging buffer, no CPU
    work, only the selected rows cross PCIe. Runs on the current CUDA stream.

    Contract for the kernel launcher (``ZERO_COPY_KERNEL``): ``host_rows`` is a pinned CPU
    tensor ``[N, width]`` with ``stride(1) == 1`` and any row stride (a view into [N, 2d] neuron
    rows); ``ids`` is int32/int64 on ``out.device`` (sorted, in range, checked by the caller);
    ``out`` is ``[len(ids), width]`` on CUDA with ``stride(1) == 1``. Offsets
    ``ids[i] * host_rows.stride(0)`` must be computed in int64 (they pass 2^31 at LLaMA-7B
    shapes: 65536 rows x 8192 floats); an empty ``ids`` launches nothing.
    """
    n = _check_rows_ids_out(host_rows, ids, out)
    if host_rows.device.type != "cpu":
        raise ValueError(f"host_rows must be on the CPU (pinned), got {host_rows.device}")
    if not out.is_cuda:
        raise ValueError(f"out must be a CUDA tensor, got {out.device}")
    if ids.device != out.device:
        raise ValueError(f"ids must be on out's device {out.device}, got {ids.device}")
    if host_rows.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("host_rows and out must have unit stride along their rows (stride(1) == 1)")
    if not host_rows.is_pinned():
        raise ValueError("host_rows must be in pinned memory for a zero-copy gather (tensor.pin_memory())")
    if n == 0:
        return out
    _load_zero_copy_kernel()(host_rows, ids, out)
    return out


#: Transfer strategies of :class:`CudaCopyEngine`, by name.
GATHER_STRATEGIES: dict[str, Callable[..., Tensor]] = {"cpu_gather": cpu_gather, "zero_copy": zero_copy_gather}

