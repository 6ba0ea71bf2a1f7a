"""CPURowStore: layout, gather, pinning fallback, accounting, checkpoints (CPU only, fast)."""

from __future__ import annotations

import warnings

import pytest
import torch

from meft_triton.offload import cpu_rowops
from meft_triton.offload import CPURowStore

HAS_C = cpu_rowops.backend_name() == "c"


def random_dense(n: int, d: int):
    return torch.randn(n, d), torch.randn(n, d)


def test_from_dense_layout_one_record_per_neuron(seed):
    keys, values = random_dense(33, 7)
    store = CPURowStore.from_dense(keys, values)
    assert store.records.shape == (33, 2, 7) and store.records.dtype == torch.float32
    assert store.records.is_contiguous()
    assert torch.equal(store.keys(), keys) and torch.equal(store.values(), values)
    # neuron i is one contiguous record [key_i, value_i]
    flat = store.records.view(33, 14)
    assert torch.equal(flat, torch.cat([keys, values], dim=1))
    assert store.keys().data_ptr() == store.records.data_ptr()
    assert store.values().stride() == (14, 1)
    for t in (store.exp_avg, store.exp_avg_sq):
        assert t.shape == (33, 2, 7) and not t.any()
    # views write through
    store.values()[3] = 1.5
    assert torch.all(store.records[3, 1] == 1.5)


def test_from_dense_converts_dtype_and_copies(seed):
    keys, values = random_dense(5, 3)
    store = CPURowStore.from_dense(keys.double(), values.bfloat16())
    assert torch.equal(store.keys(), keys.double().float())
    assert torch.equal(store.values(), values.bfloat16().float())
    keys.zero_()
    assert store.keys().any()


@pytest.mark.parametrize("part", ["values", "keys", "both"])
@pytest.mark.parametrize("sort", [True, False])
def test_gather_matches_indexing(seed, part, sort, poison_outputs):
    n, d, u = 200, 24, 57
    keys, values = random_dense(n, d)
    store = CPURowStore.from_dense(keys, values)
    ids = torch.randint(0, n, (u,))  # repeats allowed
    rows, got_ids = store.gather(ids, part=part, sort=sort)
    expect_ids = torch.sort(ids).values if sort else ids
    assert torch.equal(got_ids, expect_ids)
    ref = {"keys": keys, "values": values, "both": torch.stack([keys, values], 1)}[part][expect_ids]
    assert torch.equal(rows, ref)
    assert rows.is_contiguous()


def test_gather_into_larger_staging_buffer(seed, poison_outputs):
    n, d = 64, 16
    keys, values = random_dense(n, d)
    store = CPURowStore.from_dense(keys, values)
    buf = store.staging_buffer(40, "values")
    assert buf.shape == (40, d) and buf.is_pinned() == store.pinned
    ids = torch.randperm(n)[:25].to(torch.int32)  # int32 ids are accepted
    rows, sorted_ids = store.gather(ids, out=buf)
    assert rows.shape == (25, d) and rows.data_ptr() == buf.data_ptr()
    assert sorted_ids.dtype == torch.int64
    assert torch.equal(rows, values[sorted_ids])
    both = store.staging_buffer(30, "both")
    rows, sorted_ids = store.gather(ids, out=both, part="both")
    assert torch.equal(rows[:, 0], keys[sorted_ids]) and torch.equal(rows[:, 1], values[sorted_ids])
    rows, _ = store.gather(torch.empty(0, dtype=torch.int64), out=buf)
    assert rows.shape == (0, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gather_rounds_into_a_compute_dtype_buffer(seed, dtype):
    keys, values = random_dense(50, 8)
    store = CPURowStore.from_dense(keys, values)
    buf = store.staging_buffer(20, "values", dtype=dtype)
    rows, ids = store.gather(torch.randperm(50)[:20], out=buf)
    assert rows.dtype == dtype and torch.equal(rows, values[ids].to(dtype))


@pytest.mark.skipif(not HAS_C, reason="no C compiler")
def test_compiled_gather_equals_torch_gather(seed):
    n, d = 500, 48
    keys, values = random_dense(n, d)
    store = CPURowStore.from_dense(keys, values)
    ids = torch.sort(torch.randint(0, n, (300,))).values
    for src in (store.values(), store.keys(), store.records.view(n, 2 * d)):
        a = torch.empty(300, src.shape[1])
        b = torch.empty(300, src.shape[1])
        cpu_rowops.gather_rows(src, ids, a, num_threads=3, backend="c")
        cpu_rowops.gather_rows(src, ids, b, backend="torch")
        assert torch.equal(a, b) and torch.equal(a, src[ids])


def test_nbytes_accounting():
    store = CPURowStore(100, 12)
    per_array = 100 * 2 * 12 * 4
    assert store.master_nbytes == per_array
    assert store.state_nbytes == 2 * per_array
    assert store.nbytes == 3 * per_array
    assert store.row_width == 24


def test_pinning_falls_back_with_a_recorded_flag(monkeypatch):
    if torch.cuda.is_available():
        store = CPURowStore(4, 4, pin_memory=True)
        assert store.pinned and store.records.is_pinned() and store.pin_error is None
        return
    store = CPURowStore(4, 4)  # "auto": quietly pageable without CUDA
    assert not store.pinned and "cuda" in store.pin_error.lower()
    with pytest.warns(RuntimeWarning, match="pageable"):
        store = CPURowStore(4, 4, pin_memory=True)
    assert not store.pinned and not store.records.is_pinned()
    assert "cuda" in store.pin_error.lower()
    store = CPURowStore(4, 4, pin_memory=False)
    assert not store.pinned and store.pin_error is None
    # CUDA claims to be there but the pinned allocation fails: same fallback, reason recorded
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = CPURowStore(4, 4, pin_memory=True)
    assert not store.pinned and "pinned allocation failed" in store.pin_error
    assert any("pageable" in str(w.message) for w in caught)
    assert store.staging_buffer(3).shape == (3, 4)


def test_state_dict_round_trip(seed):
    keys, values = random_dense(9, 5)
    a = CPURowStore.from_dense(keys, values)
    b = CPURowStore(9, 5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.records, b.records)
    with pytest.raises(ValueError, match="records"):
        CPURowStore(9, 6).load_state_dict(a.state_dict())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="num_rows"):
        CPURowStore(0, 4)
    with pytest.raises(TypeError, match="hidden_size"):
        CPURowStore(4, True)
    with pytest.raises(TypeError, match="num_rows"):
        CPURowStore(4.0, 4)
    with pytest.raises(ValueError, match="pin_memory"):
        CPURowStore(4, 4, pin_memory="yes")
    with pytest.raises(ValueError, match="keys and values"):
        CPURowStore.from_dense(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="keys"):
        CPURowStore.from_dense(torch.ones(4, 3, dtype=torch.int64), torch.randn(4, 3))
    with pytest.raises(ValueError, match="values"):
        CPURowStore.from_dense(torch.randn(4, 3), torch.randn(4, 3, 1))
    store = CPURowStore(10, 4)
    with pytest.raises(ValueError, match="row_ids"):
        store.gather(torch.tensor([0, 10]))
    with pytest.raises(TypeError, match="row_ids"):
        store.gather(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="part"):
        store.gather(torch.tensor([0]), part="value")
    with pytest.raises(ValueError, match="out"):
        store.gather(torch.tensor([0, 1, 2]), out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="out"):
        store.gather(torch.tensor([0]), out=torch.empty(2, 5))
    with pytest.raises(TypeError, match="out"):
        store.gather(torch.tensor([0]), out=torch.empty(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        store.staging_buffer(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="out"):
        store.gather(torch.tensor([0]), out=torch.empty(4, 2).t())


def test_huge_page_advice_is_harmless():
    small = torch.zeros(10)
    assert cpu_rowops.advise_huge_pages(small) is False  # below 4 MiB: nothing to advise
    big = cpu_rowops.empty_rows((3, 1 << 20))
    assert big.shape == (3, 1 << 20) and big.dtype == torch.float32
    big.fill_(1.0)
    assert float(big.sum()) == 3 * (1 << 20)
