"""Prometheus metrics add up under ``fedota serve --workers 2`` (issue 24 item 6).

Each uvicorn worker is a process of its own. Before multiprocess mode, each kept its own
counters and four scrapes of one counter answered 1, 3, 2, 4. Here requests reach both
workers, scrapes are answered by both, and every scrape must say exactly how many
requests were sent. The fleet gauges (devices by state, per-stage outcomes) are read
from the database at scrape time; their test runs in process on SQLite.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.ota import fleet_stats, inventory
from tests.server.ota.ota_helpers import (
    Bundle,
    auth,
    bundle_bytes,
    check,
    create_rollout,
    enroll,
    event,
    free_port,
    publish,
    settings_env,
)
from tests.server.ota.pg_cluster import PgCluster
from tests.server.ota.serve_helpers import fedota_serve, log_tail, worker_of

WORKERS = 2
CHECKS = 40
CHECK_ROUTE = "/v1/devices/{device_id}/check"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus exposition ``text`` (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def clients_on_every_worker(
    server: object, url: str, port: int, clients: list[httpx.Client]
) -> dict[int, httpx.Client]:
    """A keep-alive connection held by each worker (the kernel picks who accepts)."""
    held: dict[int, httpx.Client] = {}
    for _ in range(100):
        if len(held) == WORKERS:
            return held
        client = httpx.Client(base_url=url, timeout=30)
        clients.append(client)
        held.setdefault(worker_of(server, port, client.get("/readyz")), client)  # type: ignore[arg-type]
    raise AssertionError(f"only {len(held)} of {WORKERS} workers accepted a connection")


@pytest.mark.slow
@pytest.mark.postgres
def test_a_counter_equals_the_requests_sent_on_every_scrape_of_two_workers(
    pg_cluster: PgCluster, tuf_keys, tmp_path: Path
) -> None:
    env = settings_env(
        pg_cluster.new_database(), tmp_path / "storage", tuf_keys.write(tmp_path / "keys")
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    clients: list[httpx.Client] = []
    try:
        with fedota_serve(env, port, tmp_path, workers=WORKERS) as server:
            held = clients_on_every_worker(server, url, port, clients)
            device = enroll(next(iter(held.values())))
            pool = list(held.values())
            for i in range(CHECKS):  # alternate: both workers count some of them
                assert check(pool[i % len(pool)], device, installed=None) is None
            scrapes = scrape_every_worker(server, url, port)
    finally:
        for client in clients:
            client.close()
    answered_by = Counter(pid for pid, _ in scrapes)
    assert len(answered_by) == WORKERS and min(answered_by.values()) >= 2, answered_by
    checks = [sample(text, "fedota_update_checks_total", result="none") for _, text in scrapes]
    timed = [
        sample(text, "fedota_http_request_duration_seconds_count", route=CHECK_ROUTE)
        for _, text in scrapes
    ]
    assert checks == [CHECKS] * len(scrapes), f"{checks}\n{log_tail(tmp_path)}"
    assert timed == [CHECKS] * len(scrapes), timed


def scrape_every_worker(server: object, url: str, port: int) -> list[tuple[int, str]]:
    """(worker pid, /metrics text) of fresh connections until each worker answered twice."""
    scrapes: list[tuple[int, str]] = []
    for _ in range(100):
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.get("/metrics")
            assert response.status_code == 200, response.text
            scrapes.append((worker_of(server, port, response), response.text))  # type: ignore[arg-type]
        per = Counter(pid for pid, _ in scrapes)
        if len(per) == WORKERS and min(per.values()) >= 2:
            break
    return scrapes


def test_fleet_gauges_come_from_the_database_at_scrape_time(make_client, sqlite_url, tuf_keys):
    client: TestClient = make_client(sqlite_url)
    v1 = Bundle(1, bundle_bytes("g1"))
    assert publish(client, tuf_keys, 1, [v1]).status_code == 201
    devices = [enroll(client) for _ in range(4)]
    rollout = create_rollout(client, 1, [100], max_failure_rate=0.9, min_reports=10)
    outcomes = {devices[0]: "installed", devices[1]: "installed", devices[2]: "failed"}
    for n, (device, kind) in enumerate(outcomes.items()):
        installed = 1 if kind == "installed" else None
        response = event(
            client, device, event_id=f"e{n}", seq=1, type=kind, version=1, installed=installed
        )
        assert response.status_code == 200, response.text
    assert (
        client.post(f"/v1/devices/{devices[3].id}/revoke", headers=auth("admin")).status_code == 204
    )

    text = client.get("/metrics").text
    states = {s: sample(text, "fedota_devices", state=s) for s in fleet_stats.DEVICE_STATES}
    assert states == {"ok": 2, "failed": 1, "retrying": 0, "stale": 0, "revoked": 1}
    services = client.app.state.services  # type: ignore[attr-defined]
    for state in inventory.DeviceState:  # one definition of state: the inventory's
        page = inventory.list_devices(
            services.db,
            inventory.DeviceFilter(state=state),
            stale_after_s=services.settings.stale_after_s,
        )
        assert sum(not d.revoked for d in page.items) == states[state], state
    stage = {"rollout": str(rollout["id"]), "version": "1", "stage": "1"}
    assert sample(text, "fedota_rollout_stage_reports", outcome="installed", **stage) == 2
    assert sample(text, "fedota_rollout_stage_reports", outcome="failed", **stage) == 1
    assert sample(text, "fedota_rollout_stage_failure_rate", **stage) == pytest.approx(1 / 3)

    client.post(f"/v1/rollouts/{rollout['id']}/cancel", headers=auth("operator"))
    text = client.get("/metrics").text  # a cancelled rollout is history: no stage gauges
    assert sample(text, "fedota_rollout_stage_reports", outcome="installed", **stage) == 0
    assert "fedota_rollout_stage_failure_rate{" not in text
