"""``fedota devices list|show``, ``fedota audit`` and ``fedota rollout advance|show``
against a served app (uvicorn on loopback), through the real ``fedota`` entry point."""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import httpx
import pytest

from fedota.cli import main
from server.ota import make_engine, upgrade
from tests.server.ota.ota_helpers import (
    ROLE_KEYS,
    Bundle,
    auth,
    bundle_bytes,
    enroll,
    free_port,
    publish,
    server_process,
    settings_env,
)

pytestmark = pytest.mark.slow
V1 = Bundle(1, bundle_bytes("cli-inv1"))
V2 = Bundle(2, bundle_bytes("cli-inv2"))


def _fedota(*args: str) -> tuple[int, str, str]:
    """``fedota ARGS`` in-process: (exit code, stdout, stderr)."""
    saved_argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = ["fedota", *args]
    code: int | str | None = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved_argv
    return int(code or 0), out.getvalue(), err.getvalue()


@pytest.fixture
def served(tmp_path: Path, tuf_keys, monkeypatch):  # type: ignore[no-untyped-def]
    db_url = f"sqlite:///{tmp_path / 'ota.db'}"
    engine = make_engine(db_url)
    upgrade(engine)
    engine.dispose()
    port = free_port()
    env = settings_env(db_url, tmp_path / "storage", tuf_keys.write(tmp_path / "keys"))
    monkeypatch.setenv("FEDOTA_OPERATOR_KEY", ROLE_KEYS["operator"])
    with server_process(env, port):
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as client:
            yield url, client


def test_devices_audit_and_rollout_control_commands(served, tuf_keys) -> None:
    server, client = served
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    devices = [enroll(client, installed=1) for _ in range(20)]
    code, out, err = _fedota(
        "rollout", "create", "--version", "2", "--base", V2.base, "--stages", "50,100",
        "--min-reports", "1000", "--server", server,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("rollout 1 v2 active stage 1/2") and "— waiting: 0/" in out
    failing = devices[0]
    answer = client.post(
        f"/v1/devices/{failing.id}/events",
        json={"event_id": "x", "seq": 1, "type": "failed", "version": 2, "installed_version": 1,
              "detail": "health check failed"},
        headers=auth(failing.token),
    )  # fmt: skip
    assert answer.status_code == 200, answer.text

    code, out, _ = _fedota("devices", "list", "--state", "failed", "--server", server)
    assert code == 0 and out.splitlines() == [
        line for line in out.splitlines() if line.startswith(failing.id)
    ]
    assert " failed v1 " in out and "last failed v2: health check failed" in out
    code, first, _ = _fedota("devices", "list", "--limit", "5", "--server", server)
    *rows, more = first.splitlines()
    assert code == 0 and len(rows) == 5 and more.startswith("more: --cursor ")
    cursor = more.split()[-1]
    code, rest, _ = _fedota("devices", "list", "--cursor", cursor, "--server", server)
    listed = [line.split()[0] for line in rows + rest.splitlines()]
    assert code == 0 and listed == sorted(d.id for d in devices)
    code, page, _ = _fedota("devices", "list", "--json", "--version", "1", "--server", server)
    assert code == 0 and len(json.loads(page)["devices"]) == 20

    code, shown, _ = _fedota("devices", "show", failing.id, "--server", server)
    assert code == 0 and shown.splitlines()[0].startswith(f"{failing.id} failed")
    assert "seq 1 failed v2: health check failed" in shown.splitlines()[1]

    code, out, err = _fedota("rollout", "advance", "1", "--server", server)
    assert code == 0 and "stage 2/2" in out, err
    code, shown, _ = _fedota("rollout", "show", "1", "--server", server)
    actions = [line.split()[1] for line in shown.splitlines()[1:]]
    assert code == 0 and actions == ["create", "advance"] and "by operator:" in shown
    code, log, _ = _fedota("audit", "--action", "rollout", "--server", server)
    assert code == 0 and [line.split()[1] for line in log.splitlines()] == [
        "rollout.advance",
        "rollout.create",
    ]

    code, _, err = _fedota("devices", "list", "--state", "sleepy", "--server", server)
    assert code == 2 and "state" in err and len(err.strip().splitlines()) == 1
    code, _, err = _fedota("devices", "show", "0" * 32, "--server", server)
    assert code == 2 and f"no device {'0' * 32}" in err
    os.environ.pop("FEDOTA_OPERATOR_KEY")
    code, _, err = _fedota("audit", "--server", server)
    assert code == 2 and "FEDOTA_OPERATOR_KEY" in err
