"""Atomic, durable file writes and content hashes: the one place the package writes files.

A file is written to a hidden temp file in its directory (``.<name>.<token>.tmp``), fsynced,
then renamed over its target with ``os.replace``: an interrupted write leaves either the old
file or the new one, never a partial one. :func:`is_temp_name` recognises those temp files so
cleanups remove only what this module made.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """A fresh hidden temp path beside ``path`` (unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for the names :func:`temp_path` makes (and only those)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into ``path`` through a temp file, fsynced and renamed (never a partial
    ``path``); the temp file is gone afterwards, whatever happened."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
