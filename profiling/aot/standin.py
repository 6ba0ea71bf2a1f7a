"""A stand-in Triton driver and a launch recorder: compile for a GPU this machine does not have.

``StandInDriver(target)`` answers what ``JITFunction.run`` asks the driver (current target,
device, stream) and nothing else, so a run with ``warmup=True`` compiles through the real
NVIDIA backend (LLVM, the wheel's ptxas) to a cubin and stops before any launch.

``recording(modules, target)`` runs the *real* launchers unchanged: inside it a launch
``kernel[grid](...)`` of a ``@triton.jit`` kernel of the given modules records the grid and every argument, then compiles with
``warmup=True`` on the same arguments (CPU tensors: their ``data_ptr`` gives the 16-byte
alignment specialization a CUDA allocation would; torch's CPU allocator aligns to 64 bytes).
So the block sizes, grid, num_warps and num_stages are exactly what the launcher picks.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

TARGETS = {"sm90a": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}

warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")


class StandInDriver(DriverBase):
    """Just enough of a Triton driver for compiling: a fixed target, no device behind it.

    The device index is the architecture number, so JITFunction's per-device caches keep
    sm_90a and sm_80 compilations apart within one process."""

    def __init__(self, target: GPUTarget):
        super().__init__()
        self.target = target

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the stand-in driver only compiles")

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("the stand-in driver only compiles")

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def stand_in_driver(target: GPUTarget):
    """The stand-in as Triton's active driver.

    Needs a process where Triton was imported without TRITON_INTERPRET=1: under the
    interpreter, triton.language's own @jit helpers are interpreted functions the compiler
    cannot use (the CLI's compile processes and the tests' subprocess clear the variable)."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("profiling.aot compiles kernels: run it in a process without "
                           "TRITON_INTERPRET=1 (Triton's interpreter is on in this one)")
    previous = driver._active
    driver.set_active(StandInDriver(target))
    try:
        yield
    finally:
        driver._active = previous


@dataclass
class Launch:
    """One ``kernel[grid](...)`` call a launcher made, and what compiling it gave."""

    kernel: str                     # the @triton.jit function's name
    grid: tuple[int, int, int]
    args: dict[str, Any]            # every kernel parameter by name (tensors as passed)
    options: dict[str, Any] = field(default_factory=dict)  # num_warps etc., if the launcher set them
    compiled: Any = None            # triton CompiledKernel
    error: str | None = None


def _is_kernel(obj) -> bool:
    return isinstance(obj, JITFunction)


@contextlib.contextmanager
def recording(modules, target: GPUTarget, launches: list[Launch]):
    """Within it, launches of the modules' kernels append a :class:`Launch` to ``launches``
    and compile for ``target`` instead of running. Module globals are restored on exit."""
    saved: list[tuple[Any, str, Any]] = []
    patched: list[JITFunction] = []

    def swap(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def make_run(jit):
        params = [p.name for p in jit.params]

        def run(*args, grid, warmup, **kwargs):
            if warmup:
                return JITFunction.run(jit, *args, grid=grid, warmup=True, **kwargs)
            named = dict(zip(params, args))
            named.update({k: v for k, v in kwargs.items() if k in params})
            options = {k: v for k, v in kwargs.items() if k not in params}
            bound = dict(named)
            if callable(grid):
                grid = grid(bound)
            grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
            launch = Launch(jit.fn.__name__, grid, named, options)
            launches.append(launch)
            try:
                launch.compiled = JITFunction.run(jit, *args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:  # a compile error is a finding, not a crash
                launch.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
            return launch.compiled

        return run

    try:
        for module in modules:
            for name, jit in list(vars(module).items()):
                if _is_kernel(jit) and jit not in patched:
                    jit.run = make_run(jit)  # instance attribute: __getitem__ goes through it
                    patched.append(jit)
            # The launchers must see a GPU run: check_devices accepts CPU tensors only when
            # interpreted (validation's flag), and any launcher branching on INTERPRETED
            # (smt_block_grad's bf16 upcast) must take its compiled-GPU branch.
            if hasattr(module, "INTERPRETED"):
                swap(module, "INTERPRETED", module.__name__.endswith(".validation"))
        with stand_in_driver(target):
            yield launches
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
        for jit in patched:
            jit.__dict__.pop("run", None)


# ----------------------------------------------------------------------------- compiled code

def _tool(name: str) -> str:
    return getattr(triton.knobs.nvidia, name).path


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_text(cubin: bytes) -> tuple[str, str]:
    """(``cuobjdump -sass``, ``cuobjdump -res-usage``) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
    return sass, res


def resource_usage(res_text: str) -> dict[str, int]:
    """Registers per thread, stack and local (spill) bytes per thread, static shared bytes."""
    m = _RES.search(res_text)
    if not m:
        raise ValueError(f"no resource usage in cuobjdump output: {res_text[:300]!r}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def compile_small(fn_or_jit, target_name: str, *args, grid=(1,), **kwargs):
    """Compile one kernel for a target by warm-up (helper for tests and ad-hoc use)."""
    jit = fn_or_jit if _is_kernel(fn_or_jit) else JITFunction(fn_or_jit)
    with stand_in_driver(TARGETS[target_name]):
        return JITFunction.run(jit, *args, grid=grid, warmup=True, **kwargs)


def signature_names(jit) -> list[str]:
    return list(inspect.signature(jit.fn).parameters)
