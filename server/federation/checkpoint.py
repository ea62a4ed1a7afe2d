"""Crash-safe checkpoints of a federated run (THREATS G34).

Layout under the checkpoint directory::

    round-0003/global.safetensors   the global adapter after round 3
    round-0003/state.json           round, config fingerprint, strategy + accountant
                                    state, metrics history
    LATEST                          name of the newest complete checkpoint

Invariants: a checkpoint directory is complete before ``LATEST`` names it (files are
written through ``protocol.files.atomic_dir``; then ``LATEST`` is replaced with
``atomic_write``). A crash at any point leaves the
previous checkpoint loadable. Tensors are stored with safetensors, never pickled.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocol import atomic_dir, atomic_write
from server.errors import ServerInputError

__all__ = ["Checkpoint", "load_latest", "save_checkpoint"]

logger = logging.getLogger(__name__)
_LATEST = "LATEST"
_KEEP = 2


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed run restores.

    Attributes:
        round: the last completed round (0: only the baseline evaluation ran).
        adapter: the global adapter after that round.
        state: strategy/accountant state, config fingerprint and metrics history.
        path: the checkpoint's directory (set by :func:`load_latest`).
    """

    round: int
    adapter: dict[str, np.ndarray]
    state: dict[str, Any]
    path: Path | None = None


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically and point ``LATEST`` at it; keep the last two.

    Returns:
        The checkpoint's directory.

    Raises:
        OSError: the directory cannot be written.
    """
    from safetensors.numpy import save

    name = f"round-{ckpt.round:04d}"
    final = directory / name
    tensors = {k: np.ascontiguousarray(v) for k, v in ckpt.adapter.items()}
    state = {"round": ckpt.round, **ckpt.state}
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "global.safetensors").write_bytes(save(tensors))
        (tmp / "state.json").write_bytes(json.dumps(state, indent=1, sort_keys=True).encode())
    atomic_write(directory / _LATEST, name.encode())
    for old in sorted(directory.glob("round-*"))[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpointed round %d to %s", ckpt.round, final)
    return final


def load_latest(directory: Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or ``None`` when there is none.

    Raises:
        ServerInputError: ``LATEST`` names a checkpoint that is missing or unreadable.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    pointer = directory / _LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = directory / name
    try:
        state = json.loads((path / "state.json").read_text())
        adapter = load_file(str(path / "global.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise ServerInputError(
            f"checkpoint {path} is unreadable ({e}); delete {directory} to start afresh"
        ) from e
    rnd = int(state.pop("round"))
    return Checkpoint(round=rnd, adapter=dict(adapter), state=state, path=path)
