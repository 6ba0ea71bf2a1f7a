"""No host waits on the training thread's hot path (DESIGN.md, "Performance model" and
"Testing without a GPU"): at most one per optimizer step (the global non-finite check), none
per layer, under both placements and both backends.

On CPU every tensor is a host tensor, so nothing really waits. What the test traps instead is
each torch call that *would* wait for a GPU (a scalar read, a data-dependent output size, a
device->host copy, a synchronize), made while steady-state training steps run. It counts a
call when the code that made it is package code (``meft_triton/`` or
``kernels/``), on a thread that is not one of the package's own workers (those wait on
purpose, off the hot path): the training thread, and autograd's on a GPU. A call made under
one of the host-data modules (:data:`HOST_SIDE`, whose tensors live in host memory on a GPU
too) is listed but not counted. Tests marked ``gpu`` run the same steps on a GPU under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from meft_triton import MEFTConfig
from meft_triton.optimizers import nonfinite

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = tuple(os.path.join(REPO, d) + os.sep for d in ("meft_triton", "kernels"))
THIS_FILE = os.path.abspath(__file__)
#: code whose tensors are host memory under every device (module, or module:function): the row
#: store and its CPU AdamW (gradient rows already copied home), the host row gathers and id
#: trimming, the CPU-only copy engine
HOST_SIDE = frozenset({
    "meft_triton/optimizers/sparse_adamw.py", "meft_triton/offload/row_store.py",
    "meft_triton/offload/cpu_rowops.py", "meft_triton/offload/sync_engine.py",
    "meft_triton/offload/gather.py:cpu_gather", "meft_triton/offload/gather.py:distinct_prefix"})
#: the one wait an optimizer step may make
GLOBAL_CHECK = os.path.join(REPO, "meft_triton", "optimizers", "nonfinite.py")


@dataclass(frozen=True)
class Wait:
    step: int
    call: str
    site: str            # file:line of the package code that made the call
    stack: tuple[str, ...]  # the package frames, innermost first
    host_side: bool

    def __str__(self) -> str:
        return f"step {self.step}: {self.call} at {self.site} (via {' <- '.join(self.stack[1:4]) or '-'})"


def _is_bool_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _to_host(args, kwargs) -> bool:
    targets = [a for a in args if isinstance(a, (str, torch.device))]
    if "device" in kwargs:
        targets.append(kwargs["device"])
    return any(torch.device(t).type == "cpu" for t in targets if t is not None)


def _no_output_size(args, kwargs) -> bool:
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None


def _one_argument(args, kwargs) -> bool:
    return len(args) == 1 and not kwargs


_ALWAYS = None
#: (owner, attribute, when it waits: None = always, else a predicate over (args, kwargs))
TRAPS = [
    (torch.Tensor, "item", _ALWAYS), (torch.Tensor, "tolist", _ALWAYS),
    (torch.Tensor, "__bool__", _ALWAYS), (torch.Tensor, "__int__", _ALWAYS),
    (torch.Tensor, "__float__", _ALWAYS), (torch.Tensor, "__index__", _ALWAYS),
    (torch.Tensor, "is_nonzero", _ALWAYS), (torch.Tensor, "numpy", _ALWAYS),
    (torch.Tensor, "nonzero", _ALWAYS), (torch.Tensor, "unique", _ALWAYS),
    (torch.Tensor, "unique_consecutive", _ALWAYS), (torch.Tensor, "bincount", _ALWAYS),
    (torch.Tensor, "masked_select", _ALWAYS), (torch.Tensor, "equal", _ALWAYS),
    (torch.Tensor, "cpu", _ALWAYS),
    # a non-blocking copy never waits (host->device, or device->host into pinned memory)
    (torch.Tensor, "to", lambda a, k: _to_host(a[1:], k) and not k.get("non_blocking")),
    (torch.Tensor, "repeat_interleave", _no_output_size),
    (torch.Tensor, "__getitem__", lambda a, k: _is_bool_mask(a[1])),
    (torch.Tensor, "__setitem__", lambda a, k: _is_bool_mask(a[1])),
    (torch, "unique", _ALWAYS), (torch, "unique_consecutive", _ALWAYS), (torch, "bincount", _ALWAYS),
    (torch, "nonzero", _ALWAYS), (torch, "argwhere", _ALWAYS), (torch, "masked_select", _ALWAYS),
    (torch, "equal", _ALWAYS), (torch, "allclose", _ALWAYS),
    (torch, "repeat_interleave", lambda a, k: _no_output_size((None, *a), k)),
    (torch, "where", _one_argument),
    (torch.cuda, "synchronize", _ALWAYS),
    (torch.cuda.Event, "synchronize", _ALWAYS), (torch.cuda.Stream, "synchronize", _ALWAYS),
]


class HostWaitTrap:
    """Patches :data:`TRAPS` while :meth:`steps` runs and records the package's calls."""

    def __init__(self) -> None:
        self.waits: list[Wait] = []
        self.step = -1
        self.armed = False
        self._inside = threading.local()  # only the outermost trapped call counts

    def _record(self, call: str) -> None:
        if threading.current_thread().name.startswith("meft-"):
            return
        frame = sys._getframe(2)
        if not os.path.realpath(frame.f_code.co_filename).startswith(PACKAGE_DIRS):
            return
        stack, host = [], False
        while frame is not None:
            path = os.path.realpath(frame.f_code.co_filename)
            if path.startswith(PACKAGE_DIRS):
                module = os.path.relpath(path, REPO)
                stack.append(f"{module}:{frame.f_lineno}")
                host = host or bool({module, f"{module}:{frame.f_code.co_name}"} & HOST_SIDE)
            frame = frame.f_back
        self.waits.append(Wait(self.step, call, stack[0], tuple(stack), host))

    def _wrap(self, owner, name, when):
        real = getattr(owner, name)
        trap = self

        @functools.wraps(real)
        def trapped(*args, **kwargs):
            if not trap.armed or getattr(trap._inside, "depth", 0):
                return real(*args, **kwargs)
            if when is None or when(args, kwargs):
                trap._record(f"{getattr(owner, '__name__', owner)}.{name}")
            trap._inside.depth = 1
            try:
                return real(*args, **kwargs)
            finally:
                trap._inside.depth = 0

        return trapped

    @contextmanager
    def installed(self):
        saved = [(owner, name, owner.__dict__.get(name, getattr(owner, name))) for owner, name, _ in TRAPS]
        try:
            for owner, name, when in TRAPS:
                setattr(owner, name, self._wrap(owner, name, when))
            yield self
        finally:
            for owner, name, real in saved:
                setattr(owner, name, real)

    @contextmanager
    def counting(self, step: int):
        self.step, self.armed = step, True
        try:
            yield
        finally:
            self.armed = False

    def counted(self) -> list[Wait]:
        return [w for w in self.waits if not w.host_side]

    def report(self) -> str:
        lines = [str(w) + ("  [host data: not counted]" if w.host_side else "") for w in self.waits]
        return "\n".join(lines) or "(none)"


# ---------------------------------------------------------------------------------- the model

BASE = MEFTConfig(num_neurons=48, num_experts=6, experts_per_token=2, topk=5, key_init_std=1.0,
                  value_init_std=0.05, router_init_scale=0.3)
LAYERS = 2
WARMUP_STEPS, COUNTED_STEPS = 2, 2


def tiny_training(placement: str, backend: str, device: str, residency: str = "resident"):
    """A 2-layer Llama with adapters on both layers and its optimizer; returns one train step."""
    from meft_triton import attach_meft, create_meft_optimizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device)
    model = attach_meft(model, BASE.replace(placement=placement, backend=backend, residency=residency))
    model.train()
    opt = create_meft_optimizer(model, lr=1e-2)
    ids = torch.randint(3, 50, (2, 6), device=device)

    def step():
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    return model, step


def run_steps(placement: str, backend: str, device: str = "cpu", residency: str = "resident") -> HostWaitTrap:
    from meft_triton import detach_meft

    model, step = tiny_training(placement, backend, device, residency)
    trap = HostWaitTrap()
    try:
        for _ in range(WARMUP_STEPS):
            step()
        with trap.installed():
            for i in range(COUNTED_STEPS):
                with trap.counting(i):
                    step()
    finally:
        detach_meft(model)
    return trap


def package_waits(trap: HostWaitTrap, *, kernels: bool) -> list[Wait]:
    return [w for w in trap.counted() if w.site.startswith("kernels/") == kernels]


CASES = [pytest.param(p, b, "resident", id=f"{p}-{b}") for p in ("gpu", "cpu") for b in ("torch", "triton")]
CASES.append(pytest.param("cpu", "torch", "per-micro-batch", id="cpu-torch-per-micro-batch"))


@pytest.mark.parametrize("placement, backend, residency", CASES)
def test_at_most_one_host_wait_per_optimizer_step(placement, backend, residency):
    """Outside the kernel launchers: at most one trapped call per optimizer step, and that one
    is the global non-finite check; no layer makes any."""
    trap = run_steps(placement, backend, residency=residency)
    print(trap.report())
    waits = package_waits(trap, kernels=False)
    for i in range(COUNTED_STEPS):
        per_step = [w for w in waits if w.step == i]
        assert len(per_step) <= 1, f"{len(per_step)} host waits in step {i}:\n{trap.report()}"
    assert all(w.site.startswith(os.path.relpath(GLOBAL_CHECK, REPO)) for w in waits), trap.report()


@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_kernel_launchers_make_no_host_waits(placement):
    trap = run_steps(placement, "triton")
    waits = package_waits(trap, kernels=True)
    assert not waits, trap.report()


def test_the_trap_counts_package_calls_only():
    """The trap itself: waits made by package code count (a host-side module's are listed but
    not counted); the same calls from elsewhere, or while not counting, are ignored."""
    source = "def f(t):\n    return t.sum().item(), bool(t.any()), t[t > 0], torch.unique(t)\n"
    made_in = {}
    for name in ("meft_triton/layer/adapter.py", "meft_triton/optimizers/sparse_adamw.py", "tests/x.py"):
        scope = {"torch": torch}
        exec(compile(source, os.path.join(REPO, name), "exec"), scope)
        made_in[name] = scope["f"]
    trap = HostWaitTrap()
    t = torch.tensor([1.0, -1.0])
    with trap.installed():
        made_in["meft_triton/layer/adapter.py"](t)  # not counting yet
        with trap.counting(0):
            for f in made_in.values():
                f(t)
    assert [(w.call, w.site, w.host_side) for w in trap.waits] == [
        (call, f"{name}:2", name.endswith("sparse_adamw.py"))
        for name in ("meft_triton/layer/adapter.py", "meft_triton/optimizers/sparse_adamw.py")
        for call in ("Tensor.item", "Tensor.__bool__", "Tensor.__getitem__", "torch.unique")]
    assert torch.Tensor.item is not trap._wrap  # restored


@pytest.mark.gpu
@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_no_sync_on_a_gpu_outside_the_global_check(placement, monkeypatch):
    """The same steps on a GPU with torch's sync checks raising; the non-finite check's one
    read runs with them off."""
    real = nonfinite.read_flag

    def allowed(flag):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(flag)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(nonfinite, "read_flag", allowed)
    model, step = tiny_training(placement, "triton", "cuda")
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(COUNTED_STEPS):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
