"""The HF Trainer under torchrun (2 gloo ranks on CPU, use_cpu, ddp_backend "gloo") on a tiny
Llama with MEFT adapters equals the one-process Trainer on the same global batch, for both
placements, with gradient accumulation, with the row-sparse hook on the Trainer's DDP wrapper
(placement "gpu"), and with IST (every rank selects the same layers)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import dist_scenarios as sc  # noqa: E402
import trainer_worker  # noqa: E402
from dist_launch import run_script  # noqa: E402
from meft_triton.distributed import agreed_loss, use_row_sparse_hook  # noqa: E402
from test_distributed_gpu import TIMEOUT  # noqa: E402


def trained(tmp_path, placement, extra, nproc=None):
    """One process (here, in this process: no WORLD_SIZE) or ``nproc`` ranks under torchrun."""
    out = tmp_path / ("one" if nproc is None else f"w{nproc}")
    out.mkdir()
    if nproc is None:
        trainer_worker.run(placement, out, list(extra))
    else:
        rc, log = run_script("trainer_worker.py", (placement, out, *extra), nproc=nproc, timeout=TIMEOUT)
        assert rc == 0, f"{nproc} ranks exited with {rc}:\n{log}"
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc or 1)]


# placement "cpu" without IST runs as a README command (test_distributed_readme.py); with IST it
# trains the node-shared optimizer under the Trainer's DDP here
@pytest.mark.parametrize("placement, ist", [("gpu", False), ("gpu", True), ("cpu", True)],
                         ids=["gpu-plain", "gpu-ist", "cpu-ist"])
def test_trainer_under_torchrun_equals_one_process(tmp_path, monkeypatch, placement, ist):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    extra = ("ist",) if ist else ()
    (want,) = trained(tmp_path, placement, extra)
    ranks = trained(tmp_path, placement, extra, nproc=2)
    initial = sc.masters(sc.tiny_llama(placement))
    assert any(not torch.equal(want["masters"][k], initial[k]) for k in initial), "nothing trained"
    for rank, got in enumerate(ranks):
        assert got["masters"].keys() == want["masters"].keys()
        for name, tensor in want["masters"].items():
            assert torch.equal(got["masters"][name], ranks[0]["masters"][name]), (rank, name)
            torch.testing.assert_close(got["masters"][name], tensor, rtol=0, atol=1e-6, msg=name)
        if ist:  # the same scores and layers on every rank, and as in one process
            assert torch.equal(got["scores"], ranks[0]["scores"]), rank
            torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-12)
            assert got["selection_counts"].tolist() == want["selection_counts"].tolist()
    if placement == "gpu" and not ist:  # the Trainer's DDP wrapper reduced by rows where cheaper
        assert ranks[0]["sparse"] > 0 and ranks[0]["bytes_sent"] < ranks[0]["bytes_dense"], ranks[0]
        assert want["bytes_sent"] == 0  # one process: no wrapper, nothing sent
    if ist:  # a scoring round ran, and each step trained one of the two layers
        assert want["scores"].abs().max() > 0 and want["selection_counts"].sum() == 3


def test_agreed_loss_needs_a_callable_and_is_the_loss_in_one_process():
    with pytest.raises(TypeError, match="loss_fn"):
        agreed_loss(1.5)
    assert agreed_loss(lambda: torch.tensor(2.5))() == 2.5
    with pytest.raises(TypeError, match="trainer"):
        use_row_sparse_hook(object())
