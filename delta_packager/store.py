"""③ package — the packager state on disk, written crash-safely.

Layout of a state directory (one per base model)::

    STATE/state.json                      commit record (canonical JSON, see below)
    STATE/steps/v<version:08d>.safetensors  one encoded step per version in the chain
    STATE/current-v<version:08d>.safetensors  device-exact float32 adapter at the latest

``state.json`` = ``{"format": "fedota-packager-state", "format_version": 1,
"base_fingerprint", "adapter_config", "chain": [{"version", "kind",
"release_counter", "provenance", "file", "sha256"}], "current": {"version",
"release_counter", "file", "sha256"}}``, plus ``"compatible_bases"`` (sorted
fingerprints) only when the latest release names further bases.

Invariants:

* ``state.json`` is the commit point: new step and current files are written first
  (each atomically), then ``state.json`` is atomically replaced, then files it no
  longer names are deleted. A crash at any point leaves the old or the new state;
  leftovers are removed by the next save.
* loading checks every file's SHA-256 and re-applies the chain to check it reproduces
  the stored current adapter bit for bit; any mismatch is a ``PackagerStateError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from delta_packager.apply import AdapterState
from delta_packager.encode import EncodedTensor
from delta_packager.errors import BundleFormatError, PackagerInputError, PackagerStateError
from delta_packager.fingerprint import normalize_bases
from delta_packager.format import Step
from delta_packager.manifest import (
    adapter_config_from_dict,
    adapter_config_to_dict,
    canonical_json,
    provenance_from_dict,
    provenance_to_dict,
)
from delta_packager.package import ChainStep, PackagerState, check_state
from protocol import ReleaseKind, atomic_write

__all__ = ["load_state", "save_state"]

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
_FORMAT = "fedota-packager-state"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _step_bytes(step: Step) -> bytes:
    arrays = {
        f"{n}/{p}": np.ascontiguousarray(a)
        for n, e in step.tensors.items()
        for p, a in e.parts.items()
    }
    meta = {n: {"encoding": e.encoding, "shape": list(e.shape)} for n, e in step.tensors.items()}
    return bytes(safetensors.numpy.save(arrays, metadata={"tensors": canonical_json(meta)}))


def save_state(state: PackagerState, directory: Path) -> None:
    """Write ``state`` to ``directory`` crash-safely (see the module docstring).

    Raises:
        PackagerStateError: the directory cannot be written.
    """
    try:
        (directory / "steps").mkdir(parents=True, exist_ok=True)
        chain = []
        for c in state.chain:
            name = f"steps/v{c.step.to_version:08d}.safetensors"
            data = _step_bytes(c.step)
            atomic_write(directory / name, data)
            chain.append(
                {
                    "version": c.step.to_version,
                    "kind": c.step.kind,
                    "release_counter": c.release_counter,
                    "provenance": provenance_to_dict(c.provenance),
                    "file": name,
                    "sha256": _sha(data),
                }
            )
        cur = state.current
        cur_name = f"current-v{cur.version:08d}.safetensors"
        cur_data = bytes(
            safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in cur.tensors.items()})
        )
        atomic_write(directory / cur_name, cur_data)
        record = {
            "format": _FORMAT,
            "format_version": 1,
            "base_fingerprint": state.base_fingerprint,
            "adapter_config": adapter_config_to_dict(state.adapter_config),
            "chain": chain,
            "current": {
                "version": cur.version,
                "release_counter": cur.release_counter,
                "file": cur_name,
                "sha256": _sha(cur_data),
            },
        }
        if state.compatible_bases:  # absent when empty, as in the manifest
            record["compatible_bases"] = list(state.compatible_bases)
        atomic_write(directory / STATE_FILE, (canonical_json(record) + "\n").encode())
        keep = {STATE_FILE, cur_name, *(c["file"] for c in chain)}
        for path in [
            *directory.glob("current-v*.safetensors"),
            *directory.glob("steps/v*.safetensors"),
        ]:
            if str(path.relative_to(directory)) not in keep:
                path.unlink(missing_ok=True)
    except OSError as e:
        raise PackagerStateError(
            f"cannot write the packager state to {directory}: {e.strerror}; free space or "
            "fix permissions, then package again (the previous state is intact)"
        ) from e
    logger.info("saved packager state at version %d to %s", cur.version, directory)


def _read_checked(directory: Path, entry: dict[str, Any]) -> bytes:
    path = directory / str(entry["file"])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PackagerStateError(f"packager state file {path} is unreadable: {e.strerror}") from e
    if _sha(data) != entry["sha256"]:
        raise PackagerStateError(
            f"packager state file {path} has hash {_sha(data)}, state.json records "
            f"{entry['sha256']}: the state is corrupt; restore it from backup"
        )
    return data


def _metadata(data: bytes) -> dict[str, str]:
    # A trusted local file written by save_state and hash-checked by the caller.
    n = int.from_bytes(data[:8], "little")
    meta: dict[str, str] = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    return meta


def _load_step(data: bytes, kind: str, version: int) -> Step:
    tensors = safetensors.numpy.load(data)
    info = json.loads(_metadata(data)["tensors"])
    encs = {}
    for name, d in info.items():
        parts = {
            p: tensors[f"{name}/{p}"] for p in ("data", "q", "scale") if f"{name}/{p}" in tensors
        }
        encs[name] = EncodedTensor(d["encoding"], tuple(d["shape"]), parts)
    return Step(kind, version, encs)


def _compatible_bases(path: Path, base: str, stored: Any) -> tuple[str, ...]:
    if not isinstance(stored, list):
        raise TypeError(f"compatible_bases is {type(stored).__name__}, expected a list")
    try:
        return normalize_bases(base, stored)
    except PackagerInputError as e:
        raise PackagerStateError(f"packager state {path}: {e}; restore it from backup") from e


def load_state(directory: Path) -> PackagerState:
    """Load and self-check a packager state directory.

    Raises:
        PackagerStateError: missing, unreadable, corrupt, or not reproducing its adapter.
    """
    path = directory / STATE_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise PackagerStateError(
            f"no packager state at {path}; pass the directory a previous `fedota package` "
            "wrote, or omit --previous-state for a first release"
        ) from e
    except (OSError, ValueError) as e:
        raise PackagerStateError(f"packager state {path} is unreadable or not JSON: {e}") from e
    if (
        not isinstance(record, dict)
        or record.get("format") != _FORMAT
        or record.get("format_version") != 1
    ):
        raise PackagerStateError(f"{path} is not a fedota packager state (format version 1)")
    try:
        chain = []
        for entry in record["chain"]:
            step = _load_step(_read_checked(directory, entry), entry["kind"], int(entry["version"]))
            prov = provenance_from_dict(entry["provenance"])
            chain.append(ChainStep(step, int(entry["release_counter"]), prov))
        cur = record["current"]
        tensors = safetensors.numpy.load(_read_checked(directory, cur))
        base = str(record["base_fingerprint"])
        also = _compatible_bases(path, base, record.get("compatible_bases", []))
        state = PackagerState(
            base_fingerprint=base,
            adapter_config=adapter_config_from_dict(record["adapter_config"]),
            chain=tuple(chain),
            current=AdapterState(
                int(cur["version"]),
                int(cur["release_counter"]),
                base,
                tensors,
            ),
            compatible_bases=also,
        )
    except (KeyError, TypeError, ValueError, BundleFormatError) as e:
        raise PackagerStateError(
            f"packager state {path} is malformed ({e}); restore it from backup"
        ) from e
    if not chain or chain[0].step.kind != ReleaseKind.FULL:
        raise PackagerStateError(
            f"packager state {path} has no full anchor; restore it from backup"
        )
    check_state(state)
    return state
