"""Who may call what (THREATS F30) and settings that refuse unsafe defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.ota import DeviceRow, OtaSettings
from tests.server.ota.ota_helpers import (
    ENROLLMENT_SECRET,
    Bundle,
    Device,
    auth,
    bundle_bytes,
    create_rollout,
    enroll,
    event,
    publish,
    report,
)


@pytest.fixture
def two_devices(client, tuf_keys):
    assert publish(client, tuf_keys, 1, [Bundle(1, bundle_bytes("a"))]).status_code == 201
    create_rollout(client, 1, [100])
    return client, enroll(client), enroll(client)


def test_device_cannot_read_or_act_as_another(two_devices) -> None:
    client, a, b = two_devices
    as_a = auth(a.token)
    assert client.get(f"/v1/devices/{b.id}/assignment", headers=as_a).status_code == 403
    assert client.post(f"/v1/devices/{b.id}/check", json=report(), headers=as_a).status_code == 403
    posted = event(
        client, Device(b.id, a.token), event_id="x", seq=1, type="failed", version=1, installed=None
    )
    assert posted.status_code == 403
    own = client.get(f"/v1/devices/{a.id}/assignment", headers=as_a)
    assert own.status_code == 200 and own.json()["assigned_version"] == 1
    b_state = client.get(f"/v1/devices/{b.id}/assignment", headers=auth("operator")).json()
    assert b_state["failed_versions"] == []  # A's forged failure was not recorded


def test_revoked_token_is_rejected(two_devices) -> None:
    client, a, _ = two_devices
    assert client.post(f"/v1/devices/{a.id}/revoke", headers=auth("operator")).status_code == 403
    assert client.post(f"/v1/devices/{a.id}/revoke", headers=auth("admin")).status_code == 204
    response = client.post(f"/v1/devices/{a.id}/check", json=report(), headers=auth(a.token))
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/v1/rollouts"),
        ("get", "/v1/fleet"),
        ("post", "/v1/rollouts/1/pause"),
        ("post", "/v1/releases"),
        ("put", "/v1/blobs/" + "0" * 64),
        ("post", "/v1/tuf/root"),
    ],
)
def test_devices_and_strangers_cannot_call_role_routes(two_devices, method, path) -> None:
    client, a, _ = two_devices
    as_device = getattr(client, method)(path, headers=auth(a.token))
    assert as_device.status_code == 403
    no_key = getattr(client, method)(path)
    assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
    wrong_key = getattr(client, method)(path, headers=auth("not-a-key-at-all-123"))
    assert wrong_key.status_code == 401


def test_publisher_cannot_run_rollouts_and_operator_cannot_publish(two_devices) -> None:
    client, _, _ = two_devices
    assert client.post("/v1/rollouts/1/pause", headers=auth("publisher")).status_code == 403
    assert (
        client.put("/v1/blobs/" + "0" * 64, content=b"x", headers=auth("operator")).status_code
        == 403
    )


def test_enrollment_needs_the_secret(client) -> None:
    body = {**report(), "enrollment_secret": "wrong-secret"}
    assert client.post("/v1/devices", json=body).status_code == 401
    body["enrollment_secret"] = ENROLLMENT_SECRET
    assert client.post("/v1/devices", json=body).status_code == 201


def test_token_is_stored_only_as_a_hash(client) -> None:
    device = enroll(client)
    with client.app.state.services.db.read() as session:
        stored = session.get(DeviceRow, device.id).token_hash
    assert device.token not in stored and len(stored) == 64


BASE = {
    "database_url": "sqlite:///x.db",
    "storage_dir": "/tmp/x",
    "trusted_root": "root.json",
    "snapshot_key": "s.pem",
    "timestamp_key": "t.pem",
}


def test_settings_refuse_to_start_without_secrets(monkeypatch) -> None:
    for name in ("ADMIN_KEY", "OPERATOR_KEY", "PUBLISHER_KEY", "ENROLLMENT_SECRET"):
        monkeypatch.delenv(f"FEDOTA_OTA_{name}", raising=False)
    with pytest.raises(ValidationError, match="FEDOTA_OTA_ADMIN_KEY"):
        OtaSettings(**BASE)
    with pytest.raises(ValidationError, match="shorter than"):
        OtaSettings(
            **BASE,
            admin_key="short",
            operator_key="o" * 16,
            publisher_key="p" * 16,
            enrollment_secret="e" * 16,
        )
    dev = OtaSettings(**BASE, dev_mode=True)
    assert dev.secret("admin_key").startswith("dev-")
