"""Row kernels of the CPU store and the row-sparse optimizer: a small C loop and a torch twin.

Two operations run over rows picked by id from a CPU matrix whose rows are contiguous:

* ``adamw_rows``: the lazy AdamW update of the picked rows of a parameter matrix and its two
  moments, one pass over memory (read p, g, m, v; write p, m, v), split over threads;
* ``gather_rows``: copy the picked rows (or a fixed column slice of each) into a buffer.

The C loop is compiled on first use with the system C compiler (``cc``/``gcc``), cached on
disk keyed by a hash of its source, flags and CPU in a directory private to this user (mode
0700; directory and library are checked for owner and mode at every load, and where the cache
cannot be private a fresh private temp directory is used), and called through :mod:`ctypes`
(which releases the GIL, so a worker thread's update overlaps Python work elsewhere). Where no
compiler is found, or ``MEFT_TRITON_CPU_KERNELS=torch`` is set, the pure-torch twin runs
instead; it performs the same fp32 operations in the same order, so both give the same
numbers (tests check this). ``MEFT_TRITON_CPU_KERNELS=c`` makes a failed build an error.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

_C_SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *p, *m, *v;
    const void *g;
    const int64_t *ids, *gidx;
    int64_t begin, end, rowlen;
    float decay, omb1, omb2, eps, neg_step, gscale;
    int use_decay, use_scale, gkind;
    float *scratch;  /* one fp32 gradient row, for 16-bit gradients */
} adam_job;

/* IEEE half -> float, exact for every input (subnormals, infinities, NaN). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: man x 2^-24, normalised */
            int shift = 0;
            while (!(man & 0x400u)) { man <<= 1; ++shift; }
            bits = sign | ((uint32_t)(113 - shift) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Gradient row `row` as fp32: the row itself (gkind 0), or widened into j->scratch
   (1: bfloat16, 2: float16; both widen exactly). */
static const float *grad_row(const adam_job *j, int64_t row) {
    const int64_t L = j->rowlen;
    if (j->gkind == 0) return (const float *)j->g + row * L;
    const uint16_t *restrict h = (const uint16_t *)j->g + row * L;
    float *restrict out = j->scratch;
    if (j->gkind == 1) {
        uint32_t *restrict bits = (uint32_t *)out;  /* (-fno-strict-aliasing) */
        for (int64_t i = 0; i < L; ++i) bits[i] = (uint32_t)h[i] << 16;
    } else {
        for (int64_t i = 0; i < L; ++i) out[i] = half_to_float(h[i]);
    }
    return out;
}

/* Same fp32 operations, same order as torch.optim.SparseAdam (plus the decoupled decay and
   the clip scale, each one multiply, when enabled). Compiled with -ffp-contract=off. */
static void *adam_worker(void *arg) {
    const adam_job *j = (const adam_job *)arg;
    const int64_t L = j->rowlen;
    for (int64_t k = j->begin; k < j->end; ++k) {
        float *restrict p = j->p + j->ids[k] * L;
        float *restrict m = j->m + j->ids[k] * L;
        float *restrict v = j->v + j->ids[k] * L;
        const float *restrict g = grad_row(j, j->gidx ? j->gidx[k] : k);
        if (k + 1 < j->end) {
            const int64_t nx = j->ids[k + 1] * L;
            __builtin_prefetch(j->p + nx, 1, 0);
            __builtin_prefetch(j->m + nx, 1, 0);
            __builtin_prefetch(j->v + nx, 1, 0);
        }
        const float omb1 = j->omb1, omb2 = j->omb2, eps = j->eps, ns = j->neg_step;
        /* x * 1.0f is x exactly, so the disabled scale and decay change nothing (and cost two
           multiplies in a loop bound by memory) */
        const float s = j->use_scale ? j->gscale : 1.0f, dc = j->use_decay ? j->decay : 1.0f;
        for (int64_t i = 0; i < L; ++i) {
            const float gi = g[i] * s;
            const float mo = m[i], vo = v[i];
            const float mn = mo + (gi - mo) * omb1;
            const float vn = vo + (gi * gi - vo) * omb2;
            m[i] = mn; v[i] = vn;
            p[i] = p[i] * dc + ns * (mn / (sqrtf(vn) + eps));
        }
    }
    return 0;
}

#define MAX_THREADS 64

/* Threads for `work` units: nthreads clamped to 1..MAX_THREADS, and to at least
   `min_per_thread` units each, else threads cost more than they give. */
static int thread_count(int nthreads, int64_t work, int64_t min_per_thread) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    int64_t most = work / min_per_thread;
    if (most < 1) most = 1;
    if (nthreads > most) nthreads = (int)most;
    return nthreads;
}

/* Runs fn on each of the n jobs (an array of `size`-byte structs): job 0 on the calling
   thread, the others on new threads; a job whose thread fails to start runs here instead. */
static void run_jobs(int n, void *(*fn)(void *), void *jobs, size_t size) {
    char *base = (char *)jobs;
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 1; t < n; ++t)
        started[t] = pthread_create(&tids[t], 0, fn, base + t * size) == 0;
    fn(base);
    for (int t = 1; t < n; ++t) {
        if (started[t]) pthread_join(tids[t], 0);
        else fn(base + t * size);
    }
}

/* gkind: the gradient rows' type (0 float32, 1 bfloat16, 2 float16). Returns 0, or -1 when
   the scratch rows cannot be allocated (nothing written then). */
int meft_adamw_rows(float *p, float *m, float *v, const void *g, int gkind,
                    const int64_t *ids, const int64_t *gidx, int64_t n, int64_t rowlen,
                    float decay, float omb1, float omb2, float eps, float neg_step,
                    float gscale, int use_decay, int use_scale, int nthreads) {
    if (n <= 0) return 0;
    nthreads = thread_count(nthreads, n * rowlen, 65536);
    float *scratch = 0;
    if (gkind != 0) {
        scratch = (float *)malloc((size_t)nthreads * (size_t)rowlen * sizeof(float));
        if (!scratch) return -1;
    }
    adam_job jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; ++t) {
        adam_job *j = &jobs[t];
        j->p = p; j->m = m; j->v = v; j->g = g; j->ids = ids; j->gidx = gidx;
        j->begin = n * t / nthreads; j->end = n * (t + 1) / nthreads; j->rowlen = rowlen;
        j->decay = decay; j->omb1 = omb1; j->omb2 = omb2; j->eps = eps; j->neg_step = neg_step;
        j->gscale = gscale; j->use_decay = use_decay; j->use_scale = use_scale;
        j->gkind = gkind; j->scratch = scratch ? scratch + (size_t)t * (size_t)rowlen : 0;
    }
    run_jobs(nthreads, adam_worker, jobs, sizeof jobs[0]);
    free(scratch);
    return 0;
}

typedef struct {
    const char *src; char *dst;
    const int64_t *ids;
    int64_t begin, end, src_stride, dst_stride, nbytes;
} gather_job;

static void *gather_worker(void *arg) {
    const gather_job *j = (const gather_job *)arg;
    for (int64_t k = j->begin; k < j->end; ++k) {
        if (k + 1 < j->end) __builtin_prefetch(j->src + j->ids[k + 1] * j->src_stride, 0, 0);
        memcpy(j->dst + k * j->dst_stride, j->src + j->ids[k] * j->src_stride, (size_t)j->nbytes);
    }
    return 0;
}

int meft_gather_rows(const char *src, int64_t src_stride, const int64_t *ids, int64_t n,
                     char *dst, int64_t dst_stride, int64_t nbytes, int nthreads) {
    if (n <= 0) return 0;
    nthreads = thread_count(nthreads, n * nbytes, 256 * 1024);
    gather_job jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; ++t) {
        gather_job *j = &jobs[t];
        j->src = src; j->dst = dst; j->ids = ids;
        j->begin = n * t / nthreads; j->end = n * (t + 1) / nthreads;
        j->src_stride = src_stride; j->dst_stride = dst_stride; j->nbytes = nbytes;
    }
    run_jobs(nthreads, gather_worker, jobs, sizeof jobs[0]);
    return 0;
}
"""

# -ffp-contract=off: no fused multiply-add, so each operation rounds like torch's twin.
# -fno-math-errno lets sqrtf vectorize; it changes nothing for the non-negative inputs here.
# -fno-strict-aliasing: bf16 rows are widened by writing their bits as words into a float row.
_BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-math-errno",
               "-fno-strict-aliasing", "-pthread"]
_ARCH_FLAGS = ["-march=native"]

_ENV_VAR = "MEFT_TRITON_CPU_KERNELS"


@dataclass
class _Lib:
    handle: ctypes.CDLL
    path: str


_lock = threading.Lock()
_lib: _Lib | None = None
_lib_error: str | None = None
_tried = False


def _cache_dir() -> str:
    root = os.environ.get("MEFT_TRITON_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "meft_triton")
    return os.path.join(root, "cpu_rowops")


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _is_private(st: os.stat_result, kind: int) -> bool:
    """``st`` (of an lstat or fstat) is of ``kind`` (``stat.S_IFDIR`` / ``S_IFREG``), owned by
    this user, and neither readable nor writable by anyone else: nothing another local user
    placed or could change."""
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    return stat.S_IFMT(st.st_mode) == kind and st.st_uid == uid and not st.st_mode & 0o077


def _private_dir(path: str) -> bool:
    try:
        return _is_private(os.lstat(path), stat.S_IFDIR)
    except OSError:
        return False


_fresh_dir: str | None = None


def _writable_dir() -> str:
    """The cache directory if it is (or can be made) private to this user; otherwise a fresh
    private temp directory of this process (removed at exit). Never a shared, predictable
    path: a library another user could plant there would run as this user."""
    global _fresh_dir
    out_dir = _cache_dir()
    try:
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
        st = os.lstat(out_dir)
        uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and st.st_mode & 0o077:
            os.chmod(out_dir, 0o700)  # ours, made with a loose umask: close it
        if _private_dir(out_dir) and os.access(out_dir, os.W_OK):
            return out_dir
    except OSError:
        pass
    if _fresh_dir is None or not _private_dir(_fresh_dir):
        _fresh_dir = tempfile.mkdtemp(prefix="meft_triton_rowops_")  # 0700, unpredictable name
        atexit.register(shutil.rmtree, _fresh_dir, True)
    return _fresh_dir


def _library_path(out_dir: str, cc: str, flags: list[str]) -> str:
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, *flags, _cpu_tag(), sys.platform]).encode()).hexdigest()[:16]
    return os.path.join(out_dir, f"meft_rowops_{key}.so")


def _build(cc: str) -> str:
    last_err = ""
    out_dir = _writable_dir()
    for flags in (_BASE_FLAGS + _ARCH_FLAGS, _BASE_FLAGS):
        path = _library_path(out_dir, cc, flags)
        try:
            if _is_private(os.lstat(path), stat.S_IFREG):
                return path
        except OSError:
            pass  # absent: build it; anything not private is replaced by our own build below
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = os.path.join(tmp, "rowops.c")
            with open(src, "w") as f:
                f.write(_C_SOURCE)
            tmp_so = os.path.join(tmp, "rowops.so")
            proc = subprocess.run([cc, *flags, src, "-o", tmp_so, "-lm"], capture_output=True, text=True)
            if proc.returncode == 0:
                os.chmod(tmp_so, 0o700)
                os.replace(tmp_so, path)  # atomic: concurrent builders are harmless
                return path
            last_err = proc.stderr[-2000:]
    raise RuntimeError(f"compiling the CPU row kernels failed:\n{last_err}")


def _open_private(path: str) -> ctypes.CDLL:
    """Load the library at ``path`` only if it and its directory are private to this user,
    checked on the open file itself (no swap between the check and the load)."""
    if not _private_dir(os.path.dirname(path)):
        raise RuntimeError(f"{os.path.dirname(path)} is not a directory private to this user")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not _is_private(os.fstat(fd), stat.S_IFREG):
            raise RuntimeError(f"{path} is not a file private to this user (owner or mode)")
        by_fd = f"/proc/self/fd/{fd}"
        return ctypes.CDLL(by_fd if os.path.exists(by_fd) else path)
    finally:
        os.close(fd)


def _load() -> _Lib | None:
    global _lib, _lib_error, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        mode = os.environ.get(_ENV_VAR, "auto").lower()
        if mode not in ("auto", "c", "torch"):
            raise ValueError(f"{_ENV_VAR} must be 'auto', 'c' or 'torch', got {mode!r}")
        if mode == "torch":
            _lib_error = f"disabled by {_ENV_VAR}=torch"
        else:
            try:
                cc = _compiler()
                if cc is None:
                    raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
                path = _build(cc)
                handle = _open_private(path)
                i64, f32, vp, ci = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
                handle.meft_adamw_rows.argtypes = [vp, vp, vp, vp, ci, vp, vp, i64, i64,
                                                   f32, f32, f32, f32, f32, f32, ci, ci, ci]
                handle.meft_adamw_rows.restype = ci
                handle.meft_gather_rows.argtypes = [vp, i64, vp, i64, vp, i64, i64, ci]
                handle.meft_gather_rows.restype = ci
                _lib = _Lib(handle, path)
            except Exception as exc:  # noqa: BLE001 - any failure means: use the torch twin
                _lib_error = f"{type(exc).__name__}: {exc}"
                if mode == "c":
                    _tried = True
                    raise RuntimeError(f"{_ENV_VAR}=c but the C row kernels are unavailable: {_lib_error}") from exc
                warnings.warn(
                    f"meft_triton: C row kernels unavailable ({_lib_error}); using the slower torch path",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _tried = True
        return _lib


def backend_name() -> str:
    """``"c"`` when the compiled loop is in use, ``"torch"`` otherwise."""
    return "c" if _load() is not None else "torch"


def backend_error() -> str | None:
    """Why the compiled loop is not in use (None when it is)."""
    _load()
    return _lib_error


_HUGE = 2 << 20  # 2 MiB: x86-64 / arm64 transparent huge page size
_MADV_HUGEPAGE = 14
_madvise = None


def _get_madvise():
    global _madvise
    if _madvise is None:
        fn = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _madvise = fn
    return _madvise


def advise_huge_pages(t: Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned interior of ``t``'s memory with transparent huge
    pages (``madvise(MADV_HUGEPAGE)``; effective where THP is in "madvise" or "always" mode).
    Call it before the memory is first written. Rows picked at random from a large array
    otherwise cost a TLB miss per 4 KiB page; with huge pages the whole store fits the TLB.
    Returns whether the advice was accepted. Harmless no-op elsewhere."""
    fn = _get_madvise()
    nbytes = t.numel() * t.element_size()
    if not fn or nbytes < 2 * _HUGE:
        return False
    start = t.data_ptr()
    lo = (start + _HUGE - 1) & ~(_HUGE - 1)
    hi = (start + nbytes) & ~(_HUGE - 1)
    return hi > lo and fn(lo, hi - lo, _MADV_HUGEPAGE) == 0


def empty_rows(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """``torch.empty`` for a large row array, advised onto huge pages (see advise_huge_pages)."""
    t = torch.empty(shape, dtype=dtype)
    advise_huge_pages(t)
    return t


def default_threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


#: the C loop's code for each gradient dtype
_GRAD_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def adamw_rows(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor,
    ids: Tensor,
    gidx: Tensor | None,
    *,
    decay: float,
    one_minus_beta1: float,
    one_minus_beta2: float,
    eps: float,
    neg_step_size: float,
    grad_scale: float,
    num_threads: int | None = None,
    backend: str | None = None,
) -> None:
    """In place, for each k: rows ``r = ids[k]`` of ``param``/``exp_avg``/``exp_avg_sq`` (each
    [R, L] contiguous fp32) get the AdamW update with gradient row ``grad[gidx[k]]`` (or
    ``grad[k]`` when ``gidx`` is None) times ``grad_scale``. ``grad`` is contiguous fp32, or
    bfloat16/float16 (the compute-dtype rows as they came home), widened exactly to fp32 as
    each row is read, so the update reads 2 bytes per gradient element instead of 4:

        g = grad * grad_scale                 (skipped when grad_scale == 1)
        m = m + (g - m) * (1 - beta1)
        v = v + (g * g - v) * (1 - beta2)
        p = p * decay + neg_step_size * (m / (sqrt(v) + eps))   (p * decay skipped when decay == 1)

    ``ids`` must not repeat (callers pass unique sorted ids). No argument checking here:
    callers (the optimizer) validate.
    """
    n = ids.numel()
    if n == 0:
        return
    use_c = (backend or ("c" if _load() is not None else "torch")) == "c"
    use_decay = decay != 1.0
    use_scale = grad_scale != 1.0
    if use_c:
        lib = _load()
        if lib is None:
            raise RuntimeError(f"C row kernels unavailable: {_lib_error}")
        status = lib.handle.meft_adamw_rows(
            _ptr(param), _ptr(exp_avg), _ptr(exp_avg_sq), _ptr(grad), _GRAD_KINDS[grad.dtype], _ptr(ids),
            _ptr(gidx), n, param.shape[1], decay, one_minus_beta1, one_minus_beta2, eps, neg_step_size,
            grad_scale, int(use_decay), int(use_scale), int(num_threads or default_threads()),
        )
        if status != 0:
            raise MemoryError(f"adamw_rows: no memory for the widened gradient rows ({param.shape[1]} floats per thread)")
        return
    _adamw_rows_torch(param, exp_avg, exp_avg_sq, grad, ids, gidx, decay, one_minus_beta1,
                      one_minus_beta2, eps, neg_step_size, grad_scale, use_decay, use_scale)


_TORCH_CHUNK_ELEMS = 1 << 19  # rows per chunk so a chunk's temporaries stay in cache


def _adamw_rows_torch(param, exp_avg, exp_avg_sq, grad, ids, gidx, decay, omb1, omb2, eps,
                      neg_step, gscale, use_decay, use_scale) -> None:
    """The torch twin of the C loop: the same fp32 operations in the same order.

    Python float scalars enter torch's fp32 kernels as fp32 (torch's opmath for float32 is
    float32), exactly as the C loop's float arguments do.
    """
    n, width = ids.numel(), param.shape[1]
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(1, width))
    rows = min(n, chunk)
    g = torch.empty(rows, width, dtype=param.dtype)
    p, m, v = torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)
    t = torch.empty_like(g)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        k = hi - lo
        idx = ids[lo:hi]
        gk, pk, mk, vk, tk = g[:k], p[:k], m[:k], v[:k], t[:k]
        if gidx is None:
            gk.copy_(grad[lo:hi])
        elif grad.dtype == gk.dtype:
            torch.index_select(grad, 0, gidx[lo:hi], out=gk)
        else:  # 16-bit rows widen exactly, as the C loop widens them
            gk.copy_(grad.index_select(0, gidx[lo:hi]))
        if use_scale:
            gk.mul_(gscale)
        torch.index_select(param, 0, idx, out=pk)
        torch.index_select(exp_avg, 0, idx, out=mk)
        torch.index_select(exp_avg_sq, 0, idx, out=vk)
        # m = m + (g - m) * (1 - beta1)
        torch.sub(gk, mk, out=tk)
        mk.add_(tk.mul_(omb1))
        # v = v + (g * g - v) * (1 - beta2)
        torch.mul(gk, gk, out=tk)
        vk.add_(tk.sub_(vk).mul_(omb2))
        # p = p * decay + neg_step * (m / (sqrt(v) + eps))
        torch.sqrt(vk, out=tk)
        tk.add_(eps)
        torch.div(mk, tk, out=tk)
        tk.mul_(neg_step)
        if use_decay:
            pk.mul_(decay)
        pk.add_(tk)
        param.index_copy_(0, idx, pk)
        exp_avg.index_copy_(0, idx, mk)
        exp_avg_sq.index_copy_(0, idx, vk)


def gather_rows(
    src: Tensor,
    ids: Tensor,
    out: Tensor,
    *,
    num_threads: int | None = None,
    backend: str | None = None,
) -> None:
    """``out[k] = src[ids[k]]`` for a 2-D ``src`` whose rows are contiguous (its row stride may
    exceed its width, e.g. the value part of an [N, r + d] record store) and a row-contiguous ``out``."""
    n = ids.numel()
    if n == 0:
        return
    use_c = (backend or ("c" if _load() is not None else "torch")) == "c"
    if use_c:
        lib = _load()
        if lib is None:
            raise RuntimeError(f"C row kernels unavailable: {_lib_error}")
        es = src.element_size()
        lib.handle.meft_gather_rows(
            _ptr(src), src.stride(0) * es, _ptr(ids), n, _ptr(out), out.stride(0) * es,
            src.shape[1] * es, int(num_threads or default_threads()),
        )
        return
    torch.index_select(src, 0, ids, out=out) if out.is_contiguous() else out.copy_(src.index_select(0, ids))
