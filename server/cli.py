"""``fedota`` subcommands owned by ``server``. Heavy imports stay inside the commands.

* ``fedota serve`` — run the OTA update server (secrets come from ``FEDOTA_OTA_*``
  environment variables, never from the command line).
* ``fedota db upgrade`` — migrate the OTA server's database.
* ``fedota publish BUNDLE... --server URL`` — upload bundles and publish their release.
* ``fedota rollout create|pause|resume|advance|cancel|status|show`` — staged rollouts.
* ``fedota devices list|show`` — the fleet inventory; ``fedota audit`` — the audit log.

Exit codes follow ``fedota.cli``: 2 bad input, 3 rejected by the server, 4 unreachable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

db_app = typer.Typer(help="The OTA server's database.", no_args_is_help=True)
rollout_app = typer.Typer(
    help="Staged rollouts on an OTA server (operator key).", no_args_is_help=True
)

# How long an idle keep-alive connection stays open. Above httpx's default expiry
# (5 s, which equals uvicorn's default): with equal timeouts a client may send a request
# on a connection the server is closing at that moment, and it fails with "Server
# disconnected without sending a response" (seen in CI between two releases).
KEEP_ALIVE_S = 15

_SERVER = typer.Option(..., "--server", help="Base URL of the OTA server.")
_OPERATOR_ENV = typer.Option(
    "FEDOTA_OPERATOR_KEY", "--key-env", help="Environment variable holding the operator key."
)


def _key_from(env_name: str) -> str:
    from server.errors import ServerInputError

    key = os.environ.get(env_name)
    if not key:
        raise ServerInputError(f"environment variable {env_name} is not set; export the role key")
    return key


def serve(
    database_url: str = typer.Option(
        ..., "--database-url", help="sqlite:///PATH or postgresql+psycopg://..."
    ),
    storage: Path = typer.Option(..., "--storage", help="Directory for bundle blobs."),
    trusted_root: Path = typer.Option(..., "--trusted-root", help="The trusted TUF root.json."),
    snapshot_key: Path = typer.Option(..., "--snapshot-key", help="Online snapshot key (PEM)."),
    timestamp_key: Path = typer.Option(..., "--timestamp-key", help="Online timestamp key (PEM)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    workers: int = typer.Option(1, "--workers", min=1),
    migrate: bool = typer.Option(False, "--migrate", help="Upgrade the database first."),
    dev: bool = typer.Option(False, "--dev", help="Allow fixed development secrets."),
    json_logs: bool = typer.Option(True, "--json-logs/--text-logs"),
    max_record_epsilon: float = typer.Option(
        None,
        "--max-record-epsilon",
        help="Release gate: refuse to publish or roll out releases whose signed "
        "record-level ε is above this (or not recorded). Env FEDOTA_OTA_MAX_RECORD_EPSILON.",
    ),
    max_user_epsilon: float = typer.Option(
        None,
        "--max-user-epsilon",
        help="Release gate: the same for the user-level ε. Env FEDOTA_OTA_MAX_USER_EPSILON.",
    ),
    max_delta: float = typer.Option(
        None,
        "--max-delta",
        help="Release gate: the largest δ of a bounded ε. Env FEDOTA_OTA_MAX_DELTA.",
    ),
) -> None:
    """Run the OTA update server (role keys from FEDOTA_OTA_ADMIN_KEY etc.)."""
    import uvicorn
    from pydantic import ValidationError

    from server.errors import ServerInputError
    from server.ota import (
        OtaSettings,
        configure_json_logging,
        create_app,
        freeze_startup_heap,
        make_engine,
        upgrade,
    )

    values = {
        "database_url": database_url,
        "storage_dir": str(storage.resolve()),
        "trusted_root": str(trusted_root.resolve()),
        "snapshot_key": str(snapshot_key.resolve()),
        "timestamp_key": str(timestamp_key.resolve()),
        "dev_mode": "true" if dev else "false",
    }
    gates = {
        "max_record_epsilon": max_record_epsilon,
        "max_user_epsilon": max_user_epsilon,
        "max_delta": max_delta,
    }
    values.update({name: repr(float(v)) for name, v in gates.items() if v is not None})
    for name, value in values.items():  # workers read the same settings from the environment
        os.environ[f"FEDOTA_OTA_{name.upper()}"] = value
    if json_logs:
        configure_json_logging()
    try:
        settings = OtaSettings()  # type: ignore[call-arg]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        named = f"{where}: " if where else ""
        raise ServerInputError(f"invalid server settings: {named}{first['msg']}") from exc
    if migrate:
        engine = make_engine(database_url)
        upgrade(engine)
        engine.dispose()
    app = create_app(settings)  # fails fast, with one line, on an unmigrated database
    if workers == 1:
        freeze_startup_heap()  # as app_from_env does in each worker (ADR 0009)
        uvicorn.run(app, host=host, port=port, log_config=None, timeout_keep_alive=KEEP_ALIVE_S)
    else:
        _serve_workers(host=host, port=port, workers=workers)


def _serve_workers(*, host: str, port: int, workers: int) -> None:
    """``workers`` uvicorn worker processes whose Prometheus metrics add up: each writes
    its values under a private PROMETHEUS_MULTIPROC_DIR that /metrics sums (ADR 0004)."""
    import uvicorn

    from server.ota import prepare_multiprocess_dir, remove_multiprocess_dir

    metrics_dir, made_here = prepare_multiprocess_dir()  # before the workers are spawned
    try:
        uvicorn.run(
            "server.ota.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=None,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    finally:
        if made_here:
            remove_multiprocess_dir(metrics_dir)


@db_app.command("upgrade")
def db_upgrade(
    database_url: str = typer.Option(..., "--database-url"),
    revision: str = typer.Option("head", "--revision"),
) -> None:
    """Migrate the OTA server's database to REVISION (default: the newest)."""
    from server.ota import current_revision, make_engine, upgrade

    engine = make_engine(database_url)
    upgrade(engine, revision)
    typer.echo(f"database at revision {current_revision(engine)}")
    engine.dispose()


def publish(
    bundles: list[Path] = typer.Argument(
        None,
        exists=True,
        dir_okay=False,
        help="Bundle file(s) the release adds (none: re-publish metadata only).",
    ),
    server: str = _SERVER,
    metadata: Path = typer.Option(
        None, "--metadata", help="Signed targets.json (default: KEYS/metadata/targets.json)."
    ),
    keys: Path = typer.Option(Path("keys"), "--keys", help="Release pipeline KEYS dir."),
    key_env: str = typer.Option("FEDOTA_PUBLISHER_KEY", "--key-env"),
) -> None:
    """Upload BUNDLE(s) and publish the release their signed targets metadata describes."""
    from server.errors import ServerInputError
    from server.ota import OtaRemote

    path = metadata or keys / "metadata" / "targets.json"
    if not path.is_file():
        raise ServerInputError(
            f"no signed targets metadata at {path}; run `fedota package` first or pass --metadata"
        )
    remote = OtaRemote(server, _key_from(key_env))
    try:
        for bundle in bundles or []:
            remote.upload_bundle(bundle)
        release = remote.publish(path.read_bytes())
    finally:
        remote.close()
    typer.echo(_published_line(release))


def _published_line(release: dict[str, Any]) -> str:
    """One line that says which number is which: a release is numbered by the version of
    its signed TUF targets metadata, which is not the adapter version its bundles carry."""
    adapters = sorted({t["to_version"] for t in release["targets"]})
    if not adapters:
        carried = "no adapter bundles"
    elif len(adapters) == 1:
        carried = f"{len(release['targets'])} bundle(s) for adapter v{adapters[0]}"
    else:
        carried = (
            f"{len(release['targets'])} bundle(s) for adapter versions "
            f"v{adapters[0]}..v{adapters[-1]}"
        )
    return (
        f"published release {release['version']} (its TUF targets metadata version; "
        f"snapshot metadata v{release['snapshot_version']}): {carried}"
    )


def _rollout_call(server: str, key_env: str, method: str, path: str, **kwargs: Any) -> Any:
    from server.ota import OtaRemote

    remote = OtaRemote(server, _key_from(key_env))
    try:
        return remote.request(method, path, **kwargs)
    finally:
        remote.close()


def _summary(rollout: dict[str, Any]) -> str:
    stage = rollout["stage_index"]
    stats = " ".join(
        f"{s['percent']}%:{s['installed']}ok/{s['failed']}fail" for s in rollout["stage_stats"]
    )
    reason = f" ({rollout['pause_reason']})" if rollout.get("pause_reason") else ""
    progress = f" — {rollout['progress']}" if rollout.get("progress") else ""
    return (
        f"rollout {rollout['id']} v{rollout['to_version']} {rollout['state']}{reason} "
        f"stage {stage + 1}/{len(rollout['stages'])} [{stats}]{progress}"
    )


@rollout_app.command("create")
def rollout_create(
    version: int = typer.Option(..., "--version", help="Adapter version to roll out."),
    base: str = typer.Option(..., "--base", help="Base fingerprint sha256:..."),
    stages: str = typer.Option("1,10,50,100", "--stages", help="Percent stages."),
    max_failure_rate: float = typer.Option(0.2, "--max-failure-rate"),
    min_reports: int = typer.Option(10, "--min-reports"),
    min_reports_fraction: float = typer.Option(
        1.0,
        "--min-reports-fraction",
        help="A stage smaller than --min-reports is judged after ceil(this x its devices).",
    ),
    quality_tolerance: float = typer.Option(
        None,
        "--quality-tolerance",
        help="Quality gate: pause (reason quality) a stage whose devices' mean golden-prompt "
        "loss for the new adapter exceeds (1 + this) x that of the adapter it replaces.",
    ),
    server: str = _SERVER,
    key_env: str = _OPERATOR_ENV,
) -> None:
    """Start a staged rollout."""
    from server.errors import ServerInputError

    try:
        percents = [int(p) for p in stages.split(",")]
    except ValueError as exc:
        raise ServerInputError(
            f"--stages {stages!r} is not a comma-separated list of integers like 1,10,50,100"
        ) from exc
    body = {
        "base_fingerprint": base,
        "to_version": version,
        "stages": percents,
        "max_failure_rate": max_failure_rate,
        "min_reports": min_reports,
        "min_reports_fraction": min_reports_fraction,
    }
    if quality_tolerance is not None:
        body["quality_tolerance"] = quality_tolerance
    typer.echo(_summary(_rollout_call(server, key_env, "POST", "/v1/rollouts", json=body)))


def _action(action: str) -> Any:
    def command(
        rollout_id: int = typer.Argument(..., help="Rollout id."),
        server: str = _SERVER,
        key_env: str = _OPERATOR_ENV,
    ) -> None:
        result = _rollout_call(server, key_env, "POST", f"/v1/rollouts/{rollout_id}/{action}")
        typer.echo(_summary(result))

    command.__doc__ = f"{action.capitalize()} a rollout."
    return command


@rollout_app.command("status")
def rollout_status(
    rollout_id: int = typer.Argument(None, help="Rollout id (default: the whole fleet)."),
    server: str = _SERVER,
    key_env: str = _OPERATOR_ENV,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show one rollout, or the fleet: versions installed and every rollout."""
    path = f"/v1/rollouts/{rollout_id}" if rollout_id is not None else "/v1/fleet"
    result = _rollout_call(server, key_env, "GET", path)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif rollout_id is not None:
        typer.echo(_summary(result))
    else:
        if not result["installed"]:
            typer.echo("no devices enrolled")
        if not result["rollouts"]:
            typer.echo("no rollouts")
        for row in result["installed"]:
            typer.echo(
                f"{row['base_fingerprint'][:19]}… v{row['version']}: {row['devices']} devices"
            )
        for rollout in result["rollouts"]:
            typer.echo(_summary(rollout))


for _name in ("pause", "resume", "advance", "cancel"):
    rollout_app.command(_name)(_action(_name))


@rollout_app.command("show")
def rollout_show(
    rollout_id: int = typer.Argument(..., help="Rollout id."),
    server: str = _SERVER,
    key_env: str = _OPERATOR_ENV,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show one rollout, why its stage waits, and its transitions (time, actor)."""
    rollout = _rollout_call(server, key_env, "GET", f"/v1/rollouts/{rollout_id}")
    events = _rollout_call(server, key_env, "GET", f"/v1/rollouts/{rollout_id}/events")
    if as_json:
        typer.echo(json.dumps({"rollout": rollout, "events": events}, indent=2))
        return
    typer.echo(_summary(rollout))
    for e in events:
        detail = f" {e['detail']}" if e["detail"] else ""
        typer.echo(
            f"  {e['at']} {e['action']} stage {e['stage_index'] + 1} by {e['actor']}{detail}"
        )


devices_app = typer.Typer(help="The fleet inventory (operator key).", no_args_is_help=True)
_CURSOR = typer.Option(None, "--cursor", help="The next_cursor a previous page printed.")
_LIMIT = typer.Option(50, "--limit", min=1, max=500, help="Rows per page.")
_JSON = typer.Option(False, "--json", help="The server's JSON page, as it came.")


def _query(**params: Any) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}


def _next_page(page: dict[str, Any]) -> None:
    if page["next_cursor"]:
        typer.echo(f"more: --cursor {page['next_cursor']}")


def _device_line(d: dict[str, Any]) -> str:
    outcome = "no outcome yet"
    if d["last_outcome"]:
        reason = f": {d['last_outcome_reason']}" if d["last_outcome_reason"] else ""
        outcome = f"last {d['last_outcome']} v{d['last_outcome_version']}{reason}"
    revoked = " revoked" if d["revoked"] else ""
    return (
        f"{d['id']} {d['state']}{revoked} v{d['installed_version']} "
        f"{d['base_fingerprint'][:19]}… {d['runtime'] or '-'} seen {d['last_seen_at']} {outcome}"
    )


@devices_app.command("list")
def devices_list(
    base: str = typer.Option(None, "--base", help="Base fingerprint sha256:..."),
    version: int = typer.Option(None, "--version", help="Installed adapter version."),
    runtime: str = typer.Option(None, "--runtime", help="Runtime the device reports."),
    rollout: int = typer.Option(None, "--rollout", help="Devices that reported for it."),
    state: str = typer.Option(None, "--state", help="ok, failed, retrying or stale."),
    cursor: str = _CURSOR,
    limit: int = _LIMIT,
    as_json: bool = _JSON,
    server: str = _SERVER,
    key_env: str = _OPERATOR_ENV,
) -> None:
    """List devices, one page at a time, with state, version, last-seen and last outcome."""
    params = _query(
        base=base, version=version, runtime=runtime, rollout=rollout, state=state, cursor=cursor
    )
    page = _rollout_call(server, key_env, "GET", "/v1/devices", params={**params, "limit": limit})
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    if not page["devices"]:
        typer.echo("no devices match")
    for device in page["devices"]:
        typer.echo(_device_line(device))
    _next_page(page)


@devices_app.command("show")
def devices_show(
    device_id: str = typer.Argument(..., help="Device id."),
    cursor: str = _CURSOR,
    limit: int = _LIMIT,
    as_json: bool = _JSON,
    server: str = _SERVER,
    key_env: str = _OPERATOR_ENV,
) -> None:
    """Show one device and its reported events, newest first."""
    device = _rollout_call(server, key_env, "GET", f"/v1/devices/{device_id}")
    params = _query(cursor=cursor, limit=limit)
    history = _rollout_call(
        server, key_env, "GET", f"/v1/devices/{device_id}/history", params=params
    )
    if as_json:
        typer.echo(json.dumps({"device": device, "history": history}, indent=2))
        return
    typer.echo(_device_line(device))
    for e in history["events"]:
        detail = f": {e['detail']}" if e["detail"] else ""
        typer.echo(f"  {e['received_at']} seq {e['seq']} {e['type']} v{e['version']}{detail}")
    _next_page(history)


def audit(
    action: str = typer.Option(None, "--action", help="e.g. rollout.pause, or rollout."),
    actor: str = typer.Option(None, "--actor", help="e.g. operator, or system:threshold."),
    since: str = typer.Option(None, "--since", help="ISO 8601 time, e.g. 2026-12-01T00:00Z."),
    cursor: str = _CURSOR,
    limit: int = _LIMIT,
    as_json: bool = _JSON,
    server: str = _SERVER,
    key_env: str = _OPERATOR_ENV,
) -> None:
    """The audit log, newest first: who published, rolled out, paused, revoked what."""
    params = _query(action=action, actor=actor, since=since, cursor=cursor, limit=limit)
    page = _rollout_call(server, key_env, "GET", "/v1/audit", params=params)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    if not page["entries"]:
        typer.echo("no entries match")
    for e in page["entries"]:
        detail = json.dumps(e["detail"], separators=(",", ":"), sort_keys=True)
        typer.echo(f"{e['at']} {e['action']} {e['target']} by {e['actor']} {detail}")
    _next_page(page)


def register(app: typer.Typer) -> None:
    """Mount this package's commands on the root ``fedota`` app."""
    app.command("serve")(serve)
    app.command("publish")(publish)
    app.add_typer(db_app, name="db")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(devices_app, name="devices")
    app.command("audit")(audit)
