"""The fleet inventory (issue 24 item 1): ``GET /v1/devices`` keyset pages and filters,
device states, last-seen times, ``GET /v1/devices/{id}/history``, and who may read them;
on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text, update

from server.ota import Database, inventory, make_engine, upgrade
from server.ota.database import alembic_config
from server.ota.models import DeviceRow, utcnow
from tests.server.ota.ota_helpers import (
    FP_A,
    FP_B,
    Bundle,
    auth,
    bundle_bytes,
    check,
    create_rollout,
    enroll,
    event,
    first_stage,
    publish,
)

V1 = Bundle(1, bundle_bytes("inv1"))
V2 = Bundle(2, bundle_bytes("inv2"))


def _get(client: Any, path: str, **params: Any) -> dict[str, Any]:
    response = client.get(path, params=params, headers=auth("operator"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _ids(client: Any, **params: Any) -> list[str]:
    """Every device id a filtered walk through all pages returns, in page order."""
    ids: list[str] = []
    cursor = None
    while True:
        page = _get(client, "/v1/devices", **params, **({"cursor": cursor} if cursor else {}))
        ids += [d["id"] for d in page["devices"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


def test_pages_return_every_device_once_in_id_order_while_devices_enroll(client) -> None:
    before = {enroll(client).id for _ in range(7)}
    first = _get(client, "/v1/devices", limit=3)
    assert [d["id"] for d in first["devices"]] == sorted(before)[:3]
    after = {enroll(client).id for _ in range(5)}  # enroll between two pages
    seen = [d["id"] for d in first["devices"]]
    cursor = first["next_cursor"]
    while cursor is not None:
        page = _get(client, "/v1/devices", limit=3, cursor=cursor)
        assert len(page["devices"]) <= 3
        seen += [d["id"] for d in page["devices"]]
        cursor = page["next_cursor"]
    assert seen == sorted(set(seen))  # no repeats, keyset order
    # every device present at the start is listed; new ones exactly when past the cursor
    assert set(seen) == before | {i for i in after if i > seen[2]}


def test_filters_by_base_version_runtime_rollout_and_state(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    on_a = [enroll(client, installed=1) for _ in range(20)]
    on_b = enroll(client, base=FP_B)
    check(client, on_a[0], 1, runtime="llamacpp")  # the report names its runtime
    rollout = create_rollout(client, 2, [100], max_failure_rate=1.0, min_reports=50)
    ok, failed, retrying, stale = on_a[1:5]
    for device, kind in ((ok, "installed"), (failed, "failed"), (retrying, "retry")):
        installed = 2 if kind == "installed" else 1
        answer = event(
            client, device, event_id="e1", seq=1, type=kind, version=2, installed=installed
        )
        assert answer.status_code == 200, answer.text
    event(client, stale, event_id="e1", seq=1, type="failed", version=2, installed=1)
    _age(client, stale.id, days=8)  # the default stale_after_s is 7 days

    assert _ids(client, base=FP_B) == [on_b.id]
    assert set(_ids(client, base=FP_A)) == {d.id for d in on_a}
    assert _ids(client, version=2) == [ok.id]
    assert _ids(client, runtime="llamacpp") == [on_a[0].id]
    # a retry is no outcome (ADR 0007): it never counts for the rollout
    assert set(_ids(client, rollout=rollout["id"])) == {ok.id, failed.id, stale.id}
    assert _ids(client, state="failed") == [failed.id]  # the stale one is stale first
    assert _ids(client, state="retrying") == [retrying.id]
    assert _ids(client, state="stale") == [stale.id]
    everyone = {d.id for d in on_a} | {on_b.id}
    assert set(_ids(client, state="ok")) == everyone - {failed.id, retrying.id, stale.id}
    assert _ids(client, base=FP_A, state="failed", version=1) == [failed.id]
    assert _ids(client, base=FP_B, state="failed") == []


def test_a_row_says_last_seen_installed_version_outcome_and_reason(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    create_rollout(client, 2, [100], max_failure_rate=1.0)
    device = enroll(client, installed=1)
    enrolled = _get(client, f"/v1/devices/{device.id}")
    assert (enrolled["state"], enrolled["last_outcome"]) == ("ok", None)
    response = client.post(
        f"/v1/devices/{device.id}/events",
        json={
            "event_id": "x",
            "seq": 3,
            "type": "failed",
            "version": 2,
            "installed_version": 1,
            "detail": "health check: golden loss 4.1 > 3.0",
        },
        headers=auth(device.token),
    )
    assert response.status_code == 200, response.text
    (row,) = _get(client, "/v1/devices", state="failed")["devices"]
    assert row["id"] == device.id and row["installed_version"] == 1
    assert (row["last_outcome"], row["last_outcome_version"]) == ("failed", 2)
    assert row["last_outcome_reason"] == "health check: golden loss 4.1 > 3.0"
    assert row["last_seen_at"] >= enrolled["last_seen_at"] and not row["revoked"]


def test_an_update_check_moves_last_seen_through_the_batched_tracker(client) -> None:
    device = enroll(client)
    _age(client, device.id, days=30)
    assert _ids(client, state="stale") == [device.id]
    before = utcnow()
    check(client, device, None)
    # GET /v1/devices writes this worker's pending marks first
    (row,) = _get(client, "/v1/devices", state="ok")["devices"]
    assert dt.datetime.fromisoformat(row["last_seen_at"]) >= before.replace(microsecond=0)
    tracker = client.app.state.services.seen
    assert tracker.flush() == 0  # nothing left pending


def test_seen_tracker_never_moves_last_seen_backwards(client) -> None:
    device = enroll(client)
    db = client.app.state.services.db
    old = utcnow() - dt.timedelta(days=3)
    tracker = inventory.SeenTracker(db, clock=lambda: old)
    tracker.mark(device.id)
    assert tracker.flush() == 1
    row = inventory.get_device(db, device.id, stale_after_s=86_400)
    assert row.last_seen_at > old + dt.timedelta(days=2)  # the enrollment time stays


def test_history_pages_newest_first_and_each_event_once(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    create_rollout(client, 2, [100], max_failure_rate=1.0)
    device = enroll(client, installed=1)
    for seq in range(1, 8):
        kind = "retry" if seq < 7 else "installed"
        answer = event(
            client, device, event_id=f"e{seq}", seq=seq, type=kind, version=2, installed=1
        )
        assert answer.status_code == 200
    seqs: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = _get(client, f"/v1/devices/{device.id}/history", **params)
        seqs += [e["seq"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seqs == [7, 6, 5, 4, 3, 2, 1]
    missing = client.get(f"/v1/devices/{'0' * 32}/history", headers=auth("operator"))
    assert missing.status_code == 404 and missing.json()["detail"] == f"no device {'0' * 32}"


@pytest.mark.parametrize(
    "path", ["/v1/devices", "/v1/devices/{id}", "/v1/devices/{id}/history", "/v1/audit"]
)
def test_only_operator_and_admin_keys_may_read_the_inventory(client, path) -> None:
    device = enroll(client)
    url = path.format(id=device.id)
    assert client.get(url).status_code == 401
    assert client.get(url, headers=auth("not-a-key-0123456789")).status_code == 401
    assert client.get(url, headers=auth(device.token)).status_code == 403
    assert client.get(url, headers=auth("publisher")).status_code == 403
    assert client.get(url, headers=auth("operator")).status_code == 200
    assert client.get(url, headers=auth("admin")).status_code == 200


@pytest.mark.parametrize(
    "params, status, says",
    [
        ({"cursor": "not-a-cursor"}, 400, "cursor is not one this server issued"),
        ({"cursor": "WyJhdWRpdCIsWzFdXQ"}, 400, "issued for devices"),  # an audit cursor
        ({"limit": 0}, 422, "limit"),
        ({"state": "sleepy"}, 422, "state"),
        ({"base": "sha256:xyz"}, 422, "base"),
    ],
    ids=["garbage-cursor", "cursor-of-another-listing", "limit-0", "unknown-state", "bad-base"],
)
def test_bad_queries_are_one_line_errors(client, params, status, says) -> None:
    response = client.get("/v1/devices", params=params, headers=auth("operator"))
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert says in detail and "\n" not in detail


def test_rollout_filter_follows_its_stage_owners(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    devices = [enroll(client, installed=1) for _ in range(20)]
    rollout = create_rollout(client, 2, [50, 100], max_failure_rate=1.0, min_reports=50)
    owners = first_stage(client.app.state.services.db, rollout["id"], devices)
    for n, device in enumerate(owners):
        event(client, device, event_id=f"o{n}", seq=1, type="installed", version=2, installed=2)
    assert _ids(client, rollout=rollout["id"]) == sorted(d.id for d in owners)
    assert _ids(client, rollout=rollout["id"], version=1) == []


def _age(client: Any, device_id: str, *, days: int) -> None:
    """Pretend the device was last seen ``days`` ago (time passing, not an API action)."""
    with client.app.state.services.db.write() as session:
        session.execute(
            update(DeviceRow)
            .where(DeviceRow.id == device_id)
            .values(last_seen_at=utcnow() - dt.timedelta(days=days))
        )


def test_0005_back_fills_inventory_columns_of_existing_devices(database_url) -> None:
    engine = make_engine(database_url)
    upgrade(engine, "0004")
    then = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO devices (id, token_hash, created_at, base_fingerprint, "
                "installed_version, capabilities, memory_budget_bytes, last_event_seq) VALUES "
                "('d1', 'h1', :t, 'sha256:x', 1, :caps, 100, 2), "
                "('d2', 'h2', :t, 'sha256:x', NULL, '{}', 100, 0)"
            ),
            {"t": then, "caps": '{"runtime": "llamacpp"}'},
        )
        for seq, kind, detail in ((1, "installed", ""), (2, "failed", "rolled back")):
            conn.execute(
                text(
                    "INSERT INTO telemetry_events (device_id, event_id, seq, type, version, "
                    "installed_version, detail, received_at) VALUES ('d1', :e, :s, :k, 2, 1, "
                    ":d, :at)"
                ),
                {"e": f"e{seq}", "s": seq, "k": kind, "d": detail, "at": then.replace(day=seq + 1)},
            )
    upgrade(engine)
    page = inventory.list_devices(Database(engine), inventory.DeviceFilter(), stale_after_s=1e9)
    db_rows = {row.id: row for row in page.items}
    d1, d2 = db_rows["d1"], db_rows["d2"]
    assert (d1.runtime, d1.last_outcome, d1.last_outcome_version) == ("llamacpp", "failed", 2)
    assert d1.last_outcome_reason == "rolled back" and d1.state == inventory.DeviceState.FAILED
    assert d1.last_seen_at == then.replace(day=3)  # its newest event
    assert (d2.runtime, d2.last_outcome, d2.last_seen_at) == ("", None, then)  # enrolled
    command.downgrade(alembic_config(engine), "0004")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM devices")).scalar() == 2
    upgrade(engine)
    engine.dispose()


def test_the_app_writes_last_seen_times_in_the_background(make_client, sqlite_url) -> None:
    client = make_client(sqlite_url, seen_flush_interval_s=0.05)
    device = enroll(client)
    _age(client, device.id, days=30)
    check(client, device, None)
    db = client.app.state.services.db
    deadline = time.monotonic() + 10
    while inventory.get_device(db, device.id, stale_after_s=86_400).state == "stale":
        assert time.monotonic() < deadline, "the last-seen time was never written"
        time.sleep(0.05)
