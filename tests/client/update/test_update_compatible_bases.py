"""A release that names every base it applies to, on a device running a GGUF export
(DESIGN decision 11; THREATS C12, I42): installed where the release names the device's
base, refused before download where it does not — even when a server offers it.

The last test runs the real OTA server in process (``server.ota`` behind FastAPI's
TestClient) with real bundles, TUF keys and the agent: the whole path from
``package_version(compatible_bases=...)`` to an install on the GGUF device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from client.update import DeviceConfig, DeviceState, Retrier, UpdateRejectedError, check_and_update
from delta_packager import parse_bundle
from delta_packager.trust import release
from server.ota import OtaSettings, create_app, make_engine, upgrade
from tests.client.update.helpers import FakeClock, World, measured_losses
from tests.client.update.update_fakes import (
    FakeOta,
    Pipeline,
    enroll_device,
    make_base,
    make_gguf_base,
)


def gguf_world(tmp_path: Path, *, named: bool) -> Iterator[World]:
    """The release names the NF4 base and GGUF export A; the device runs A, or an
    export B the release does not name (``named=False``)."""
    ota = FakeOta()
    nf4_fp = make_base(tmp_path / "nf4")
    gguf_a = make_gguf_base(tmp_path / "base-a.gguf", seed=1)
    pipeline = Pipeline(tmp_path, ota, nf4_fp, compatible_bases=(gguf_a,))
    device_base = tmp_path / ("base-a.gguf" if named else "base-b.gguf")
    fp = gguf_a if named else make_gguf_base(device_base, seed=2)
    state = enroll_device(tmp_path / "device", ota, pipeline.keys, device_base, fp)
    try:
        yield World(ota, pipeline, state, FakeClock(), device_base)
    finally:
        ota.close()


@pytest.fixture
def on_named_gguf(tmp_path: Path) -> Iterator[World]:
    yield from gguf_world(tmp_path, named=True)


@pytest.fixture
def on_other_gguf(tmp_path: Path) -> Iterator[World]:
    yield from gguf_world(tmp_path, named=False)


def run(world: World) -> str:
    return check_and_update(
        world.state, checker=measured_losses({}), retrier=world.retrier()
    ).status


def test_gguf_device_named_by_the_release_installs_full_then_delta(on_named_gguf: World) -> None:
    world, pipeline = on_named_gguf, on_named_gguf.pipeline
    fp_a = world.state.read_config().base_fingerprint
    for _ in range(2):
        rel = pipeline.next_version()
        pipeline.publish(rel)
        pipeline.offer(rel)
        assert run(world) == "updated"
        active = world.state.read_active()
        assert active is not None and active.version == rel.version
        assert active.base_fingerprint == fp_a  # bound to the device's own base
        for name, arr in rel.tensors.items():  # closed loop holds on the GGUF base too
            np.testing.assert_array_equal(active.tensors[name], arr)
    installed = [e["version"] for e in world.ota.events.values() if e["type"] == "installed"]
    assert sorted(installed) == [1, 2]


def test_gguf_device_not_named_refuses_a_forced_offer_before_download(
    on_other_gguf: World,
) -> None:
    """C12/I42: a hostile server offers a release for {NF4, A} to a device on B."""
    world, pipeline = on_other_gguf, on_other_gguf.pipeline
    rel = pipeline.next_version()
    pipeline.publish(rel)
    pipeline.offer(rel)
    with pytest.raises(UpdateRejectedError) as info:
        run(world)
    assert info.value.reason == "base_mismatch"
    assert f"this device holds {world.state.read_config().base_fingerprint}" in str(info.value)
    assert world.state.active() is None and not world.ota.target_gets()
    failed = [e for e in world.ota.events.values() if e["type"] == "failed"]
    assert failed and "base_mismatch" in failed[-1]["detail"]


def test_signed_metadata_naming_a_base_the_manifest_does_not_is_refused(
    on_other_gguf: World,
) -> None:
    # A pipeline bug: the signed target claims base B, the bundle's manifest does not.
    # The device trusts the manifest (A4): nothing is staged.
    world, pipeline = on_other_gguf, on_other_gguf.pipeline
    rel = pipeline.next_version()
    fp_b = world.state.read_config().base_fingerprint
    custom = {
        "format_version": 1,
        "kind": "full",
        "from_version": None,
        "to_version": 1,
        "release_counter": 1,
        "base_fingerprint": pipeline.fp,
        "uncompressed_bytes": parse_bundle(rel.data).manifest.uncompressed_bytes,
        "compatible_bases": sorted([*pipeline.compatible_bases, fp_b]),
    }
    pipeline.add_raw_target(rel.path, rel.data, custom)
    pipeline.offer(rel)
    with pytest.raises(UpdateRejectedError) as info:
        run(world)
    assert info.value.reason == "integrity" and "compatible_bases" in str(info.value)
    assert world.state.active() is None


# ---------------------------------------------------------------- the real server


def test_real_server_offers_a_release_to_the_gguf_base_it_names(tmp_path: Path) -> None:
    nf4_fp = make_base(tmp_path / "nf4")
    fp_a = make_gguf_base(tmp_path / "a.gguf", seed=1)
    fp_b = make_gguf_base(tmp_path / "b.gguf", seed=2)
    pipeline = Pipeline(tmp_path, FakeOta(), nf4_fp, compatible_bases=(fp_a,))
    pipeline.ota.close()  # only its packaging and offline keys are used here
    keys = pipeline.keys
    url = f"sqlite:///{tmp_path / 'ota.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    roles = {role: f"{role}-key-0123456789abcdef" for role in ("admin", "operator", "publisher")}
    settings = OtaSettings(
        database_url=url,
        storage_dir=tmp_path / "storage",
        trusted_root=keys / "root.json",
        snapshot_key=keys / "private/snapshot.pem",
        timestamp_key=keys / "private/timestamp.pem",
        enrollment_secret=SecretStr("enroll-secret-0123456789"),
        **{f"{role}_key": SecretStr(key) for role, key in roles.items()},  # type: ignore[arg-type]
    )
    rel = pipeline.next_version()
    bundle = pipeline.dir / rel.path.rsplit("/", 1)[1]
    release([bundle], keys)
    with TestClient(create_app(settings), base_url="http://testserver") as http:
        publisher = {"Authorization": f"Bearer {roles['publisher']}"}
        sha = hashlib.sha256(rel.data).hexdigest()
        assert http.put(f"/v1/blobs/{sha}", content=rel.data, headers=publisher).is_success
        published = http.post(
            "/v1/releases",
            content=(keys / "metadata/targets.json").read_bytes(),
            headers={**publisher, "Content-Type": "application/json"},
        )
        assert published.status_code == 201, published.text
        assert published.json()["targets"][0]["compatible_bases"] == [fp_a]
        rollout = http.post(  # one rollout, named by the primary (NF4) base
            "/v1/rollouts",
            json={"base_fingerprint": nf4_fp, "to_version": 1, "stages": [100]},
            headers={"Authorization": f"Bearer {roles['operator']}"},
        )
        assert rollout.status_code == 201, rollout.text
        outcomes = {}
        for name, fp in (("a", fp_a), ("b", fp_b)):
            enrolled = http.post(
                "/v1/devices",
                json={
                    "base_fingerprint": fp,
                    "memory_budget_bytes": 512 * 2**20,
                    "enrollment_secret": "enroll-secret-0123456789",
                },
            ).json()
            state = DeviceState(tmp_path / f"device-{name}")
            state.tuf_dir.mkdir(parents=True)
            (state.tuf_dir / "root.json").write_bytes((keys / "1.root.json").read_bytes())
            state.write_config(
                DeviceConfig(
                    "http://testserver",
                    enrolled["device_id"],
                    enrolled["token"],
                    str(tmp_path / f"{name}.gguf"),
                    fp,
                    512 * 2**20,
                )
            )
            outcome = check_and_update(
                state,
                checker=measured_losses({}),
                http=http,  # type: ignore[arg-type]
                retrier=Retrier(),
            )
            outcomes[name] = (outcome.status, outcome.version, state.read_active())
    status, version, active = outcomes["a"]
    assert (status, version) == ("updated", 1)
    assert active is not None and active.base_fingerprint == fp_a
    assert all(np.array_equal(active.tensors[k], v) for k, v in rel.tensors.items())
    assert outcomes["b"] == ("no_update", None, None)  # C12/I42: B is never offered it
