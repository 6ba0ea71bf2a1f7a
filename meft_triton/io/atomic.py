"""Atomic, durable file writes and content hashes: the one place the package writes files.

A file is written to a hidden temp file in its directory (``.<name>.<pid>-<8 hex>.meft-tmp``),
fsynced, then renamed over its target with ``os.replace``: an interrupted write leaves either
the old file or the new one, never a partial one. :func:`is_temp_name` recognises those temp
files (and, by their exact pattern, the ``.tmp`` ones earlier versions wrote) so that cleanups
remove only what this package made; :func:`remove_temp_files` removes the ones a killed save
left behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

TEMP_SUFFIX = ".meft-tmp"
# what temp_path makes; earlier versions wrote ".<name>.<pid>-<8 hex>.tmp" and ".<name>.<8 hex>.tmp"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?:(?:\d+-)?[0-9a-f]{8}\.tmp|\d+-[0-9a-f]{8}\.meft-tmp)")


def temp_path(path: Path) -> Path:
    """A fresh hidden temp path beside ``path`` (unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def temp_target(name: str) -> str | None:
    """The target name of a temp file :func:`temp_path` (or an earlier version) made, else None."""
    match = _TEMP_NAME.fullmatch(name)
    return None if match is None else match["target"]


def is_temp_name(name: str, targets: Iterable[str] | Callable[[str], bool] | None = None) -> bool:
    """True for the names :func:`temp_path` makes (and those of earlier versions), and only
    those; with ``targets`` (names, or a predicate), only temp files of those targets."""
    target = temp_target(name)
    if target is None:
        return False
    if targets is None:
        return True
    return targets(target) if callable(targets) else target in set(targets)


def remove_temp_files(directory: Path, targets: Iterable[str] | Callable[[str], bool]) -> None:
    """Remove the temp files of ``targets`` in ``directory`` that interrupted writes left
    (one writer per directory: a save running elsewhere into it would lose its temp file)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if is_temp_name(entry.name, targets) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


_IO_ERRNOS = tuple(e for e in (getattr(errno, n, None) for n in (
    "ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO")) if e is not None)


def _errno_of(exc: BaseException, directory: Path) -> int | None:
    """The errno behind a failed write: from an ``OSError`` in the exception's chain, from the
    message of a library that wraps it (safetensors, torch.save), or a full disk."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        text = str(seen)
        for code in _IO_ERRNOS:
            if os.strerror(code) in text:
                return code
        seen = seen.__cause__ or seen.__context__
    try:
        if os.statvfs(directory).f_bavail == 0:
            return errno.ENOSPC
    except (OSError, AttributeError):
        pass
    return None


def write_error(exc: BaseException, target: Path) -> OSError | None:
    """The one error a failed write of ``target`` raises: an ``OSError`` with the errno
    (``ENOSPC`` disk full, ``EACCES``/``EROFS`` not writable, ...) naming ``target``, never a
    temp file; None when ``exc`` is not an I/O failure (e.g. an object that cannot be pickled)."""
    code = _errno_of(exc, Path(target).parent)
    if code is None:
        return None
    return OSError(code, f"{os.strerror(code)}: could not write {target} "
                         f"({type(exc).__name__}: {exc})", str(target))


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
    ``path``); the temp file is gone afterwards, whatever happened. A failed write (full disk,
    no permission) raises :func:`write_error`'s ``OSError`` naming ``path``."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - an I/O failure becomes one OSError naming path
        error = write_error(exc, path)
        if error is None:
            raise
        raise error from exc
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
