"""``fedota device ...``: the on-device commands. Heavy imports stay inside commands.

``fedota device update`` exit codes (on top of ``fedota.cli``'s conventions):

* 0 — updated: a new adapter was verified, health-checked and committed
* 10 — no update: the server offered nothing (the device is current)
* 3 — rejected: the release was refused (signature, stale metadata, base, rollback,
  integrity) or failed its health check and was rolled back; the reason is printed
* 4 — transient failure: network/server trouble, disk full, or another updater is
  running; nothing changed, try again later
* 2 — bad input: the state directory is not enrolled or is corrupt

``device_app`` is importable so other commands (``infer``) can join the group.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import typer

__all__ = ["EXIT_NO_UPDATE", "device_app", "register"]

EXIT_NO_UPDATE = 10
EXIT_REJECTED = 3

device_app = typer.Typer(
    help="On-device agent: enroll, update, status, infer.", no_args_is_help=True
)
_STATE = typer.Option(..., "--state", help="The device's state directory.")


@device_app.command("enroll")
def enroll(
    server: str = typer.Option(..., "--server", help="Base URL of the OTA server."),
    state: Path = _STATE,
    root: Path = typer.Option(
        ..., "--root", exists=True, dir_okay=False, help="Provisioned trusted TUF root.json."
    ),
    base: Path = typer.Option(
        ..., "--base", exists=True, file_okay=False, help="The device's pre-quantized NF4 base."
    ),
    enroll_secret: str = typer.Option(
        None, "--enroll-secret", help="Fleet enrollment secret (prefer --enroll-secret-env)."
    ),
    enroll_secret_env: str = typer.Option(
        "FEDOTA_ENROLLMENT_SECRET", "--enroll-secret-env", help="Variable holding the secret."
    ),
    budget_mb: int = typer.Option(512, "--budget-mb", min=1, help="Runtime memory budget."),
    golden: Path = typer.Option(
        None,
        "--golden",
        exists=True,
        dir_okay=False,
        help="JSON list of golden prompts for the health check (without: updates fail closed).",
    ),
) -> None:
    """Enroll this device: pin the trusted root, fingerprint the base, get a token."""
    import httpx
    from tuf.api.metadata import Metadata, Root
    from tuf.api.serialization import DeserializationError

    from client.update import api
    from client.update.errors import DeviceStateError
    from client.update.health import GOLDEN_FILE, read_golden
    from client.update.state import DeviceConfig, DeviceState
    from client.update.transport import Retrier
    from delta_packager.fingerprint import fingerprint_checkpoint
    from delta_packager.verify import verify_root_update

    device = DeviceState(state)
    if (state / "device.json").exists():
        raise DeviceStateError(f"{state} is already enrolled; use a new --state directory")
    secret = enroll_secret or os.environ.get(enroll_secret_env)
    if not secret:
        raise DeviceStateError(f"no enrollment secret: set {enroll_secret_env} or --enroll-secret")
    try:
        trusted = Metadata[Root].from_bytes(root.read_bytes())
        if not isinstance(trusted.signed, Root):
            raise DeserializationError("not root metadata")
        verify_root_update(None, trusted)
    except (DeserializationError, ValueError) as e:
        raise DeviceStateError(f"{root} is not a valid TUF root.json: {e}") from e
    fingerprint = fingerprint_checkpoint(base)
    report = api.DeviceReport(fingerprint, None, budget_mb * 2**20)
    with httpx.Client(base_url=server, timeout=30.0) as http:
        device_id, token = api.enroll(http, Retrier(), report=report, enrollment_secret=secret)
    device.tuf_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root, device.tuf_dir / "root.json")
    if golden is not None:
        shutil.copyfile(golden, state / GOLDEN_FILE)
        read_golden(device)  # refuse a malformed file now, not at the first update
    device.write_config(
        DeviceConfig(
            server_url=server,
            device_id=device_id,
            token=token,
            base_dir=str(base.resolve()),
            base_fingerprint=fingerprint,
            memory_budget_bytes=budget_mb * 2**20,
        )
    )
    typer.echo(f"enrolled device {device_id} (base {fingerprint[:19]}…) in {state}")


@device_app.command("update")
def update(
    state: Path = _STATE,
    retry_budget_s: float = typer.Option(
        300.0, "--retry-budget-s", min=0, help="Total seconds to spend retrying the server."
    ),
) -> None:
    """Check for, download, verify, stage, health-check and commit one update.

    Exit codes: 0 updated, 10 no update, 3 rejected/rolled back, 4 transient, 2 bad input.
    """
    from client.update import check_and_update
    from client.update.health import default_checker
    from client.update.state import DeviceState
    from client.update.transport import Retrier, RetryPolicy

    device = DeviceState(state)
    outcome = check_and_update(
        device,
        checker=default_checker(device),
        retrier=Retrier(RetryPolicy(budget_s=retry_budget_s)),
    )
    if outcome.status == "updated":
        typer.echo(f"updated to adapter version {outcome.version}")
    elif outcome.status == "no_update":
        typer.echo(f"no update (installed version: {outcome.version})")
        raise typer.Exit(EXIT_NO_UPDATE)
    else:
        typer.echo(
            f"error: version {outcome.version} failed its health check and was rolled back: "
            f"{outcome.reason}",
            err=True,
        )
        raise typer.Exit(EXIT_REJECTED)


def status_of(state: Path) -> dict[str, Any]:
    """The device's state as a JSON-able dict (what ``device status`` prints).

    Raises:
        DeviceStateError: not enrolled or corrupt.
    """
    from client.update.state import SLOTS, DeviceState
    from client.update.telemetry import TelemetryQueue

    device = DeviceState(state)
    config = device.read_config()
    active = device.active()
    slots: dict[str, Any] = {}
    for slot in SLOTS:
        meta_path = device.slot_dir(slot) / "slot.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        slots[slot] = None if meta is None else {k: meta[k] for k in ("version", "release_counter")}
    ledger_path = state / "privacy_ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else None
    return {
        "device_id": config.device_id,
        "server": config.server_url,
        "base_fingerprint": config.base_fingerprint,
        "active_version": active.version if active else None,
        "active_slot": active.slot if active else None,
        "release_floor": device.release_floor(),
        "slots": slots,
        "update_step": device.journal().get("step"),
        "pending_telemetry": len(TelemetryQueue(device.telemetry_dir).pending()),
        "privacy_ledger": ledger,
    }


@device_app.command("status")
def status(
    state: Path = _STATE,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show base fingerprint, active version, slots, update step and privacy ledger."""
    info = status_of(state)
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    for key, value in info.items():
        if key == "privacy_ledger" and isinstance(value, dict):
            value = (
                f"{len(value.get('rounds', []))} round(s), epsilon spent "
                f"{value.get('epsilon_spent')} of budget {value.get('epsilon_budget')}"
            )
        typer.echo(f"{key}: {value}")


@device_app.command("infer")
def infer(
    state: Path = _STATE,
    prompt: list[str] = typer.Option(..., "--prompt", help="Prompt text (repeatable)."),
    budget_mb: int = typer.Option(
        None, "--budget-mb", min=1, help="Memory budget; default: the enrolled budget."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, max=4096),
    policy: str = typer.Option(
        "sliding-window",
        "--policy",
        help="When a request exceeds the cache: sliding-window | truncate | refuse.",
    ),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt."),
) -> None:
    """Run the active adapter on the NF4 base within the memory budget, streaming text."""
    from client.runtime import AdapterSpec, QuantizedRuntime
    from client.update.errors import DeviceStateError
    from client.update.state import DeviceState

    device = DeviceState(state)
    config = device.read_config()
    budget = budget_mb * 2**20 if budget_mb else config.memory_budget_bytes
    active = device.active()
    adapter = device.read_active()
    reserve = None if adapter is None else sum(int(a.nbytes) for a in adapter.tensors.values())
    runtime = QuantizedRuntime(
        config.base_dir, budget_bytes=budget, policy=policy, adapter_reserve_bytes=reserve
    )
    if adapter is not None and active is not None:
        shape = device.read_adapter_config(active.slot)
        if shape is None:
            raise DeviceStateError(
                f"slot {active.slot} does not record its LoRA shape; run "
                "`fedota device update` to restage the adapter"
            )
        spec = AdapterSpec(
            int(shape["rank"]), float(shape["alpha"]), tuple(shape["target_modules"]) or None
        )
        runtime.set_adapter(dict(adapter.tensors), spec, version=adapter.version)
    for text in prompt:
        if as_json:
            g = runtime.generate(text, max_new_tokens, temperature=temperature)
            typer.echo(
                json.dumps(
                    {
                        "prompt": text,
                        **g.__dict__,
                        "budget_bytes": budget,
                        "adapter_version": runtime.adapter_version,
                    }
                )
            )
            continue
        typer.echo(text, nl=False)
        g = runtime.generate(
            text,
            max_new_tokens,
            temperature=temperature,
            on_text=lambda piece: typer.echo(piece, nl=False),
        )
        typer.echo("")
        typer.echo(
            f"[{g.new_tokens} tokens, {g.new_tokens / max(g.seconds, 1e-9):.1f} tok/s, peak "
            f"{g.peak_added_bytes / 2**20:.1f} of {budget / 2**20:.0f} MiB, adapter "
            f"v{runtime.adapter_version if runtime.adapter_version is not None else '-'}"
            f"{', policy ' + g.policy_applied if g.policy_applied else ''}]",
            err=True,
        )


def register(app: typer.Typer) -> None:
    """Mount this package's commands on the root ``fedota`` app."""
    app.add_typer(device_app, name="device")
