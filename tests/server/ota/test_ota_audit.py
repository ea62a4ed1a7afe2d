"""The audit log (issue 24 item 2): one entry per action, written in the action's own
transaction, with time, actor and detail; ``GET /v1/audit`` keyset pages and filters;
rollout events with time and actor. On SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

from securesystemslib.signer import CryptoSigner

from server.ota import audit
from server.ota.models import utcnow
from server.ota.rollouts import rollout_event_log
from tests.server.ota.ota_helpers import (
    ROLE_KEYS,
    Bundle,
    TufKeys,
    auth,
    bundle_bytes,
    create_rollout,
    enroll,
    event,
    first_stage,
    publish,
)

V1 = Bundle(1, bundle_bytes("aud1"))
V2 = Bundle(2, bundle_bytes("aud2"))
OPERATOR = audit.role_actor("operator", ROLE_KEYS["operator"])
ADMIN = audit.role_actor("admin", ROLE_KEYS["admin"])
PUBLISHER = audit.role_actor("publisher", ROLE_KEYS["publisher"])


def _entries(client: Any, **params: Any) -> list[dict[str, Any]]:
    """Every entry matching ``params``, newest first, walking all pages."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/audit", params=query, headers=auth("operator"))
        assert response.status_code == 200, response.text
        out += response.json()["entries"]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return out


def _post(client: Any, path: str, role: str, expected: int = 200, **kwargs: Any) -> Any:
    headers = {**auth(role), **kwargs.pop("headers", {})}
    response = client.post(path, headers=headers, **kwargs)
    assert response.status_code == expected, response.text
    return response


def _rotated_root(keys: TufKeys) -> bytes:
    md = keys.root_metadata(version=1)
    new_key = CryptoSigner.generate_ed25519()
    md.signed.version = 2
    md.signed.revoke_key(keys.root.public_key.keyid, "root")
    md.signed.add_key(new_key.public_key, "root")
    md.signatures.clear()
    md.sign(new_key, append=True)
    md.sign(keys.root, append=True)
    return md.to_bytes()


def test_every_action_is_recorded_exactly_once_with_its_actor(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    device, *_ = [enroll(client, installed=1) for _ in range(20)]  # no stage is empty
    rollout = create_rollout(client, 2, [50, 100], min_reports=50)
    rid = rollout["id"]
    _post(client, f"/v1/rollouts/{rid}/pause", "operator")
    _post(client, f"/v1/rollouts/{rid}/pause", "operator")  # already paused: no action
    _post(client, f"/v1/rollouts/{rid}/resume", "operator")
    _post(client, f"/v1/rollouts/{rid}/advance", "admin")
    _post(client, f"/v1/rollouts/{rid}/advance", "operator", 409)  # refused: not recorded
    _post(client, f"/v1/rollouts/{rid}/cancel", "operator")
    event(client, device, event_id="f", seq=1, type="failed", version=2, installed=1)
    cleared = client.delete(f"/v1/devices/{device.id}/failures/2", headers=auth("operator"))
    assert cleared.status_code == 204
    _post(client, f"/v1/devices/{device.id}/revoke", "admin", 204)
    _post(client, f"/v1/devices/{device.id}/revoke", "admin", 204)  # already revoked
    _post(
        client,
        "/v1/tuf/root",
        "admin",
        201,
        content=_rotated_root(tuf_keys),
        headers={"Content-Type": "application/json"},
    )
    entries = list(reversed(_entries(client)))
    assert [(e["action"], e["actor"], e["target"]) for e in entries] == [
        ("release.publish", PUBLISHER, "release:1"),
        ("rollout.create", OPERATOR, f"rollout:{rid}"),
        ("rollout.pause", OPERATOR, f"rollout:{rid}"),
        ("rollout.resume", OPERATOR, f"rollout:{rid}"),
        ("rollout.advance", ADMIN, f"rollout:{rid}"),
        ("rollout.cancel", OPERATOR, f"rollout:{rid}"),
        ("device.clear_failure", OPERATOR, f"device:{device.id}"),
        ("device.revoke", ADMIN, f"device:{device.id}"),
        ("tuf.root_rotate", ADMIN, "root:2"),
    ]
    assert entries[0]["detail"]["bundles"] == sorted([V1.path, V2.path])
    assert entries[4]["detail"] == {"stage_index": 1, "to_version": 2, "detail": "operator"}
    assert entries[6]["detail"] == {"version": 2}
    times = [dt.datetime.fromisoformat(e["at"]) for e in entries]
    assert times == sorted(times) and times[-1] <= utcnow()
    assert ROLE_KEYS["operator"] not in str(entries)  # a key id, never the key


def test_auto_pause_and_auto_advance_are_recorded_as_the_system(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    devices = [enroll(client, installed=1) for _ in range(30)]
    rollout = create_rollout(client, 2, [50, 100], max_failure_rate=0.4, min_reports=2)
    owners = first_stage(client.app.state.services.db, rollout["id"], devices)
    for n, device in enumerate(owners[:2]):
        event(client, device, event_id=f"ok{n}", seq=1, type="installed", version=2, installed=2)
    (advance,) = _entries(client, action="rollout.advance")
    assert advance["actor"] == audit.SYSTEM_STAGE_DONE == "system:stage-complete"
    later = [d for d in devices if d not in owners]
    for n, device in enumerate(later[:4]):
        event(client, device, event_id=f"f{n}", seq=1, type="failed", version=2, installed=1)
    (pause,) = _entries(client, action="rollout.auto_pause")
    assert pause["actor"] == "system:threshold"
    assert pause["detail"]["detail"].startswith("failure rate 1.000 over 2 reports")
    log = rollout_event_log(client.app.state.services.db, rollout["id"])
    assert [(e.action, e.actor) for e in log] == [
        ("create", OPERATOR),
        ("advance", "system:stage-complete"),
        ("auto_pause", "system:threshold"),
    ]
    served = client.get(f"/v1/rollouts/{rollout['id']}/events", headers=auth("operator")).json()
    assert [e["actor"] for e in served] == [e.actor for e in log]
    assert all(dt.datetime.fromisoformat(e["at"]) <= utcnow() for e in served)


def test_filters_and_keyset_pages_of_the_audit_log(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1, V2]).status_code == 201
    rid = create_rollout(client, 2, [100], min_reports=50)["id"]
    for _ in range(3):
        _post(client, f"/v1/rollouts/{rid}/pause", "operator")
        _post(client, f"/v1/rollouts/{rid}/resume", "admin")
    first = client.get("/v1/audit", params={"limit": 3}, headers=auth("operator")).json()
    assert [e["action"] for e in first["entries"]] == [
        "rollout.resume",
        "rollout.pause",
        "rollout.resume",
    ]
    _post(client, f"/v1/rollouts/{rid}/cancel", "operator")  # newer than the walk's start
    rest = client.get(
        "/v1/audit", params={"limit": 50, "cursor": first["next_cursor"]}, headers=auth("operator")
    ).json()
    ids = [e["id"] for e in first["entries"] + rest["entries"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == 8 and rest["next_cursor"] is None
    assert len(_entries(client, action="rollout")) == 8
    assert len(_entries(client, action="rollout.pause")) == 3
    assert {e["actor"] for e in _entries(client, actor="admin")} == {ADMIN}
    assert len(_entries(client, actor=OPERATOR)) == 5
    assert _entries(client, action="release")[0]["actor"] == PUBLISHER
    future = (utcnow() + dt.timedelta(hours=1)).isoformat()
    assert _entries(client, since=future) == []
    past = (utcnow() - dt.timedelta(hours=1)).isoformat()
    assert len(_entries(client, since=past)) == 9


def test_list_audit_is_a_plain_service_function(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1]).status_code == 201
    page = audit.list_audit(client.app.state.services.db, audit.AuditFilter(action="release"))
    (entry,) = page.items
    assert (entry.action, entry.actor, entry.target) == ("release.publish", PUBLISHER, "release:1")
    assert page.next_cursor is None and entry.at.tzinfo is not None


def test_a_failed_action_leaves_no_entry(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V1]).status_code == 201
    replay = publish(client, tuf_keys, 1, [V1])  # not newer: refused in the transaction
    assert replay.status_code == 409
    refused = client.post(
        "/v1/rollouts",
        json={"base_fingerprint": V1.base, "to_version": 9, "stages": [100]},
        headers=auth("operator"),
    )
    assert refused.status_code == 409
    assert [e["action"] for e in _entries(client)] == ["release.publish"]
