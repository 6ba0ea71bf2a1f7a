"""CPURowStore: layout, gather, pinning fallback, accounting, checkpoints (CPU only, fast)."""

from __future__ import annotations

import warnings

import pytest
import torch

from meft_triton.offload import cpu_rowops
from meft_triton.offload import CPURowStore

HAS_C = cpu_rowops.backend_name() == "c"


def random_dense(n: int, d: int, r: int | None = None):
    """Keys [n, r] (r = d by default) and values [n, d]."""
    return torch.randn(n, d if r is None else r), torch.randn(n, d)


KEY_WIDTHS = [None, 3, 11]  # r = d, r < d (low_key_dim), r > d


@pytest.mark.parametrize("r", KEY_WIDTHS)
def test_from_dense_layout_one_record_per_neuron(seed, r):
    keys, values = random_dense(33, 7, r)
    width = keys.shape[1] + 7
    store = CPURowStore.from_dense(keys, values)
    assert store.key_size == keys.shape[1] and store.hidden_size == 7 and store.row_width == width
    assert store.records.shape == (33, width) and store.records.dtype == torch.float32
    assert store.records.is_contiguous()
    assert torch.equal(store.keys(), keys) and torch.equal(store.values(), values)
    # neuron i is one contiguous record [key_i, value_i]
    assert torch.equal(store.records, torch.cat([keys, values], dim=1))
    assert store.keys().data_ptr() == store.records.data_ptr()
    assert store.values().stride() == (width, 1)
    for t in (store.exp_avg, store.exp_avg_sq):
        assert t.shape == (33, width) and not t.any()
        assert [p.shape[1] for p in store.split(t)] == [keys.shape[1], 7]
    # views write through
    store.values()[3] = 1.5
    r = keys.shape[1]
    assert torch.all(store.records[3, r:] == 1.5) and not (store.records[3, :r] == 1.5).any()


def test_from_dense_converts_dtype_and_copies(seed):
    keys, values = random_dense(5, 3)
    store = CPURowStore.from_dense(keys.double(), values.bfloat16())
    assert torch.equal(store.keys(), keys.double().float())
    assert torch.equal(store.values(), values.bfloat16().float())
    keys.zero_()
    assert store.keys().any()


@pytest.mark.parametrize("part", ["values", "keys", "both"])
@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("r", KEY_WIDTHS)
def test_gather_matches_indexing(seed, part, sort, r, poison_outputs):
    n, d, u = 200, 24, 57
    keys, values = random_dense(n, d, r)
    store = CPURowStore.from_dense(keys, values)
    ids = torch.randint(0, n, (u,))  # repeats allowed
    rows, got_ids = store.gather(ids, part=part, sort=sort)
    expect_ids = torch.sort(ids).values if sort else ids
    assert torch.equal(got_ids, expect_ids)
    ref = {"keys": keys, "values": values, "both": torch.cat([keys, values], 1)}[part][expect_ids]
    assert torch.equal(rows, ref)
    assert rows.is_contiguous()


def test_gather_into_larger_staging_buffer(seed, poison_outputs):
    n, d = 64, 16
    keys, values = random_dense(n, d, 5)
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
    assert both.shape == (30, 5 + d)
    assert torch.equal(rows[:, :5], keys[sorted_ids]) and torch.equal(rows[:, 5:], values[sorted_ids])
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
    keys, values = random_dense(n, d, 13)
    store = CPURowStore.from_dense(keys, values)
    ids = torch.sort(torch.randint(0, n, (300,))).values
    for src in (store.values(), store.keys(), store.records):
        a = torch.empty(300, src.shape[1])
        b = torch.empty(300, src.shape[1])
        cpu_rowops.gather_rows(src, ids, a, num_threads=3, backend="c")
        cpu_rowops.gather_rows(src, ids, b, backend="torch")
        assert torch.equal(a, b) and torch.equal(a, src[ids])


@pytest.mark.parametrize("key_size, width", [(None, 24), (5, 17)])
def test_nbytes_accounting(key_size, width):
    store = CPURowStore(100, 12, key_size=key_size)
    per_array = 100 * width * 4
    assert store.master_nbytes == per_array
    assert store.state_nbytes == 2 * per_array
    assert store.nbytes == 3 * per_array
    assert store.row_width == width


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
    keys, values = random_dense(9, 5, 2)
    a = CPURowStore.from_dense(keys, values)
    b = CPURowStore(9, 5, key_size=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.records, b.records)
    with pytest.raises(ValueError, match="records"):
        CPURowStore(9, 6).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"records.*\(9, 8\)"):  # same d, other key width
        CPURowStore(9, 5, key_size=3).load_state_dict(a.state_dict())


def test_loads_records_saved_in_the_layout_before_low_key_dim(seed):
    """Saves from before low_key_dim held [N, 2, d] records (keys and values both d wide): the
    same bytes as [N, 2d], so they load unchanged; a store with r != d refuses them."""
    keys, values = random_dense(9, 5)
    store = CPURowStore(9, 5)
    store.load_state_dict({"records": torch.stack([keys, values], dim=1)})
    assert torch.equal(store.keys(), keys) and torch.equal(store.values(), values)
    with pytest.raises(ValueError, match="records"):
        CPURowStore(9, 5, key_size=5 - 1).load_state_dict({"records": torch.stack([keys, values], dim=1)})


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
    with pytest.raises(ValueError, match="key_size"):
        CPURowStore(4, 4, key_size=0)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_value_shadow_follows_the_master(dtype):
    """The compute-dtype shadow a zero-copy gather reads: made from the values, the rows a
    row-sparse AdamW step updates refreshed by the step, the rest on request."""
    from meft_triton import SparseRowAdamW

    torch.manual_seed(0)
    store = CPURowStore.from_dense(torch.randn(30, 5), torch.randn(30, 7))
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        store.value_shadow(torch.float32)
    shadow = store.value_shadow(dtype)
    assert shadow.shape == (30, 7) and shadow.dtype == dtype and store.shadow_nbytes == 30 * 7 * 2
    assert torch.equal(shadow, store.values().to(dtype))
    opt = SparseRowAdamW(store, lr=0.1)
    ids = torch.tensor([3, 17, 29])
    opt.accumulate(ids, torch.randn(3, 5), torch.randn(3, 7))
    before = shadow.clone()
    opt.step()
    assert not torch.equal(shadow[ids], before[ids])
    assert torch.equal(shadow, store.values().to(dtype))
    store.values()[4] += 1.0  # written from outside (a load)
    store.refresh_shadow()
    assert torch.equal(shadow, store.values().to(dtype))
