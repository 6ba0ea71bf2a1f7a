"""SparseRowAdamW: lazy AdamW over touched rows of a CPURowStore (CPU only, fast)."""

from __future__ import annotations

import io
import math
import threading

import pytest
import torch

from meft_triton.offload import LayerUpdateError, cpu_rowops
from meft_triton import SparseRowAdamW
from meft_triton.optimizers import clip_grad_norm_
from meft_triton.optimizers.nonfinite import NonFiniteGradientError
from meft_triton.offload import CPURowStore

HAS_C = cpu_rowops.backend_name() == "c"
BACKENDS = [pytest.param("c", marks=pytest.mark.skipif(not HAS_C, reason="no C compiler")), "torch"]

# The C loop rounds every operation exactly (IEEE sqrt and division); torch's vectorised sqrt
# may differ by one ulp, so parameters agree to a few ulps; moments agree bit for bit.
PARAM_TOL = dict(rtol=1e-6, atol=1e-7)


def random_store(n: int, d: int, *, zero_values: bool = False, r: int | None = None) -> CPURowStore:
    """Keys [n, r] (r = d by default: low_key_dim unset) and values [n, d]."""
    keys = torch.randn(n, d if r is None else r)
    values = torch.zeros(n, d) if zero_values else torch.randn(n, d)
    return CPURowStore.from_dense(keys, values)


def random_grads(n: int, d: int, u: int, *, unique: bool = True, scale: float = 1.0, r: int | None = None):
    ids = torch.randperm(n)[:u] if unique else torch.randint(0, n, (u,))
    return ids, torch.randn(u, d if r is None else r) * scale, torch.randn(u, d) * scale


def sparse(ids: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return torch.sparse_coo_tensor(ids[None], rows, (n, rows.shape[1]), check_invariants=False)


def snapshot(store: CPURowStore):
    return store.records.clone(), store.exp_avg.clone(), store.exp_avg_sq.clone()


# ---------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [None, 7])  # keys d wide, or low_key_dim = 7
def test_matches_torch_sparse_adam(seed, backend, r, poison_outputs):
    n, d, u = 97, 24, 13
    store = random_store(n, d, r=r)
    lr, betas, eps = 3e-3, (0.8, 0.99), 1e-6
    opt = SparseRowAdamW(store, lr=lr, betas=betas, eps=eps, backend=backend)
    pk = torch.nn.Parameter(store.keys().clone())
    pv = torch.nn.Parameter(store.values().clone())
    ref = torch.optim.SparseAdam([pk, pv], lr=lr, betas=betas, eps=eps)
    for _ in range(5):
        ids, gk, gv = random_grads(n, d, u, r=r)
        opt.accumulate(ids, gk, gv)
        touched = opt.step()
        assert torch.equal(touched, torch.sort(ids).values)
        pk.grad, pv.grad = sparse(ids, gk, n), sparse(ids, gv, n)
        ref.step()
    assert opt.step_count == 5
    if r is not None:
        with pytest.raises(ValueError, match=r"key_rows must have shape \[len\(row_ids\), key_size\] = \[13, 7\]"):
            opt.accumulate(ids, gv, gv)
    torch.testing.assert_close(store.keys(), pk.detach(), **PARAM_TOL)
    torch.testing.assert_close(store.values(), pv.detach(), **PARAM_TOL)
    for part, p in ((0, pk), (1, pv)):
        torch.testing.assert_close(store.split(store.exp_avg)[part], ref.state[p]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(store.split(store.exp_avg_sq)[part], ref.state[p]["exp_avg_sq"], rtol=0, atol=0)


def lazy_adamw_f64(p, m, v, grads_by_step, lr, betas, eps, wd):
    """Float64 lazy AdamW over the rows present in each step's dense-row gradient dict."""
    b1, b2 = betas
    for t, grads in enumerate(grads_by_step, start=1):
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for row, g in grads.items():
            p[row] *= 1 - lr * wd
            m[row] = b1 * m[row] + (1 - b1) * g
            v[row] = b2 * v[row] + (1 - b2) * g * g
            p[row] -= lr * math.sqrt(bc2) / bc1 * m[row] / (v[row].sqrt() + eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_lazy_adamw_with_weight_decay(seed, backend):
    n, d = 64, 16
    store = random_store(n, d)
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    opt = SparseRowAdamW(store, lr=lr, betas=betas, eps=eps, weight_decay=wd, backend=backend)
    p = store.records.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    history = []
    for step in range(6):
        ids, gk, gv = random_grads(n, d, int(torch.randint(1, n // 2, ())))
        opt.accumulate(ids, gk, gv)
        opt.step()
        history.append({int(i): torch.cat([gk[k], gv[k]]).double() for k, i in enumerate(ids)})
    lazy_adamw_f64(p, m, v, history, lr, betas, eps, wd)
    torch.testing.assert_close(store.records.double(), p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.exp_avg.double(), m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(store.exp_avg_sq.double(), v, rtol=1e-5, atol=1e-9)


def test_all_rows_touched_matches_torch_adamw_float64(seed):
    """Touching every row every step, lazy AdamW is plain AdamW up to eps placement, which is
    negligible when no gradient element is near zero (so they are kept >= 0.5 in size)."""
    n, d = 16, 8
    store = random_store(n, d)
    lr, wd = 1e-2, 0.05
    opt = SparseRowAdamW(store, lr=lr, weight_decay=wd)
    pk = torch.nn.Parameter(store.keys().double().clone())
    pv = torch.nn.Parameter(store.values().double().clone())
    ref = torch.optim.AdamW([pk, pv], lr=lr, weight_decay=wd)
    ids = torch.arange(n)
    for _ in range(4):
        gk, gv = (g.sign() * (g.abs() + 0.5) for g in (torch.randn(n, d), torch.randn(n, d)))
        perm = torch.randperm(n)
        opt.accumulate(ids[perm], gk[perm], gv[perm])
        opt.step()
        pk.grad, pv.grad = gk.double(), gv.double()
        ref.step()
    torch.testing.assert_close(store.keys().double(), pk.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.values().double(), pv.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_C, reason="no C compiler")
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_loop_equals_torch_fallback(seed, grad_dtype):
    """16-bit gradient rows (what residency "resident" brings home) widen exactly in both."""
    n, width, u = 300, 40, 120
    base = [torch.randn(n, width), torch.randn(n, width) * 0.1, torch.rand(n, width) * 0.1]
    grad = torch.randn(u + 7, width).to(grad_dtype)
    ids = torch.sort(torch.randperm(n)[:u]).values
    gidx = torch.randperm(u + 7)[:u]
    out = {}
    for backend in ("c", "torch"):
        p, m, v = (t.clone() for t in base)
        cpu_rowops.adamw_rows(p, m, v, grad, ids, gidx, decay=0.999, one_minus_beta1=0.1,
                               one_minus_beta2=0.001, eps=1e-8, neg_step_size=-1e-2,
                               grad_scale=0.37, num_threads=3, backend=backend)
        out[backend] = (p, m, v)
    torch.testing.assert_close(out["c"][0], out["torch"][0], **PARAM_TOL)
    assert torch.equal(out["c"][1], out["torch"][1])
    assert torch.equal(out["c"][2], out["torch"][2])
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[ids] = False
    for t, b in zip(out["c"], base):
        assert torch.equal(t[untouched], b[untouched])


@pytest.mark.skipif(not HAS_C, reason="no C compiler")
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_compiled_loop_widens_every_16_bit_gradient_exactly(grad_dtype):
    """Every finite 16-bit pattern (subnormals, signed zeros, the extremes) as a gradient: the C
    loop's update equals the one from the fp32 rows torch widens them to, bit for bit."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(grad_dtype)
    grad16 = patterns[torch.isfinite(patterns.float())]
    width = 64
    grad16 = torch.cat([grad16, grad16[: (-grad16.numel()) % width]]).view(-1, width)
    n = grad16.shape[0]
    ids = torch.arange(n)
    out = []
    for grad in (grad16, grad16.float()):
        p, m, v = torch.ones(n, width), torch.full((n, width), 0.5), torch.full((n, width), 0.25)
        cpu_rowops.adamw_rows(p, m, v, grad, ids, None, decay=1.0, one_minus_beta1=0.1,
                              one_minus_beta2=0.001, eps=1e-8, neg_step_size=-1e-2, grad_scale=1.0,
                              num_threads=2, backend="c")
        out.append((p, m, v))
    for a, b in zip(*out):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("backend", BACKENDS)
def test_microbatch_accumulation_equals_one_step_on_summed_grads(seed, backend, poison_outputs):
    n, d = 50, 12
    a, b = random_store(n, d), None
    b = CPURowStore.from_dense(a.keys().clone(), a.values().clone())
    opt_a = SparseRowAdamW(a, lr=1e-2, weight_decay=0.01, backend=backend)
    opt_b = SparseRowAdamW(b, lr=1e-2, weight_decay=0.01, backend=backend)
    for _ in range(2):
        dense = torch.zeros(n, 2, d, dtype=torch.float64)
        touched = torch.zeros(n, dtype=torch.bool)
        for mb in range(4):  # repeated ids within and across micro-batches
            ids, gk, gv = random_grads(n, d, 20, unique=False)
            half = (None, gv) if mb == 2 else (gk, gv)  # a call with only value rows
            opt_a.accumulate(ids, *half)
            if half[0] is not None:
                dense[:, 0].index_add_(0, ids, gk.double())
            dense[:, 1].index_add_(0, ids, gv.double())
            touched[ids] = True
        assert opt_a.pending_rows == int(touched.sum())
        ids = torch.nonzero(touched).flatten()
        ids = ids[torch.randperm(ids.numel())]
        opt_b.accumulate(ids, dense[ids, 0].float(), dense[ids, 1].float())
        assert torch.equal(opt_a.step(), opt_b.step())
    for x, y in zip(snapshot(a), snapshot(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_zero_grad_and_empty_step(seed):
    store = random_store(20, 4)
    before = snapshot(store)
    opt = SparseRowAdamW(store)
    opt.accumulate(*random_grads(20, 4, 5))
    opt.zero_grad()
    assert opt.pending_rows == 0
    touched = opt.step()
    assert touched.numel() == 0 and opt.step_count == 1
    for x, y in zip(before, snapshot(store)):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_global_clip_matches_torch_clip_grad_norm(seed, max_norm):
    """Two layers clipped together == torch.nn.utils.clip_grad_norm_ over the dense grads of
    all four dense parameters, followed by SparseAdam."""
    n, d, layers = 40, 8, 2
    stores = [random_store(n, d) for _ in range(layers)]
    opts = [SparseRowAdamW(s, lr=1e-2) for s in stores]
    params = [torch.nn.Parameter(t.clone()) for s in stores for t in (s.keys(), s.values())]
    ref = torch.optim.SparseAdam(params, lr=1e-2)
    for _ in range(3):
        dense = [torch.zeros(n, d) for _ in params]
        touched = []
        for li, opt in enumerate(opts):
            mask = torch.zeros(n, dtype=torch.bool)
            for _mb in range(2):
                ids, gk, gv = random_grads(n, d, 9, unique=False, scale=3.0)
                opt.accumulate(ids, gk, gv)
                dense[2 * li].index_add_(0, ids, gk)
                dense[2 * li + 1].index_add_(0, ids, gv)
                mask[ids] = True
            touched.append(torch.nonzero(mask).flatten())
        total = clip_grad_norm_(opts, max_norm)
        for p, g in zip(params, dense):
            p.grad = g
        ref_total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
        for i, p in enumerate(params):
            ids = touched[i // 2]
            p.grad = sparse(ids, p.grad[ids], n)
        ref.step()
        for opt in opts:
            opt.step()
    for li, s in enumerate(stores):
        torch.testing.assert_close(s.keys(), params[2 * li].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.values(), params[2 * li + 1].detach(), rtol=1e-5, atol=1e-6)


def test_per_optimizer_max_grad_norm_matches_torch(seed):
    n, d = 30, 6
    store = random_store(n, d)
    opt = SparseRowAdamW(store, lr=1e-2, max_grad_norm=0.3)
    pk = torch.nn.Parameter(store.keys().clone())
    pv = torch.nn.Parameter(store.values().clone())
    ref = torch.optim.SparseAdam([pk, pv], lr=1e-2)
    ids, gk, gv = random_grads(n, d, 10)
    opt.accumulate(ids, gk, gv)
    opt.step()
    gkd, gvd = torch.zeros(n, d), torch.zeros(n, d)
    gkd[ids], gvd[ids] = gk, gv
    pk.grad, pv.grad = gkd, gvd
    torch.nn.utils.clip_grad_norm_([pk, pv], 0.3)
    pk.grad, pv.grad = sparse(ids, pk.grad[ids], n), sparse(ids, pv.grad[ids], n)
    ref.step()
    torch.testing.assert_close(store.keys(), pk.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.values(), pv.detach(), rtol=1e-5, atol=1e-6)


def test_accumulate_after_clip_keeps_the_clip(seed):
    """clip then more gradients == (clipped grads) + new grads, as with dense .grad."""
    n, d = 30, 6
    a = random_store(n, d)
    b = CPURowStore.from_dense(a.keys().clone(), a.values().clone())
    oa, ob = SparseRowAdamW(a), SparseRowAdamW(b)
    ids1, gk1, gv1 = random_grads(n, d, 8, scale=5.0)
    ids2, gk2, gv2 = random_grads(n, d, 8)
    oa.accumulate(ids1, gk1, gv1)
    total = clip_grad_norm_(oa, 1.0)
    coef = min(1.0, float(1.0 / (total + 1e-6)))
    oa.accumulate(ids2, gk2, gv2)
    ob.accumulate(ids1, gk1 * coef, gv1 * coef)
    ob.accumulate(ids2, gk2, gv2)
    oa.step()
    ob.step()
    for x, y in zip(snapshot(a), snapshot(b)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- laziness
@pytest.mark.parametrize("backend", BACKENDS)
def test_untouched_rows_and_moments_bit_identical(seed, backend):
    n, d = 80, 10
    store = random_store(n, d)
    opt = SparseRowAdamW(store, lr=1e-2, weight_decay=0.1, backend=backend)
    opt.accumulate(*random_grads(n, d, 30))
    opt.step()  # moments non-zero everywhere touched once
    before = snapshot(store)
    ids, gk, gv = random_grads(n, d, 7)
    opt.accumulate(ids, gk, gv)
    opt.step()
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[ids] = False
    after = snapshot(store)
    for x, y in zip(before, after):
        assert torch.equal(x[untouched], y[untouched])
        assert not torch.equal(x[ids], y[ids])


# ---------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_gives_the_same_next_step(seed):
    n, d = 40, 8
    store = random_store(n, d)
    opt = SparseRowAdamW(store, lr=2e-3, betas=(0.85, 0.995), weight_decay=0.02, max_grad_norm=2.0)
    for _ in range(3):
        opt.accumulate(*random_grads(n, d, 12))
        opt.step()
    buf = io.BytesIO()
    torch.save({"store": store.state_dict(), "opt": opt.state_dict()}, buf)
    ids, gk, gv = random_grads(n, d, 12)
    opt.accumulate(ids, gk, gv)
    opt.step()  # the run that did not stop

    buf.seek(0)
    saved = torch.load(buf)
    store2 = CPURowStore(n, d)
    opt2 = SparseRowAdamW(store2)  # default hyperparameters: load must restore them
    store2.load_state_dict(saved["store"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.step_count == 3
    assert (opt2.lr, opt2.betas, opt2.weight_decay, opt2.max_grad_norm) == (2e-3, (0.85, 0.995), 0.02, 2.0)
    opt2.accumulate(ids, gk, gv)
    opt2.step()
    for x, y in zip(snapshot(store), snapshot(store2)):
        assert torch.equal(x, y)
    assert opt2.step_count == opt.step_count == 4


def test_load_state_dict_rejects_mismatch(seed):
    opt = SparseRowAdamW(random_store(10, 4))
    other = SparseRowAdamW(random_store(11, 4))
    with pytest.raises(ValueError, match="num_rows"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="format"):
        opt.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="key_size=3"):  # other low_key_dim
        SparseRowAdamW(random_store(10, 4, r=3)).load_state_dict(opt.state_dict())


def test_loads_moments_saved_before_low_key_dim(seed):
    """Checkpoints from before low_key_dim hold [N, 2, d] moments and no key_size: the same
    bytes as today's [N, 2d] records, so they load and the next step is unchanged."""
    store = random_store(10, 4)
    opt = SparseRowAdamW(store, lr=1e-2)
    opt.accumulate(*random_grads(10, 4, 5))
    opt.step()
    state = opt.state_dict()
    old = {k: v for k, v in state.items() if k != "key_size"}
    old["exp_avg"], old["exp_avg_sq"] = (state[k].clone().view(10, 2, 4) for k in ("exp_avg", "exp_avg_sq"))
    fresh = SparseRowAdamW(CPURowStore.from_dense(store.keys().clone(), store.values().clone()))
    fresh.load_state_dict(old)
    assert torch.equal(fresh.store.exp_avg, store.exp_avg)
    assert torch.equal(fresh.store.exp_avg_sq, store.exp_avg_sq)
    assert fresh.step_count == 1


# ---------------------------------------------------------------------------------- async
def test_step_async_equals_step_and_overlaps_accumulate(seed):
    n, d = 60, 8
    a = random_store(n, d)
    b = CPURowStore.from_dense(a.keys().clone(), a.values().clone())
    oa, ob = SparseRowAdamW(a, lr=1e-2), SparseRowAdamW(b, lr=1e-2)
    batches = [random_grads(n, d, 15, unique=False) for _ in range(4)]
    try:
        for ids, gk, gv in batches:
            ob.accumulate(ids, gk, gv)
            ob.step()
        futures = []
        for ids, gk, gv in batches:
            oa.accumulate(ids, gk, gv)  # may run while the previous step is in flight
            futures.append(oa.step_async())
        touched = oa.wait()
        assert torch.equal(touched, torch.unique(batches[-1][0]))
        assert all(f.done() for f in futures)
        for x, y in zip(snapshot(a), snapshot(b)):
            assert torch.equal(x, y)
        assert oa.step_count == 4
    finally:
        oa.close()


@pytest.mark.parametrize("surface", ["step", "step_async", "wait"])
def test_worker_exception_surfaces_at_next_call(seed, monkeypatch, surface):
    """A worker exception (raised before the row loop writes) is carried by the future; the next
    call completes that step from the gradients it kept and raises LayerUpdateError naming the
    layer, with the ids it touched. The state then equals a run that never failed."""
    store = random_store(20, 4)
    twin_store = CPURowStore.from_dense(store.keys().clone(), store.values().clone())
    opt, twin = SparseRowAdamW(store, name=3), SparseRowAdamW(twin_store)
    real = cpu_rowops.adamw_rows
    started = threading.Event()

    def boom(*args, **kwargs):
        started.set()
        raise RuntimeError("boom in the worker")

    first, second = random_grads(20, 4, 5), random_grads(20, 4, 5)
    monkeypatch.setattr(cpu_rowops, "adamw_rows", boom)
    opt.accumulate(*first)
    fut = opt.step_async()
    with pytest.raises(RuntimeError, match="boom"):
        fut.result()  # the future carries it ...
    assert started.is_set() and opt.update_failed and opt.step_count == 0
    monkeypatch.setattr(cpu_rowops, "adamw_rows", real)
    opt.accumulate(*second)  # the next step's gradients, kept apart
    with pytest.raises(LayerUpdateError, match="layer 3 failed.*boom.*completed") as info:
        getattr(opt, surface)()  # ... and the next call completes the step and says so
    assert torch.equal(info.value.touched, torch.sort(first[0]).values)
    twin.accumulate(*first)
    twin.step()
    assert opt.step_count == 1 and not opt.update_failed
    for x, y in zip(snapshot(store), snapshot(twin_store)):
        assert torch.equal(x, y)
    opt.step()  # then the optimizer works on, with the gradients accumulated meanwhile
    twin.accumulate(*second)
    twin.step()
    assert opt.step_count == 2
    for x, y in zip(snapshot(store), snapshot(twin_store)):
        assert torch.equal(x, y)
    opt.close()


def test_an_update_that_keeps_failing_raises_at_every_call_and_writes_nothing(seed, monkeypatch):
    store = random_store(20, 4)
    opt = SparseRowAdamW(store, name=1)

    def boom(*args, **kwargs):
        raise MemoryError("no memory for the update")

    monkeypatch.setattr(cpu_rowops, "adamw_rows", boom)
    opt.accumulate(*random_grads(20, 4, 5))
    before = snapshot(store)
    with pytest.raises(MemoryError):
        opt.step()
    for _ in range(2):
        with pytest.raises(LayerUpdateError, match="layer 1 failed.*kept") as info:
            opt.wait()
        assert info.value.touched is None and opt.update_failed
    assert opt.step_count == 0
    for x, y in zip(snapshot(store), before):
        assert torch.equal(x, y)
    monkeypatch.undo()
    assert opt.wait() is not None and opt.step_count == 1  # completed once the fault is gone
    opt.close()


# ---------------------------------------------------------------------------------- bad input
def test_bad_constructor_arguments_name_the_argument():
    store = random_store(8, 4)
    with pytest.raises(TypeError, match="store"):
        SparseRowAdamW(torch.zeros(8, 2, 4))
    with pytest.raises(ValueError, match="lr"):
        SparseRowAdamW(store, lr=-1e-3)
    with pytest.raises(TypeError, match="lr"):
        SparseRowAdamW(store, lr="0.1")
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        SparseRowAdamW(store, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas"):
        SparseRowAdamW(store, betas=0.9)
    with pytest.raises(ValueError, match="eps"):
        SparseRowAdamW(store, eps=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        SparseRowAdamW(store, weight_decay=float("nan"))
    with pytest.raises(ValueError, match="max_grad_norm"):
        SparseRowAdamW(store, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="backend"):
        SparseRowAdamW(store, backend="cuda")
    opt = SparseRowAdamW(store)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([opt], -1.0)
    with pytest.raises(TypeError, match=r"optimizers\[0\]"):
        clip_grad_norm_([store], 1.0)


def test_bad_accumulate_arguments_name_the_argument():
    n, d = 8, 4
    opt = SparseRowAdamW(random_store(n, d))
    ids, g = torch.tensor([1, 2]), torch.randn(2, d)
    with pytest.raises(TypeError, match="row_ids"):
        opt.accumulate(ids.float(), g, g)
    with pytest.raises(TypeError, match="row_ids"):
        opt.accumulate([1, 2], g, g)
    with pytest.raises(ValueError, match="row_ids"):
        opt.accumulate(torch.tensor([1, n]), g, g)
    with pytest.raises(ValueError, match="row_ids"):
        opt.accumulate(torch.tensor([-1, 0]), g, g)
    with pytest.raises(ValueError, match="row_ids"):
        opt.accumulate(ids[None], g, g)
    with pytest.raises(TypeError, match="key_rows"):
        opt.accumulate(ids, g.double(), g)
    with pytest.raises(TypeError, match="value_rows"):
        opt.accumulate(ids, g, g.to(torch.int32))
    with pytest.raises(ValueError, match="key_rows"):
        opt.accumulate(ids, torch.randn(3, d), g)
    with pytest.raises(ValueError, match="value_rows"):
        opt.accumulate(ids, g, torch.randn(2, d + 1))
    with pytest.raises(ValueError, match="both None"):
        opt.accumulate(ids, None, None)
    assert opt.pending_rows == 0  # nothing was half-added


def test_without_a_compiler_the_torch_path_is_used(seed, monkeypatch):
    monkeypatch.setattr(cpu_rowops, "_tried", False)
    monkeypatch.setattr(cpu_rowops, "_lib", None)
    monkeypatch.setattr(cpu_rowops, "_lib_error", None)
    monkeypatch.setattr(cpu_rowops, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert cpu_rowops.backend_name() == "torch"
    assert "no C compiler" in cpu_rowops.backend_error()
    store = random_store(20, 4)
    opt = SparseRowAdamW(store)
    ids, gk, gv = random_grads(20, 4, 6)
    opt.accumulate(ids, gk, gv)
    before = store.records.clone()
    opt.step()
    assert not torch.equal(before[ids], store.records[ids])
    with pytest.raises(RuntimeError, match="unavailable"):
        SparseRowAdamW(store, backend="c")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype_rows_are_summed_in_fp32(dtype):
    """Gradient rows in the compute dtype (what crosses the link under residency "resident")
    add up in fp32, exactly as their fp32 values would: repeated ids over several calls."""
    torch.manual_seed(0)
    keys, values = torch.randn(20, 6), torch.randn(20, 6)
    low, high = (SparseRowAdamW(CPURowStore.from_dense(keys, values), lr=1e-2) for _ in range(2))
    for _ in range(3):
        ids = torch.randint(0, 20, (9,))
        keys, values = torch.randn(9, 6).to(dtype), torch.randn(9, 6).to(dtype)
        low.accumulate(ids, keys, values)
        high.accumulate(ids, keys.float(), values.float())
    assert torch.equal(low.accumulated()[1], high.accumulated()[1])
    assert low.accumulated()[1].dtype == torch.float32
    low.step()
    high.step()
    assert torch.equal(low.store.records, high.store.records)


FINALIZER_SCRIPT = r"""
import gc, threading, torch
from meft_triton import MEFTAdapter, MEFTConfig, OffloadedAdamW, SparseRowAdamW
from meft_triton.offload import CPURowStore, OffloadRuntime

gc.disable()
optimizer = SparseRowAdamW(CPURowStore.from_dense(torch.randn(8, 4), torch.randn(8, 4)), lr=1e-2)
optimizer.accumulate(torch.arange(3), torch.ones(3, 4), torch.ones(3, 4))
optimizer.step_async().result()  # its worker thread exists
optimizer.cycle = optimizer       # dropped, it waits for a garbage collection
runtime = OffloadRuntime("cpu", torch.float32, 4)
layer = MEFTAdapter(4, MEFTConfig(num_neurons=8, num_experts=2, experts_per_token=1, topk=2,
                                  placement="cpu"), runtime=runtime)
adam = OffloadedAdamW([layer], lr=1e-2)
layer(torch.randn(3, 4)).sum().backward()
adam.step()                       # the runtime's gradient-collect threads exist
del optimizer, runtime, layer, adam
# A non-daemon thread holds this lock while it starts or is joined, and allocates under it,
# so a garbage collection can run its finalizers there; one that joined a thread would wait
# for this very lock forever.
with threading._shutdown_locks_lock:
    gc.collect()
print("collected")
"""


@pytest.mark.skipif(not hasattr(threading, "_shutdown_locks_lock"), reason="CPython <= 3.12 internals")
def test_finalizers_never_join_threads_inside_garbage_collection():
    """The dropped optimizer's worker and the dropped runtime's collect threads are told to stop
    by finalizers that do not wait for them: a finalizer runs wherever garbage collection
    starts, which may be a thread holding the lock a join needs (this hung a CI run)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", FINALIZER_SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "collected" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------------------------- records kept as sent
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_records_kept_as_sent_step_like_copied_sums(seed, backend, dtype, clip):
    """accumulate_records keeps a step's first batch of distinct rows as it came (no fp32 copy)
    and the update reads it in its dtype: parameters and moments equal, bit for bit, those of
    accumulate(), which copies the rows into fp32 sums; a second batch, a clip of several
    layers and a step that follows all behave as with copied sums."""
    n, d, r, u = 61, 10, 7, 23
    first, second = random_store(n, d, r=r), None
    second = CPURowStore.from_dense(first.keys().clone(), first.values().clone())
    kept = SparseRowAdamW(first, lr=1e-2, weight_decay=0.1, max_grad_norm=clip, backend=backend)
    copied = SparseRowAdamW(second, lr=1e-2, weight_decay=0.1, max_grad_norm=clip, backend=backend)
    try:
        for batches in (1, 2, 1):
            for _ in range(batches):
                ids = torch.randperm(n)[:u]
                records = torch.randn(u, r + d).to(dtype)
                kept.accumulate_records(ids, records)
                copied.accumulate(ids, *second.split(records))
            if batches == 1:
                assert kept._acc.buf.numel() == 0, "the first batch was copied into fp32 sums"
            clip_grad_norm_([kept], 1.0)
            clip_grad_norm_([copied], 1.0)
            kept.step()
            copied.step()
            for x, y in zip(snapshot(first), snapshot(second)):
                assert torch.equal(x, y)
    finally:
        kept.close()
        copied.close()


def test_records_checked_like_accumulate():
    store = random_store(20, 6, r=4)
    opt = SparseRowAdamW(store, lr=1e-2)
    with pytest.raises(ValueError, match=r"records must be a 2-D tensor \[len\(row_ids\), 10\]"):
        opt.accumulate_records(torch.arange(3), torch.zeros(3, 9))
    with pytest.raises(ValueError, match="key_rows must have shape"):
        opt.accumulate_records(torch.arange(3), torch.zeros(4, 10))
    with pytest.raises(ValueError, match="row_ids"):
        opt.accumulate_records(torch.tensor([0, 20, 1]), torch.zeros(3, 10))
    assert opt.pending_rows == 0
    bad = torch.zeros(3, 10, dtype=torch.bfloat16)
    bad[1, 5] = float("inf")  # a value half
    opt.accumulate_records(torch.tensor([4, 7, 9]), bad)
    with pytest.raises(NonFiniteGradientError, match="values"):
        opt.step()


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 7 * 3, 1 << 22])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_rows_summed_a_chunk_at_a_time(seed, monkeypatch, chunk_bytes, dtype):
    """16-bit rows added to existing sums widen a chunk of rows at a time (row_grads.
    WIDEN_CHUNK_BYTES): the sums equal those of the whole rows widened at once, for chunks of
    one row, of three, and of all, with a repeated id in the batch."""
    from meft_triton.optimizers import row_grads

    monkeypatch.setattr(row_grads, "WIDEN_CHUNK_BYTES", chunk_bytes)
    n, d, r = 40, 10, 7
    store = random_store(n, d, r=r)
    sums = row_grads.RowGradSums(store)
    first = torch.randperm(n)[:25]
    k1, v1 = torch.randn(25, r), torch.randn(25, d)
    sums.add(first, k1, v1)
    second = torch.cat([first[:9], torch.randperm(n)[:12], first[:1]])  # overlapping, one id twice
    k2, v2 = torch.randn(second.numel(), r).to(dtype), torch.randn(second.numel(), d).to(dtype)
    sums.add(second, k2, v2)
    want = torch.zeros(n, r + d, dtype=torch.float64)
    want.index_add_(0, first, torch.cat([k1, v1], 1).double())
    want.index_add_(0, second, torch.cat([k2, v2], 1).double())
    got = torch.zeros(n, r + d, dtype=torch.float64).index_add_(0, sums.ids[:sums.count], sums.rows().double())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
