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
        ...,
        "--base",
        exists=True,
        help="The device's base: a .gguf file (llama.cpp) or a pre-quantized NF4 directory.",
    ),
    runtime: str = typer.Option(
        None,
        "--runtime",
        help="llamacpp (a .gguf base) or nf4 (an NF4 directory); default: the base's form.",
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
    max_record_epsilon: float = typer.Option(
        None,
        "--max-record-epsilon",
        help="Refuse, before download, releases whose signed record-level ε is above this.",
    ),
    max_user_epsilon: float = typer.Option(
        None,
        "--max-user-epsilon",
        help="Refuse, before download, releases whose signed user-level ε is above this.",
    ),
    max_delta: float = typer.Option(
        None, "--max-delta", help="Refuse releases whose δ (of a bounded ε) is above this."
    ),
) -> None:
    """Enroll this device: pin the trusted root, fingerprint the base, get a token."""
    from client.device import Device
    from client.runtime import RUNTIME_KINDS
    from client.update import DeviceStateError

    if runtime is not None and runtime not in RUNTIME_KINDS:
        raise DeviceStateError(f"unknown --runtime {runtime!r}; choose one of {RUNTIME_KINDS}")
    from protocol import PrivacyPolicy

    try:
        policy = PrivacyPolicy(max_record_epsilon, max_user_epsilon, max_delta)
    except ValueError as e:
        raise DeviceStateError(f"privacy policy: {e}") from e
    secret = enroll_secret or os.environ.get(enroll_secret_env)
    if not secret:
        raise DeviceStateError(f"no enrollment secret: set {enroll_secret_env} or --enroll-secret")
    device = Device.enroll(
        state,
        server=server,
        root=root,
        base=base,
        enrollment_secret=secret,
        budget_mb=budget_mb,
        golden=golden,
        runtime=runtime,
        privacy_policy=policy,
    )
    config = device.config
    typer.echo(
        f"enrolled device {config.device_id} ({config.runtime} runtime, base "
        f"{config.base_fingerprint[:19]}…) in {state}"
    )


@device_app.command("update")
def update(
    state: Path = _STATE,
    retry_budget_s: float = typer.Option(
        300.0, "--retry-budget-s", min=0, help="Total seconds to spend retrying the server."
    ),
) -> None:
    """Check for, download, verify, stage, health-check and commit one update.

    A damaged active adapter (see `device status`) is repaired: the release is fetched
    again as a full bundle, verified against its signed metadata and committed.

    Exit codes: 0 updated, 10 no update, 3 rejected/rolled back, 4 transient, 2 bad input.
    """
    from client.device import Device
    from client.update import UpdateStatus

    outcome = Device(state).update(retry_budget_s=retry_budget_s)
    if outcome.status == UpdateStatus.UPDATED and outcome.reason == "repaired":
        typer.echo(f"repaired the damaged adapter: adapter version {outcome.version}, re-verified")
    elif outcome.status == UpdateStatus.UPDATED:
        typer.echo(f"updated to adapter version {outcome.version}")
    elif outcome.status == UpdateStatus.NO_UPDATE:
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
    from client.device import Device

    return Device(state).status()


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
    """Run the active adapter on the device's runtime within the memory budget, streaming."""
    from client.device import Device

    device = Device(state, policy=policy, budget_bytes=budget_mb * 2**20 if budget_mb else None)
    budget, runtime = device.budget_bytes, device.runtime
    for text in prompt:
        if as_json:
            g = device.generate(text, max_new_tokens, temperature=temperature)
            record = {
                "prompt": text,
                **g.__dict__,
                "budget_bytes": budget,
                "adapter_version": runtime.adapter_version,
                "runtime": runtime.kind,
            }
            typer.echo(json.dumps(record))
            continue
        typer.echo(text, nl=False)
        g = device.generate(
            text,
            max_new_tokens,
            temperature=temperature,
            on_text=lambda piece: typer.echo(piece, nl=False),
        )
        typer.echo("")
        typer.echo(
            f"[{runtime.kind}: {g.new_tokens} tokens, "
            f"{g.new_tokens / max(g.seconds, 1e-9):.1f} tok/s, first token "
            f"{g.first_token_s * 1000:.0f} ms, peak {g.peak_added_bytes / 2**20:.1f} of "
            f"{budget / 2**20:.0f} MiB, adapter "
            f"v{runtime.adapter_version if runtime.adapter_version is not None else '-'}"
            f"{', policy ' + g.policy_applied if g.policy_applied else ''}]",
            err=True,
        )
    device.close()


def register(app: typer.Typer) -> None:
    """Mount this package's commands on the root ``fedota`` app."""
    app.add_typer(device_app, name="device")
