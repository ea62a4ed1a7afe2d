"""THREATS F26 on the production setup: PostgreSQL and ``fedota serve --workers 2``.

A burst of simultaneous failure reports must pause a staged rollout exactly once. The
SQLite tests serialize every write in one process; here two real uvicorn worker
processes write to one PostgreSQL database at the same time, so only the database's
row locks (``SELECT ... FOR UPDATE`` on the device, then the rollout) keep the
evaluation exactly-once.

Every device's report is delivered twice, at the same moment, once through a
connection the first worker accepted and once through one the second worker accepted:
the two copies race on two processes and must still be stored once.
"""

from __future__ import annotations

import subprocess
import threading
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from server.ota import Database, make_engine
from server.ota.models import RolloutReportRow, TelemetryEventRow
from tests.server.ota.ota_helpers import (
    Bundle,
    Device,
    auth,
    bundle_bytes,
    create_rollout,
    enroll,
    event,
    first_stage,
    free_port,
    publish,
    settings_env,
)
from tests.server.ota.pg_cluster import PgCluster
from tests.server.ota.serve_helpers import fedota_serve, log_tail, worker_of

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

WORKERS = 2
DEVICES = 30
INSTALLED = 3  # first-stage devices that report success; every other one fails


def connections_per_worker(
    server: subprocess.Popen[bytes], url: str, port: int, per_worker: int, stack: ExitStack
) -> list[list[httpx.Client]]:
    """Open keep-alive connections until each worker has accepted ``per_worker`` of them.

    Which worker accepts a connection is up to the kernel; connections are opened one
    at a time and each is attributed to the worker process holding its server end.
    """
    held: dict[int, list[httpx.Client]] = {}
    for _ in range(50 * per_worker * WORKERS):
        if len(held) == WORKERS and all(len(c) >= per_worker for c in held.values()):
            return list(held.values())
        client = httpx.Client(base_url=url, timeout=60)
        response = client.get("/readyz")
        assert response.status_code == 200, response.text
        owner = worker_of(server, port, response)
        if len(held.setdefault(owner, [])) < per_worker:
            held[owner].append(client)
            stack.callback(client.close)
        else:
            client.close()
    raise AssertionError(f"connections per worker {[len(c) for c in held.values()]}")


def test_failure_burst_on_two_workers_pauses_the_rollout_exactly_once(
    pg_cluster: PgCluster, tuf_keys, tmp_path: Path
) -> None:
    database_url = pg_cluster.new_database()
    env = settings_env(database_url, tmp_path / "storage", tuf_keys.write(tmp_path / "keys"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    v1, v2 = Bundle(1, bundle_bytes("k1")), Bundle(2, bundle_bytes("k2"))

    with (
        fedota_serve(env, port, tmp_path, workers=WORKERS) as server,
        httpx.Client(base_url=url, timeout=30) as operator,
        ExitStack() as stack,
    ):
        assert publish(operator, tuf_keys, 1, [v1, v2]).status_code == 201
        devices = [enroll(operator, installed=1) for _ in range(DEVICES)]
        rollout = create_rollout(operator, 2, [50, 100], max_failure_rate=0.25, min_reports=5)
        db = Database(make_engine(database_url))
        first = first_stage(db, rollout["id"], devices)
        assert len(first) >= 8 and len(first) < DEVICES  # both stages have devices
        succeeded = {d.id for d in first[:INSTALLED]}

        pools = connections_per_worker(server, url, port, DEVICES, stack)
        # (device, connection): each device's report once through each worker
        sends: list[tuple[Device, httpx.Client]] = [
            (device, pool[i]) for pool in pools for i, device in enumerate(devices)
        ]
        start = threading.Barrier(len(sends))
        answers: list[tuple[str, int, bool | None]] = []
        lock = threading.Lock()

        def send(device: Device, client: httpx.Client) -> None:
            kind = "installed" if device.id in succeeded else "failed"
            start.wait(timeout=60)
            response = event(
                client, device, event_id=f"{kind}-{device.id}", seq=1, type=kind,
                version=2, installed=2 if kind == "installed" else 1,
            )  # fmt: skip
            stored = response.json().get("stored") if response.status_code == 200 else None
            with lock:
                answers.append((device.id, response.status_code, stored))

        threads = [threading.Thread(target=send, args=pair) for pair in sends]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a report never got an answer"

        status = operator.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
        events = operator.get(
            f"/v1/rollouts/{rollout['id']}/events", headers=auth("operator")
        ).json()

    statuses = sorted({code for _, code, _ in answers})
    assert statuses == [200], f"answers other than 200: {statuses}\n{log_tail(tmp_path)}"
    assert len(answers) == WORKERS * DEVICES
    for device in devices:  # each report stored exactly once, whichever worker won
        assert sorted(s for d, _, s in answers if d == device.id) == [False, True]

    assert [e["action"] for e in events] == ["create", "auto_pause"], events
    assert status["state"] == "paused" and status["pause_reason"] == "threshold"
    assert status["stage_index"] == 0
    # every first-stage report counted once (reports after the pause still count);
    # second-stage devices were never offered the version, so theirs count nowhere
    assert status["stage_stats"][0]["installed"] == INSTALLED
    assert status["stage_stats"][0]["failed"] == len(first) - INSTALLED
    assert status["stage_stats"][1]["installed"] == status["stage_stats"][1]["failed"] == 0
    with db.read() as session:
        assert session.query(TelemetryEventRow).count() == DEVICES
        assert session.query(RolloutReportRow).count() == len(first)
    db.dispose()
