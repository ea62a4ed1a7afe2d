"""Crash-safe file writes, defined once for every package: the packager state, the TUF
keys, the phones' state directories and privacy ledgers, the runtime's exports, the
server's blobs and checkpoints, and the simulation's partitions and summaries.

Invariant: after ``atomic_write`` returns, ``path`` holds exactly the new bytes; if the
process dies at any point before, ``path`` holds exactly the old bytes (or is absent).
Sequence: a temp file in the same directory (name ends in ``TMP_SUFFIX``, so a reader
can sweep leftovers), fsync it, rename it over the target, fsync the directory so the
rename itself survives a power loss. ``atomic_file`` and ``atomic_dir`` give the same
guarantee to writers that stream a file or fill a whole directory (a model checkpoint).

``relaxed_durability()`` drops the two fsyncs (never the temp-and-rename): the old or
new bytes are still all a killed *process* can leave, but a *power loss* may lose the
last writes. Only for simulations that model process kills, not power cuts, at a scale
where fsync dominates (the lightweight fleet).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_SUFFIX",
    "atomic_dir",
    "atomic_file",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "read_json",
    "relaxed_durability",
    "replace_file",
]

TMP_SUFFIX = ".fedota-tmp"
_durable = True


@contextlib.contextmanager
def relaxed_durability() -> Iterator[None]:
    """Within the block, writes stay atomic but are not fsynced (see the module doc)."""
    global _durable
    before, _durable = _durable, False
    try:
        yield
    finally:
        _durable = before


def fsync_file(fd: int) -> None:
    """fsync an open file descriptor (skipped under ``relaxed_durability``)."""
    if _durable:
        os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so renames and creations inside it survive a crash."""
    if not _durable:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        fsync_file(f.fileno())


def replace_file(tmp: Path, path: Path) -> None:
    """Move a complete file written at ``tmp`` (same file system) over ``path``: fsync
    it, rename it, fsync the directory.

    Raises:
        OSError: ``tmp`` is missing or on another file system.
    """
    _fsync_path(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends without an exception the
    file written there is fsynced and renamed over ``path`` (then the directory is
    fsynced), otherwise it is removed and ``path`` is untouched.

    Raises:
        OSError: the directory is not writable or the disk is full (the old file stays).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; when the block ends without an exception
    every file in it and the directory are fsynced and it is renamed to ``path``,
    otherwise it is removed. ``path`` must not exist unless it is an empty directory or
    ``replace`` is set (then the old tree is removed just before the rename; a crash in
    between leaves neither, never a mix).

    Raises:
        OSError: the directory is not writable, or ``path`` holds files and
            ``replace`` is off.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        fsync_dir(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data`` (temp, fsync, rename, fsync dir).

    Raises:
        OSError: the directory is not writable or the disk is full (the old file stays).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            fsync_file(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    """``atomic_write`` of ``text`` encoded as UTF-8.

    Raises:
        OSError: see ``atomic_write``.
    """
    atomic_write(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    """``atomic_write`` of canonical JSON (sorted keys).

    Raises:
        OSError: see ``atomic_write``.
    """
    atomic_write(path, json.dumps(obj, sort_keys=True, indent=1).encode(), mode=mode)


def read_json(path: Path) -> Any:
    """Read a JSON file, or ``None`` when it does not exist.

    Raises:
        ValueError: the file is not JSON.
        OSError: the file cannot be read.
    """
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
