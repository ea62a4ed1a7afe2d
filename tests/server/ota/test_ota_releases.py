"""Publishing releases and answering update checks (THREATS C12, C14, B11, F25)."""

from __future__ import annotations

import pytest
from securesystemslib.signer import CryptoSigner

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
    publish,
    sign_targets,
)

V5 = Bundle(5, bundle_bytes("v5"))
V6 = Bundle(6, bundle_bytes("v6"))
V6_FROM_5 = Bundle(6, bundle_bytes("d5-6", 900), kind="delta", from_version=5)
V6_B = Bundle(6, bundle_bytes("v6 for base b"), base=FP_B)


def test_release_is_published_and_served_as_tuf_metadata(client, tuf_keys) -> None:
    response = publish(client, tuf_keys, 1, [V5])
    assert response.status_code == 201, response.text
    assert response.json()["version"] == 1
    assert client.get("/tuf/1.root.json").status_code == 200
    assert client.get("/tuf/1.targets.json").json()["signed"]["targets"].keys() == {V5.path}
    snapshot = client.get("/tuf/1.snapshot.json").json()["signed"]
    assert snapshot["meta"]["targets.json"]["version"] == 1
    timestamp = client.get("/tuf/timestamp.json").json()["signed"]
    assert timestamp["meta"]["snapshot.json"]["version"] == 1


def test_release_signed_by_wrong_key_is_rejected(client, tuf_keys) -> None:
    client.put(f"/v1/blobs/{V5.sha256}", content=V5.data, headers=auth("publisher"))
    forged = sign_targets(CryptoSigner.generate_ed25519(), 1, [V5])
    response = client.post(
        "/v1/releases",
        content=forged,
        headers={**auth("publisher"), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert "not signed by the root's targets threshold" in response.json()["detail"]
    assert client.get("/tuf/timestamp.json").status_code == 404


def test_release_version_must_increase(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 2, [V5]).status_code == 201
    again = publish(client, tuf_keys, 2, [V5, V6])
    assert again.status_code == 409
    older = publish(client, tuf_keys, 1, [V5, V6])
    assert older.status_code == 409
    assert client.get("/tuf/3.targets.json").status_code == 404


def test_release_with_missing_or_wrong_bytes_is_rejected(client, tuf_keys) -> None:
    missing = client.post(
        "/v1/releases",
        content=sign_targets(tuf_keys.targets, 1, [V5]),
        headers={**auth("publisher"), "Content-Type": "application/json"},
    )
    assert missing.status_code == 400 and "was not uploaded" in missing.json()["detail"]
    wrong = client.put(
        f"/v1/blobs/{V5.sha256}", content=V5.data[:-1] + b"X", headers=auth("publisher")
    )
    assert wrong.status_code == 400
    assert (
        client.get(f"/tuf/targets/adapters/5/{V5.sha256}.aaaaaaaa-full.fedota").status_code == 404
    )


@pytest.mark.parametrize(
    "custom_edit, message",
    [
        pytest.param({"kind": "patch"}, "kind", id="unknown-kind"),
        pytest.param({"to_version": 7}, "to_version", id="path-version-mismatch"),
        pytest.param({"base_fingerprint": "md5:x"}, "base_fingerprint", id="bad-fingerprint"),
        pytest.param({"format_version": 2}, "format_version", id="future-format"),
        pytest.param({"from_version": 3}, "from_version null", id="full-with-from"),
    ],
)
def test_release_violating_bundle_contract_is_rejected(
    client, tuf_keys, custom_edit, message
) -> None:
    class Edited(Bundle):
        def target_file(self):  # type: ignore[no-untyped-def]
            target = super().target_file()
            target.unrecognized_fields["custom"]["fedota"].update(custom_edit)
            return target

    bad = Edited(5, bundle_bytes("edited"))
    response = publish(client, tuf_keys, 1, [bad])
    assert response.status_code == 400
    assert message in response.json()["detail"]


def test_check_offers_delta_only_from_installed_version_else_full(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V5, V6, V6_FROM_5, V6_B]).status_code == 201
    create_rollout(client, 6, [100])
    on_v5, on_v3, fresh = enroll(client), enroll(client), enroll(client)
    delta = check(client, on_v5, 5)
    assert (delta["kind"], delta["from_version"], delta["to_version"]) == ("delta", 5, 6)
    assert delta["url"] == f"/tuf/targets/adapters/6/{V6_FROM_5.sha256}.aaaaaaaa-delta-5.fedota"
    assert check(client, on_v3, 3)["kind"] == "full"  # C14: never a chain
    assert check(client, fresh, None)["kind"] == "full"
    assert check(client, on_v5, 5, supports_delta=False)["kind"] == "full"
    assert check(client, on_v5, 6) is None  # already there
    assert check(client, on_v5, 9) is None  # never a downgrade


def test_check_never_offers_another_base(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V6]).status_code == 201
    create_rollout(client, 6, [100])
    other = enroll(client, base=FP_B)
    assert check(client, other, None, base=FP_B) is None  # C12: no bundle for base B
    mine = enroll(client)
    update = check(client, mine, None)
    assert update["base_fingerprint"] == FP_A


def test_rollback_is_a_new_higher_release(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V5, V6]).status_code == 201
    create_rollout(client, 6, [100])
    device = enroll(client)
    assert check(client, device, 5)["to_version"] == 6
    old_payload = Bundle(7, V5.data)  # B11: v7 carries v5's adapter
    assert publish(client, tuf_keys, 2, [V5, V6, old_payload]).status_code == 201
    rollback = client.post(
        "/v1/rollouts",
        json={"base_fingerprint": FP_A, "to_version": 5, "stages": [100]},
        headers=auth("operator"),
    )
    assert rollback.status_code == 409  # versions only move forward
    create_rollout(client, 7, [100])
    update = check(client, device, 6)
    assert update["to_version"] == 7 and update["hashes"]["sha256"] == V5.sha256


def test_fallback_report_is_authoritative_and_failed_version_not_reoffered(
    client, tuf_keys
) -> None:
    # F25: device fell back from v6 to v5.
    assert publish(client, tuf_keys, 1, [V5, V6, V6_FROM_5]).status_code == 201
    create_rollout(client, 6, [100], max_failure_rate=1.0)  # never pauses
    device = enroll(client, installed=5)
    assert check(client, device, 5)["to_version"] == 6
    response = event(client, device, event_id="e1", seq=1, type="failed", version=6, installed=5)
    assert response.status_code == 200 and response.json()["stored"] is True
    state = client.get(f"/v1/devices/{device.id}/assignment", headers=auth(device.token)).json()
    assert state["installed_version"] == 5 and state["failed_versions"] == [6]
    assert check(client, device, 5) is None
    cleared = client.delete(f"/v1/devices/{device.id}/failures/6", headers=auth("operator"))
    assert cleared.status_code == 204
    assert check(client, device, 5)["to_version"] == 6
