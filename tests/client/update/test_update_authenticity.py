"""THREATS A1–A7, B8–B10, C12–C14 through the agent (fake server, real TUF + bundles).

Every rejection must leave the active adapter unchanged and stage nothing; the checks
that can run before the payload is fetched must not fetch it.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from client.update import DeviceState, UpdateRejectedError, UpdateRetryError, check_and_update
from delta_packager import build_bundle
from delta_packager.trust import load_signer, load_targets, release, rotate_keys
from tests.client.update.helpers import World, measured_losses
from tests.client.update.update_fakes import (
    Released,
    bomb_bundle,
    forged_signer,
    huge_header_bundle,
    make_base,
)


def run(world: World) -> str:
    return check_and_update(
        world.state, checker=measured_losses({}), retrier=world.retrier()
    ).status


def install_v1(world: World) -> Released:
    v1 = world.pipeline.next_version()
    world.pipeline.publish(v1)
    world.pipeline.offer(v1)
    assert run(world) == "updated"
    return v1


def assert_rejected(world: World, reason: str, *, fetched: bool | None = None) -> None:
    before = world.state.active()
    inactive = world.state.slot_dir(world.state.inactive_slot()) / "slot.json"
    inactive_before = inactive.read_bytes() if inactive.exists() else None
    gets_before = len(world.ota.target_gets())
    with pytest.raises(UpdateRejectedError) as info:
        run(world)
    assert info.value.reason == reason, str(info.value)
    assert world.state.active() == before
    inactive_after = inactive.read_bytes() if inactive.exists() else None
    assert inactive_after == inactive_before, "something was staged"
    if fetched is False:
        assert len(world.ota.target_gets()) == gets_before, "payload fetched before refusing"
    failed = [e for e in world.ota.events.values() if e["type"] == "failed"]
    assert failed and reason in failed[-1]["detail"]


def assert_retried_then_installed(world: World, version: Released) -> None:
    """A payload that is not the signed one is a transport problem (ADR 0007): nothing is
    staged, the server hears ``retry`` (not ``failed``), and once the mirror serves the
    right bytes again the same release installs."""
    before = world.state.active()
    inactive = world.state.slot_dir(world.state.inactive_slot()) / "slot.json"
    inactive_before = inactive.read_bytes() if inactive.exists() else None
    with pytest.raises(UpdateRetryError) as info:
        run(world)
    assert info.value.reason == "payload_mismatch", str(info.value)
    assert world.state.active() == before
    assert (inactive.read_bytes() if inactive.exists() else None) == inactive_before
    assert not list(world.state.downloads_dir.glob("*")), "the bad payload was kept"
    last = list(world.ota.events.values())[-1]
    assert last["type"] == "retry" and "payload_mismatch" in last["detail"]
    assert not [e for e in world.ota.events.values() if e["type"] == "failed"]
    world.ota.files[world.pipeline.target_url_path(version)] = version.data  # mirror repaired
    assert run(world) == "updated"
    active = world.state.active()
    assert active is not None and active.version == version.version


def fedota_custom(world: World, *, to_version: int, size: int) -> dict[str, object]:
    return {
        "format_version": 1,
        "kind": "full",
        "from_version": None,
        "to_version": to_version,
        "release_counter": to_version,
        "base_fingerprint": world.pipeline.fp,
        "uncompressed_bytes": size,
    }


def test_a1_flipped_byte_is_rejected_before_staging(world: World) -> None:
    install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    url = world.pipeline.target_url_path(v2)
    data = bytearray(world.ota.files[url])
    data[len(data) // 2] ^= 0x01
    world.ota.files[url] = bytes(data)
    world.pipeline.offer(v2)
    assert_retried_then_installed(world, v2)


def test_a1_truncated_payload_is_a_retry_not_a_failure(world: World) -> None:
    install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    url = world.pipeline.target_url_path(v2)
    world.ota.files[url] = world.ota.files[url][:-100]
    world.pipeline.offer(v2)
    assert_retried_then_installed(world, v2)


def test_a2_edited_signed_metadata_is_rejected(world: World) -> None:
    install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    targets = json.loads((world.pipeline.keys / "metadata/targets.json").read_bytes())
    targets["signed"]["targets"][v2.path]["custom"]["fedota"]["release_counter"] = 99
    world.pipeline.serve_metadata(targets_bytes=json.dumps(targets).encode())
    world.pipeline.offer(v2)
    assert_rejected(world, "untrusted_metadata", fetched=False)


def test_a2_edited_bundle_manifest_under_old_signature_is_rejected(world: World) -> None:
    install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    other = world.pipeline.next_version()  # a genuine bundle whose manifest says v3
    world.ota.files[world.pipeline.target_url_path(v2)] = other.data
    world.pipeline.offer(v2)
    assert_retried_then_installed(world, v2)


@pytest.mark.parametrize("how", ["unknown_key", "expired", "unsigned_target"])
def test_a3_unsigned_unknown_key_or_expired_is_rejected(world: World, how: str) -> None:
    install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    reason = "untrusted_metadata"
    if how == "unknown_key":
        targets = load_targets(world.pipeline.keys)
        targets.signatures.clear()
        targets.sign(forged_signer())
        world.pipeline.serve_metadata(targets_bytes=targets.to_bytes())
    elif how == "expired":
        targets = load_targets(world.pipeline.keys)
        targets.signed.expires = targets.signed.expires - timedelta(days=400)
        targets.signatures.clear()
        targets.sign(load_signer(world.pipeline.keys / "private/targets.pem"))
        world.pipeline.serve_metadata(targets_bytes=targets.to_bytes())
        reason = "stale_metadata"
    else:
        reason = "unsigned_target"
        world.pipeline.offer(v2, path="adapters/2/not-signed.fedota")
        return assert_rejected(world, reason, fetched=False)
    world.pipeline.offer(v2)
    assert_rejected(world, reason, fetched=False)


def test_a4_metadata_of_one_release_with_payload_of_another(world: World) -> None:
    v1 = install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    world.ota.files[world.pipeline.target_url_path(v2)] = v1.data
    world.pipeline.offer(v2)
    assert_retried_then_installed(world, v2)


def test_a5_server_streaming_past_the_signed_length_is_cut_off(world: World) -> None:
    install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    world.pipeline.offer(v2)
    world.ota.faults.extra_bytes = 1_000_000
    assert run(world) == "updated"  # stopped at the signed length, so the hash matched
    assert world.state.active() is not None


@pytest.mark.parametrize(
    ("payload", "size", "reason"),
    [
        pytest.param(huge_header_bundle(), 10, "malformed_bundle", id="a6-huge-header"),
        pytest.param(bomb_bundle(8 * 2**20), 4096, "integrity", id="a7-zstd-bomb"),
    ],
)
def test_a6_a7_hostile_but_signed_payloads_fail_cleanly(
    world: World, payload: bytes, size: int, reason: str
) -> None:
    install_v1(world)
    world.pipeline.add_raw_target(
        "adapters/5/evil.fedota", payload, fedota_custom(world, to_version=5, size=size)
    )
    world.ota.offer = {"path": "adapters/5/evil.fedota", "to_version": 5}
    assert_rejected(world, reason)


def test_b8_older_release_is_a_rollback_and_the_counter_survives_restart(world: World) -> None:
    v1 = install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    world.pipeline.offer(v2)
    assert run(world) == "updated"
    world.pipeline.offer(v1)
    assert_rejected(world, "rollback", fetched=False)
    # "Restart" with the adapter slots and pointer lost: the persisted floor still holds.
    for name in ("active.json",):
        (world.state.root / name).unlink()
    world.state = DeviceState(Path(world.state.root))
    assert world.state.release_floor() == 2
    assert_rejected(world, "rollback", fetched=False)


def test_b9_expired_timestamp_installs_nothing(world: World) -> None:
    install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2, expires_in=timedelta(hours=-1))
    world.pipeline.offer(v2)
    assert_rejected(world, "stale_metadata", fetched=False)


def test_b10_rotation_signed_by_old_and_new_is_followed(world: World) -> None:
    install_v1(world)
    rotate_keys(world.pipeline.keys, "targets")  # root v2, signed by the root keys
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)  # targets signed by the new key only
    world.pipeline.offer(v2)
    assert run(world) == "updated"
    assert json.loads((world.state.tuf_dir / "root.json").read_bytes())["signed"]["version"] == 2


def test_b10_root_signed_only_by_a_new_key_is_refused(world: World) -> None:
    install_v1(world)
    root = json.loads((world.pipeline.keys / "root.json").read_bytes())
    from tuf.api.metadata import Metadata

    forged = Metadata.from_dict(root)
    forged.signed.version = 2
    forged.signatures.clear()
    forged.sign(forged_signer())
    world.ota.files["/tuf/2.root.json"] = forged.to_bytes()
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    world.ota.files["/tuf/2.root.json"] = forged.to_bytes()
    world.pipeline.offer(v2)
    assert_rejected(world, "untrusted_metadata", fetched=False)


def test_b10_threshold_raised_then_one_signature_is_not_enough(world: World) -> None:
    install_v1(world)
    rotate_keys(world.pipeline.keys, "targets", threshold=2)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    targets = load_targets(world.pipeline.keys)
    assert len(targets.signatures) == 2
    one = dict(list(targets.signatures.items())[:1])
    targets.signatures.clear()
    targets.signatures.update(one)
    world.pipeline.serve_metadata(targets_bytes=targets.to_bytes())
    world.pipeline.offer(v2)
    assert_rejected(world, "untrusted_metadata", fetched=False)
    world.pipeline.serve_metadata()  # both signatures: accepted
    assert run(world) == "updated"


@pytest.mark.parametrize("change", ["c12-other-weights", "c13-other-quant-config"])
def test_c12_c13_bundle_for_another_base_is_refused_before_download(
    world: World, change: str
) -> None:
    install_v1(world)
    v2 = world.pipeline.next_version()
    world.pipeline.publish(v2)
    if change == "c12-other-weights":
        make_base(world.base_dir, seed=1)
    else:
        make_base(world.base_dir, quant_type="fp4")
    world.pipeline.offer(v2)
    assert_rejected(world, "base_mismatch", fetched=False)


def test_c14_delta_from_another_version_refused_and_full_bundle_installs(world: World) -> None:
    pipeline = world.pipeline
    v1 = pipeline.next_version()
    v2 = pipeline.next_version()
    v3 = pipeline.next_version()
    pipeline.publish(v1, v2, v3)
    pipeline.offer(v3)  # a delta 2 -> 3; this device holds nothing
    assert_rejected(world, "chain_mismatch", fetched=False)
    assert pipeline.state is not None
    full = build_bundle(pipeline.state, from_version=None)
    (pipeline.dir / "adapter-v3-full.fedota").write_bytes(full)
    release([pipeline.dir / "adapter-v3-full.fedota"], pipeline.keys)
    pipeline.released[30] = Released(3, "adapters/3/adapter-v3-full.fedota", full, v3.tensors)
    pipeline.serve_metadata()
    world.ota.offer = {"path": "adapters/3/adapter-v3-full.fedota", "to_version": 3}
    assert run(world) == "updated"
    active = world.state.read_active()
    assert active is not None and active.version == 3
    assert all((active.tensors[k] == v).all() for k, v in v3.tensors.items())
