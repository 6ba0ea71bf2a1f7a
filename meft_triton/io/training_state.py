"""Training checkpoints: adapters, optimizer state and step count, saved and restored together.

    save_training_state(model, optimizer, "ckpt", step=step, scheduler=sched, ist=ist)
    ...
    step = load_training_state(model, optimizer, "ckpt", scheduler=sched, ist=ist)  # resume exactly

A checkpoint directory holds::

    training_state.json          the manifest: step, and the size and sha256 of every file below
    adapter-<id>/                save_adapter's files (adapter.safetensors + meft_config.json)
    optimizer-<id>.pt            optimizer.state_dict() (OffloadedAdamW: routers' AdamW state and
                                 every layer's SparseRowAdamW moments, step count, hyperparameters)
    trainer-<id>.pt              step, ``extra``, the LR scheduler's state, the IST scheduler's
                                 state (layer scores, its generator), the RNG states

Atomic: every file of a save gets a fresh ``<id>`` and is written to a temp file, fsynced and
renamed; the manifest is written last the same way, and its ``os.replace`` is the commit point.
A save that fails or is killed before it leaves the previous manifest, and every file it names,
untouched; the files of the superseded checkpoint (and leftovers of an interrupted save) are
removed only after the commit. A load verifies the manifest and the size and sha256 of every
file, and reads and checks everything, before it writes anything into the model, the optimizer
or the scheduler: a truncated or corrupt checkpoint raises ``ValueError`` naming the file, and
leaves them untouched.

What "exact resume" needs and this saves: the adapters (placement "cpu": the CPU fp32 master
rows), the optimizer state, the LR scheduler state (pass ``scheduler``), the IST layer
scheduler's state (pass ``ist``, a :class:`~meft_triton.addons.ist.ISTScheduler`), the step count, and
torch's / Python's / NumPy's RNG states (``rng=True``) for data order and dropout. Not saved:
gradients accumulated for a step that has not run (save between steps), the frozen backbone
(reload it from its source), the optimizer's constructor arguments (create it the same way).
One writer per directory at a time.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..integration.attach import attached_state, meft_adapters
from .adapter_files import (CONFIG_NAME, WEIGHTS_NAME, check_and_copy, check_fits, read_adapter, save_adapter,
                            saved_config)
from ..validation import check_path
from .atomic import file_sha256, fsync_dir, is_temp_name, remove_temp_files, write_atomic

MANIFEST_NAME = "training_state.json"
FORMAT_NAME = "meft-triton-training-state"
FORMAT_VERSION = 1
# The names a save gives its files, ``<step>-<pid>-<8 hex>`` (earlier versions: ``<pid>-<8 hex>``):
# cleanups remove only these (and this package's temp files), never a user's ``adapter-best/``.
_TOKEN = r"(?:\d+-)?\d+-[0-9a-f]{8}"
_OWN_NAME = re.compile(rf"adapter-{_TOKEN}|optimizer-{_TOKEN}\.pt|trainer-{_TOKEN}\.pt")


@dataclass(frozen=True)
class TrainingState:
    """What :func:`read_training_state` returns: the verified manifest and the trainer file."""

    step: int
    extra: Any
    path: Path
    manifest: dict[str, Any]
    scheduler_state: Any
    rng_state: dict[str, Any] | None
    ist_state: dict[str, Any] | None = None
    scheduler_class: str | None = None


# ---------------------------------------------------------------------------------- helpers


def _check_ist(ist: Any) -> None:
    from ..addons.ist import ISTScheduler

    if ist is not None and not isinstance(ist, ISTScheduler):
        raise TypeError(f"ist must be an ISTScheduler (or None), got {type(ist).__name__}")


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return step


def _json_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _torch_bytes(obj: Any, what: str) -> bytes:
    """torch.save bytes of ``obj``, checked to load back with ``weights_only=True`` (so the
    checkpoint never holds something its own load would refuse)."""
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
        data = buf.getvalue()
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - explain which argument is not storable
        raise TypeError(f"save_training_state: {what} must hold only tensors and plain Python "
                        f"values (it is loaded with torch.load(weights_only=True)); nothing was "
                        f"written: {type(exc).__name__}: {exc}") from exc
    return data


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _ours(name: str) -> bool:
    """A name only this package gives a checkpoint's files or their temp files."""
    return bool(_OWN_NAME.fullmatch(name)) or is_temp_name(
        name, lambda target: target == MANIFEST_NAME or bool(_OWN_NAME.fullmatch(target)))


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                _remove(child)
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------- save


def save_training_state(model: nn.Module, optimizer: Any, path: str | os.PathLike, *, step: int,
                        extra: Any = None, scheduler: Any = None, ist: Any = None,
                        rng: bool = True) -> Path:
    """Save the model's adapters, ``optimizer.state_dict()``, ``step`` and ``extra`` to the
    directory ``path`` (created if missing), atomically (module docstring); returns it.

    ``optimizer``: what :func:`~meft_triton.optimizers.factory.create_meft_optimizer` returned
    (``MEFTAdamW`` / ``OffloadedAdamW``), any ``torch.optim.Optimizer``, or None. ``scheduler``:
    an LR scheduler (its ``state_dict``) or None. ``ist``: an
    :class:`~meft_triton.addons.ist.ISTScheduler` or None. ``extra``: plain Python values and tensors
    (e.g. the data loader's position), returned by :func:`read_training_state`. ``rng``: also
    save torch's (CPU and initialized CUDA), Python's and NumPy's RNG states. Call it between
    steps: in-flight CPU optimizer updates are waited for; gradients not yet stepped are not
    saved. Saving into an existing checkpoint replaces it only at the final rename.
    """
    step = _check_step(step)
    directory = check_path("path", path, "save_training_state")
    state = attached_state(model) if isinstance(model, nn.Module) else None
    if state is None or not meft_adapters(model):
        raise ValueError(f"save_training_state: {type(model).__name__} has no MEFT adapters attached")
    if optimizer is not None and not callable(getattr(optimizer, "state_dict", None)):
        raise TypeError(f"optimizer must have a state_dict() (or be None), got {type(optimizer).__name__}")
    if scheduler is not None and not callable(getattr(scheduler, "state_dict", None)):
        raise TypeError(f"scheduler must have a state_dict() (or be None), got {type(scheduler).__name__}")
    _check_ist(ist)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_training_state: {directory} exists and is not a directory")

    # Everything in memory first, each part checked to load back (naming the argument that
    # cannot be stored), before the directory is created or anything is written.
    _torch_bytes(extra, "extra")
    trainer_bytes = _torch_bytes({"step": step, "extra": extra,
                                  "scheduler": None if scheduler is None else scheduler.state_dict(),
                                  "scheduler_class": None if scheduler is None else type(scheduler).__name__,
                                  "ist": None if ist is None else ist.state_dict(),
                                  "rng": _rng_state() if rng else None}, "the scheduler states")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    token = f"{step}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    adapter_dir = f"adapter-{token}"
    optimizer_file = None if optimizer is None else f"optimizer-{token}.pt"
    trainer_file = f"trainer-{token}.pt"
    written = [directory / adapter_dir, directory / trainer_file]
    if optimizer_file is not None:
        written.append(directory / optimizer_file)
    committed = False
    try:
        # (the adapter save and optimizer.state_dict() wait for in-flight CPU updates)
        save_adapter(model, directory / adapter_dir)
        if optimizer is not None:
            # streamed (the CPU moments can be many GiB): torch.save reads the row store's own
            # arrays, which no update touches while this runs (state_dict() waited for them)
            opt_state = optimizer.state_dict()
            write_atomic(directory / optimizer_file, lambda f: torch.save(opt_state, f))
            del opt_state
        write_atomic(directory / trainer_file, lambda f: f.write(trainer_bytes))
        files = [f"{adapter_dir}/{WEIGHTS_NAME}", f"{adapter_dir}/{CONFIG_NAME}", trainer_file]
        if optimizer_file is not None:
            files.append(optimizer_file)
        adapters = meft_adapters(model)
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "adapter_dir": adapter_dir,
            "optimizer_file": optimizer_file,
            "optimizer_class": None if optimizer is None else type(optimizer).__name__,
            "trainer_file": trainer_file,
            "placement": state.config.placement,
            "layers": list(adapters),
            "files": {name: {"bytes": (directory / name).stat().st_size,
                             "sha256": file_sha256(directory / name)} for name in sorted(files)},
        }
        manifest["manifest_sha256"] = _json_digest(manifest)
        text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        write_atomic(directory / MANIFEST_NAME, lambda f: f.write(text))  # the commit point
        committed = True
        fsync_dir(directory)
    finally:
        if not committed:
            for item in written:
                _remove(item)
            if created:
                _remove_if_empty(directory)
    keep = {adapter_dir, trainer_file, optimizer_file, MANIFEST_NAME}
    for item in directory.iterdir():  # the superseded checkpoint and leftovers of killed saves
        if item.name not in keep and _ours(item.name):
            _remove(item)
    return directory


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # not empty (the user's files), or gone
        pass


# ---------------------------------------------------------------------------------- load


def _read_manifest(directory: Path) -> dict[str, Any]:
    where = directory / MANIFEST_NAME
    if not where.is_file():
        raise FileNotFoundError(f"load_training_state: no {MANIFEST_NAME} in {directory} "
                                "(not a training checkpoint, or its first save never completed)")
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_training_state: {where} is truncated or corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"load_training_state: {where} is not a meft-triton training state")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"load_training_state: {where} has format_version {version!r}; this "
                         f"meft-triton reads versions 1..{FORMAT_VERSION}")
    if manifest.get("manifest_sha256") != _json_digest(manifest):
        raise ValueError(f"load_training_state: {where} is corrupt (its sha256 does not match)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"load_training_state: {where} lists no files")
    for name in files:
        _inside(directory, name, where)
    # every file the load reads is one whose size and sha256 the manifest lists
    needed = [manifest.get("trainer_file")]
    adapter_dir = manifest.get("adapter_dir")
    if not isinstance(adapter_dir, str):
        raise ValueError(f"load_training_state: {where} names no adapter directory")
    needed += [f"{adapter_dir}/{WEIGHTS_NAME}", f"{adapter_dir}/{CONFIG_NAME}"]
    if manifest.get("optimizer_file") is not None:
        needed.append(manifest["optimizer_file"])
    for name in needed:
        if not isinstance(name, str) or name not in files:
            raise ValueError(f"load_training_state: {where} names {name!r} without its size and "
                             "sha256 (a hand-edited manifest?)")
    return manifest


def _inside(directory: Path, name: Any, where: Path) -> Path:
    """``directory / name`` if ``name`` is a relative path that stays inside ``directory``."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"load_training_state: {where} names {name!r}, which is not a file inside "
                         f"the checkpoint {directory}")
    file = directory / name
    try:
        inside = file.resolve().is_relative_to(directory.resolve())
    except OSError:
        inside = False
    if not inside:
        raise ValueError(f"load_training_state: {where} names {name!r}, which leads outside the "
                         f"checkpoint {directory} (a link?)")
    return file


def _verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    for name, expect in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise ValueError(f"load_training_state: {file} is missing (the checkpoint is incomplete)")
        size = file.stat().st_size
        if size != expect["bytes"]:
            raise ValueError(f"load_training_state: {file} is truncated or corrupt: {size} bytes, "
                             f"the manifest says {expect['bytes']}")
        if file_sha256(file) != expect["sha256"]:
            raise ValueError(f"load_training_state: {file} is corrupt: its sha256 does not match the manifest")


def _load_torch(file: Path) -> Any:
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a verified file that still fails to load
        raise ValueError(f"load_training_state: {file} could not be read: {exc}") from exc


def read_training_state(path: str | os.PathLike) -> TrainingState:
    """Verify a checkpoint (manifest, sizes, sha256) and read its step, ``extra``, scheduler
    and RNG states, without touching a model. Raises ``FileNotFoundError`` when ``path`` holds
    no committed checkpoint and ``ValueError`` for a truncated or corrupt one."""
    directory = check_path("path", path, "read_training_state")
    manifest = _read_manifest(directory)
    _verify_files(directory, manifest)
    trainer = _load_torch(directory / manifest["trainer_file"])
    if not isinstance(trainer, dict) or trainer.get("step") != manifest["step"]:
        raise ValueError(f"load_training_state: {directory / manifest['trainer_file']} does not match "
                         f"the manifest (step {trainer.get('step') if isinstance(trainer, dict) else None!r} "
                         f"vs {manifest['step']})")
    return TrainingState(step=manifest["step"], extra=trainer.get("extra"), path=directory,
                         manifest=manifest, scheduler_state=trainer.get("scheduler"),
                         rng_state=trainer.get("rng"), ist_state=trainer.get("ist"),
                         scheduler_class=trainer.get("scheduler_class"))


def _check_optimizer_state(optimizer: Any, saved: Any, manifest: dict[str, Any]) -> None:
    """Refuse an optimizer state that does not fit, before anything is written."""
    cls = manifest.get("optimizer_class")
    if cls != type(optimizer).__name__:
        raise ValueError(f"load_training_state: the checkpoint holds a {cls} state, the optimizer is a "
                         f"{type(optimizer).__name__}")
    check = getattr(optimizer, "check_state_dict", None)
    if callable(check):  # OffloadedAdamW: every layer's sparse state, before any is loaded
        try:
            check(saved)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"load_training_state: {manifest.get('optimizer_file')}: {exc}") from exc
    if not isinstance(optimizer, torch.optim.Optimizer):
        return
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise ValueError("load_training_state: the optimizer file holds no optimizer state_dict")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], groups)):
        raise ValueError("load_training_state: the optimizer state has other parameter groups or sizes "
                         "than the optimizer (another model, config or layers?)")
    params = {i: p for s, g in zip(saved["param_groups"], groups) for i, p in zip(s["params"], g["params"])}
    for index, st in saved["state"].items():
        p = params.get(index)
        for key in ("exp_avg", "exp_avg_sq"):
            t = st.get(key) if isinstance(st, dict) else None
            if p is not None and isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"load_training_state: optimizer state {key} of parameter {index} has shape "
                                 f"{tuple(t.shape)}, the parameter {tuple(p.shape)}")
    sparse = getattr(optimizer, "sparse", None)
    if sparse is not None:
        states = saved.get("meft_sparse")
        if not isinstance(states, list) or len(states) != len(sparse):
            raise ValueError(f"load_training_state: the checkpoint has "
                             f"{len(states) if isinstance(states, list) else 0} sparse optimizer states, "
                             f"the optimizer {len(sparse)} offloaded layers")
        for layer, (st, opt) in enumerate(zip(states, sparse)):
            shape = (opt.store.num_rows, opt.store.hidden_size)
            if not isinstance(st, dict) or (st.get("num_rows"), st.get("hidden_size")) != shape:
                raise ValueError(f"load_training_state: sparse optimizer state {layer} does not fit a "
                                 f"store of {shape[0]} rows x {shape[1]}")


def load_training_state(model: nn.Module, optimizer: Any, path: str | os.PathLike, *,
                        scheduler: Any = None, ist: Any = None, restore_rng: bool = True) -> int:
    """Restore what :func:`save_training_state` saved into ``model`` (adapters attached, e.g. by
    ``attach_meft`` with the same config) and ``optimizer`` (created the same way as for the
    save); returns the saved step. Also restores ``scheduler``, ``ist`` and, with ``restore_rng``, the
    RNG states saved with ``rng=True``. Verifies and reads everything first: on a missing,
    truncated or corrupt file, or a state that does not fit, it raises (``FileNotFoundError`` /
    ``ValueError``) and writes nothing. The next step then equals the step an uninterrupted run
    would have taken."""
    directory = check_path("path", path, "load_training_state")
    if not isinstance(model, nn.Module) or attached_state(model) is None:
        raise ValueError(f"load_training_state: {type(model).__name__} has no MEFT adapters attached; "
                         "attach_meft with the checkpoint's config and create the optimizer first")
    _check_ist(ist)
    ckpt = read_training_state(directory)
    manifest = ckpt.manifest
    adapter_dir = directory / manifest["adapter_dir"]
    info, tensors = read_adapter(adapter_dir)
    config, layers = saved_config(info, "load_training_state", directory)
    check_fits(model, config, layers, tensors)
    saved_opt = None
    if optimizer is not None:
        if manifest.get("optimizer_file") is None:
            raise ValueError(f"load_training_state: {directory} was saved without an optimizer state")
        saved_opt = _load_torch(directory / manifest["optimizer_file"])
        _check_optimizer_state(optimizer, saved_opt, manifest)
    if scheduler is not None:
        _check_scheduler_state(scheduler, ckpt, directory / manifest["trainer_file"])
    if ist is not None:
        if ckpt.ist_state is None:
            raise ValueError(f"load_training_state: {directory} was saved without an IST scheduler state")
        try:
            ist.check_state_dict(ckpt.ist_state)
        except ValueError as exc:
            raise ValueError(f"load_training_state: {directory / manifest['trainer_file']}: {exc}") from exc
    rng = ckpt.rng_state if restore_rng else None
    # Everything is checked. The small states go first, each undone if a later part still
    # fails; the optimizer and the adapters (too large to keep a copy of) go last.
    undo: list[Any] = []
    try:
        if scheduler is not None:
            undo.append((scheduler.load_state_dict, copy.deepcopy(scheduler.state_dict())))
            scheduler.load_state_dict(ckpt.scheduler_state)
        if ist is not None:
            undo.append((ist.load_state_dict, copy.deepcopy(ist.state_dict())))
            ist.load_state_dict(ckpt.ist_state)
        if rng is not None:
            undo.append((_set_rng_state, _rng_state()))
            _set_rng_state(rng)
        if optimizer is not None:
            optimizer.load_state_dict(saved_opt)
    except Exception as exc:
        for restore, state in reversed(undo):
            restore(state)
        raise ValueError(f"load_training_state: {directory} does not fit "
                         f"({type(exc).__name__}: {exc}); nothing was loaded") from exc
    check_and_copy(model, config, layers, tensors)
    return ckpt.step


def _check_scheduler_state(scheduler: Any, ckpt: TrainingState, where: Path) -> None:
    """The saved LR scheduler state must come from a scheduler of the same class and keys."""
    saved = ckpt.scheduler_state
    if saved is None:
        raise ValueError(f"load_training_state: {ckpt.path} was saved without a scheduler state")
    name = type(scheduler).__name__
    if ckpt.scheduler_class is not None and ckpt.scheduler_class != name:
        raise ValueError(f"load_training_state: {where} holds the state of a {ckpt.scheduler_class}, "
                         f"the scheduler is a {name}")
    current = scheduler.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(current):
        keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"load_training_state: the scheduler state in {where} has keys {keys}, "
                         f"a {name} has {sorted(current)} (another scheduler class?)")


__all__ = ["MANIFEST_NAME", "TrainingState", "load_training_state", "read_training_state",
           "save_training_state"]
