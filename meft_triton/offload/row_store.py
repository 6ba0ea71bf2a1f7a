"""CPURowStore: the CPU-resident fp32 master copy of an adapter's keys and values.

Placement "cpu" (docs/DESIGN.md, "Placement cpu") keeps every neuron's key row and value row in host
memory, stored together: neuron ``i`` is one contiguous record ``records[i] = [key_i,
value_i]`` of ``key_size + hidden_size`` fp32 numbers (key_size r = ``low_key_dim``, or d), so
fetching or updating a neuron is one sequential read. The AdamW moments of
:class:`meft_triton.optimizers.SparseRowAdamW` live beside it in the same ``[N, r + d]`` layout
(``exp_avg``, ``exp_avg_sq``), so the row-sparse update touches one record in each of four
arrays per neuron.

All three arrays are allocated in pinned (page-locked) memory when that is possible, so
host-to-device copies of gathered rows can run asynchronously; when it is not (no CUDA in
this torch build, or the pinned allocation fails), the store falls back to ordinary pageable
memory and records why in :attr:`CPURowStore.pin_error`. Pageable arrays are advised onto
transparent huge pages (Linux ``madvise``): the row-sparse update reads rows scattered over
hundreds of MiB, and with 4 KiB pages each row would cost TLB misses in all four arrays.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..validation import check_int
from . import cpu_rowops
from .gather import cpu_gather

PARTS = ("values", "keys", "both")
GATHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_row_ids(row_ids: Any, num_rows: int, name: str = "row_ids") -> Tensor:
    """Validate a 1-D CPU integer tensor of row ids in [0, num_rows); return it as int64."""
    if not isinstance(row_ids, Tensor):
        raise TypeError(f"{name} must be a 1-D int64 torch.Tensor, got {type(row_ids).__name__}")
    if row_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got dtype {row_ids.dtype}")
    if row_ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(row_ids.shape)}")
    if row_ids.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {row_ids.device}")
    if row_ids.numel():
        lo, hi = torch.aminmax(row_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_rows:
            raise ValueError(
                f"{name} must lie in [0, {num_rows}) (the store's num_rows), got values in [{lo}, {hi}]"
            )
    return row_ids.to(torch.int64).contiguous()


def _want_pinned(pin_memory: Any) -> bool:
    if pin_memory == "auto":
        return torch.cuda.is_available()
    if isinstance(pin_memory, bool):
        return pin_memory
    raise ValueError(f"pin_memory must be True, False or 'auto', got {pin_memory!r}")


def _alloc(shape: tuple[int, ...], pinned: bool, dtype: torch.dtype = torch.float32) -> tuple[Tensor, str | None]:
    """A CPU tensor, pinned if asked and possible; returns (tensor, why-not-pinned)."""
    if pinned:
        if not torch.cuda.is_available():
            err = "torch.cuda.is_available() is False: this torch build has no pinned-memory allocator"
        else:
            try:
                return torch.empty(shape, dtype=dtype, pin_memory=True), None
            except RuntimeError as exc:  # out of page-locked memory, driver trouble, ...
                err = f"pinned allocation failed: {exc}"
        return cpu_rowops.empty_rows(shape, dtype), err
    return cpu_rowops.empty_rows(shape, dtype), None


class Gathered(NamedTuple):
    """Result of :meth:`CPURowStore.gather`: ``rows[k]`` is the row of neuron ``row_ids[k]``."""

    rows: Tensor
    row_ids: Tensor


class CPURowStore:
    """fp32 master keys and values of one adapter layer plus their AdamW moments, on the CPU.

    ``records`` is ``[num_rows, key_size + hidden_size]``: ``records[i, :key_size]`` is neuron
    i's key row, ``records[i, key_size:]`` its value row (``key_size`` defaults to
    ``hidden_size``; MEFT's ``low_key_dim`` makes it smaller). ``exp_avg`` and ``exp_avg_sq``
    have the same layout; :meth:`split` views any of the three as (keys, values).

    ``pin_memory``: ``True`` asks for pinned memory and warns when it falls back to pageable
    memory; ``"auto"`` (default) pins exactly when CUDA is available, silently; ``False``
    never pins. :attr:`pinned` says what was obtained and :attr:`pin_error` why not (None when
    pinned or when ``pin_memory=False``).

    ``num_threads``: threads used by :meth:`gather` (default: ``torch.get_num_threads()``).
    """

    def __init__(self, num_rows: int, hidden_size: int, pin_memory: bool | str = "auto",
                 *, key_size: int | None = None, num_threads: int | None = None) -> None:
        self.num_rows = check_int("num_rows", num_rows)
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.key_size = self.hidden_size if key_size is None else check_int("key_size", key_size)
        if num_threads is not None:
            check_int("num_threads", num_threads)
        self.num_threads = num_threads
        want = _want_pinned(pin_memory)
        if pin_memory == "auto" and not want:
            auto_reason = "pin_memory='auto' and torch.cuda.is_available() is False"
        else:
            auto_reason = None
        shape = (self.num_rows, self.row_width)
        self.records, err = _alloc(shape, want)
        self.exp_avg, _ = _alloc(shape, want and err is None)
        self.exp_avg_sq, _ = _alloc(shape, want and err is None)
        self.records.zero_()
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.pinned = want and err is None
        self.pin_error: str | None = err if want else auto_reason
        self.shadow: Tensor | None = None  # the value rows in a compute dtype (value_shadow)
        if pin_memory is True and err is not None:
            warnings.warn(f"CPURowStore: using pageable memory ({err})", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, keys: Tensor, values: Tensor, pin_memory: bool | str = "auto",
                   *, num_threads: int | None = None) -> "CPURowStore":
        """A store holding copies of ``keys`` ``[N, r]`` and ``values`` ``[N, d]`` (floating point,
        any device; converted to fp32). Moments start at zero."""
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D [num_rows, hidden_size], got shape {tuple(t.shape)}")
        if keys.shape[0] != values.shape[0]:
            raise ValueError(
                f"keys and values must have the same number of rows, got {tuple(keys.shape)} and "
                f"{tuple(values.shape)}"
            )
        store = cls(values.shape[0], values.shape[1], pin_memory=pin_memory, key_size=keys.shape[1],
                    num_threads=num_threads)
        with torch.no_grad():
            store.keys().copy_(keys.detach())
            store.values().copy_(values.detach())
        return store

    # ------------------------------------------------------------------ views
    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Views ``(keys [..., r], values [..., d])`` of ``rows`` laid out like the records
        (``records``, ``exp_avg``, ``exp_avg_sq``, a gathered ``"both"`` buffer)."""
        return rows[..., : self.key_size], rows[..., self.key_size:]

    def keys(self) -> Tensor:
        """``[N, r]`` view of the key rows (row stride ``r + d``); writes go into the store."""
        return self.split(self.records)[0]

    def values(self) -> Tensor:
        """``[N, d]`` view of the value rows (row stride ``r + d``); writes go into the store."""
        return self.split(self.records)[1]

    @property
    def row_width(self) -> int:
        """fp32 numbers per neuron record (key row + value row)."""
        return self.key_size + self.hidden_size

    def value_shadow(self, dtype: torch.dtype) -> Tensor:
        """``[N, d]`` copy of the value rows in the 16-bit compute ``dtype``, pinned like the
        store: what a zero-copy gather reads over the link (half the bytes of the fp32 rows).
        Made on first use; the row-sparse AdamW refreshes the rows it updates, and
        :meth:`refresh_shadow` the rest after the values are written from outside."""
        if dtype not in GATHER_DTYPES[1:]:
            raise TypeError(f"dtype must be bfloat16 or float16, got {dtype}")
        if self.shadow is None or self.shadow.dtype != dtype:
            self.shadow, _ = _alloc((self.num_rows, self.hidden_size), self.pinned, dtype)
            self.shadow.copy_(self.values())
        return self.shadow

    def refresh_shadow(self, row_ids: Tensor | None = None) -> None:
        """Bring the :meth:`value_shadow` rows ``row_ids`` (None: all) back in line with the
        master values; nothing to do without a shadow."""
        if self.shadow is None:
            return
        if row_ids is None:
            self.shadow.copy_(self.values())
        elif row_ids.numel():
            self.shadow.index_copy_(0, row_ids, self.values().index_select(0, row_ids).to(self.shadow.dtype))

    @property
    def shadow_nbytes(self) -> int:
        """Bytes of the value shadow (0 without one)."""
        return 0 if self.shadow is None else self.shadow.numel() * self.shadow.element_size()

    # ------------------------------------------------------------------ accounting
    @property
    def master_nbytes(self) -> int:
        """Bytes of the fp32 master keys and values."""
        return self.records.numel() * self.records.element_size()

    @property
    def state_nbytes(self) -> int:
        """Bytes of the AdamW moments (exp_avg and exp_avg_sq)."""
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * self.exp_avg.element_size()

    @property
    def nbytes(self) -> int:
        """All host bytes the store holds: master rows plus moments (staging buffers excluded)."""
        return self.master_nbytes + self.state_nbytes

    # ------------------------------------------------------------------ gather
    def staging_buffer(self, max_rows: int, part: str = "values", dtype: torch.dtype = torch.float32) -> Tensor:
        """An empty buffer for :meth:`gather` of up to ``max_rows`` rows, pinned when the store
        is: ``[max_rows, r]`` for ``"keys"``, ``[max_rows, d]`` for ``"values"``, ``[max_rows, r + d]``
        for ``"both"``.
        ``dtype``: float32 (exact copies) or bfloat16/float16 (rounded while gathering)."""
        check_int("max_rows", max_rows)
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if dtype not in GATHER_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        buf, _ = _alloc((max_rows, self._part_width(part)), self.pinned, dtype)
        return buf

    def gather(self, row_ids: Tensor, out: Tensor | None = None, part: str = "values",
               *, sort: bool = True) -> Gathered:
        """Copy the rows of ``row_ids`` into ``out`` (or a new buffer, pinned when the store is).

        ``part``: ``"values"`` gives ``[U, d]`` rows, ``"keys"`` ``[U, r]``, ``"both"`` whole
        ``[U, r + d]`` records. With ``sort=True`` (default) the ids are sorted first (sequential reads) and
        the rows come back in ascending id order; with ``sort=False`` in the given order.
        ``out`` may have more rows than needed; the result is then its first ``U`` rows. A
        bfloat16/float16 ``out`` receives the rows rounded to that dtype.
        Returns ``Gathered(rows, row_ids)`` with the ids in the order of ``rows``.
        Copies through :func:`~meft_triton.offload.gather.cpu_gather`.
        """
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        ids = check_row_ids(row_ids, self.num_rows)
        if sort and ids.numel() > 1:
            ids = torch.sort(ids).values
        n = ids.numel()
        tail = (self._part_width(part),)
        if out is None:
            buf, _ = _alloc((n, *tail), self.pinned)
            out = buf
        else:
            if not isinstance(out, Tensor):
                raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
            if out.dtype not in GATHER_DTYPES:
                raise TypeError(f"out must be float32, bfloat16 or float16, got dtype {out.dtype}")
            if out.device.type != "cpu":
                raise ValueError(f"out must be a CPU tensor, got device {out.device}")
            if tuple(out.shape[1:]) != tail or out.shape[0] < n:
                raise ValueError(
                    f"out must have shape [>= {n}, {', '.join(map(str, tail))}] for part={part!r}, "
                    f"got {tuple(out.shape)}"
                )
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
            out = out[:n]
        src = {"both": self.records, "keys": self.keys(), "values": self.values()}[part]
        cpu_gather(src, ids, out, num_threads=self.num_threads)
        return Gathered(out, ids)

    def _part_width(self, part: str) -> int:
        return {"both": self.row_width, "keys": self.key_size, "values": self.hidden_size}[part]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The master rows (by reference, like ``nn.Module.state_dict``): ``{"records": [N, r + d]}``.
        The moments are saved by the optimizer's ``state_dict``."""
        return {"records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "records" not in state:
            raise ValueError("state must be a dict with key 'records'")
        rec = self.as_records(state["records"], "state['records']")
        if rec.data_ptr() != self.records.data_ptr():
            self.records.copy_(rec)

    def as_records(self, rows: Any, name: str) -> Tensor:
        """``rows`` in the records' ``[N, r + d]`` layout; saves from before ``low_key_dim``
        held ``[N, 2, d]`` (the same bytes when r = d), which are accepted as such."""
        shape = tuple(self.records.shape)
        old = (self.num_rows, 2, self.hidden_size)
        if isinstance(rows, Tensor) and tuple(rows.shape) == old and self.key_size == self.hidden_size:
            return rows.reshape(shape)
        if not isinstance(rows, Tensor) or tuple(rows.shape) != shape:
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"{name} must have shape {shape}, got {got}")
        return rows

    def __repr__(self) -> str:
        return (
            f"CPURowStore(num_rows={self.num_rows}, hidden_size={self.hidden_size}, key_size={self.key_size}, "
            f"pinned={self.pinned}, nbytes={self.nbytes})"
        )
