"""save_adapter / load_adapter: an adapter directory (safetensors weights + a JSON config), written
atomically and verified on load."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MEFTConfig
from ..integration.attach import (attach_meft, attached_state, detach_meft, is_meft_attached, meft_adapters,
                                  meft_state_tensors)
from ..integration.identity import check_same_backbone, model_identity
from ..layer.adapter import MEFTAdapter
from ..validation import check_path
from .atomic import file_sha256, fsync_dir, fsync_file, remove_temp_files, temp_path, write_error

COMPUTE_FIELDS = ("num_neurons", "num_experts", "experts_per_token", "topk", "gate", "low_key_dim")

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "meft_config.json"
FORMAT_NAME = "meft-triton-adapter"
# 2: gate "softmax" is MEFT's softmax over all E experts (version 1 renormalised over the P
# chosen ones); low_key_dim exists. Version-1 "logit" adapters mean the same under both.
FORMAT_VERSION = 2


def _tensor_digest(metadata: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """sha256 over the header metadata (minus the digest itself) and every tensor's name,
    dtype, shape and bytes: makes the weights file verifiable on its own."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "digest"},
                        sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()




def _hidden_size_of(adapters: dict[int, MEFTAdapter]) -> int | list[int]:
    sizes = [a.hidden_size for a in adapters.values()]
    return sizes[0] if len(set(sizes)) == 1 else sizes


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the model's adapters to directory ``path`` (created if missing); returns it.

    Writes ``adapter.safetensors`` (tensors ``layers.{i}.router.weight|keys|values`` in the
    adapters' dtype, under placement "cpu" the fp32 master keys/values of the CPU row store,
    after any in-flight optimizer update; its header metadata repeats the config, layers and hidden size plus a
    sha256 digest of metadata and tensors, so the file verifies on its own) and
    ``meft_config.json`` (format version, MEFTConfig, layers, hidden size, dtype and the sha256
    of the whole weights file).

    Atomic: both files are written to temp files in ``path``, fsynced, then moved into place
    with ``os.replace`` (weights first: that rename is the commit point). A save interrupted
    before it leaves the previous adapter untouched; one interrupted between the two renames
    leaves the new, complete weights file with a stale JSON, which :func:`load_adapter`
    detects (checksum), verifies through the file's own digest and loads with a warning. Either
    way a load sees a whole adapter, never a mix. Temp files are removed on errors; those a
    hard kill left behind (``.<file>.<pid>-<8 hex>.meft-tmp``) the next save removes. A failed
    write (full disk, read-only directory) raises an ``OSError`` naming the file.
    """
    from safetensors.torch import save_file

    directory = check_path("path", path, "save_adapter")
    state = attached_state(model)
    adapters = meft_adapters(model)
    if state is None or not adapters:
        raise ValueError(f"save_adapter: {type(model).__name__} has no MEFT adapters attached")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_adapter: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    tensors = {name: t.to("cpu").contiguous().clone()
               for name, t in meft_state_tensors(model).items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    info: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meft_config": state.config.to_dict(),
        "layers": list(adapters),
        "hidden_size": _hidden_size_of(adapters),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        **model_identity(model),  # model_class, model_type, num_layers, target: checked on load
        "name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
    }
    metadata = {"meft": json.dumps(info, sort_keys=True)}
    metadata["digest"] = _tensor_digest(metadata, tensors)

    tmp_weights, tmp_config = temp_path(directory / WEIGHTS_NAME), temp_path(directory / CONFIG_NAME)
    try:
        save_file(tensors, str(tmp_weights), metadata=metadata)
        fsync_file(tmp_weights)
        info["weights_file"] = WEIGHTS_NAME
        info["weights_bytes"] = tmp_weights.stat().st_size
        info["weights_sha256"] = file_sha256(tmp_weights)
        info["weights_digest"] = metadata["digest"]
        with open(tmp_config, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_weights, directory / WEIGHTS_NAME)  # commit point
        os.replace(tmp_config, directory / CONFIG_NAME)
        fsync_dir(directory)
    except Exception as exc:  # noqa: BLE001 - a full disk or a read-only directory: one OSError
        error = write_error(exc, directory / WEIGHTS_NAME)
        if error is None:
            raise
        raise error from exc
    finally:
        for tmp in (tmp_weights, tmp_config):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    remove_temp_files(directory, (WEIGHTS_NAME, CONFIG_NAME))  # left by killed saves
    return directory


def _read_weights(weights: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors = {}
        with safe_open(str(weights), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"load_adapter: {weights} is truncated or corrupt "
                         f"(safetensors could not read it: {exc})") from exc
    return tensors, metadata


def _read_info(config_path: Path) -> dict[str, Any] | None:
    if not config_path.exists():
        return None
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapter: {config_path} is truncated or corrupt: {exc}") from exc
    if not isinstance(info, dict):
        raise ValueError(f"load_adapter: {config_path} does not hold a JSON object")
    return info


def _check_format(info: dict[str, Any], where: Path) -> None:
    if info.get("format") != FORMAT_NAME:
        raise ValueError(f"load_adapter: {where} is not a meft-triton adapter "
                         f"(format {info.get('format')!r}, expected {FORMAT_NAME!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"load_adapter: {where} has format_version {version!r}; this "
                         f"meft-triton reads versions 1..{FORMAT_VERSION}")


def saved_config(info: dict[str, Any], caller: str, path: Any) -> tuple[MEFTConfig, list[int]]:
    """The MEFTConfig and layer indices recorded by :func:`save_adapter`. Refuses a version-1
    adapter with gate "softmax": its weights were trained for another gate than today's."""
    try:
        config, layers = MEFTConfig.from_dict(info["meft_config"]), [int(i) for i in info["layers"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{caller}: {path} holds an invalid MEFT config: {exc}") from exc
    if info.get("format_version") == 1 and config.gate == "softmax":
        raise ValueError(
            f"{caller}: {path} is a format-1 adapter with gate 'softmax', which then renormalised the "
            "softmax over each token's P chosen experts; gate 'softmax' now means MEFT's softmax over "
            "all E experts, so these weights would compute something else. Load it with the meft-triton "
            "version that saved it, or train a new adapter (gate 'softmax' is now MEFT's own)")
    return config, layers


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a saved adapter directory without touching a model.

    Returns ``(info, tensors)``. Raises ``FileNotFoundError`` for a missing directory or weights
    file and ``ValueError`` for a truncated or corrupt file (size/checksum/digest mismatch, bad
    header) or an unknown format version."""
    directory = check_path("path", path, "load_adapter")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {directory}")
    info = _read_info(directory / CONFIG_NAME)
    if info is not None:
        _check_format(info, directory / CONFIG_NAME)
    trusted = (info is not None and weights.stat().st_size == info.get("weights_bytes")
               and file_sha256(weights) == info.get("weights_sha256"))
    tensors, metadata = _read_weights(weights)
    try:
        header_info = json.loads(metadata["meft"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"load_adapter: {weights} is truncated or corrupt "
                         "(no valid 'meft' header metadata)") from exc
    if not trusted:
        digest = metadata.get("digest")
        if digest is None or _tensor_digest(metadata, tensors) != digest:
            raise ValueError(
                f"load_adapter: {weights} is truncated or corrupt: its sha256/size does not match "
                f"{CONFIG_NAME} and its own digest does not match its contents")
        if info is not None:
            warnings.warn(
                f"load_adapter: {directory / CONFIG_NAME} does not describe {weights} (a save "
                "interrupted after the weights were committed?); the weights file passed its own "
                "checksum, loading it with the config stored in its header", stacklevel=3)
        _check_format(header_info, weights)
        info = header_info
    else:
        _check_against_header(info, header_info, directory / CONFIG_NAME, weights)
    return info, tensors


def _check_against_header(info: dict[str, Any], header: Any, config_path: Path, weights: Path) -> None:
    """The JSON's description must equal the one in the weights' header (which the weights'
    sha256 and digest cover): an edited ``meft_config.json`` would otherwise change the model."""
    if not isinstance(header, dict):
        raise ValueError(f"load_adapter: {weights} is corrupt (its 'meft' header is not an object)")
    for key, value in header.items():
        saved = info.get(key)
        if isinstance(value, dict) and isinstance(saved, dict):
            fields = sorted(set(value) | set(saved))
            diff = [(f"{key}.{f}", saved.get(f), value.get(f)) for f in fields if saved.get(f) != value.get(f)]
        else:
            diff = [(key, saved, value)] if saved != value else []
        if diff:
            name, a, b = diff[0]
            raise ValueError(f"load_adapter: {config_path} does not match the header of {weights}: "
                             f"{name} is {a!r} in the JSON but {b!r} in the weights (edited by hand?)")


def _same_compute_config(a: MEFTConfig, b: MEFTConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in COMPUTE_FIELDS)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    attach: bool = True,
    input_require_grads: bool = True,
) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` into ``model``; returns the model.

    If the model has no adapters and ``attach`` is true (the default), they are first attached
    with :func:`attach_meft` using the saved config, layers and dtype (backbone frozen). If it
    already has adapters, the saved config must match theirs in every field that changes the
    computation (``num_neurons``, ``num_experts``, ``experts_per_token``, ``topk``, ``gate``,
    ``low_key_dim``; ``backend`` and the init settings may differ), the saved layers must equal the attached
    layers, and every tensor's shape and dtype must equal the parameter's. Any mismatch, a
    missing/extra tensor, or a truncated/corrupt file raises ``ValueError`` naming what
    differs, and the model's adapters are left unchanged (adapters attached by this call are
    detached again). Values are copied into the existing
    parameters in place (optimizers holding them stay valid).
    """
    path = check_path("path", path, "load_adapter")
    info, tensors = read_adapter(path)
    config, saved_layers = saved_config(info, "load_adapter", path)
    check_same_backbone(info, model, "load_adapter")

    attached_here = False
    if not is_meft_attached(model):
        if not attach:
            raise ValueError(f"load_adapter: {type(model).__name__} has no MEFT adapters and "
                             "attach=False")
        # the routers' dtype (placement "cpu" keeps fp32 master keys/values whatever it is)
        dtypes = {t.dtype for name, t in tensors.items() if name.endswith("router.weight")}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        attach_meft(model, config, saved_layers, target=info.get("target"), dtype=dtype,
                    input_require_grads=input_require_grads)
        attached_here = True
    try:
        check_and_copy(model, config, saved_layers, tensors)
    except BaseException:
        if attached_here:
            detach_meft(model)
        raise
    return model


def check_and_copy(model: nn.Module, config: MEFTConfig, saved_layers: list[int],
                    tensors: dict[str, Tensor]) -> None:
    """:func:`check_fits`, then copy ``tensors`` into the model's adapters in place."""
    check_fits(model, config, saved_layers, tensors)
    with torch.no_grad():
        for i, adapter in meft_adapters(model).items():
            # in place; placement "cpu" copies into the row store and refreshes its key cache
            prefix = f"layers.{i}."
            adapter.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def check_fits(model: nn.Module, config: MEFTConfig, saved_layers: list[int],
               tensors: dict[str, Tensor]) -> None:
    """Raise ``ValueError`` naming what differs unless ``tensors`` (saved with ``config`` on
    ``saved_layers``) fit the model's adapters exactly; changes nothing."""
    state = attached_state(model)
    adapters = meft_adapters(model)

    if list(adapters) != saved_layers:
        raise ValueError(f"load_adapter: the file holds adapters for layers {saved_layers} but "
                         f"the model has them on layers {list(adapters)}")
    if not _same_compute_config(config, state.config):
        diff = {f: (getattr(config, f), getattr(state.config, f)) for f in COMPUTE_FIELDS
                if getattr(config, f) != getattr(state.config, f)}
        raise ValueError("load_adapter: saved MEFTConfig differs from the attached one "
                         + ", ".join(f"{k}: saved {a!r} vs model {b!r}" for k, (a, b) in diff.items()))
    params = meft_state_tensors(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"load_adapter: tensor names differ: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, param in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"load_adapter: {name} has shape {tuple(t.shape)} in the file but "
                             f"{tuple(param.shape)} in the model (hidden size or config differs)")
        if t.dtype != param.dtype:
            raise ValueError(f"load_adapter: {name} is {t.dtype} in the file but {param.dtype} in "
                             "the model; attach with attach_meft(..., dtype=...) to match")


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "read_adapter", "save_adapter"]
