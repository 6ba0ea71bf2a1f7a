"""The README's multi-GPU commands (torchrun, accelerate launch: DDP, FSDP2, the HF Trainer, both
placements) run as written on this CPU machine with gloo at world size 2 (only a free port and
--out, into the test's folder, are added)."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from dist_launch import ROOT, free_port, run_command

pytest.importorskip("transformers")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## More than one GPU"):]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M).group(1)
    return [line for line in block.splitlines() if line.strip()]


COMMANDS = readme_commands()


def test_the_readme_shows_both_launchers_and_every_mode():
    text = "\n".join(COMMANDS)
    for part in ("torchrun", "accelerate launch", "--placement gpu", "--placement cpu", "--fsdp", "--trainer"):
        assert part in text, part


@pytest.mark.parametrize("command", COMMANDS, ids=[c.split(".py")[-1].strip() + " " + c.split()[0]
                                                   for c in COMMANDS])
def test_readme_multi_gpu_command_runs(tmp_path, command):
    argv = shlex.split(command)
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    # a free port, so parallel runs do not collide: torchrun's option, or accelerate launch's
    at, option = (1, "--master_port") if argv[0] == "torchrun" else (2, "--main_process_port")
    argv[at:at] = [option, str(free_port())]
    rc, out = run_command([*argv, "--out", str(tmp_path / "ckpt")], timeout=300)
    assert rc == 0, f"{command} exited with {rc}:\n{out}"
    assert "world 2" in out and (tmp_path / "ckpt").is_dir(), out
