"""The README's multi-GPU commands (torchrun, accelerate launch) run as written on this CPU
machine with gloo at world size 2 (only --out is added, into the test's folder)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from dist_launch import ROOT, free_port

pytest.importorskip("transformers")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## More than one GPU"):]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_readme_multi_gpu_command_runs(tmp_path, launcher):
    command = next(c for c in readme_commands() if c.startswith(launcher))
    if shutil.which(launcher) is None:
        pytest.skip(f"{launcher} is not installed")
    argv = shlex.split(command)
    # a free port, so parallel runs do not collide: torchrun's option, or accelerate launch's
    at, option = (1, "--master_port") if launcher == "torchrun" else (2, "--main_process_port")
    argv[at:at] = [option, str(free_port())]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([*argv, "--out", str(tmp_path / "ckpt")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "world 2" in done.stdout and (tmp_path / "ckpt").is_dir(), done.stdout
