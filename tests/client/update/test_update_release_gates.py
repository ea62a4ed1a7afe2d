"""Release gates on the device (ADR 0014), against a hostile server.

The fake OTA server here has no privacy policy: it offers whatever the release pipeline
signed, as a compromised or misconfigured server would. The device's own policy, set at
enrollment, must refuse an over-budget release on its *signed* metadata before a payload
byte is fetched, and report why. And every outcome of a health-checked update reports
the golden-prompt loss of the new adapter and of the one it replaces (the quality gate's
input).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from client.update import DeviceState, UpdateRejectedError, UpdateStatus, check_and_update
from delta_packager import Provenance, read_bundle
from delta_packager.verify import target_custom
from protocol import PrivacyPolicy
from tests.client.update.helpers import World, measured_losses
from tests.client.update.update_fakes import posix_name

RECORD_8 = PrivacyPolicy(max_record_epsilon=8.0)


def _with_policy(state: DeviceState, policy: PrivacyPolicy) -> None:
    """What ``Device.enroll(..., privacy_policy=policy)`` persists in ``device.json``."""
    state.write_config(replace(state.read_config(), privacy_policy=policy.to_json()))


def _update(world: World, losses: dict[int, float] | None = None):  # type: ignore[no-untyped-def]
    return check_and_update(
        world.state, checker=measured_losses(losses or {}), retrier=world.retrier()
    )


def _failed_events(world: World) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in world.ota.events.values() if e["type"] == "failed"]


@pytest.mark.parametrize(
    ("policy", "provenance", "message"),
    [
        pytest.param(
            RECORD_8,
            Provenance(record_epsilon=9.1, record_delta=1e-5),
            "release v1 spent record-level ε=9.1 > policy max_record_epsilon=8 of this device",
            id="record-epsilon-over",
        ),
        pytest.param(
            RECORD_8,
            Provenance(epsilon=3.0),  # an ε without a unit bounds nothing
            "release v1 records no record-level ε (unbounded) > policy max_record_epsilon=8",
            id="no-record-epsilon",
        ),
        pytest.param(
            PrivacyPolicy(max_user_epsilon=2.0),
            Provenance(user_epsilon=2.5, user_delta=1e-6),
            "release v1 spent user-level ε=2.5 > policy max_user_epsilon=2 of this device",
            id="user-epsilon-over",
        ),
        pytest.param(
            PrivacyPolicy(max_record_epsilon=8.0, max_delta=1e-6),
            Provenance(record_epsilon=4.0, record_delta=1e-5),
            "release v1 spent record-level δ=1e-05 > policy max_delta=1e-06 of this device",
            id="delta-over",
        ),
    ],
)
def test_hostile_server_cannot_push_past_the_device_budget(
    world: World, policy: PrivacyPolicy, provenance: Provenance, message: str
) -> None:
    _with_policy(world.state, policy)
    rel = world.pipeline.next_version(provenance=provenance)
    world.pipeline.publish(rel)
    world.pipeline.offer(rel)  # the server offers it regardless of any policy
    with pytest.raises(UpdateRejectedError) as info:
        _update(world)
    assert info.value.reason == "privacy_budget"
    assert message in str(info.value) and "nothing was downloaded" in str(info.value)
    assert world.ota.target_gets() == [], "payload fetched before refusing"
    assert world.state.active() is None
    failed = _failed_events(world)
    assert len(failed) == 1 and failed[0]["version"] == 1
    detail = json.loads(failed[0]["detail"])
    assert detail["reason"] == "privacy_budget" and message in detail["why"]


def test_within_the_budget_installs(world: World) -> None:
    _with_policy(world.state, PrivacyPolicy(max_record_epsilon=8.0, max_delta=1e-5))
    rel = world.pipeline.next_version(provenance=Provenance(record_epsilon=7.9, record_delta=1e-5))
    world.pipeline.publish(rel)
    world.pipeline.offer(rel)
    assert _update(world).status == UpdateStatus.UPDATED
    assert world.state.active() is not None and world.state.active().version == 1


def test_without_a_policy_any_signed_release_installs(world: World) -> None:
    rel = world.pipeline.next_version(provenance=Provenance(record_epsilon=50.0))
    world.pipeline.publish(rel)
    world.pipeline.offer(rel)
    assert _update(world).status == UpdateStatus.UPDATED


def test_signed_spend_must_match_the_manifest(world: World) -> None:
    # The pipeline's signed block claims ε=7 while the bundle's manifest records 9.1: the
    # pre-download check passes on the (lying) signed block, and the payload check then
    # refuses the bundle, since its manifest disagrees with what was signed.
    _with_policy(world.state, RECORD_8)
    rel = world.pipeline.next_version(provenance=Provenance(record_epsilon=9.1))
    bundle = read_bundle(world.pipeline.dir / posix_name(rel.path))
    fedota = target_custom(bundle)["fedota"]
    fedota["privacy"] = {"record_epsilon": "7.0"}
    world.pipeline.add_raw_target(rel.path, rel.data, fedota)
    world.pipeline.offer(rel)
    with pytest.raises(UpdateRejectedError) as info:
        _update(world)
    assert info.value.reason == "integrity", str(info.value)
    assert "privacy" in str(info.value)
    assert world.state.active() is None


def test_outcomes_report_the_new_and_the_replaced_quality(world: World) -> None:
    losses = {1: 1.0, 2: 1.02, 3: 1.5}  # measured by the (fake) runtime per version
    v1 = world.pipeline.next_version(loss=1.0)
    world.pipeline.publish(v1)
    world.pipeline.offer(v1)
    assert _update(world, losses).status == UpdateStatus.UPDATED
    first = [e for e in world.ota.events.values() if e["type"] == "installed"]
    assert first[-1]["golden_loss"] == 1.0 and "previous_golden_loss" not in first[-1]

    v2 = world.pipeline.next_version(loss=1.0)
    world.pipeline.publish(v2)
    world.pipeline.offer(v2)
    assert _update(world, losses).status == UpdateStatus.UPDATED
    installed = [e for e in world.ota.events.values() if e["type"] == "installed"]
    assert (installed[-1]["golden_loss"], installed[-1]["previous_golden_loss"]) == (1.02, 1.0)

    v3 = world.pipeline.next_version(loss=1.0)  # its measured 1.5 fails the health check
    world.pipeline.publish(v3)
    world.pipeline.offer(v3)
    assert _update(world, losses).status == UpdateStatus.ROLLED_BACK
    failed = _failed_events(world)[-1]
    assert (failed["version"], failed["golden_loss"], failed["previous_golden_loss"]) == (
        3,
        1.5,
        1.02,
    )
    assert world.state.active_quality() == 1.02  # still v2's, measured when it was committed
