"""Rollout control (issue 24 item 3): advancing by hand, stage-sized report thresholds
(a small fleet never stalls), and the status saying why a stage waits."""

from __future__ import annotations

import math
from typing import Any

import pytest

from server.ota.models import RolloutRow
from server.ota.rollouts import stage_devices
from tests.server.ota.ota_helpers import (
    Bundle,
    auth,
    bundle_bytes,
    create_rollout,
    enroll,
    event,
    first_stage,
    publish,
)

V1 = Bundle(1, bundle_bytes("ctl1"))
V2 = Bundle(2, bundle_bytes("ctl2"))


def _status(client: Any, rollout_id: int) -> dict[str, Any]:
    response = client.get(f"/v1/rollouts/{rollout_id}", headers=auth("operator"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def small_fleet(client, tuf_keys):
    """20 devices on v1 (a 50% stage of them is never empty: probability 2^-20)."""
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    return client, [enroll(client, installed=1) for _ in range(20)]


@pytest.mark.parametrize("fraction", [1.0, 0.5], ids=["every-device", "half"])
def test_a_stage_smaller_than_min_reports_advances_once_its_devices_report(
    small_fleet, fraction
) -> None:
    client, devices = small_fleet
    rollout = _create(client, min_reports=1000, min_reports_fraction=fraction)
    owners = first_stage(client.app.state.services.db, rollout["id"], devices)
    needed = max(1, math.ceil(fraction * len(owners)))
    assert _status(client, rollout["id"])["progress"] == f"waiting: 0/{needed} reports"
    for n, device in enumerate(owners[: needed - 1]):
        event(client, device, event_id=f"i{n}", seq=1, type="installed", version=2, installed=2)
    status = _status(client, rollout["id"])
    assert status["stage_index"] == 0
    assert status["progress"] == f"waiting: {needed - 1}/{needed} reports"
    last = owners[needed - 1]
    event(client, last, event_id="last", seq=1, type="installed", version=2, installed=2)
    status = _status(client, rollout["id"])
    assert status["stage_index"] == 1 and status["state"] == "active"
    assert status["progress"] == "last stage (100%): 0 reports, 0 failed"


def _create(client: Any, **policy: Any) -> dict[str, Any]:
    body = {"base_fingerprint": V2.base, "to_version": 2, "stages": [50, 100], **policy}
    response = client.post("/v1/rollouts", json=body, headers=auth("operator"))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_min_reports_fraction_is_part_of_the_api(small_fleet) -> None:
    client, devices = small_fleet
    body = _create(client, min_reports=1000, min_reports_fraction=0.5)
    owners = first_stage(client.app.state.services.db, body["id"], devices)
    assert body["min_reports_fraction"] == 0.5
    assert body["progress"] == f"waiting: 0/{math.ceil(len(owners) / 2)} reports"
    refused = client.post(
        "/v1/rollouts",
        json={"base_fingerprint": V2.base, "to_version": 2, "min_reports_fraction": 0},
        headers=auth("operator"),
    )
    assert refused.status_code == 422 and "min_reports_fraction" in refused.json()["detail"]


def test_stages_that_hold_no_device_pass_at_once(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    rollout = create_rollout(client, 2, [1, 10, 100], min_reports=5)  # nobody enrolled yet
    assert (rollout["stage_index"], rollout["state"]) == (2, "active")
    events = client.get(f"/v1/rollouts/{rollout['id']}/events", headers=auth("operator")).json()
    assert [(e["action"], e["actor"]) for e in events] == [
        ("create", events[0]["actor"]),
        ("advance", "system:stage-complete"),
        ("advance", "system:stage-complete"),
    ]
    device = enroll(client, installed=1)  # the last stage covers everyone
    offer = client.post(
        f"/v1/devices/{device.id}/check",
        json={"base_fingerprint": V2.base, "installed_version": 1, "memory_budget_bytes": 2**29},
        headers=auth(device.token),
    ).json()["update"]
    assert offer["to_version"] == 2


def test_stage_size_counts_only_devices_that_can_still_report(small_fleet) -> None:
    client, devices = small_fleet
    db = client.app.state.services.db
    rollout = create_rollout(client, 2, [50, 100], min_reports=1000)
    owners = first_stage(db, rollout["id"], devices)
    revoked, done = owners[0], owners[1:2]
    assert client.post(f"/v1/devices/{revoked.id}/revoke", headers=auth("admin")).status_code == 204
    for device in done:  # reported for this rollout: still counted
        event(client, device, event_id="d", seq=1, type="installed", version=2, installed=2)
    with db.read() as session:
        row = session.get(RolloutRow, rollout["id"])
        assert stage_devices(session, row, 0) == len(owners) - 1
        assert stage_devices(session, row, 1) == len(devices) - len(owners)


def test_manual_advance_is_audited_and_refused_past_the_last_stage(small_fleet) -> None:
    client, _ = small_fleet
    rollout = create_rollout(client, 2, [50, 100], min_reports=1000)
    advanced = client.post(f"/v1/rollouts/{rollout['id']}/advance", headers=auth("operator"))
    assert advanced.status_code == 200 and advanced.json()["stage_index"] == 1
    again = client.post(f"/v1/rollouts/{rollout['id']}/advance", headers=auth("operator"))
    assert again.status_code == 409 and "cannot advance" in again.json()["detail"]
    publisher = client.post(f"/v1/rollouts/{rollout['id']}/advance", headers=auth("publisher"))
    assert publisher.status_code == 403
    entries = client.get(
        "/v1/audit", params={"action": "rollout.advance"}, headers=auth("operator")
    ).json()["entries"]
    assert [e["actor"].split(":")[0] for e in entries] == ["operator"]


def test_status_says_why_a_paused_rollout_waits(small_fleet) -> None:
    client, devices = small_fleet
    rollout = create_rollout(client, 2, [50, 100], max_failure_rate=0.1, min_reports=2)
    rid = rollout["id"]
    client.post(f"/v1/rollouts/{rid}/pause", headers=auth("operator"))
    assert _status(client, rid)["progress"] == "paused by an operator; resume continues this stage"
    client.post(f"/v1/rollouts/{rid}/resume", headers=auth("operator"))
    owners = first_stage(client.app.state.services.db, rid, devices)
    for n, device in enumerate(owners[:2]):
        event(client, device, event_id=f"f{n}", seq=1, type="failed", version=2, installed=1)
    assert _status(client, rid)["progress"] == (
        "paused automatically: failure rate 1.000 over 2 reports > 0.1; "
        "resume starts the next stage"
    )
    client.post(f"/v1/rollouts/{rid}/cancel", headers=auth("operator"))
    assert _status(client, rid)["progress"].startswith("cancelled")
