"""Training state is never lost: meft_triton.io (training state and adapter files).

Tiny random Llama models on CPU (hidden 32, 2 layers, vocab 100), both placements."""

from __future__ import annotations

import io

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meft_triton import MEFTConfig  # noqa: E402
from meft_triton import attach_meft, load_adapter, meft_adapters, save_adapter

VOCAB = 100
CFG = MEFTConfig(num_neurons=64, num_experts=8, experts_per_token=2, topk=4, backend="torch",
                 value_init_std=0.05)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def token_batch(seed: int, rows: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


# (ids must not be "gpu": conftest skips items with a "gpu" keyword where CUDA is missing)
PLACEMENTS = [pytest.param("gpu", id="placement_gpu"), pytest.param("cpu", id="placement_cpu")]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_adapter_file_holds_the_cpu_master_rows(tmp_path, placement):
    """Regression: placement "cpu" keys/values live in the row store, not in parameters, and
    save_adapter used to write only the routers (a reload matched only when the fresh model's
    random init happened to repeat the same seed)."""
    model = attach_meft(tiny_model(0), CFG.replace(placement=placement))
    torch.manual_seed(123)
    for adapter in meft_adapters(model).values():
        adapter.reset_parameters()  # other weights than a fresh attach under seed 0 draws
    ids = token_batch(1)
    save_adapter(model, tmp_path)
    restored = load_adapter(tiny_model(0), tmp_path)
    assert torch.equal(logits(restored, ids), logits(model, ids))
    for index, adapter in meft_adapters(restored).items():
        for got, want in zip(adapter.master_rows(), meft_adapters(model)[index].master_rows()):
            assert torch.equal(got, want)


# ------------------------------------------------------------------------- training state

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402

from meft_triton.io import training_state as ckpt  # noqa: E402
from meft_triton import load_training_state, read_training_state, save_training_state
from meft_triton import create_meft_optimizer
from meft_triton.integration import meft_state_tensors  # noqa: E402


def setup_run(placement: str, model_seed: int = 0, adapter_seed: int = 7):
    """A tiny Llama with adapters, its optimizer (clipping, weight decay) and an LR schedule."""
    model = attach_meft(tiny_model(model_seed), CFG.replace(placement=placement))
    torch.manual_seed(adapter_seed)
    for adapter in meft_adapters(model).values():
        adapter.reset_parameters()
    model.train()
    args = type("Args", (), {"max_grad_norm": 1.0})()
    opt = create_meft_optimizer(model, args, lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    return model, opt, sched


def train_step(model, opt, sched, step: int) -> None:
    for micro in range(2):  # gradient accumulation over 2 micro-batches of different sizes
        ids = token_batch(100 * step + micro, rows=1 + micro, length=5 + micro)
        (model(ids, labels=ids).loss / 2).backward()
    if isinstance(opt, torch.optim.AdamW) and not hasattr(opt, "sparse"):
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad()
    sched.step()


def snapshot(model):
    return {k: v.detach().clone() for k, v in meft_state_tensors(model).items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def optimizer_tensors(opt) -> list[torch.Tensor]:
    state = opt.state_dict()
    out = [v for st in state["state"].values() for v in st.values() if torch.is_tensor(v)]
    for sparse in state.get("meft_sparse", []):
        out += [sparse["exp_avg"].clone(), sparse["exp_avg_sq"].clone(), torch.tensor(sparse["step"])]
    return out


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_resume_gives_exactly_the_next_step(tmp_path, placement):
    """Train 3 steps, save, then step 4 in the same process vs in a fresh model/optimizer/scheduler
    (built from another seed, so nothing matches by luck) restored from the checkpoint."""
    model, opt, sched = setup_run(placement)
    for step in range(3):
        train_step(model, opt, sched, step)
    save_training_state(model, opt, tmp_path / "ckpt", step=3, extra={"epoch": 0, "seen": 12},
                        scheduler=sched)
    draw = (torch.rand(3), random.random())
    train_step(model, opt, sched, 3)
    expected, expected_opt = snapshot(model), optimizer_tensors(opt)

    model2, opt2, sched2 = setup_run(placement, model_seed=0, adapter_seed=99)
    assert load_training_state(model2, opt2, tmp_path / "ckpt", scheduler=sched2) == 3
    assert torch.equal(torch.rand(3), draw[0]) and random.random() == draw[1]  # RNG restored
    assert read_training_state(tmp_path / "ckpt").extra == {"epoch": 0, "seen": 12}
    assert sched2.last_epoch == sched.last_epoch - 1
    train_step(model2, opt2, sched2, 3)
    assert_same(snapshot(model2), expected)
    got_opt = optimizer_tensors(opt2)
    assert len(got_opt) == len(expected_opt)
    for a, b in zip(got_opt, expected_opt):
        assert torch.equal(a, b)


def saved_run(tmp_path, placement="cpu", steps=1):
    model, opt, sched = setup_run(placement)
    for step in range(steps):
        train_step(model, opt, sched, step)
    save_training_state(model, opt, tmp_path / "ckpt", step=steps, scheduler=sched)
    return model, opt, sched


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies at any point before its commit (here: while writing the optimizer file,
    and at the manifest's rename) leaves the previous checkpoint loadable and exactly as it was."""
    model, opt, sched = saved_run(tmp_path)
    at_step_1 = snapshot(model)
    before = sorted(os.listdir(tmp_path / "ckpt"))
    train_step(model, opt, sched, 1)

    real_save, real_replace = torch.save, os.replace

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if not isinstance(f, io.BytesIO):  # a file, not the in-memory check of what is saved
            raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(model, opt, tmp_path / "ckpt", step=2)
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    def dying_replace(src, dst):
        if str(dst).endswith(ckpt.MANIFEST_NAME):
            raise KeyboardInterrupt("killed at the commit (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(model, opt, tmp_path / "ckpt", step=2)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path / "ckpt")) == before  # the failed saves cleaned up after themselves

    model2, opt2, sched2 = setup_run("cpu", adapter_seed=5)
    assert load_training_state(model2, opt2, tmp_path / "ckpt", scheduler=sched2) == 1
    assert_same(snapshot(model2), at_step_1)

    # A hard kill leaves temp files (this version's and earlier ones' exact patterns) and
    # uncommitted files behind: loads ignore them, the next successful save removes them and the
    # superseded checkpoint, and nothing else: the user's files with similar names stay.
    ours = [".optimizer-9-1-0badcafe.pt.1234-deadbeef.tmp", ".trainer-9-1-0badcafe.pt.0badcafe.tmp",
            ".training_state.json.77-deadbeef.meft-tmp", "trainer-9-1-0badcafe.pt", "optimizer-1-2-0badcafe.pt"]
    users = ["trainer-notes.txt", "optimizer-sweep.yaml", ".notes.tmp", ".x.1-2.tmp", "adapter-9-1-x.pt",
             ".trainer-notes.txt.12-deadbeef.tmp"]
    for name in ours + users:
        (tmp_path / "ckpt" / name).write_bytes(b"partial")
    for name in ("adapter-9-1-0badcafe", "adapter-best"):
        (tmp_path / "ckpt" / name).mkdir()
        (tmp_path / "ckpt" / name / "adapter.safetensors").write_bytes(b"x")
    assert read_training_state(tmp_path / "ckpt").step == 1
    save_training_state(model, opt, tmp_path / "ckpt", step=2)
    names = sorted(os.listdir(tmp_path / "ckpt"))
    new = [n for n in names if n.startswith(("adapter-2-", "optimizer-2-", "trainer-2-"))]
    assert len(new) == 3
    assert set(names) == {ckpt.MANIFEST_NAME, *new, *users, "adapter-best"}  # the user's files stay
    assert (tmp_path / "ckpt" / "adapter-best" / "adapter.safetensors").read_bytes() == b"x"
    assert read_training_state(tmp_path / "ckpt").step == 2


def corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        del data[len(data) * 2 // 3:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("which", ["weights", "adapter_config", "optimizer", "trainer", "manifest"])
def test_corrupt_or_truncated_file_is_refused_and_nothing_is_written(tmp_path, which, how):
    saved_run(tmp_path)
    directory = tmp_path / "ckpt"
    manifest = json.loads((directory / ckpt.MANIFEST_NAME).read_text())
    target = {
        "weights": directory / manifest["adapter_dir"] / "adapter.safetensors",
        "adapter_config": directory / manifest["adapter_dir"] / "meft_config.json",
        "optimizer": directory / manifest["optimizer_file"],
        "trainer": directory / manifest["trainer_file"],
        "manifest": directory / ckpt.MANIFEST_NAME,
    }[which]
    corrupt(target, how)
    model, opt, sched = setup_run("cpu", adapter_seed=5)
    before, before_opt, before_rng = snapshot(model), optimizer_tensors(opt), torch.get_rng_state()
    with pytest.raises(ValueError, match="truncated or corrupt|is corrupt") as info:
        load_training_state(model, opt, directory, scheduler=sched)
    assert target.name in str(info.value)
    assert_same(snapshot(model), before)
    for a, b in zip(optimizer_tensors(opt), before_opt):
        assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before_rng)


def test_load_refuses_what_does_not_fit_before_writing(tmp_path):
    saved_run(tmp_path)
    directory = tmp_path / "ckpt"
    with pytest.raises(FileNotFoundError, match="no training_state.json"):
        load_training_state(setup_run("cpu")[0], None, tmp_path)
    # a model of the other placement: its optimizer is another class
    model, opt, _ = setup_run("gpu", adapter_seed=5)
    before = snapshot(model)
    with pytest.raises(ValueError, match="OffloadedAdamW state, the optimizer is a MEFTAdamW"):
        load_training_state(model, opt, directory)
    assert_same(snapshot(model), before)
    # another config
    other = attach_meft(tiny_model(0), CFG.replace(placement="cpu", num_neurons=128))
    other_opt = create_meft_optimizer(other, lr=1e-2)
    before = snapshot(other)
    with pytest.raises(ValueError, match="does not fit|differs"):
        load_training_state(other, other_opt, directory)
    assert_same(snapshot(other), before)
    with pytest.raises(ValueError, match="no MEFT adapters"):
        load_training_state(tiny_model(0), None, directory)
    with pytest.raises(ValueError, match="step must be an int"):
        save_training_state(model, opt, tmp_path / "x", step=-1)
    with pytest.raises(TypeError, match="extra"):
        save_training_state(model, opt, tmp_path / "x", step=1, extra=object())


# ------------------------------------------------------------------------- CUDA (gpu marker)


@pytest.mark.gpu
@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_resume_and_nonfinite_on_cuda(tmp_path, placement):
    """On a GPU: resume gives the next step of an uninterrupted run (CUDA reductions may use
    atomics: compared at 1e-6, not bitwise), and a NaN gradient is refused without touching the
    adapters (placement "cpu": the CPU master behind a CUDA key cache)."""
    from meft_triton import NonFiniteGradientError

    def build(adapter_seed):
        model = attach_meft(tiny_model(0).to("cuda"), CFG.replace(placement=placement, backend="auto"))
        torch.manual_seed(adapter_seed)
        for adapter in meft_adapters(model).values():
            adapter.reset_parameters()
        model.train()
        return model, create_meft_optimizer(model, lr=1e-2, weight_decay=0.05)

    def step(model, opt, seed):
        ids = token_batch(seed, rows=2, length=6).cuda()
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    model, opt = build(7)
    for s in range(3):
        step(model, opt, s)
    save_training_state(model, opt, tmp_path / "ckpt", step=3)
    step(model, opt, 3)
    expected = snapshot(model)
    model2, opt2 = build(99)
    assert load_training_state(model2, opt2, tmp_path / "ckpt") == 3
    step(model2, opt2, 3)
    got = snapshot(model2)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)

    before = snapshot(model2)
    ids = token_batch(5, rows=2, length=6).cuda()
    model2(ids, labels=ids).loss.backward()
    adapter = meft_adapters(model2)[1]
    adapter.router.weight.grad[2, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"layer 1 router rows \[2\]"):
        opt2.step()
    opt2.zero_grad()
    assert_same(snapshot(model2), before)


# ------------------------------------------------------------------------- attacks (issue "Nothing lost, nothing run that the user did not write")


def fresh_manifest(directory, **changes) -> None:
    """Edit the manifest and recompute its digest (what a hand edit that knows the format does)."""
    path = directory / ckpt.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    manifest["manifest_sha256"] = ckpt._json_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_a_manifest_pointing_outside_the_checkpoint_is_refused(tmp_path):
    model, opt, sched = setup_run("gpu")
    save_training_state(model, opt, tmp_path / "ckpt", step=1, scheduler=sched)
    name = json.loads((tmp_path / "ckpt" / ckpt.MANIFEST_NAME).read_text())["adapter_dir"]
    os.rename(tmp_path / "ckpt" / name, tmp_path / "elsewhere")
    before = snapshot(model)
    for where in ("../elsewhere", str(tmp_path / "elsewhere")):
        fresh_manifest(tmp_path / "ckpt", adapter_dir=where)
        with pytest.raises(ValueError, match="outside|not a file inside|without its size"):
            load_training_state(model, opt, tmp_path / "ckpt", scheduler=sched)
    assert_same(snapshot(model), before)


def test_an_edited_adapter_config_is_refused_naming_the_field(tmp_path):
    model = attach_meft(tiny_model(0), CFG)
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "meft_config.json"
    original = path.read_text()
    for field, value in (("gate", "softmax"), ("topk", CFG.topk - 1), ("experts_per_token", 1)):
        info = json.loads(original)
        info["meft_config"][field] = value
        path.write_text(json.dumps(info))
        with pytest.raises(ValueError, match=rf"meft_config\.{field} is .* in the JSON but"):
            load_adapter(attach_meft(tiny_model(0), CFG), tmp_path / "a")


def test_ist_state_file_is_checksummed_and_named(tmp_path):
    from meft_triton.addons.ist import ISTScheduler, read_scheduler_state, save_scheduler_state

    model = attach_meft(tiny_model(0), CFG)
    sched = ISTScheduler(model)
    path = tmp_path / "ist_scheduler.pt"
    save_scheduler_state(sched, path)
    assert torch.equal(read_scheduler_state(path)["scores"], sched.state_dict()["scores"])
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], data[:-1] + bytes([data[-1] ^ 1])):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match="ist_scheduler.pt is truncated or corrupt"):
            read_scheduler_state(path)


def test_a_scheduler_of_another_class_loads_nothing(tmp_path):
    model, opt, sched = setup_run("cpu")
    train_step(model, opt, sched, 0)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    save_training_state(model, opt, tmp_path / "ckpt", step=1, scheduler=step_lr)
    model2, opt2, sched2 = setup_run("cpu", adapter_seed=5)
    before, before_opt = snapshot(model2), optimizer_tensors(opt2)
    before_sched, rng = dict(sched2.state_dict()), torch.get_rng_state()
    with pytest.raises(ValueError, match="StepLR.*LambdaLR"):
        load_training_state(model2, opt2, tmp_path / "ckpt", scheduler=sched2)
    assert_same(snapshot(model2), before)
    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(opt2), before_opt))
    assert sched2.state_dict() == before_sched and torch.equal(torch.get_rng_state(), rng)


def test_unstorable_extra_and_bad_paths_are_clear_errors(tmp_path):
    model, opt, sched = setup_run("gpu")
    with pytest.raises(TypeError, match="extra must hold only"):
        save_training_state(model, opt, tmp_path / "ckpt", step=1, extra={"f": lambda: 1})
    assert not (tmp_path / "ckpt").exists()  # nothing written, not even the directory
    for call in (lambda: save_training_state(model, opt, None, step=1),
                 lambda: load_training_state(model, opt, None), lambda: read_training_state(None),
                 lambda: save_adapter(model, None), lambda: load_adapter(model, None)):
        with pytest.raises(TypeError, match="path must be a non-empty str or os.PathLike"):
            call()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_target_is_an_oserror_naming_it(tmp_path):
    model, opt, sched = setup_run("gpu")
    for save in (lambda d: save_adapter(model, d), lambda d: save_training_state(model, opt, d, step=1)):
        target = tmp_path / f"ro{id(save)}"
        target.mkdir()
        os.chmod(target, 0o500)
        try:
            with pytest.raises(OSError, match=str(target)) as info:
                save(target)
            assert ".meft-tmp" not in str(info.value) and info.value.errno is not None
        finally:
            os.chmod(target, 0o700)


def test_a_full_disk_is_one_oserror_naming_the_file(tmp_path, monkeypatch):
    """ENOSPC from whichever writer (safetensors, torch.save, a plain write): one OSError with
    errno ENOSPC naming the file being saved; the previous checkpoint stays."""
    import errno

    from meft_triton.io import atomic

    model, opt, sched = setup_run("cpu")
    save_training_state(model, opt, tmp_path / "ckpt", step=1, scheduler=sched)
    before = sorted(os.listdir(tmp_path / "ckpt"))
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and ".meft-tmp" in str(path) and "trainer-" in str(path):
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(OSError) as info:
        save_training_state(model, opt, tmp_path / "ckpt", step=2, scheduler=sched)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and "trainer-" in str(info.value)
    assert ".meft-tmp" not in str(info.value).split("(")[0]
    assert sorted(os.listdir(tmp_path / "ckpt")) == before
    # a library that wraps the errno in its own exception type (safetensors, torch)
    wrapped = RuntimeError(f"file write failed: {os.strerror(errno.ENOSPC)}")
    error = atomic.write_error(wrapped, tmp_path / "x.safetensors")
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC and "x.safetensors" in str(error)
    assert atomic.write_error(TypeError("cannot pickle"), tmp_path / "x") is None


def test_save_adapter_removes_the_temp_files_of_killed_saves_only(tmp_path):
    model = attach_meft(tiny_model(0), CFG)
    save_adapter(model, tmp_path / "a")
    ours = [".adapter.safetensors.123-deadbeef.meft-tmp", ".meft_config.json.9-0badcafe.tmp",
            ".adapter.safetensors.0badcafe.tmp"]
    users = [".adapter.safetensors.tmp", ".notes.12-deadbeef.meft-tmp.bak", "notes.tmp"]
    for name in ours + users:
        (tmp_path / "a" / name).write_bytes(b"partial")
    save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == sorted(["adapter.safetensors", "meft_config.json", *users])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("bad", [{"weight_decay": -0.5}, {"lr": float("nan")}, {"max_grad_norm": -1.0},
                                 {"adam_beta1": 1.0}, {"adam_epsilon": -1e-8}])
def test_optimizer_creation_same_rules_both_placements(placement, bad):
    model = attach_meft(tiny_model(0), CFG.replace(placement=placement))
    adapters = meft_adapters(model)
    owners = [a.offload.optimizer if a.offload is not None else None for a in adapters.values()]
    fields = {"learning_rate": 1e-3, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
              "adam_epsilon": 1e-8, "max_grad_norm": 1.0}
    fields.update({("learning_rate" if k == "lr" else k): v for k, v in bad.items()})
    args = type("Args", (), fields)()
    name = {"adam_beta1": "betas", "adam_epsilon": "eps", "lr": "lr"}.get(next(iter(bad)), next(iter(bad)))
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        create_meft_optimizer(model, args)
    # nothing changed: the adapters keep the optimizers they had
    assert [a.offload.optimizer if a.offload is not None else None for a in adapters.values()] == owners


def test_max_grad_norm_zero_means_no_clipping(tmp_path):
    model = attach_meft(tiny_model(0), CFG.replace(placement="cpu"))
    opt = create_meft_optimizer(model, type("Args", (), {"max_grad_norm": 0.0})())
    assert opt.max_grad_norm is None
