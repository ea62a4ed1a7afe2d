"""⑦ apply, on disk: the device's state directory (two slots, an atomic pointer).

Layout of ``STATE/``::

    device.json     enrollment: server URL, device id, token, base, runtime, budget,
                    privacy policy (0600)
    quality.json    golden-prompt loss measured when the active adapter was committed
    active.json     the active pointer {"slot", "version", "release_counter"} (absent:
                    no adapter installed)
    counter.json    highest release counter ever committed (rollback protection)
    journal.json    the update state machine (see ``client.update.agent``)
    slot-a/ slot-b/ adapter.safetensors + slot.json (version, counter, base, sha256)
    tuf/            tuf.ngclient's metadata directory (provisioned root.json)
    downloads/      resumable partial downloads (<sha256>.part + .part.json)
    telemetry/      queued events, one file each
    runtime-cache/  GGUF LoRAs the llama.cpp runtime materialised (derived, by digest)
    lock            fcntl.flock single-instance lock

Invariants: ``active.json`` is only ever replaced atomically and only points at a slot
whose ``slot.json`` (written last, with the adapter file's SHA-256) is complete, so a
kill at any instant leaves exactly the old or exactly the new adapter active (THREATS
E20). The release floor is ``max(counter.json, active pointer)`` and only grows (B8).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from client.update.errors import DeviceStateError, UpdateBusyError
from delta_packager import AdapterState
from protocol import (
    TMP_SUFFIX,
    LoraShape,
    LoraShapeError,
    PrivacyPolicy,
    atomic_write,
    atomic_write_json,
    fsync_dir,
    read_json,
)

__all__ = ["SLOTS", "ActivePointer", "DeviceConfig", "DeviceState", "StepHook"]


class JournalStep(StrEnum):
    """Where an update stands, persisted before each step so a restart resumes it."""

    IDLE = "idle"  # nothing in flight
    DOWNLOAD = "download"  # bytes arriving (a partial file may exist)
    STAGED = "staged"  # verified and written to the inactive slot
    HEALTH = "health"  # the pointer swapped; the health check is running
    COMMIT = "commit"  # healthy: telling the server, then cleaning up
    COMMITTED = "committed"  # reported; only cleanup is left
    ROLLBACK = "rollback"  # unhealthy: the previous adapter is restored


logger = logging.getLogger(__name__)

SLOTS = ("a", "b")
StepHook = Callable[[str], None]
_ADAPTER = "adapter.safetensors"
_SLOT_META = "slot.json"


def _no_hook(step: str) -> None:
    del step


@dataclass(frozen=True)
class DeviceConfig:
    """What enrollment provisions (``device.json``)."""

    server_url: str
    device_id: str
    token: str
    base_dir: str
    base_fingerprint: str
    memory_budget_bytes: int
    runtime: str = "nf4"  # "llamacpp" (a .gguf base) or "nf4" (a checkpoint directory)
    # The device's own privacy budget (``PrivacyPolicy.to_json``), set at enrollment and
    # enforced on the signed target before download (ADR 0014); None: no bound.
    privacy_policy: dict[str, float] | None = None
    # The LoRA rank this device runs when a federation's ranks differ (ADR 0016): it is
    # offered the bundles of ``delta_packager.rank_target(base, rank)``; None: the
    # bundles of its base itself (the release's own rank).
    lora_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)

    def policy(self) -> PrivacyPolicy:
        """The device's privacy policy.

        Raises:
            DeviceStateError: ``device.json`` holds a malformed policy.
        """
        try:
            return PrivacyPolicy.from_json(self.privacy_policy)
        except (TypeError, ValueError) as e:
            raise DeviceStateError(f"device.json privacy_policy is malformed: {e}") from e


@dataclass(frozen=True)
class ActivePointer:
    """The content of ``active.json``."""

    slot: str
    version: int
    release_counter: int


@dataclass(frozen=True)
class DeviceState:
    """Typed access to one device state directory; every write is crash-safe."""

    root: Path

    # ------------------------------------------------------------------ paths
    @property
    def tuf_dir(self) -> Path:
        """tuf.ngclient metadata directory."""
        return self.root / "tuf"

    @property
    def downloads_dir(self) -> Path:
        """Partial and complete downloads."""
        return self.root / "downloads"

    @property
    def telemetry_dir(self) -> Path:
        """Queued telemetry events."""
        return self.root / "telemetry"

    @property
    def runtime_cache_dir(self) -> Path:
        """GGUF LoRA files the llama.cpp runtime derives from verified adapters."""
        return self.root / "runtime-cache"

    def slot_dir(self, slot: str) -> Path:
        """Directory of slot ``a`` or ``b``."""
        return self.root / f"slot-{slot}"

    # ------------------------------------------------------------------ config
    def read_config(self) -> DeviceConfig:
        """Read ``device.json``.

        Raises:
            DeviceStateError: not enrolled or unreadable.
        """
        raw = self._json("device.json")
        if raw is None:
            raise DeviceStateError(
                f"{self.root} is not an enrolled device state directory (no device.json); "
                "run `fedota device enroll --server URL --state DIR ...` first"
            )
        try:
            return DeviceConfig(**raw)
        except TypeError as e:
            raise DeviceStateError(f"{self.root / 'device.json'} is malformed: {e}") from e

    def write_config(self, config: DeviceConfig) -> None:
        """Write ``device.json`` (mode 0600: it holds the device token).

        Raises:
            OSError: the directory is not writable.
        """
        atomic_write_json(self.root / "device.json", config.to_dict(), mode=0o600)

    # ------------------------------------------------------------------ pointer and counter
    def active(self) -> ActivePointer | None:
        """The active pointer, or ``None`` when no adapter is installed.

        Raises:
            DeviceStateError: ``active.json`` is malformed.
        """
        raw = self._json("active.json")
        if raw is None:
            return None
        try:
            pointer = ActivePointer(
                str(raw["slot"]), int(raw["version"]), int(raw["release_counter"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceStateError(f"{self.root / 'active.json'} is malformed: {e}") from e
        if pointer.slot not in SLOTS:
            raise DeviceStateError(f"active.json names slot {pointer.slot!r}; expected a or b")
        return pointer

    def set_active(self, pointer: ActivePointer, *, hook: StepHook = _no_hook) -> None:
        """Swap the active pointer atomically (the commit point of an update).

        Raises:
            OSError: the write failed; the old pointer stays.
        """
        hook("swap_pointer")
        atomic_write_json(self.root / "active.json", pointer.__dict__)

    def release_floor(self) -> int:
        """The highest release counter committed on this device (0 if none).

        Raises:
            DeviceStateError: a state file is malformed.
        """
        raw = self._json("counter.json") or {"release_counter": 0}
        active = self.active()
        return max(int(raw["release_counter"]), active.release_counter if active else 0)

    def raise_floor(self, counter: int) -> None:
        """Persist ``counter`` as the release floor if it is higher.

        Raises:
            OSError: the write failed.
        """
        stored = self._json("counter.json") or {"release_counter": 0}
        if counter > int(stored["release_counter"]):
            atomic_write_json(self.root / "counter.json", {"release_counter": counter})

    # ------------------------------------------------------------------ quality
    def active_quality(self) -> float | None:
        """Golden-prompt loss measured when the active adapter was committed, if known
        (the previous adapter's quality an update reports beside the new one's)."""
        active = self.active()
        try:
            raw = read_json(self.root / "quality.json")
        except (OSError, ValueError):
            return None  # derived, advisory: an unreadable file only loses the comparison
        if active is None or not isinstance(raw, dict) or raw.get("version") != active.version:
            return None
        loss = raw.get("golden_loss")
        return float(loss) if isinstance(loss, int | float) and not isinstance(loss, bool) else None

    def write_quality(self, version: int, golden_loss: float) -> None:
        """Remember the golden-prompt loss of the adapter ``version`` just committed.

        Raises:
            OSError: the write failed.
        """
        atomic_write_json(
            self.root / "quality.json", {"version": version, "golden_loss": golden_loss}
        )

    # ------------------------------------------------------------------ journal
    def journal(self) -> dict[str, Any]:
        """The persisted state machine record (``{"step": "idle"}`` when none)."""
        return self._json("journal.json") or {"step": JournalStep.IDLE}

    def write_journal(self, record: dict[str, Any]) -> None:
        """Persist the state machine record.

        Raises:
            OSError: the write failed.
        """
        atomic_write_json(self.root / "journal.json", record)

    # ------------------------------------------------------------------ slots
    def inactive_slot(self) -> str:
        """The slot the next update is staged into."""
        active = self.active()
        return "b" if active is not None and active.slot == "a" else "a"

    def write_slot(
        self,
        slot: str,
        adapter: AdapterState,
        *,
        hook: StepHook = _no_hook,
        shape: LoraShape | None = None,
    ) -> None:
        """Write ``adapter`` into ``slot`` (never the active one): tensors, then meta last.

        ``shape`` (the LoRA shape, from the bundle manifest) is kept beside the tensors
        so the runtime can rebuild the LoRA layers.

        Raises:
            DeviceStateError: ``slot`` is the active slot.
            OSError: disk full or not writable; the slot is wiped again before raising.
        """
        active = self.active()
        if active is not None and active.slot == slot:
            raise DeviceStateError(f"refusing to overwrite the active slot {slot}")
        directory = self.slot_dir(slot)
        self.wipe_slot(slot)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tensors = {
                k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.tensors.items()
            }
            data = bytes(safetensors.numpy.save(tensors))
            hook("write_slot")
            atomic_write(directory / _ADAPTER, data)
            hook("fsync")
            meta = {
                "version": adapter.version,
                "release_counter": adapter.release_counter,
                "base_fingerprint": adapter.base_fingerprint,
                "sha256": hashlib.sha256(data).hexdigest(),
                "adapter_config": None if shape is None else shape.as_shape().to_json(),
            }
            atomic_write_json(directory / _SLOT_META, meta)
        except OSError:
            self.wipe_slot(slot)
            raise

    def read_slot(self, slot: str) -> AdapterState:
        """Read the adapter in ``slot``, checking its recorded SHA-256.

        Raises:
            DeviceStateError: the slot is empty, incomplete or corrupt.
        """
        directory = self.slot_dir(slot)
        meta = read_json(directory / _SLOT_META)
        if meta is None:
            raise DeviceStateError(f"slot {slot} holds no complete adapter ({directory})")
        try:
            data = (directory / _ADAPTER).read_bytes()
        except OSError as e:
            raise DeviceStateError(f"slot {slot}: cannot read its adapter: {e}") from e
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise DeviceStateError(
                f"slot {slot}: adapter bytes do not match the SHA-256 recorded when it was "
                "written; the slot is damaged (run `fedota device update` to repair it from "
                "the signed release)"
            )
        return AdapterState(
            version=int(meta["version"]),
            release_counter=int(meta["release_counter"]),
            base_fingerprint=str(meta["base_fingerprint"]),
            tensors=safetensors.numpy.load(data),
        )

    def read_shape(self, slot: str) -> LoraShape | None:
        """The LoRA shape recorded with the adapter in ``slot`` (``None`` if absent).

        Raises:
            DeviceStateError: the recorded shape is not a LoRA shape.
        """
        meta = read_json(self.slot_dir(slot) / _SLOT_META)
        config = None if meta is None else meta.get("adapter_config")
        if not isinstance(config, dict):
            return None
        try:
            return LoraShape.from_json(config)
        except LoraShapeError as e:
            raise DeviceStateError(f"slot {slot}: {e}; run `fedota device update`") from e

    def active_damage(self) -> str | None:
        """Why the active slot cannot be trusted (``None``: intact or no adapter).

        Re-reads the active adapter and checks it against the SHA-256 recorded when it was
        written: storage can rot after a commit, and a damaged adapter must be found before
        the runtime loads it. ``check_and_update`` repairs it from the signed release.

        Raises:
            DeviceStateError: ``active.json`` itself is malformed.
        """
        active = self.active()
        if active is None:
            return None
        try:
            self.read_slot(active.slot)
        except DeviceStateError as e:
            return str(e)
        except (KeyError, TypeError, ValueError, safetensors.SafetensorError) as e:
            return f"slot {active.slot}: its record or adapter is unreadable ({e})"
        return None

    def read_active(self) -> AdapterState | None:
        """The active adapter, or ``None``.

        Raises:
            DeviceStateError: the active slot is corrupt.
        """
        active = self.active()
        return None if active is None else self.read_slot(active.slot)

    def wipe_slot(self, slot: str) -> None:
        """Remove everything in ``slot`` (meta first, so a half-wiped slot is incomplete).

        Raises:
            DeviceStateError: ``slot`` is the active slot.
        """
        active = self.active()
        if active is not None and active.slot == slot:
            raise DeviceStateError(f"refusing to wipe the active slot {slot}")
        directory = self.slot_dir(slot)
        with contextlib.suppress(FileNotFoundError):
            (directory / _SLOT_META).unlink()
        shutil.rmtree(directory, ignore_errors=True)
        if self.root.is_dir():
            fsync_dir(self.root)

    # ------------------------------------------------------------------ housekeeping
    def clean_stale(self) -> int:
        """Remove temp files a killed process left behind; return how many.

        Partial downloads are kept (they resume); incomplete inactive slots are wiped.
        """
        removed = 0
        for path in self.root.rglob(f"*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        active = self.active()
        for slot in SLOTS:
            directory = self.slot_dir(slot)
            idle = active is None or active.slot != slot
            if idle and directory.exists() and not (directory / _SLOT_META).exists():
                self.wipe_slot(slot)
                removed += 1
        if removed:
            logger.info("cleaned %d stale temp files or incomplete slots in %s", removed, self.root)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the single-instance lock for the duration of the block.

        Raises:
            UpdateBusyError: another process holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise UpdateBusyError(
                    f"another fedota update process holds {self.root / 'lock'}; refusing to "
                    "run a second one: wait for it to finish"
                ) from e
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _json(self, name: str) -> Any:
        try:
            return read_json(self.root / name)
        except (OSError, ValueError) as e:
            raise DeviceStateError(f"{self.root / name} is unreadable or not JSON: {e}") from e
