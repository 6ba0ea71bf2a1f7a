"""Row-copy throughput through the library's own placement-"cpu" pipeline.

Value rows go host -> device the way an offloaded layer moves them: a :class:`Prefetcher`
over a :class:`CPURowStore`'s value rows on the copy engine placement "cpu" picks
(``offload.default_engine``: ``CudaCopyEngine`` per transfer strategy on a GPU, the CPU
engine otherwise), one ``prefetch -> acquire -> release`` per copy; gradient rows go back
through ``Prefetcher.offload_grads``. The host gather alone is ``offload.gather.cpu_gather``, the
function the "cpu_gather" engine runs. Plain memcpys of the same bytes are the reference.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from meft_triton.offload import CPURowStore, Prefetcher, cpu_gather
from meft_triton.offload.runtime import default_engine

from .. import metrics
from ..metrics import NAN, Notes
from .grid import Shape

TRANSFER_COLUMNS = ("gather_GBps", "gather_cast_GBps", "host_memcpy_GBps", "h2d_cpu_gather_GBps",
                    "h2d_zero_copy_GBps", "pinned_h2d_GBps", "d2h_GBps", "pinned_d2h_GBps")


@lru_cache(maxsize=1)
def transfer_store(num_rows: int, hidden_size: int) -> CPURowStore:
    """One row store for every transfer point of a sweep (pinned where CUDA is available)."""
    return CPURowStore(num_rows, hidden_size, pin_memory="auto")


def random_rows(num_rows: int, rows: int) -> torch.Tensor:
    """``rows`` distinct sorted row ids out of ``num_rows`` (seeded by ``rows``)."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(rows))[:rows].sort().values


def engine_GBps(store: CPURowStore, ids: torch.Tensor, dtype: torch.dtype, device: torch.device, transfer: str,
                repeats: int) -> tuple[float, float]:
    """Payload GB/s of the value rows ``ids`` copied into a slot of the compute ``dtype`` by the
    library's Prefetcher on ``default_engine(device, transfer)`` (prefetch -> acquire ->
    release), and of fp32 gradient rows ``[len(ids), 2d]`` sent back by ``offload_grads``."""
    rows, d = ids.numel(), store.hidden_size
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with Prefetcher(default_engine(device, transfer), [store.values()], max_rows=rows, width=d,
                    dtype=dtype) as prefetcher:
        def copy_in() -> None:
            ticket = prefetcher.prefetch(0, ids)
            prefetcher.acquire(ticket)
            prefetcher.release(ticket, for_backward=False)
            sync()

        ms_in = metrics.time_op_ms(copy_in, repeats)
        grads = torch.randn(rows, 2 * d, device=device)
        ids_dev = ids.to(device)
        ms_out = metrics.time_op_ms(lambda: prefetcher.offload_grads(0, ids_dev, grads).result(), repeats)
    in_bytes = rows * d * metrics.dtype_bytes(dtype)
    return in_bytes / (ms_in * 1e-3) / 1e9, rows * 2 * d * 4 / (ms_out * 1e-3) / 1e9


def host_gather_GBps(store: CPURowStore, ids: torch.Tensor, dtype: torch.dtype, repeats: int) -> float:
    """Payload GB/s written by ``offload.gather.cpu_gather`` of the value rows ``ids`` into a staging
    buffer of ``dtype`` (the host half of the "cpu_gather" engine)."""
    staging = store.staging_buffer(ids.numel(), "values", dtype)
    ms = metrics.time_op_ms(lambda: cpu_gather(store.values(), ids, staging), repeats)
    return staging.numel() * staging.element_size() / (ms * 1e-3) / 1e9


def measure_transfer_rows(shape: Shape, rows: int, repeats: int, cuda: bool) -> dict:
    """Copy throughput of ``rows`` random sorted rows of a store of ``max(shape.num_neurons,
    rows)`` neurons: the :data:`TRANSFER_COLUMNS` (payload GB/s; NaN where not measurable) and
    a ``note``."""
    notes = Notes()
    d, dt = shape.hidden_size, shape.torch_dtype
    store = transfer_store(max(shape.num_neurons, rows), d)
    ids = random_rows(store.num_rows, rows)
    out = dict.fromkeys(TRANSFER_COLUMNS, NAN)
    out["gather_GBps"] = host_gather_GBps(store, ids, torch.float32, repeats)
    if dt != torch.float32:
        out["gather_cast_GBps"] = host_gather_GBps(store, ids, dt, repeats)
    out["host_memcpy_GBps"] = metrics.host_memcpy_GBps(rows * d * 4, repeats)
    if not store.pinned:
        notes.add("pageable host rows (no pinned memory here)")
    if cuda:
        device = torch.device("cuda")
        out["h2d_cpu_gather_GBps"], out["d2h_GBps"] = engine_GBps(store, ids, dt, device, "cpu_gather", repeats)
        try:
            out["h2d_zero_copy_GBps"], _ = engine_GBps(store, ids, dt, device, "zero_copy", repeats)
        except Exception as exc:  # noqa: BLE001 - kernel missing or store not pinned
            notes.add(f"zero_copy not measured ({type(exc).__name__}: {str(exc)[:100]})")
        out["pinned_h2d_GBps"], why = metrics.pinned_memcpy_GBps(rows * d * metrics.dtype_bytes(dt), "h2d", repeats)
        notes.add(why)
        out["pinned_d2h_GBps"], why = metrics.pinned_memcpy_GBps(rows * 2 * d * 4, "d2h", repeats)
        notes.add(why)
    out["note"] = str(notes)
    return out
