"""Start W ranks of tests/distributed/dist_worker.py the way torchrun does (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT on loopback), or a script under torchrun itself,
each with a timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out_dir, *, local_world: int | None = None, timeout: float = 240,
           args: tuple = ()) -> list[tuple[int | None, str]]:
    """Run ``scenario`` on ``world`` ranks; returns each rank's (exit code or None if it was
    killed at the timeout, stderr tail). Ranks write their results under ``out_dir``."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % (local_world or world)),
                   LOCAL_WORLD_SIZE=str(local_world or world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), OMP_NUM_THREADS="1",
                   # a fixed mmap threshold: freed large arrays go back to the OS (the memory test)
                   MALLOC_MMAP_THRESHOLD_="65536")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), scenario, str(out_dir),
                                       *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, err[-4000:]))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            results.append((None, err[-4000:]))
    return results


def run_command(argv: list[str], *, timeout: float = 240) -> tuple[int | None, str]:
    """Run ``argv`` from the repository root (its own session, the package and this folder on
    the path); returns (exit code, or None if it was killed at the timeout with every process it
    started, the tail of its output: stdout and stderr together)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        out, _ = proc.communicate()
        return None, out[-4000:]


def run_script(script: str, args: tuple, *, nproc: int | None = None, timeout: float = 240) -> tuple[int | None, str]:
    """``python tests/distributed/SCRIPT ARGS`` in one process, or under torchrun
    (``python -m torch.distributed.run``) with ``nproc`` ranks on a free loopback port."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                         "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return run_command([sys.executable, *launcher, str(HERE / script), *map(str, args)], timeout=timeout)
