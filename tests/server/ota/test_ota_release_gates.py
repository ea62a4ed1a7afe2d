"""Release gates (ADR 0014): the operator's privacy policy refuses a release at publish
and at rollout time, and a rollout's quality gate pauses a stage whose devices measured
a worse golden-prompt loss than the adapter it replaces. SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from server.ota.rollouts import rollout_events
from tests.server.ota.ota_helpers import (
    FP_A,
    Bundle,
    Device,
    auth,
    bundle_bytes,
    check,
    create_rollout,
    enroll,
    publish,
)

WITHIN = {"record_epsilon": "7.5", "record_delta": "1e-05"}  # signed as decimal strings
OVER = {"record_epsilon": "9.1", "record_delta": "1e-05"}
FITS_ALL = {
    "record_epsilon": "2.0",
    "record_delta": "1e-07",
    "user_epsilon": "1.0",
    "user_delta": "1e-07",
}


def _rollout(client: Any, version: int, **extra: Any) -> Any:
    body = {"base_fingerprint": FP_A, "to_version": version, "stages": [50, 100], **extra}
    return client.post("/v1/rollouts", json=body, headers=auth("operator"))


@pytest.mark.parametrize(
    ("policy", "privacy", "expected"),
    [
        pytest.param(
            {"max_record_epsilon": 8.0},
            OVER,
            "release v2 spent record-level ε=9.1 > policy max_record_epsilon=8",
            id="record-epsilon-over",
        ),
        pytest.param(
            {"max_record_epsilon": 8.0},
            None,
            "release v2 records no record-level ε (unbounded) > policy max_record_epsilon=8",
            id="no-epsilon-is-unbounded",
        ),
        pytest.param(
            {"max_user_epsilon": 4.0},
            WITHIN,
            "release v2 records no user-level ε (unbounded) > policy max_user_epsilon=4",
            id="other-unit-is-unbounded",
        ),
        pytest.param(
            {"max_record_epsilon": 8.0, "max_delta": 1e-6},
            WITHIN,
            "release v2 spent record-level δ=1e-05 > policy max_delta=1e-06",
            id="delta-over",
        ),
    ],
)
def test_publish_over_the_server_policy_is_refused(
    make_client, database_url, tuf_keys, policy, privacy, expected
) -> None:
    client = make_client(database_url, **policy)
    assert (
        publish(client, tuf_keys, 1, [Bundle(1, bundle_bytes("g1"), privacy=FITS_ALL)]).status_code
        == 201
    )
    response = publish(client, tuf_keys, 2, [Bundle(2, bundle_bytes("g2"), privacy=privacy)])
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "ReleaseGateError"
    assert body["detail"].startswith(expected), body["detail"]
    assert "\n" not in body["detail"]
    # nothing of the refused release is served
    assert client.get("/tuf/2.targets.json").status_code == 404


def test_publish_within_the_policy_is_accepted(make_client, database_url, tuf_keys) -> None:
    client = make_client(database_url, max_record_epsilon=8.0, max_delta=1e-5)
    response = publish(client, tuf_keys, 1, [Bundle(1, bundle_bytes("g1"), privacy=WITHIN)])
    assert response.status_code == 201, response.text


def test_rollout_over_the_server_policy_is_refused(make_client, database_url, tuf_keys) -> None:
    # published while the server had no policy; the operator tightened it since
    lax = make_client(database_url)
    assert (
        publish(lax, tuf_keys, 1, [Bundle(1, bundle_bytes("o1"), privacy=OVER)]).status_code == 201
    )
    strict = make_client(database_url, max_record_epsilon=8.0)
    response = _rollout(strict, 1)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "ReleaseGateError"
    assert response.json()["detail"].startswith(
        "release v1 spent record-level ε=9.1 > policy max_record_epsilon=8"
    )
    assert strict.get("/v1/rollouts", headers=auth("operator")).json() == []
    device = enroll(strict)
    assert check(strict, device, None) is None  # nothing is offered
    assert _rollout(lax, 1).status_code == 201  # the same release, without the policy


def _report(
    client: Any, device: Device, seq: int, outcome: str, new: float, old: float | None
) -> None:
    body: dict[str, Any] = {
        "event_id": f"q{seq}-{device.id[:8]}",
        "seq": seq,
        "type": outcome,
        "version": 2,
        "installed_version": 2 if outcome == "installed" else 1,
        "golden_loss": new,
    }
    if old is not None:
        body["previous_golden_loss"] = old
    response = client.post(f"/v1/devices/{device.id}/events", json=body, headers=auth(device.token))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("new", "old", "state", "stage", "reason"),
    [
        pytest.param(3.60, 3.20, "paused", 0, "quality", id="worse-pauses"),
        pytest.param(3.10, 3.20, "active", 1, None, id="better-advances"),
        pytest.param(3.30, 3.20, "active", 1, None, id="within-tolerance-advances"),
    ],
)
def test_quality_gate_on_the_first_stage(client, tuf_keys, new, old, state, stage, reason) -> None:
    releases = [Bundle(1, bundle_bytes("q1")), Bundle(2, bundle_bytes("q2"))]
    assert publish(client, tuf_keys, 1, releases).status_code == 201
    devices = [enroll(client, installed=1) for _ in range(40)]
    response = _rollout(client, 2, min_reports=3, max_failure_rate=0.5, quality_tolerance=0.05)
    assert response.status_code == 201, response.text
    rollout = response.json()
    assert rollout["quality_tolerance"] == 0.05
    first = [d for d in devices if (check(client, d, 1) or {}).get("to_version") == 2]
    assert len(first) >= 3
    for seq, device in enumerate(first[:3], start=1):  # every device installed: no failures
        _report(client, device, seq, "installed", new, old)
    view = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
    assert (view["state"], view["stage_index"], view["pause_reason"]) == (state, stage, reason)
    assert view["stage_stats"][0]["failed"] == 0
    quality = view["stage_quality"][0]
    assert quality["quality_reports"] == 3
    assert quality["golden_loss"] == pytest.approx(new)
    assert quality["previous_golden_loss"] == pytest.approx(old)
    events = rollout_events(client.app.state.services.db, rollout["id"])
    if reason == "quality":
        action, _, detail = events[-1]
        assert action == "auto_pause"
        assert detail == (
            f"quality: mean golden loss {new:.4f} of v2 over 3 reports > "
            f"{old * 1.05:.4f} = previous {old:.4f} x (1 + quality_tolerance 0.05)"
        )
        rest = [d for d in devices if d not in first]
        assert all(check(client, d, 1) is None for d in rest)  # the next stage never starts
    else:
        assert events[-1][0] == "advance"


def test_without_a_tolerance_quality_does_not_gate(client, tuf_keys) -> None:
    releases = [Bundle(1, bundle_bytes("q1")), Bundle(2, bundle_bytes("q2"))]
    assert publish(client, tuf_keys, 1, releases).status_code == 201
    devices = [enroll(client, installed=1) for _ in range(40)]
    rollout = create_rollout(client, 2, [50, 100], min_reports=3)
    first = [d for d in devices if (check(client, d, 1) or {}).get("to_version") == 2]
    for seq, device in enumerate(first[:3], start=1):
        _report(client, device, seq, "installed", 9.0, 3.0)
    view = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
    assert (view["state"], view["stage_index"]) == ("active", 1)


def test_reports_without_a_previous_loss_do_not_gate(client, tuf_keys) -> None:
    # a first install has no adapter to compare against: nothing to judge, the stage advances
    releases = [Bundle(1, bundle_bytes("q1")), Bundle(2, bundle_bytes("q2"))]
    assert publish(client, tuf_keys, 1, releases).status_code == 201
    devices = [enroll(client, installed=1) for _ in range(40)]
    response = _rollout(client, 2, min_reports=3, quality_tolerance=0.0)
    rollout = response.json()
    first = [d for d in devices if (check(client, d, 1) or {}).get("to_version") == 2]
    for seq, device in enumerate(first[:3], start=1):
        _report(client, device, seq, "installed", 9.0, None)
    view = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
    assert (view["state"], view["stage_index"]) == ("active", 1)
    assert view["stage_quality"][0]["quality_reports"] == 0


def test_bundles_carried_over_unchanged_are_not_judged_again_at_publish(
    make_client, database_url, tuf_keys
) -> None:
    # v1 went out before the operator set a policy; targets metadata keeps every earlier
    # bundle, so the next release repeats it. Only what a release adds is judged; the
    # over-budget v1 is still stopped at rollout time.
    lax = make_client(database_url)
    v1 = Bundle(1, bundle_bytes("c1"), privacy=OVER)
    assert publish(lax, tuf_keys, 1, [v1]).status_code == 201
    strict = make_client(database_url, max_record_epsilon=8.0)
    v2 = Bundle(2, bundle_bytes("c2"), privacy=WITHIN)
    assert publish(strict, tuf_keys, 2, [v1, v2]).status_code == 201
    assert _rollout(strict, 2).status_code == 201
    refused = _rollout(strict, 1)  # the gate is judged before "not newer"
    assert refused.status_code == 400 and refused.json()["error"] == "ReleaseGateError"
    # the same bytes under a new path are a new bundle: judged
    moved = Bundle(1, v1.data, privacy=OVER, base="sha256:" + "d" * 64)
    response = publish(strict, tuf_keys, 3, [v1, v2, moved])
    assert response.status_code == 400 and response.json()["error"] == "ReleaseGateError"
