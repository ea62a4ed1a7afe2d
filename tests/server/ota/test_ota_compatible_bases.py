"""A release that names several bases (DESIGN decision 11; THREATS C12, I42): offered,
rolled out and counted for a device on any named base, never for another one — on
SQLite and PostgreSQL, through the cached check and the slow (SQL) assignment path."""

from __future__ import annotations

import pytest

from tests.server.ota.ota_helpers import (
    FP_A,
    FP_B,
    FP_C,
    Bundle,
    auth,
    bundle_bytes,
    check,
    create_rollout,
    enroll,
    event,
    publish,
)

V5 = Bundle(5, bundle_bytes("v5"), also=(FP_C,))
V6 = Bundle(6, bundle_bytes("v6"), also=(FP_C,))
V6_FROM_5 = Bundle(6, bundle_bytes("d5-6", 900), kind="delta", from_version=5, also=(FP_C,))


def _assigned(client, device) -> int | None:  # type: ignore[no-untyped-def]
    response = client.get(f"/v1/devices/{device.id}/assignment", headers=auth(device.token))
    assert response.status_code == 200, response.text
    return response.json()["assigned_version"]


def test_release_is_offered_on_every_named_base_and_no_other(client, tuf_keys) -> None:
    published = publish(client, tuf_keys, 1, [V5, V6, V6_FROM_5])
    assert published.status_code == 201, published.text
    assert {tuple(t["compatible_bases"]) for t in published.json()["targets"]} == {(FP_C,)}
    create_rollout(client, 6, [100])  # named by the primary base
    on_c, on_c_v5 = enroll(client, base=FP_C), enroll(client, base=FP_C, installed=5)
    full = check(client, on_c, None, base=FP_C)
    assert (full["kind"], full["base_fingerprint"]) == ("full", FP_A)
    assert full["compatible_bases"] == [FP_C]
    delta = check(client, on_c_v5, 5, base=FP_C)
    assert (delta["kind"], delta["from_version"]) == ("delta", 5)
    assert _assigned(client, on_c) == 6
    other = enroll(client, base=FP_B)
    assert check(client, other, None, base=FP_B) is None  # C12/I42: B is not named
    assert _assigned(client, other) is None
    assert check(client, enroll(client), None)["to_version"] == 6  # the primary still is


def test_one_base_release_lists_no_compatible_bases(client, tuf_keys) -> None:
    plain = Bundle(6, bundle_bytes("plain v6"))
    assert publish(client, tuf_keys, 1, [plain]).status_code == 201
    create_rollout(client, 6, [100])
    assert check(client, enroll(client), None)["compatible_bases"] == []
    assert check(client, enroll(client, base=FP_C), None, base=FP_C) is None


def test_rollout_may_name_a_compatible_base_and_reaches_the_whole_release(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V5, V6]).status_code == 201
    rollout = create_rollout(client, 6, [100], base=FP_C)
    assert rollout["base_fingerprint"] == FP_C
    assert check(client, enroll(client), None)["to_version"] == 6  # primary's devices too
    assert _assigned(client, enroll(client, base=FP_C)) == 6
    again = client.post(  # one release, one rollout: the primary is in the same group
        "/v1/rollouts",
        json={"base_fingerprint": FP_A, "to_version": 6, "stages": [100]},
        headers=auth("operator"),
    )
    assert again.status_code == 409 and "exists for this base" in again.json()["detail"]
    unnamed = client.post(
        "/v1/rollouts",
        json={"base_fingerprint": FP_B, "to_version": 6, "stages": [100]},
        headers=auth("operator"),
    )
    assert unnamed.status_code == 409 and "no full bundle" in unnamed.json()["detail"]


def test_failures_on_a_compatible_base_pause_the_rollout(client, tuf_keys) -> None:
    assert publish(client, tuf_keys, 1, [V5, V6]).status_code == 201
    rollout = create_rollout(client, 6, [100], max_failure_rate=0.2, min_reports=1)
    device = enroll(client, base=FP_C, installed=5)
    assert check(client, device, 5, base=FP_C)["to_version"] == 6
    response = event(client, device, event_id="f1", seq=1, type="failed", version=6, installed=5)
    assert response.status_code == 200, response.text
    view = client.get(f"/v1/rollouts/{rollout['id']}", headers=auth("operator")).json()
    assert (view["state"], view["pause_reason"]) == ("paused", "threshold")
    assert view["stage_stats"][0]["failed"] == 1


@pytest.mark.parametrize(
    "bases",
    [
        pytest.param([], id="empty-list"),
        pytest.param([FP_C, FP_B], id="unsorted"),
        pytest.param([FP_C, FP_C], id="repeated"),
        pytest.param([FP_A], id="the-primary"),
        pytest.param(["sha256:" + "C" * 64], id="not-a-fingerprint"),
        pytest.param(FP_C, id="not-a-list"),
    ],
)
def test_malformed_compatible_bases_are_refused_at_publish(client, tuf_keys, bases) -> None:
    class Edited(Bundle):
        def target_file(self):  # type: ignore[no-untyped-def]
            target = super().target_file()
            target.unrecognized_fields["custom"]["fedota"]["compatible_bases"] = bases
            return target

    response = publish(client, tuf_keys, 1, [Edited(5, bundle_bytes("edited"))])
    assert response.status_code == 400
    assert "compatible_bases" in response.json()["detail"]
