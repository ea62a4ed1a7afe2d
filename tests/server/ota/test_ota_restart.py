"""THREATS F29: the server process is killed mid-rollout and restarted.

A real uvicorn process serves the app; devices post failure reports while it is killed
with SIGKILL; after a restart on the same database every device re-sends what it is not
sure was stored. Afterwards: each event stored once, the rollout paused exactly once,
no release or metadata version signed twice.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from server.ota import Database, make_engine, upgrade
from server.ota.models import TelemetryEventRow, TufMetadataRow
from tests.server.ota.ota_helpers import (
    Bundle,
    auth,
    bundle_bytes,
    create_rollout,
    enroll,
    event,
    first_stage,
    free_port,
    publish,
    server_process,
    settings_env,
)

pytestmark = pytest.mark.slow


def test_kill_and_restart_mid_rollout(database_url, tuf_keys, tmp_path) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    db = Database(engine)
    env = settings_env(database_url, tmp_path / "storage", tuf_keys.write(tmp_path / "keys"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    v1, v2 = Bundle(1, bundle_bytes("k1")), Bundle(2, bundle_bytes("k2"))

    with server_process(env, port) as proc, httpx.Client(base_url=base, timeout=10) as client:
        assert publish(client, tuf_keys, 1, [v1, v2]).status_code == 201
        devices = [enroll(client, installed=1) for _ in range(24)]
        rollout = create_rollout(client, 2, [75, 100], max_failure_rate=0.25, min_reports=6)
        first = first_stage(db, rollout["id"], devices)
        assert len(first) >= 8
        sent: list[str] = []

        def report_all() -> None:
            for device in first:
                try:
                    event(
                        client,
                        device,
                        event_id=f"fail-{device.id}",
                        seq=1,
                        type="failed",
                        version=2,
                        installed=1,
                    )
                    sent.append(device.id)
                except httpx.TransportError:
                    return  # the server died under us

        reporter = threading.Thread(target=report_all)
        reporter.start()
        while len(sent) < 3 and reporter.is_alive():
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst
        reporter.join()
        assert len(sent) < len(first), "the kill came too late to interrupt anything"

    with db.read() as session:
        before_restart = session.query(TufMetadataRow).count()

    with server_process(env, port), httpx.Client(base_url=base, timeout=10) as client:
        # devices re-send everything they are not sure about (all of it, here)
        answers = [
            event(
                client, d, event_id=f"fail-{d.id}", seq=1, type="failed", version=2, installed=1
            ).json()["stored"]
            for d in first
        ]
        assert answers.count(False) >= len(sent)  # what was stored before the kill is kept
        status = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
        events = client.get(f"/v1/rollouts/{rollout['id']}/events", headers=auth("operator")).json()
        again = publish(client, tuf_keys, 1, [v1, v2])

    assert status["state"] == "paused" and status["stage_index"] == 0
    assert status["stage_stats"][0]["failed"] == len(first)
    assert [e["action"] for e in events] == ["create", "auto_pause"]
    assert again.status_code == 409  # the release is not published twice
    with db.read() as session:
        assert session.query(TelemetryEventRow).count() == len(first)
        assert session.query(TufMetadataRow).count() == before_restart
    db.dispose()
