"""SparseRowAdamW: lazy AdamW over the touched rows of a :class:`CPURowStore`.

Only neurons that received a gradient since the last step are updated; every other row of
the master copy and of both moments stays bit-identical ("lazy Adam"). A neuron is the unit:
when a neuron is touched, its key row and its value row are both updated (a missing half
counts as a zero gradient). The arithmetic follows :class:`torch.optim.SparseAdam` exactly,
with one global step count ``t`` (the number of ``step()`` calls) for the bias correction:

    g  = grad * clip_scale                       (clip_scale = 1 unless clipping shrinks it)
    m  = m + (g - m) * (1 - beta1)
    v  = v + (g * g - v) * (1 - beta2)
    step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)
    p  = p * (1 - lr * weight_decay) - step_size * (m / (sqrt(v) + eps))

so with ``weight_decay = 0`` it equals ``torch.optim.SparseAdam`` on the same rows. Note the
``eps`` placement is SparseAdam's (``sqrt(v) + eps`` before the bias correction); dense
``torch.optim.AdamW`` adds ``eps`` after dividing by ``sqrt(1 - beta2**t)``, which differs
only where ``sqrt(v)`` is comparable to ``eps``. Weight decay is decoupled (AdamW) and applied
to touched rows only.

Gradients arrive row-sparse through :meth:`SparseRowAdamW.accumulate` (ids may repeat, within
one call and across micro-batches: they sum). :meth:`~SparseRowAdamW.step_async` runs the
update on one worker thread per optimizer (the compiled row loop releases the GIL), so the
update of one layer overlaps the backward of the others; :func:`clip_grad_norm_` clips by the
global norm over several optimizers (layers) at once.
"""

from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..offload import cpu_rowops
from ..offload.errors import LayerUpdateError
from ..offload.row_store import CPURowStore, check_row_ids
from ..validation import describe
from .hyperparameters import check_betas, check_lr, check_max_norm, check_nonneg, check_norm_type
from .nonfinite import NonFiniteRows, act_on, check_nonfinite_mode, nonfinite_rows
from .row_grads import RowGradSums

_FORMAT = "meft_triton.SparseRowAdamW/1"
#: gradient row dtypes :meth:`SparseRowAdamW.accumulate` takes (summed in fp32)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def perf_slowdown(part: str) -> bool:
    """True when ``MEFT_PERF_SLOWDOWN`` (``1``/``all``, or a comma list naming ``part``) asks for
    a deliberately slowed build: the test of ``profiling.perf_gate`` proves with it that the gate
    fails. Never set it otherwise; the needless work leaves every result unchanged."""
    flag = os.environ.get("MEFT_PERF_SLOWDOWN", "").strip().lower()
    return flag in ("1", "all") or part in flag.split(",")


def _clip_coef(total: Tensor, max_norm: float) -> Tensor:
    # the same arithmetic as torch.nn.utils.clip_grad_norm_
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


class SparseRowAdamW:
    """Row-sparse lazy AdamW over a :class:`CPURowStore` (see the module docstring).

    Parameters
    ----------
    store: the :class:`CPURowStore` whose ``records`` are updated and whose ``exp_avg`` /
        ``exp_avg_sq`` hold the moments.
    lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW` (``lr`` may be changed
        between steps by assigning ``opt.lr``).
    max_grad_norm: clip this optimizer's accumulated gradients to this global L2 norm at
        every step (``None``: no clipping). To clip across several layers use
        :func:`clip_grad_norm_` instead (both compose, like two successive clips).
    num_threads: threads of the row update (default ``torch.get_num_threads()``). With many
        layers stepping in the background at once, ``num_threads=1`` keeps the number of busy
        threads near the number of cores (the update is memory-bound either way).
    backend: ``"auto"`` (compiled loop when available), ``"c"`` or ``"torch"``.
    nonfinite: what a step does when a gradient row holds NaN/Inf (checked as
        :meth:`accumulate` receives the rows, and a non-finite clip scale): ``"raise"``
        (default) raises :class:`meft_triton.optimizers.nonfinite.NonFiniteGradientError` from
        :meth:`step` / :meth:`step_async`, ``"skip"`` warns; either way the step is not applied
        (master rows, moments and step count untouched: it never writes NaN) and the
        accumulated gradients are dropped. ``nonfinite_steps`` counts such steps,
        ``last_nonfinite`` holds the last report (:class:`~meft_triton.optimizers.nonfinite.NonFiniteRows`).
    name: how reports name this optimizer's layer (e.g. the decoder-layer index).

    Typical loop::

        for micro_batch in batches:
            ...                                   # backward produces row-sparse grads
            opt.accumulate(ids, key_grad_rows, value_grad_rows)
        fut = opt.step_async()                    # or: touched = opt.step()
        ...                                       # other layers' work overlaps
        touched = fut.result()                    # refresh the GPU key cache for `touched`
    """

    def __init__(
        self,
        store: CPURowStore,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        *,
        num_threads: int | None = None,
        backend: str = "auto",
        nonfinite: str = "raise",
        name: Any = None,
    ) -> None:
        if not isinstance(store, CPURowStore):
            raise TypeError(f"store must be a CPURowStore, got {type(store).__name__}")
        self.store = store
        self._lr = check_lr(lr)
        self.betas = check_betas(betas)
        self.eps = check_nonneg("eps", eps)
        self.weight_decay = check_nonneg("weight_decay", weight_decay)
        self.max_grad_norm = check_max_norm("max_grad_norm", max_grad_norm)
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"num_threads must be an int >= 1 or None, got {num_threads!r}")
        self.num_threads = num_threads
        if backend not in ("auto", "c", "torch"):
            raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {backend!r}")
        if backend == "c" and cpu_rowops.backend_name() != "c":
            raise RuntimeError(f"backend='c' but the compiled row loop is unavailable: {cpu_rowops.backend_error()}")
        self.backend = backend
        self.nonfinite = check_nonfinite_mode(nonfinite)
        self.name = name
        self.nonfinite_steps = 0
        self.last_nonfinite: tuple[NonFiniteRows, ...] | None = None
        self._step = 0
        self._acc = RowGradSums(store)
        self._spare: RowGradSums | None = None
        self._failed: tuple[RowGradSums, dict[str, Any]] | None = None  # a step to complete
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ hyperparameters
    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = check_lr(value)

    @property
    def step_count(self) -> int:
        """Completed steps (the ``t`` of the bias correction of the last finished step)."""
        return self._step

    @property
    def pending_rows(self) -> int:
        """Distinct neurons with accumulated gradient waiting for the next step."""
        return self._acc.count

    # ------------------------------------------------------------------ gradients
    def accumulate(self, row_ids: Tensor, key_rows: Tensor | None = None,
                   value_rows: Tensor | None = None) -> None:
        """Add row-sparse gradients: ``key_rows[k]`` (``[U, r]``) / ``value_rows[k]`` (``[U, d]``)
        to neuron ``row_ids[k]`` (int64 ``[U]``), fp32 or a 16-bit compute dtype (what crosses
        the link under residency "resident"), summed in fp32. Repeated ids sum; sums carry over until
        :meth:`step` or :meth:`zero_grad`. ``None`` for one half means a zero gradient there
        (the neuron still counts as touched). Safe while a :meth:`step_async` is running."""
        ids = self._checked(row_ids, key_rows, value_rows)
        self._acc.add(ids, key_rows, value_rows)

    def accumulate_records(self, row_ids: Tensor, records: Tensor) -> None:
        """Like :meth:`accumulate` with both halves in one ``[U, r + d]`` tensor (the store's
        record layout: key gradient, then value gradient). The first batch of a step with
        distinct ids is kept as it is, not copied (its owner must not change it before the
        step): the update then reads it in its own dtype, 2 bytes per element for bf16/fp16,
        where a copy into fp32 sums would cost a write of 4 and a read of 4 more."""
        if not isinstance(records, Tensor) or records.dim() != 2 or records.shape[1] != self.store.row_width:
            raise ValueError(f"records must be a 2-D tensor [len(row_ids), {self.store.row_width}], "
                             f"got {describe(records)}")
        key_rows, value_rows = self.store.split(records)
        ids = self._checked(row_ids, key_rows, value_rows)
        self._acc.materialize_scale()  # a clip of nothing: only its non-finite check remains
        if not self._acc.adopt(ids, records):
            self._acc.add(ids, key_rows, value_rows)

    def _checked(self, row_ids: Tensor, key_rows: Tensor | None, value_rows: Tensor | None) -> Tensor:
        """The ids as int64 after every argument check; non-finite rows noted for the step."""
        ids = check_row_ids(row_ids, self.store.num_rows)
        if key_rows is None and value_rows is None:
            raise ValueError("key_rows and value_rows are both None: pass at least one")
        widths = {"key_rows": ("key_size", self.store.key_size),
                  "value_rows": ("hidden_size", self.store.hidden_size)}
        for name, rows in (("key_rows", key_rows), ("value_rows", value_rows)):
            if rows is None:
                continue
            if not isinstance(rows, Tensor):
                raise TypeError(f"{name} must be a float32 torch.Tensor, got {type(rows).__name__}")
            if rows.dtype not in GRAD_DTYPES:
                raise TypeError(f"{name} must be float32, bfloat16 or float16, got dtype {rows.dtype}")
            if rows.device.type != "cpu":
                raise ValueError(f"{name} must be a CPU tensor, got device {rows.device}")
            width_name, width = widths[name]
            if tuple(rows.shape) != (ids.numel(), width):
                raise ValueError(
                    f"{name} must have shape [len(row_ids), {width_name}] = [{ids.numel()}, {width}], "
                    f"got {tuple(rows.shape)}"
                )
        for part, rows in (("keys", key_rows), ("values", value_rows)):
            bad = None if rows is None else nonfinite_rows(rows)
            if bad is not None:
                self._acc.nonfinite.append((part, ids[bad]))
        return ids

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (and any pending clip)."""
        self._acc.clear()

    def grad_norm(self, norm_type: float = 2.0) -> Tensor:
        """``norm_type``-norm of the accumulated gradients (0-dim fp32 tensor)."""
        return self._acc.norm(check_norm_type(norm_type))

    def accumulated(self) -> tuple[Tensor, Tensor]:
        """The gradients accumulated for the next step: ``(ids [U], records [U, r + d])`` with a
        pending clip applied (views, valid until the next accumulate / step / zero_grad): what
        a data-parallel rank sends to its node's master (meft_triton.distributed)."""
        self._acc.materialize_scale()
        self._acc.widen()
        n = self._acc.count
        return self._acc.ids[:n], self._acc.buf[:n]

    # ------------------------------------------------------------------ stepping
    def _collect(self) -> Any:
        """Wait for the in-flight step. One that failed is completed here, on the calling thread,
        from the gradients it kept, and :class:`LayerUpdateError` reports it (once)."""
        fut, self._pending = self._pending, None
        error = None
        if fut is not None:
            try:
                return fut.result()
            except BaseException as exc:  # noqa: BLE001 - completed below, or re-raised
                error = exc
        if self._failed is None:
            if error is not None:
                raise error
            return None
        who = "SparseRowAdamW" if self.name is None else f"layer {self.name}"
        try:
            touched = self._apply(*self._failed)
        except BaseException as again:  # noqa: BLE001 - still failing: the step stays to complete
            raise LayerUpdateError(
                f"the optimizer update of {who} failed ({type(again).__name__}: {again}); its gradients "
                "are kept and the update is retried at the layer's next forward or step (the other "
                "layers and the routers already took this step)", self.name) from again
        if error is None:
            return touched  # reported when it failed; completed now
        raise LayerUpdateError(
            f"the optimizer update of {who} failed on its worker thread ({type(error).__name__}: "
            f"{error}); retried here, it completed: every layer took this step", self.name,
            touched) from error

    @property
    def update_failed(self) -> bool:
        """True while a failed step waits to be completed (by :meth:`wait` or the next step)."""
        return self._failed is not None

    def wait(self) -> Tensor | None:
        """Block until the in-flight :meth:`step_async` finished; return its touched ids (None
        if nothing was in flight). A failed background step is completed here and raises
        :class:`LayerUpdateError` (its ``touched`` holds the ids when it completed)."""
        return self._collect()

    def nonfinite_report(self) -> list[NonFiniteRows]:
        """The non-finite gradient rows accumulated for the next step (empty when none):
        neuron ids per part, merged over micro-batches; a non-finite pending clip scale too."""
        acc = self._acc
        found = list(acc.nonfinite)
        if acc.scale is not None and not math.isfinite(acc.scale):
            found.append(("clip_scale", None))
        report = []
        for part in ("keys", "values", "clip_scale"):
            ids = [i for p, i in found if p == part]
            if not ids:
                continue
            rows = () if part == "clip_scale" else tuple(torch.unique(torch.cat(ids)).tolist())
            report.append(NonFiniteRows(self.name, part, rows))
        return report

    def _refuse_nonfinite(self) -> bool:
        """Caller thread, before a step: on non-finite gradients drop them, record the report
        and raise or warn (per ``nonfinite``); True when the step must not run."""
        report = self.nonfinite_report()
        if not report:
            return False
        self._acc.clear()
        self.nonfinite_steps += 1
        self.last_nonfinite = tuple(report)
        act_on(report, self.nonfinite,
               "the step" + ("" if self.name is None else f" of layer {self.name}"))
        return True

    def _prepare(self) -> tuple[RowGradSums, dict[str, Any]]:
        """Take the current accumulator (a fresh one takes its place) and freeze the
        hyperparameters of the step about to run."""
        acc = self._acc
        nxt = self._spare if self._spare is not None else RowGradSums(self.store)
        self._spare = None
        self._acc = nxt
        hp = dict(lr=self._lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                  max_grad_norm=self.max_grad_norm, t=self._step + 1)
        return acc, hp

    def _apply(self, acc: RowGradSums, hp: dict[str, Any]) -> Tensor:
        self._failed = None
        try:
            n = acc.count
            ids = acc.ids[:n]
            sorted_ids, order = torch.sort(ids)
            scale = acc.scale if acc.scale is not None else 1.0
            if hp["max_grad_norm"] is not None and n:
                norm = acc.unscaled_norm(2.0)
                if scale != 1.0:
                    norm = norm * scale
                scale = float(torch.tensor(scale, dtype=torch.float32) * _clip_coef(norm, hp["max_grad_norm"]))
            t = hp["t"]
            lr, (beta1, beta2), wd = hp["lr"], hp["betas"], hp["weight_decay"]
            bc1 = 1.0 - beta1**t
            bc2 = 1.0 - beta2**t
            step_size = lr * math.sqrt(bc2) / bc1
            if n:
                s = self.store
                # whole [r + d] records: one pass over each neuron's key and value row
                cpu_rowops.adamw_rows(
                    s.records, s.exp_avg, s.exp_avg_sq, acc.rows(), sorted_ids, order,
                    decay=1.0 - lr * wd, one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
                    eps=hp["eps"], neg_step_size=-step_size, grad_scale=scale,
                    num_threads=self.num_threads,
                    backend=None if self.backend == "auto" else self.backend,
                )
                if perf_slowdown("optim"):  # needless extra passes over the touched rows (perf gate test)
                    for a in (s.records, s.exp_avg, s.exp_avg_sq) * 2:
                        a.index_copy_(0, sorted_ids, a[sorted_ids])
                s.refresh_shadow(sorted_ids)  # a zero-copy gather's compute-dtype rows
            self._step = t
        except BaseException:
            # Nothing was written (the row loop fails, if at all, before its first write): keep
            # the gradients and hyperparameters, so the next wait completes this step.
            self._failed = (acc, hp)
            raise
        acc.clear()
        self._spare = acc
        return sorted_ids

    def step(self) -> Tensor:
        """Apply the update to the touched neurons, clear the accumulated gradients and return
        the touched neuron ids (int64, ascending) so the caller can refresh GPU copies of
        those rows. Waits for an in-flight :meth:`step_async` first (raising its error)."""
        self._collect()
        if self._refuse_nonfinite():
            return torch.empty(0, dtype=torch.int64)
        acc, hp = self._prepare()
        return self._apply(acc, hp)

    def step_async(self) -> "Future[Tensor]":
        """Like :meth:`step`, on this optimizer's worker thread; returns a Future of the touched
        ids. Gradients accumulated after this call go to the next step. Reading the store's
        rows before the future completes sees a partial update: wait on it (or on
        :meth:`wait`) before reading. An exception in the worker is raised by the future; the
        next :meth:`step` / :meth:`step_async` / :meth:`wait` of this optimizer completes the
        failed update (it wrote nothing and kept its gradients) and raises
        :class:`LayerUpdateError` naming the layer."""
        self._collect()
        if self._refuse_nonfinite():
            skipped: Future = Future()
            skipped.set_result(torch.empty(0, dtype=torch.int64))
            return skipped
        acc, hp = self._prepare()
        fut = self._worker().submit(self._apply, acc, hp)
        self._pending = fut
        return fut

    def run_in_order(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on this optimizer's worker thread, after every step and job given to
        it before (e.g. summing gradient rows into :meth:`accumulate` as they come home, while
        the device computes). The caller waits for such jobs before :meth:`step`,
        :meth:`step_async` or :meth:`zero_grad`: they add to the gradients of the next step."""
        return self._worker().submit(fn, *args)

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meft-sparse-adamw")
            # not waiting: the finalizer may run inside garbage collection, on any thread
            self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False)
        return self._executor

    def close(self) -> None:
        """Wait for the in-flight step (raising its error) and stop the worker thread."""
        try:
            self._collect()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Step count, hyperparameters and the moments.

        The moments are the store's ``exp_avg`` / ``exp_avg_sq`` tensors themselves (by
        reference, as torch optimizers do: ``torch.save`` copies them; clone them to keep a
        snapshot in memory while training goes on). The master rows are in
        ``store.state_dict()``. Accumulated gradients not yet stepped are not saved.
        Waits for an in-flight step first."""
        self._collect()
        s = self.store
        return {
            "format": _FORMAT,
            "step": self._step,
            "lr": self._lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "num_rows": s.num_rows,
            "hidden_size": s.hidden_size,
            "key_size": s.key_size,
            "exp_avg": s.exp_avg,
            "exp_avg_sq": s.exp_avg_sq,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved: the moments are copied into the store."""
        self._collect()
        step, moments, lr, betas, eps, wd, mgn = self.check_state_dict(state)
        for key, t in moments.items():
            dst = getattr(self.store, key)
            if t.data_ptr() != dst.data_ptr():
                dst.copy_(t)
        self._step, self._lr, self.betas, self.eps, self.weight_decay, self.max_grad_norm = step, lr, betas, eps, wd, mgn

    def check_state_dict(self, state: Any) -> tuple:
        """Raise ``ValueError`` naming what does not fit unless :meth:`load_state_dict` can load
        ``state``; changes nothing. Returns the checked values."""
        keys = ("format", "step", "lr", "betas", "eps", "weight_decay", "max_grad_norm", "num_rows",
                "hidden_size", "exp_avg", "exp_avg_sq")
        if not isinstance(state, dict) or state.get("format") != _FORMAT or any(k not in state for k in keys):
            raise ValueError(f"state must be a dict saved by SparseRowAdamW.state_dict() (format {_FORMAT!r}, "
                             f"keys {', '.join(keys)})")
        s = self.store
        # states saved before low_key_dim existed hold no key_size: their keys were d wide
        saved = (state["num_rows"], state["hidden_size"], state.get("key_size", state["hidden_size"]))
        if saved != (s.num_rows, s.hidden_size, s.key_size):
            raise ValueError(
                f"state is for num_rows={saved[0]}, hidden_size={saved[1]}, key_size={saved[2]}, but the "
                f"store has num_rows={s.num_rows}, hidden_size={s.hidden_size}, key_size={s.key_size}"
            )
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state['step'] must be an int >= 0, got {step!r}")
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            if not isinstance(t, Tensor) or t.dtype != torch.float32:
                raise ValueError(f"state[{key!r}] must be a float32 tensor of shape {tuple(s.records.shape)}")
            moments[key] = s.as_records(t, f"state[{key!r}]")
        lr = check_lr(state["lr"])
        betas = check_betas(state["betas"])
        eps = check_nonneg("eps", state["eps"])
        wd = check_nonneg("weight_decay", state["weight_decay"])
        mgn = check_max_norm("max_grad_norm", state["max_grad_norm"])
        return step, moments, lr, betas, eps, wd, mgn

    def __repr__(self) -> str:
        return (
            f"SparseRowAdamW(lr={self._lr}, betas={self.betas}, eps={self.eps}, "
            f"weight_decay={self.weight_decay}, max_grad_norm={self.max_grad_norm}, "
            f"step={self._step}, backend={self.backend!r})"
        )


def clip_grad_norm_(optimizers: SparseRowAdamW | Iterable[SparseRowAdamW], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Clip the accumulated gradients of several :class:`SparseRowAdamW` (e.g. all layers)
    by their global norm, like :func:`torch.nn.utils.clip_grad_norm_` on the dense
    equivalent: ``total = norm(norm(g_1), ..., norm(g_n))``; every gradient is scaled by
    ``min(1, max_norm / (total + 1e-6))``. The scale is folded into the next step's update
    (no extra pass over the rows). Returns the total norm (0-dim fp32 tensor)."""
    opts = [optimizers] if isinstance(optimizers, SparseRowAdamW) else list(optimizers)
    for i, o in enumerate(opts):
        if not isinstance(o, SparseRowAdamW):
            raise TypeError(f"optimizers[{i}] must be a SparseRowAdamW, got {type(o).__name__}")
    max_norm = check_max_norm("max_norm", max_norm)
    norm_type = check_norm_type(norm_type)
    if not opts:
        return torch.zeros((), dtype=torch.float32)
    norms = [o._acc.norm(norm_type) for o in opts]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be clipped"
        )
    coef = float(_clip_coef(total, max_norm))
    if coef != 1.0:  # torch multiplies by exactly 1.0 then: a no-op we can skip
        for o in opts:
            if o._acc.count:
                o._acc.scale = coef
    return total
