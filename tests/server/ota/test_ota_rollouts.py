"""Staged rollouts and telemetry (THREATS F24, F26, F27), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest

from server.ota.domain import TelemetryEvent, bucket_of, stage_of
from server.ota.models import RolloutRow, TelemetryEventRow
from server.ota.rollouts import rollout_events
from server.ota.telemetry import record_event
from tests.server.ota.ota_helpers import (
    Bundle,
    Device,
    auth,
    bundle_bytes,
    check,
    create_rollout,
    enroll,
    event,
    publish,
)

V1 = Bundle(1, bundle_bytes("r1"))
V2 = Bundle(2, bundle_bytes("r2"))


def _by_stage(client, rollout_id: int, devices: list[Device]) -> dict[int, list[Device]]:
    with client.app.state.services.db.read() as session:
        row = session.get(RolloutRow, rollout_id)
        salt, stages = row.salt, tuple(row.stages)
    grouped: dict[int, list[Device]] = {}
    for device in devices:
        grouped.setdefault(stage_of(stages, bucket_of(salt, device.id)), []).append(device)
    return grouped


@pytest.fixture
def fleet(client, tuf_keys):
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    devices = [enroll(client, installed=1) for _ in range(40)]
    return client, devices


def test_bucketing_is_deterministic_and_roughly_uniform() -> None:
    buckets = [bucket_of("salt", f"{i:032x}") for i in range(4000)]
    assert buckets == [bucket_of("salt", f"{i:032x}") for i in range(4000)]
    share = sum(b < 2500 for b in buckets) / len(buckets)
    assert 0.2 < share < 0.3
    assert stage_of((10, 50, 100), 999) == 0 and stage_of((10, 50, 100), 1000) == 1


def test_failure_threshold_pauses_and_resume_starts_next_stage(fleet) -> None:
    # F24
    client, devices = fleet
    rollout = create_rollout(client, 2, [50, 100], max_failure_rate=0.4, min_reports=2)
    stages = _by_stage(client, rollout["id"], devices)
    first, second = stages[0], stages[1]
    assert all(check(client, d, 1)["to_version"] == 2 for d in first)
    assert all(check(client, d, 1) is None for d in second)
    for n, device in enumerate(first[:2]):
        event(client, device, event_id=f"f{n}", seq=1, type="failed", version=2, installed=1)
    status = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
    assert (status["state"], status["pause_reason"], status["stage_index"]) == (
        "paused",
        "threshold",
        0,
    )
    assert status["stage_stats"][0] == {"percent": 50, "installed": 0, "failed": 2}
    assert all(check(client, d, 1) is None for d in second + first[2:])  # next stage never starts
    resumed = client.post(f"/v1/rollouts/{rollout['id']}/resume", headers=auth("operator"))
    assert resumed.json()["state"] == "active" and resumed.json()["stage_index"] == 1
    assert all(check(client, d, 1)["to_version"] == 2 for d in second)
    actions = [a for a, _, _ in rollout_events(client.app.state.services.db, rollout["id"])]
    assert actions == ["create", "auto_pause", "resume"]


def test_successes_advance_the_stage(fleet) -> None:
    client, devices = fleet
    rollout = create_rollout(client, 2, [50, 100], max_failure_rate=0.4, min_reports=2)
    first = _by_stage(client, rollout["id"], devices)[0]
    for n, device in enumerate(first[:2]):
        event(client, device, event_id=f"ok{n}", seq=1, type="installed", version=2, installed=2)
    status = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
    assert (status["state"], status["stage_index"]) == ("active", 1)


def test_cancel_stops_offers_and_pause_by_operator(fleet) -> None:
    client, devices = fleet
    rollout = create_rollout(client, 2, [100])
    rid = rollout["id"]
    assert check(client, devices[0], 1) is not None
    assert client.post(f"/v1/rollouts/{rid}/pause", headers=auth("operator")).json()["state"] == (
        "paused"
    )
    assert check(client, devices[0], 1) is None
    assert client.post(f"/v1/rollouts/{rid}/cancel", headers=auth("operator")).status_code == 200
    assert client.post(f"/v1/rollouts/{rid}/resume", headers=auth("operator")).status_code == 409
    assert check(client, devices[0], 1) is None
    fleet_status = client.get("/v1/fleet", headers=auth("operator")).json()
    assert fleet_status["installed"][0]["devices"] == 40
    assert fleet_status["rollouts"][0]["state"] == "cancelled"


def test_concurrent_failures_pause_exactly_once(fleet) -> None:
    # F26: many devices report failures at the same instant.
    client, devices = fleet
    rollout = create_rollout(client, 2, [50, 100], max_failure_rate=0.2, min_reports=3)
    first = _by_stage(client, rollout["id"], devices)[0][:12]
    db = client.app.state.services.db
    barrier = threading.Barrier(len(first))
    errors: list[BaseException] = []

    def report_failure(device: Device) -> None:
        try:
            barrier.wait()
            record_event(db, device.id, TelemetryEvent("boom", 1, "failed", 2, 1))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=report_failure, args=(d,)) for d in first]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    actions = [a for a, _, _ in rollout_events(db, rollout["id"])]
    assert actions.count("auto_pause") == 1 and "advance" not in actions
    status = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
    assert status["state"] == "paused" and status["stage_index"] == 0
    assert status["stage_stats"][0]["failed"] == len(first)


def test_duplicate_and_out_of_order_events(fleet) -> None:
    # F27: the same event three times is stored once; an older event does not win.
    client, devices = fleet
    create_rollout(client, 2, [100], min_reports=100)
    device = devices[0]
    responses = [
        event(client, device, event_id="install-2", seq=7, type="installed", version=2, installed=2)
        for _ in range(3)
    ]
    assert [r.json()["stored"] for r in responses] == [True, False, False]
    # the fallback (seq 9) arrives before an older retry of an install report (seq 8)
    event(client, device, event_id="fallback", seq=9, type="failed", version=2, installed=1)
    event(client, device, event_id="late", seq=8, type="installed", version=2, installed=2)
    state = client.get(f"/v1/devices/{device.id}/assignment", headers=auth(device.token)).json()
    assert state["installed_version"] == 1 and state["failed_versions"] == [2]
    with client.app.state.services.db.read() as session:
        stored = session.query(TelemetryEventRow).filter_by(device_id=device.id).count()
    assert stored == 3


def test_every_worker_sees_a_pause_at_once(fleet, make_client, database_url) -> None:
    # Two app instances on one database stand for two workers with their own caches.
    worker_a, devices = fleet
    worker_b = make_client(database_url)
    rollout = create_rollout(worker_a, 2, [100])
    device = devices[0]
    assert check(worker_a, device, 1)["to_version"] == 2  # A has cached the rollout
    assert check(worker_b, device, 1)["to_version"] == 2
    paused = worker_b.post(f"/v1/rollouts/{rollout['id']}/pause", headers=auth("operator"))
    assert paused.json()["state"] == "paused"
    assert check(worker_a, device, 1) is None  # A's cache was invalidated by B's pause
    worker_b.post(f"/v1/rollouts/{rollout['id']}/resume", headers=auth("operator"))
    assert check(worker_a, device, 1)["to_version"] == 2


def test_retry_reports_keep_the_release_offered_and_never_pause_a_rollout(fleet) -> None:
    # ADR 0007: a device-local or transport problem (disk full, a corrupted mirror) is a
    # ``retry`` outcome, not a failed install: it neither blocks the device nor counts.
    client, devices = fleet
    rollout = create_rollout(client, 2, [50, 100], max_failure_rate=0.4, min_reports=2)
    first = _by_stage(client, rollout["id"], devices)[0]
    for n, device in enumerate(first):
        response = event(
            client, device, event_id=f"r{n}", seq=1, type="retry", version=2, installed=1
        )
        assert response.status_code == 200 and response.json()["stored"], response.text
    status = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
    assert (status["state"], status["stage_index"]) == ("active", 0)
    assert status["stage_stats"][0] == {"percent": 50, "installed": 0, "failed": 0}
    for device in first:
        assert check(client, device, 1)["to_version"] == 2  # still offered
        state = client.get(f"/v1/devices/{device.id}/assignment", headers=auth(device.token))
        assert state.json()["failed_versions"] == []
    # A later ``failed`` from one of them still counts as it always did.
    event(client, first[0], event_id="f0", seq=2, type="failed", version=2, installed=1)
    state = client.get(f"/v1/devices/{first[0].id}/assignment", headers=auth(first[0].token))
    assert state.json()["failed_versions"] == [2]
