"""What machine a measurement came from: device, driver and library versions, result paths."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import torch

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    """The CUDA device's name, or the CPU's model, as a short path-safe slug."""
    if torch.cuda.is_available():
        raw = torch.cuda.get_device_name(0)
    else:
        raw = _cpu_model() or platform.machine() or "cpu"
        raw = f"cpu-{raw}"
    return re.sub(r"[^A-Za-z0-9]+", "-", raw).strip("-").lower()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def driver_version() -> str | None:
    """The NVIDIA driver's version through NVML, or None where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - no NVML, no driver, or no GPU: recorded as unknown
        return None


def describe_machine() -> dict[str, object]:
    """Device, driver, library versions and core count, to store beside every number."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": _cpu_model(),
        "cpu_count": torch.get_num_threads(),
        "driver": driver_version(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }
    return info


def results_dir(kind: str | None = None) -> Path:
    """A fresh ``profiling/results/<device>/<timestamp>[-kind]/`` folder."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = RESULTS_ROOT / device_name() / (f"{stamp}-{kind}" if kind else stamp)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
