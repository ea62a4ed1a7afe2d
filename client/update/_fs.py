"""Crash-safe file primitives of the device state directory.

Invariant: after ``atomic_write`` returns, ``path`` holds exactly the new bytes; if the
process dies at any point before, ``path`` holds exactly the old bytes (or is absent).
Sequence: temp file in the same directory, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TMP_SUFFIX", "atomic_write", "atomic_write_json", "fsync_dir", "read_json"]

TMP_SUFFIX = ".fedota-tmp"


def fsync_dir(directory: Path) -> None:
    """fsync a directory so renames and creations inside it survive a crash."""
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    """``atomic_write`` of canonical JSON.

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
