"""Test set-up: Triton's interpreter when there is no GPU, fresh seeds, poisoned outputs."""

import os
import secrets
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module is imported: triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


#: folders whose tests get a marker and stay out of a plain ``python -m pytest``: the benchmarks and
#: the perf gate's own tests, and the multi-process distributed tests. Each runs in its own CI step
#: (``python -m pytest -m perf tests/perf``, ``python -m pytest -m distributed tests/distributed``).
#: They are selected by any ``-m`` expression, or by naming a path inside the folder (the perf
#: gate's ``--benchmarks`` runs name tests/perf without a marker, so ``addopts = -m 'not perf'``
#: would not do).
OPT_IN_FOLDERS = {"perf": "perf", "distributed": "distributed"}
TESTS = Path(__file__).resolve().parent


def _inside(folder: Path, arg: str) -> bool:
    path = Path(arg.split("::", 1)[0]).resolve()
    return path == folder or folder in path.parents


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    for name, marker in OPT_IN_FOLDERS.items():
        folder = TESTS / name
        mine = [item for item in items if folder in Path(str(item.path)).resolve().parents]
        for item in mine:
            item.add_marker(getattr(pytest.mark, marker))
        chosen = config.option.markexpr or (
            config.args_source != pytest.Config.ArgsSource.TESTPATHS and any(_inside(folder, a) for a in config.args))
        if mine and not chosen:
            skip = set(map(id, mine))
            config.hook.pytest_deselected(items=mine)
            items[:] = [item for item in items if id(item) not in skip]
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker, not item.keywords: a parameter id "gpu" (placement="gpu") is a keyword too
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """A fresh seed per test (MEFT_TEST_SEED pins it); shown in the report of a failure."""
    value = int(os.environ.get("MEFT_TEST_SEED", secrets.randbits(31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture
def device():
    return KERNEL_DEVICE


_POISON = {torch.int32: -(2**31), torch.int64: -(2**63)}


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every torch.empty/empty_like made during the test starts as NaN (floats) or the most
    negative int, so an element a kernel forgets to write cannot pass by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.is_floating_point():
            return tensor.fill_(float("nan"))
        if tensor.dtype in _POISON:
            return tensor.fill_(_POISON[tensor.dtype])
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
