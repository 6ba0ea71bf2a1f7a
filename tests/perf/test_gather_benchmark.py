"""Benchmarks of host-side row gather / packing, each beside a plain memcpy of the same bytes.

    pytest tests/perf/test_gather_benchmark.py --benchmark-enable

CPU: ``CPURowStore.gather`` (compiled row loop; value rows, whole records, and gather + round to
bf16) and ``gather.cpu_gather`` (the prefetcher's CPU engine), vs ``Tensor.copy_`` of the
same payload. CUDA (``gpu``): active value rows to the device through the prefetcher's two
engines (CPU gather into pinned staging + async copy; zero-copy gather kernel) vs a pinned
host->device memcpy of the same bytes. The ratio of each pair is gated by
``python -m profiling.perf_gate``; here they are timed for the table and the per-device
baseline. With ``--benchmark-disable`` (the default) each runs once as a smoke test.
"""

from __future__ import annotations

import pytest
import torch

from meft_triton.offload import CudaCopyEngine, gather
from meft_triton.offload import CPURowStore

# CPU: CI-sized (a 16 MiB store, 2048 rows of 1 KiB gathered)
N, D, ROWS = 8192, 256, 2048
# CUDA: LLaMA-7B width, 4096 active rows of 16384 (32 MiB of bf16 rows to the device)
GPU_N, GPU_D, GPU_ROWS = 16384, 4096, 4096


def _ids(n: int, u: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.sort(torch.randperm(n, generator=gen)[:u]).values


@pytest.fixture(scope="module")
def store():
    s = CPURowStore(N, D, pin_memory="auto")
    s.records.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    return s


def _bench(benchmark, fn, what: str, nbytes: int):
    benchmark.group = f"host row gather {ROWS} of {N} rows, d={D} ({nbytes >> 10} KiB written)"
    benchmark.extra_info.update(what=what, bytes=nbytes)
    fn()
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("part", ["values", "both"])
def test_store_gather(benchmark, store, part):
    ids = _ids(N, ROWS)
    out = store.staging_buffer(ROWS, part)
    _bench(benchmark, lambda: store.gather(ids, out=out, part=part), f"CPURowStore.gather part={part}",
           out.numel() * 4)
    torch.testing.assert_close(out.view(ROWS, -1)[:, -D:], store.values()[ids], rtol=0, atol=0)


def test_store_gather_cast_bf16(benchmark, store):
    ids = _ids(N, ROWS)
    out = store.staging_buffer(ROWS, "values", torch.bfloat16)
    _bench(benchmark, lambda: store.gather(ids, out=out), "CPURowStore.gather -> bf16", out.numel() * 2)


def test_prefetch_cpu_gather(benchmark, store):
    ids = _ids(N, ROWS)
    out = torch.empty(ROWS, D)
    host_values = store.values()
    _bench(benchmark, lambda: gather.cpu_gather(host_values, ids, out), "gather.cpu_gather", out.numel() * 4)
    torch.testing.assert_close(out, host_values[ids], rtol=0, atol=0)


@pytest.mark.parametrize("part", ["values", "both"])
def test_memcpy_same_bytes(benchmark, part):
    """The yardstick: a plain copy of the bytes the gather of ``part`` writes."""
    width = D if part == "values" else 2 * D
    src, dst = torch.ones(ROWS, width), torch.empty(ROWS, width)
    _bench(benchmark, lambda: dst.copy_(src), f"memcpy (Tensor.copy_) same bytes as part={part}", dst.numel() * 4)


# --------------------------------------------------------------------------------------------
# CUDA: host -> device of active rows
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned_rows():
    records = torch.empty(GPU_N, 2, GPU_D, pin_memory=True).normal_(0.0, 0.02)
    return records[:, 1]  # the value half of [N, 2, d] neuron records, as the CPU row store holds them


def _bench_gpu(benchmark, fn, what: str):
    nbytes = GPU_ROWS * GPU_D * 2
    benchmark.group = f"host->device {GPU_ROWS} of {GPU_N} rows, d={GPU_D}, bf16 ({nbytes >> 20} MiB)"
    benchmark.extra_info.update(what=what, bytes=nbytes)

    def run():
        fn()
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["cpu_gather", "zero_copy"])
def test_h2d_active_rows(benchmark, pinned_rows, strategy):
    ids = _ids(GPU_N, GPU_ROWS)
    engine = CudaCopyEngine(strategy=strategy)
    try:
        slot = engine.new_slot(0, GPU_ROWS, GPU_D, torch.bfloat16)
        _bench_gpu(benchmark, lambda: engine.consume(engine.copy_in(slot, pinned_rows, ids)),
                   f"CudaCopyEngine({strategy}) copy_in + consume")
        torch.testing.assert_close(slot.tensor.cpu(), pinned_rows[ids].bfloat16(), rtol=0, atol=0)
    finally:
        engine.close()


@pytest.mark.gpu
def test_h2d_pinned_memcpy_same_bytes(benchmark):
    src = torch.ones(GPU_ROWS, GPU_D, dtype=torch.bfloat16, pin_memory=True)
    dst = torch.empty(GPU_ROWS, GPU_D, dtype=torch.bfloat16, device="cuda")
    _bench_gpu(benchmark, lambda: dst.copy_(src, non_blocking=True), "pinned memcpy host->device")
