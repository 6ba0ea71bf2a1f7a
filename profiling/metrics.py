"""Measurement helpers of the profiling sweep: clocks, memory, NVML, byte and memory accounting.

Everything here degrades instead of failing: a quantity that cannot be measured on this
machine (no CUDA, no NVML, no pinned memory, no /proc) comes back as NaN together with a
short reason that the sweep writes into its ``note`` column.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

NAN = float("nan")

#: Bytes per trainable fp32 parameter kept on the compute device by a plain optimizer set-up:
#: the master weight, its gradient and AdamW's two moments.
TRAIN_BYTES_PER_PARAM = 16
#: Bytes of a gradient row element sent device -> host (the sparse optimizer takes fp32 rows).
GRAD_BYTES = 4


# ---------------------------------------------------------------------------------- notes
class Notes:
    """An ordered set of short remarks about one measurement (deduplicated)."""

    def __init__(self) -> None:
        self._items: list[str] = []

    def add(self, text: str | None) -> None:
        if text and text not in self._items:
            self._items.append(text)

    def __str__(self) -> str:
        return "; ".join(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)


# ---------------------------------------------------------------------------------- clock
class Clock:
    """Stage timer for one training step.

    ``start()`` then ``mark(stage)`` after each piece of work: the time since the previous
    mark is added to ``stage`` (a stage may be marked many times, e.g. once per layer).
    On CUDA the marks are events recorded on the current stream (nothing synchronizes until
    :meth:`durations_ms`); on CPU they are ``time.perf_counter`` readings.
    """

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self._marks: list[tuple[str, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("", self._now())]

    def mark(self, stage: str) -> None:
        self._marks.append((stage, self._now()))

    def durations_ms(self) -> dict[str, float]:
        """Milliseconds per stage, summed over its marks (synchronizes on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, a), (stage, b) in zip(self._marks, self._marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[stage] = out.get(stage, 0.0) + ms
        return out


def median_by_key(samples: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-key median over repeats (a key missing from a repeat counts as 0 there)."""
    keys: list[str] = []
    for s in samples:
        keys += [k for k in s if k not in keys]
    return {k: statistics.median([s.get(k, 0.0) for s in samples]) for k in keys}


def time_op_ms(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, cuda: bool = False,
               min_total_ms: float = 20.0, max_repeats: int = 2000) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on the current stream when ``cuda``).

    Runs at least ``repeats`` times and, for short operations, until ``min_total_ms`` of
    timed work has passed (at most ``max_repeats`` times), so a few scheduler stalls on a busy
    machine do not move the median."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(1, repeats) or (sum(times) < min_total_ms and len(times) < max_repeats):
        clock = Clock(cuda)
        clock.start()
        fn()
        clock.mark("op")
        times.append(clock.durations_ms()["op"])
    return statistics.median(times)


# ---------------------------------------------------------------------------------- host memory
def _proc_status_bytes(field_name: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return NAN


def host_rss_bytes() -> tuple[float, float]:
    """(current RSS, peak RSS since the last :func:`reset_peak_rss`) of this process, bytes."""
    try:
        import psutil

        current = float(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil is optional
        current = _proc_status_bytes("VmRSS")
    peak = _proc_status_bytes("VmHWM")
    if math.isnan(peak):
        try:
            import resource

            peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except Exception:  # noqa: BLE001
            pass
    return current, peak


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs``); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_available_bytes() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
        except OSError:
            pass
    return NAN


def pinned_host_bytes() -> tuple[float, str | None]:
    """Bytes held by torch's pinned-memory (host) allocator now, or NaN and why not."""
    if not torch.cuda.is_available():
        return NAN, "no pinned memory (no CUDA in this torch build)"
    try:
        stats = torch.cuda.host_memory_stats()
        for key in ("allocated_bytes.current", "allocated_bytes.all.current", "reserved_bytes.current"):
            if key in stats:
                return float(stats[key]), None
        return NAN, "torch.cuda.host_memory_stats has no allocated-bytes counter"
    except Exception as exc:  # noqa: BLE001
        return NAN, f"pinned bytes unknown ({type(exc).__name__})"


# ---------------------------------------------------------------------------------- NVML
class NvmlMonitor:
    """Samples NVML's used device memory and PCIe throughput in a background thread.

    ``with monitor:`` samples every ``interval`` seconds until the block ends; then
    :attr:`peak_used_bytes`, :attr:`pcie_tx_GBps` and :attr:`pcie_rx_GBps` (means of NVML's
    20 ms PCIe samples; TX = device -> host, RX = host -> device, as NVML defines them) hold
    the results, NaN where NVML is missing (:attr:`error` says why).
    """

    def __init__(self, device_index: int = 0, interval: float = 0.02) -> None:
        self.interval = interval
        self.error: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._reset()
        if not torch.cuda.is_available():
            self.error = "NVML not used (no CUDA device)"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as exc:  # noqa: BLE001 - missing library, driver or permission
            self.error = f"NVML unavailable ({type(exc).__name__}: {exc})"
            self._nvml = None

    def _reset(self) -> None:
        self._mem: list[float] = []
        self._tx: list[float] = []
        self._rx: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def sample(self) -> None:
        nv = self._nvml
        try:
            self._mem.append(float(nv.nvmlDeviceGetMemoryInfo(self._handle).used))
        except Exception as exc:  # noqa: BLE001
            self.error = self.error or f"NVML memory query failed ({exc})"
        try:
            self._tx.append(nv.nvmlDeviceGetPcieThroughput(self._handle, nv.NVML_PCIE_UTIL_TX_BYTES) * 1e3 / 1e9)
            self._rx.append(nv.nvmlDeviceGetPcieThroughput(self._handle, nv.NVML_PCIE_UTIL_RX_BYTES) * 1e3 / 1e9)
        except Exception as exc:  # noqa: BLE001 - not supported on some devices (e.g. MIG, vGPU)
            self.error = self.error or f"NVML PCIe counters unavailable ({exc})"

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "NvmlMonitor":
        self._reset()
        if self.available:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sample()

    @property
    def peak_used_bytes(self) -> float:
        return max(self._mem) if self._mem else NAN

    @property
    def pcie_tx_GBps(self) -> float:
        return statistics.fmean(self._tx) if self._tx else NAN

    @property
    def pcie_rx_GBps(self) -> float:
        return statistics.fmean(self._rx) if self._rx else NAN

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None


# ---------------------------------------------------------------------------------- accounting
def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def adapter_memory_bytes(placement: str, *, num_neurons: int, num_experts: int, hidden_size: int,
                         layers: int, row_dtype_bytes: int, max_unique_rows: int,
                         backward_rows: str = "refetch") -> dict[str, int]:
    """Device and host bytes of a MEFT adapter stack under a placement (docs/DESIGN.md, "Performance model":
    fp32 master weights, gradients and AdamW state counted).

    * "gpu": everything on the device, ``16 B x (E + 2N) x d`` per layer.
    * "cpu": the device keeps per layer the router (16 B per parameter) and a compute-dtype
      key cache (N x d), plus two value-row staging slots of ``max_unique_rows`` rows shared by
      all layers, one layer's fp32 key+value gradient rows, and with ``backward_rows="keep"``
      every layer's forward value rows until its backward. The host keeps per layer the fp32
      key+value master rows and their two AdamW moments (24 B x N x d), the pinned staging
      buffer and the pinned gradient rows.
    """
    N, E, d, L, b, U = num_neurons, num_experts, hidden_size, layers, row_dtype_bytes, max_unique_rows
    if placement == "gpu":
        return {"gpu_bytes": L * TRAIN_BYTES_PER_PARAM * (E + 2 * N) * d, "host_bytes": 0}
    if placement != "cpu":
        raise ValueError(f"placement must be 'gpu' or 'cpu', got {placement!r}")
    gpu = L * (TRAIN_BYTES_PER_PARAM * E * d + N * d * b) + 2 * U * d * b + U * 2 * d * GRAD_BYTES
    if backward_rows == "keep":
        gpu += L * U * d * b
    host = L * 3 * N * 2 * d * 4 + U * d * b + U * 2 * d * GRAD_BYTES
    return {"gpu_bytes": gpu, "host_bytes": host}


def dense_memory_bytes(params_per_layer: int, layers: int) -> int:
    return layers * TRAIN_BYTES_PER_PARAM * params_per_layer


def lora_rank_for_bytes(gpu_bytes_per_layer: float, hidden_size: int) -> int:
    """LoRA rank whose trainable pair (A [r, d], B [d, r], 16 B per parameter) takes about
    ``gpu_bytes_per_layer`` of device memory; at least 1."""
    return max(1, round(gpu_bytes_per_layer / (TRAIN_BYTES_PER_PARAM * 2 * hidden_size)))


# ---------------------------------------------------------------------------------- bandwidth
def host_memcpy_GBps(nbytes: int, repeats: int = 5) -> float:
    """Payload GB/s of a plain contiguous host copy of ``nbytes`` (``Tensor.copy_``)."""
    n = max(1, nbytes // 4)
    src = torch.ones(n)
    dst = torch.empty(n)
    ms = time_op_ms(lambda: dst.copy_(src), repeats=repeats, warmup=1)
    return n * 4 / (ms * 1e-3) / 1e9


def pinned_memcpy_GBps(nbytes: int, direction: str = "h2d", repeats: int = 5) -> tuple[float, str | None]:
    """Payload GB/s of a plain pinned host <-> device copy of ``nbytes`` (CUDA events), or NaN
    and why not."""
    if not torch.cuda.is_available():
        return NAN, "no CUDA device"
    n = max(1, nbytes // 4)
    try:
        host = torch.empty(n, pin_memory=True)
    except RuntimeError as exc:
        return NAN, f"no pinned memory ({exc})"
    dev = torch.empty(n, device="cuda")
    if direction == "h2d":
        fn = lambda: dev.copy_(host, non_blocking=True)  # noqa: E731
    else:
        fn = lambda: host.copy_(dev, non_blocking=True)  # noqa: E731
    ms = time_op_ms(fn, repeats=repeats, warmup=2, cuda=True)
    return n * 4 / (ms * 1e-3) / 1e9, None


# ---------------------------------------------------------------------------------- table
def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   headers: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub markdown table (no dependency on ``tabulate``). Floats get ``digits``
    significant digits; NaN/None print as an empty cell."""

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            if v != 0 and (abs(v) >= 10 ** (digits + 2) or abs(v) < 10 ** -(digits)):
                return f"{v:.{digits - 1}e}"
            return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"
        return str(v).replace("|", "\\|")

    headers = list(headers or columns)
    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    return "\n".join(lines)
