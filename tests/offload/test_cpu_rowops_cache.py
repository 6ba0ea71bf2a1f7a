"""The compiled row loop's cache is private: a library planted there by another local user, or
left with loose modes, is never loaded; the package builds and loads its own instead.

The planted library is a stub whose row update does nothing (what the attack planted): were it
loaded, ``adamw_rows`` would leave the parameters unchanged instead of matching the torch twin.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
import torch

from meft_triton.offload import cpu_rowops

STUB = r"""
#include <stdint.h>
int meft_adamw_rows(void *p, void *m, void *v, const void *g, int k, const int64_t *ids,
                    const int64_t *gidx, int64_t n, int64_t rowlen, float a, float b, float c,
                    float d, float e, float f, int u, int w, int t) { return 0; }
int meft_gather_rows(const char *s, int64_t ss, const int64_t *ids, int64_t n, char *d,
                     int64_t ds, int64_t nb, int t) { return 0; }
"""

pytestmark = pytest.mark.skipif(cpu_rowops._compiler() is None, reason="needs a C compiler")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh loader state over an empty cache directory (``MEFT_TRITON_CACHE_DIR``)."""
    monkeypatch.setenv("MEFT_TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_rowops._ENV_VAR, raising=False)
    for name, value in (("_tried", False), ("_lib", None), ("_lib_error", None), ("_fresh_dir", None)):
        monkeypatch.setattr(cpu_rowops, name, value)
    out_dir = cpu_rowops._cache_dir()
    os.makedirs(out_dir, mode=0o700)
    return out_dir


def plant_stub(out_dir: str, tmp_path, mode: int) -> list[str]:
    """The stub library at every name the loader would look for; returns those paths."""
    src, lib = tmp_path / "stub.c", tmp_path / "stub.so"
    src.write_text(STUB)
    cc = cpu_rowops._compiler()
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    paths = []
    for flags in (cpu_rowops._BASE_FLAGS + cpu_rowops._ARCH_FLAGS, cpu_rowops._BASE_FLAGS):
        path = cpu_rowops._library_path(out_dir, cc, flags)
        shutil.copyfile(lib, path)
        os.chmod(path, mode)
        paths.append(path)
    return paths


def assert_real_update() -> None:
    """The loaded library updates rows exactly as the torch twin does (the stub does nothing)."""
    torch.manual_seed(0)
    tensors = [torch.randn(6, 4), torch.randn(6, 4), torch.rand(6, 4)]
    grad, ids = torch.randn(3, 4), torch.tensor([0, 2, 5])
    results = []
    for backend in ("c", "torch"):
        p, m, v = (t.clone() for t in tensors)
        cpu_rowops.adamw_rows(p, m, v, grad, ids, None, decay=1.0, one_minus_beta1=0.1,
                              one_minus_beta2=0.001, eps=1e-8, neg_step_size=-0.1, grad_scale=1.0,
                              backend=backend)
        results.append(p)
    assert not torch.equal(results[0], tensors[0])
    assert torch.equal(results[0], results[1])


def fake_owner(monkeypatch, inode: int) -> None:
    """``os.lstat`` reports another owner for the file or directory with this inode."""
    real = os.lstat

    def lstat(path, *args, **kwargs):
        st = real(path, *args, **kwargs)
        if st.st_ino != inode:
            return st
        fields = list(st[:10])
        fields[4] = st.st_uid + 1  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(os, "lstat", lstat)


def test_a_library_with_loose_modes_is_replaced_not_loaded(cache, tmp_path):
    planted = plant_stub(cache, tmp_path, mode=0o777)
    os.chmod(cache, 0o777)
    lib = cpu_rowops._load()
    assert lib is not None and lib.path in planted
    assert_real_update()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700  # the loose directory was closed
    assert stat.S_IMODE(os.stat(lib.path).st_mode) == 0o700


def test_a_library_of_another_owner_is_replaced_not_loaded(cache, tmp_path, monkeypatch):
    planted = plant_stub(cache, tmp_path, mode=0o700)
    inode = os.stat(planted[0]).st_ino
    fake_owner(monkeypatch, inode)
    lib = cpu_rowops._load()
    assert lib is not None and lib.path == planted[0]
    assert os.stat(lib.path).st_ino != inode  # our own build took its place
    assert_real_update()


def test_a_cache_directory_of_another_owner_is_not_used(cache, tmp_path, monkeypatch):
    planted = plant_stub(cache, tmp_path, mode=0o700)
    fake_owner(monkeypatch, os.stat(cache).st_ino)
    lib = cpu_rowops._load()
    assert lib is not None and os.path.dirname(lib.path) != cache
    assert stat.S_IMODE(os.stat(os.path.dirname(lib.path)).st_mode) == 0o700  # a fresh private one
    assert_real_update()
    with open(planted[0], "rb") as f, open(tmp_path / "stub.so", "rb") as g:
        assert f.read() == g.read()  # left alone: not ours to touch


def test_the_load_checks_the_open_file_too(cache, tmp_path):
    """Between the build and the load a file may change hands: the load refuses it."""
    planted = plant_stub(cache, tmp_path, mode=0o744)
    with pytest.raises(RuntimeError, match="not a file private to this user"):
        cpu_rowops._open_private(planted[0])
