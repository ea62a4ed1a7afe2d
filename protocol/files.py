"""Crash-safe file writes: the packager state, the TUF keys and the phones' state
directories (``client.update``) all write through here.

Invariant: after ``atomic_write`` returns, ``path`` holds exactly the new bytes; if the
process dies at any point before, ``path`` holds exactly the old bytes (or is absent).
Sequence: a temp file in the same directory (name ends in ``TMP_SUFFIX``, so a reader
can sweep leftovers), fsync it, rename it over the target, fsync the directory so the
rename itself survives a power loss.

``relaxed_durability()`` drops the two fsyncs (never the temp-and-rename): the old or
new bytes are still all a killed *process* can leave, but a *power loss* may lose the
last writes. Only for simulations that model process kills, not power cuts, at a scale
where fsync dominates (the lightweight fleet).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_SUFFIX",
    "atomic_write",
    "atomic_write_json",
    "fsync_dir",
    "fsync_file",
    "read_json",
    "relaxed_durability",
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
