"""Fault injection for the simulated fleet (THREATS A1, C12, C14, E20, E22).

* ``CorruptingMirror`` — an httpx transport in front of the real server that flips one
  byte of every bundle it serves: a compromised or broken mirror. The device must reject
  the payload (hash mismatch against signed TUF metadata) and keep its adapter.
* ``KillAt`` — an agent step hook that raises ``Killed`` (a ``BaseException``, so no
  ``except Exception`` in the agent swallows it) at a named step: on-disk state is
  exactly what a kill there leaves, since every write the agent made is already atomic
  and nothing after the step runs. The next ``check_and_update`` is the restart.
* ``other_base`` — a copy of the base with a different tokenizer file, hence another
  fingerprint (C13): the server never offers it these bundles.
* ``corrupt_adapter`` — the bad release's payload: the good adapter with its ``B``
  matrices blown up, which the golden-prompt health check must catch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path

import httpx
import numpy as np

from protocol import atomic_dir

__all__ = [
    "KILL_STEPS",
    "PLANTED",
    "CorruptingMirror",
    "DeviceFault",
    "KillAt",
    "Killed",
    "corrupt_adapter",
    "other_base",
    "planted_devices",
    "planted_faults",
    "planted_release",
]


class DeviceFault(StrEnum):
    """The fault planted on a simulated phone (``summary.json`` ``fleet.faults`` keys)."""

    NONE = "none"
    KILLED = "killed"  # updater killed at a step of its first update, then restarted
    MIRROR = "mirror"  # the first release's downloads come through a corrupting mirror
    OTHER_BASE = "other_base"  # holds a base with another fingerprint: never offered
    FAR_BEHIND = "far_behind"  # offline until the catch-up sweep (gets a full bundle)


# Every planted fault is labelled with this wherever a person reads about it (log lines,
# the end-of-run table, report.md, fleet.md), so that the rollbacks, rejections and
# warnings a fault causes never read as the user's own training having broken.
PLANTED = "fault injection; --no-faults to turn off"
_DEVICE_FAULTS = {
    DeviceFault.KILLED: "killed mid-apply",
    DeviceFault.MIRROR: "behind a corrupting mirror",
    DeviceFault.OTHER_BASE: "on another base",
    DeviceFault.FAR_BEHIND: "far behind",
}


def planted_release(version: int) -> str:
    """``v2: planted bad release (fault injection; --no-faults to turn off)``."""
    return f"v{version}: planted bad release ({PLANTED})"


def _device_faults(faults: Mapping[str, int]) -> str:
    return ", ".join(f"{faults[k]} {what}" for k, what in _DEVICE_FAULTS.items() if faults.get(k))


def planted_devices(faults: Mapping[str, int]) -> str:
    """The phones' planted faults (``fleet.faults`` of the summary) in words, or ``""``."""
    parts = _device_faults(faults)
    return f"planted phone faults ({PLANTED}): {parts}" if parts else ""


def planted_faults(bad_versions: Sequence[int], device_faults: Mapping[str, int]) -> str:
    """Every planted fault of a run in one line; ``"none"`` when faults were off."""
    releases = [planted_release(v) for v in bad_versions]
    devices = _device_faults(device_faults)
    if not releases:
        return planted_devices(device_faults) or "none"
    return "; ".join([*releases, *([f"planted on phones: {devices}"] if devices else [])])


# The steps of client.update.agent where a kill leaves distinct on-disk states.
KILL_STEPS = (
    "verify",
    "stage",
    "write_slot",
    "fsync",
    "health_check",
    "swap_pointer",
    "commit",
    "cleanup",
)


class Killed(BaseException):
    """Raised by ``KillAt``: the simulated process died at ``step``."""

    def __init__(self, step: str) -> None:
        super().__init__(f"killed at step {step}")
        self.step = step


class KillAt:
    """Step hook that kills the updater the first time it reaches ``step``."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.fired = False

    def __call__(self, step: str) -> None:
        if step == self.step and not self.fired:
            self.fired = True
            raise Killed(step)


class CorruptingMirror(httpx.BaseTransport):
    """Forwards to the real server; flips a byte in the body of every bundle download.

    Args:
        inner: Transport to the real server.
        active: Corrupts only while ``True`` (the fleet turns it off after a release).
    """

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self.inner = inner or httpx.HTTPTransport()
        self.active = True
        self.corrupted = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """See the class docstring."""
        response = self.inner.handle_request(request)
        if not (self.active and request.url.path.startswith("/tuf/targets/")):
            return response
        body = bytearray(response.read())
        response.close()
        if body:
            body[len(body) // 2] ^= 0x01
            self.corrupted += 1
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-encoding"}
        return httpx.Response(
            response.status_code, headers=headers, content=bytes(body), request=request
        )

    def close(self) -> None:
        """Close the inner transport."""
        self.inner.close()


def other_base(base_dir: Path, out_dir: Path) -> Path:
    """A copy of ``base_dir`` whose tokenizer config differs, so its fingerprint differs.

    The weights are the same, so the runtime loads it; only the binding changes (C13).

    Returns:
        ``out_dir`` (created once, reused afterwards).
    """
    if (out_dir / "config.json").is_file():
        return out_dir
    with atomic_dir(out_dir, replace=True) as tmp:
        shutil.copytree(base_dir, tmp, dirs_exist_ok=True)
        path = tmp / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        config["fedota_fleet_variant"] = "other-base"
        path.write_text(json.dumps(config, indent=2))
    return out_dir


def corrupt_adapter(tensors: dict[str, np.ndarray], *, seed: int) -> dict[str, np.ndarray]:
    """The bad release's adapter: every ``lora_B`` replaced by large random values."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, arr in tensors.items():
        if ".lora_B" in name:
            scale = 2.0 + float(np.abs(arr).max())
            out[name] = (rng.normal(size=arr.shape) * scale).astype(np.float32)
        else:
            out[name] = np.asarray(arr, dtype=np.float32)
    return out
