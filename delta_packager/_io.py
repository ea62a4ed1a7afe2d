"""Crash-safe file writes shared by the packager state and the TUF keys directory.

Invariant: after ``atomic_write`` returns, ``path`` holds exactly the new bytes; if the
process dies at any point before, ``path`` holds exactly the old bytes (or is absent).
Sequence: write a temp file in the same directory, fsync it, rename over the target,
fsync the directory so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
