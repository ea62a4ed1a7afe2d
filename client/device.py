"""The device SDK: one façade an app embeds, and that ``fedota device ...`` itself uses.

::

    from client import Device

    device = Device.enroll("state/", server=URL, root="root.json", base="base.gguf",
                           enrollment_secret=SECRET, golden="golden.json")
    outcome = device.update()          # check, download, verify, health-check, commit
    for piece in device.stream("hello"):
        print(piece, end="")

Everything goes through the real parts: ``client.update`` for enrollment and updates,
``client.runtime.open_runtime`` for inference (llama.cpp for a ``.gguf`` base, NF4 for a
checkpoint directory). The runtime is loaded on first use, with the active adapter
attached, and re-attached after an update that changed the active version. See
``docs/sdk.md``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from client.errors import ClientInputError
from client.runtime import (
    DeviceRuntime,
    EvalStats,
    Generation,
    open_runtime,
    runtime_kind_of,
)
from client.update import (
    SLOTS,
    DeviceConfig,
    DeviceState,
    DeviceStateError,
    UpdateOutcome,
    check_and_update,
)
from protocol import PrivacyPolicy

__all__ = ["Device"]

_MIB = 2**20


class Device:
    """An enrolled device: its state directory, update agent and runtime.

    Args:
        state_dir: The state directory written by :meth:`enroll`.
        policy: What inference does with a request longer than the cache allows
            (``sliding-window``, ``truncate`` or ``refuse``).
        budget_bytes: Inference memory budget (default: the enrolled one).
        threads: CPU threads for llama.cpp (default: up to 4).

    Raises:
        DeviceStateError: ``state_dir`` is not an enrolled device.
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        policy: str = "sliding-window",
        budget_bytes: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.state = DeviceState(Path(state_dir))
        self.config: DeviceConfig = self.state.read_config()
        self.policy = policy
        self.budget_bytes = budget_bytes or self.config.memory_budget_bytes
        self.threads = threads
        self._runtime: DeviceRuntime | None = None

    # ------------------------------------------------------------------ enrollment
    @classmethod
    def enroll(
        cls,
        state_dir: Path | str,
        *,
        server: str,
        root: Path | str,
        base: Path | str,
        enrollment_secret: str,
        budget_mb: int = 512,
        golden: Path | str | None = None,
        runtime: str | None = None,
        privacy_policy: PrivacyPolicy | None = None,
    ) -> Device:
        """Enroll with the OTA server: pin the trusted root, fingerprint the base, get a
        token, and write the state directory.

        Args:
            state_dir: A new, empty state directory.
            server: Base URL of the OTA server.
            root: The provisioned trusted TUF ``root.json``.
            base: The base the device runs: a ``.gguf`` file or an NF4 directory.
            enrollment_secret: The fleet's enrollment secret.
            budget_mb: Runtime memory budget in MiB.
            golden: JSON list of golden prompts for the health check (without them,
                every update fails closed).
            runtime: ``llamacpp`` or ``nf4``; must match the base's form (default: the
                one the base calls for).
            privacy_policy: The device's own privacy budget: the update agent refuses,
                before download, any release whose signed provenance spent more (or
                does not record what the policy bounds), whatever the server offers.

        Raises:
            DeviceStateError: already enrolled, a missing or bad root or golden file, or
                a runtime that does not fit the base (checked before the server is asked).
            ClientInputError: ``base`` is not a readable base model.
            UpdateRejectedError / UpdateTransientError: the server refused or failed.
        """
        import httpx
        from tuf.api.metadata import Metadata, Root
        from tuf.api.serialization import DeserializationError

        from client.update import GOLDEN_FILE, Retrier, api, read_golden
        from delta_packager import PackagerError, fingerprint_base
        from delta_packager.verify import verify_root_update

        state = Path(state_dir)
        device = DeviceState(state)
        if (state / "device.json").exists():
            raise DeviceStateError(f"{state} is already enrolled; use a new state directory")
        kind = runtime_kind_of(base)
        if runtime is not None and runtime != kind:
            want = "a .gguf file" if runtime == "llamacpp" else "an NF4 checkpoint directory"
            raise DeviceStateError(
                f"--runtime {runtime} needs {want} as --base; {base} is run by {kind}"
            )
        try:
            trusted = Metadata[Root].from_bytes(Path(root).read_bytes())
            if not isinstance(trusted.signed, Root):
                raise DeserializationError("not root metadata")
            verify_root_update(None, trusted)
        except OSError as e:
            raise DeviceStateError(
                f"cannot read the trusted root {root}: {e.strerror}; pass the provisioned root.json"
            ) from e
        except (DeserializationError, ValueError) as e:
            raise DeviceStateError(f"{root} is not a valid TUF root.json: {e}") from e
        try:
            fingerprint = fingerprint_base(base)
        except PackagerError as e:
            raise ClientInputError(str(e)) from e
        if golden is not None:  # refuse a missing or malformed file before enrolling
            state.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(golden, state / GOLDEN_FILE)
            except OSError as e:
                raise DeviceStateError(
                    f"cannot read the golden prompts {golden}: {e.strerror}; pass a JSON "
                    "list of prompts"
                ) from e
            read_golden(device)
        report = api.DeviceReport(fingerprint, None, budget_mb * _MIB)
        with httpx.Client(base_url=server, timeout=30.0) as http:
            device_id, token = api.enroll(
                http, Retrier(), report=report, enrollment_secret=enrollment_secret
            )
        device.tuf_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root, device.tuf_dir / "root.json")
        device.write_config(
            DeviceConfig(
                server_url=server,
                device_id=device_id,
                token=token,
                base_dir=str(Path(base).resolve()),
                base_fingerprint=fingerprint,
                memory_budget_bytes=budget_mb * _MIB,
                runtime=kind,
                privacy_policy=(
                    privacy_policy.to_json()
                    if privacy_policy is not None and privacy_policy.is_set
                    else None
                ),
            )
        )
        return cls(state)

    # ------------------------------------------------------------------ updates
    def update(self, *, retry_budget_s: float = 300.0) -> UpdateOutcome:
        """Run one update cycle: check, download, verify, stage, health-check, commit or
        roll back, report (``client.update.check_and_update``).

        Raises:
            UpdateRejectedError: the offered release was refused (reason code attached).
            UpdateRetryError: disk full, or a payload that was not the signed one; the
                release stays offered (ADR 0007); nothing changed.
            UpdateTransientError: network trouble; nothing changed.
            UpdateBusyError: another updater runs on this device.
        """
        from client.update import Retrier, RetryPolicy, default_checker

        outcome = check_and_update(
            self.state,
            checker=default_checker(self.state),
            retrier=Retrier(RetryPolicy(budget_s=retry_budget_s)),
        )
        if self._runtime is not None and self._runtime.adapter_version != outcome.version:
            self._attach_active(self._runtime)
        return outcome

    def status(self) -> dict[str, Any]:
        """The device's state as a JSON-able dict (what ``fedota device status`` prints)."""
        from client.update import TelemetryQueue

        config, active = self.config, self.state.active()
        slots: dict[str, Any] = {}
        for slot in SLOTS:
            meta_path = self.state.slot_dir(slot) / "slot.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
            slots[slot] = (
                None if meta is None else {k: meta[k] for k in ("version", "release_counter")}
            )
        ledger_path = self.state.root / "privacy_ledger.json"
        return {
            "device_id": config.device_id,
            "server": config.server_url,
            "runtime": config.runtime,
            "base": config.base_dir,
            "base_fingerprint": config.base_fingerprint,
            "active_version": active.version if active else None,
            "active_slot": active.slot if active else None,
            "active_adapter": _adapter_health(self.state),
            "release_floor": self.state.release_floor(),
            "slots": slots,
            "update_step": self.state.journal().get("step"),
            "pending_telemetry": len(TelemetryQueue(self.state.telemetry_dir).pending()),
            "privacy_ledger": json.loads(ledger_path.read_text()) if ledger_path.exists() else None,
            "privacy_policy": config.privacy_policy,
        }

    # ------------------------------------------------------------------ inference
    @property
    def runtime(self) -> DeviceRuntime:
        """The loaded runtime with the active adapter attached (loaded on first use).

        Raises:
            BudgetTooSmallError: the budget cannot hold the base.
            DeviceStateError: the active slot does not record its LoRA shape.
        """
        if self._runtime is None:
            adapter = self.state.read_active()
            reserve = (
                None if adapter is None else sum(int(a.nbytes) for a in adapter.tensors.values())
            )
            threads = {"threads": self.threads} if self.threads else {}
            runtime = open_runtime(
                self.config.base_dir,
                budget_bytes=self.budget_bytes,
                policy=self.policy,
                adapter_reserve_bytes=reserve,
                cache_dir=self.state.runtime_cache_dir,
                **threads,
            )
            self._attach_active(runtime)
            self._runtime = runtime
        return self._runtime

    def _attach_active(self, runtime: DeviceRuntime) -> None:
        active, adapter = self.state.active(), self.state.read_active()
        if active is None or adapter is None:
            runtime.set_adapter(None)
            return
        shape = self.state.read_shape(active.slot)
        if shape is None:
            raise DeviceStateError(
                f"slot {active.slot} does not record its LoRA shape; run "
                "`fedota device update` to restage the adapter"
            )
        runtime.set_adapter(dict(adapter.tensors), shape, version=adapter.version)

    def stream(self, prompt: str, max_new_tokens: int = 32, **options: Any) -> Iterator[str]:
        """Yield generated text piece by piece (``options``: temperature, seed, stats)."""
        return self.runtime.stream(prompt, max_new_tokens, **options)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate a continuation of ``prompt`` with the active adapter.

        Raises:
            RequestTooLargeError: the request does not fit and the policy is ``refuse``.
        """
        return self.runtime.generate(
            prompt, max_new_tokens, temperature=temperature, seed=seed, on_text=on_text
        )

    def evaluate(self, texts: list[str]) -> EvalStats:
        """Next-token loss and accuracy of the active adapter over ``texts``."""
        if not texts:
            raise ClientInputError("evaluate needs at least one text")
        return self.runtime.evaluate(texts)

    def close(self) -> None:
        """Free the runtime (idempotent)."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _adapter_health(state: DeviceState) -> str:
    """``none``, ``intact`` or ``damaged: <why>; run `fedota device update` to repair``."""
    if state.active() is None:
        return "none"
    damage = state.active_damage()
    if damage is None:
        return "intact"
    return f"damaged: {damage}; run `fedota device update` to repair it"
