"""The packager state on disk: round trip, restart, corruption, crash leftovers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from delta_packager import (
    AdapterConfig,
    PackagePolicy,
    PackagerState,
    PackagerStateError,
    RollbackError,
    apply_bundle,
    load_state,
    package_version,
    parse_bundle,
    save_state,
)
from delta_packager.store import STATE_FILE
from tests.delta_packager.packager_helpers import FP_X, random_adapter, same_bits, train_step


def _three_versions(config: AdapterConfig) -> tuple[PackagerState, list[bytes]]:
    rng = np.random.default_rng(0)
    adapter = random_adapter(rng)
    state, bundles = None, []
    for _ in range(3):
        result = package_version(
            adapter, previous=state, base_fingerprint=FP_X, adapter_config=config
        )
        state, adapter = result.state, train_step(rng, adapter)
        bundles.append(result.bundle_bytes)
    assert state is not None
    return state, bundles


def test_state_survives_a_restart_and_continues_the_closed_loop(
    tmp_path: Path, adapter_config: AdapterConfig
) -> None:
    state, bundles = _three_versions(adapter_config)
    save_state(state, tmp_path)
    loaded = load_state(tmp_path)
    assert loaded.latest_version == 3 and loaded.current.release_counter == 3
    assert same_bits(dict(loaded.current.tensors), dict(state.current.tensors))
    # The next release from the reloaded state applies bit-exactly on a device at v3.
    device = None
    for data in bundles:
        device = apply_bundle(device, parse_bundle(data), base_fingerprint=FP_X)
    new = train_step(np.random.default_rng(1), dict(loaded.current.tensors))
    result = package_version(
        new, previous=loaded, base_fingerprint=FP_X, adapter_config=adapter_config
    )
    assert result.bundle.manifest.release_counter == 4
    device = apply_bundle(device, result.bundle, base_fingerprint=FP_X)
    assert same_bits(dict(device.tensors), dict(result.state.current.tensors))
    # B8 across a packager restart: v2 offered again to the v4 device is refused.
    with pytest.raises(RollbackError):
        apply_bundle(device, parse_bundle(bundles[1]), base_fingerprint=FP_X)


def test_saving_replaces_old_files_and_removes_crash_leftovers(
    tmp_path: Path, adapter_config: AdapterConfig
) -> None:
    state, _ = _three_versions(adapter_config)
    (tmp_path / "current-v00000099.safetensors").write_bytes(b"left by a crash")
    save_state(state, tmp_path)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == [
        "current-v00000003.safetensors",
        STATE_FILE,
        "steps/v00000001.safetensors",
        "steps/v00000002.safetensors",
        "steps/v00000003.safetensors",
    ]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("victim", ["steps/v00000002.safetensors", "current-v00000003.safetensors"])
def test_corrupt_state_file_is_detected(
    tmp_path: Path, adapter_config: AdapterConfig, victim: str
) -> None:
    state, _ = _three_versions(adapter_config)
    save_state(state, tmp_path)
    path = tmp_path / victim
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PackagerStateError, match="corrupt"):
        load_state(tmp_path)


def test_state_whose_chain_disagrees_with_its_adapter_is_refused(
    tmp_path: Path, adapter_config: AdapterConfig
) -> None:
    state, _ = _three_versions(adapter_config)
    tampered = PackagerState(
        state.base_fingerprint,
        state.adapter_config,
        state.chain,
        type(state.current)(3, 3, FP_X, {k: v + 1 for k, v in state.current.tensors.items()}),
    )
    save_state(tampered, tmp_path)  # hashes are right, content is inconsistent
    with pytest.raises(PackagerStateError, match="does not reproduce"):
        load_state(tmp_path)


def test_missing_state_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PackagerStateError, match="omit --previous-state"):
        load_state(tmp_path)


def test_chain_limit_prunes_old_steps_on_disk(
    tmp_path: Path, adapter_config: AdapterConfig
) -> None:
    rng = np.random.default_rng(2)
    adapter, state = random_adapter(rng), None
    for _ in range(4):
        state = package_version(
            adapter,
            previous=state,
            base_fingerprint=FP_X,
            adapter_config=adapter_config,
            policy=PackagePolicy(chain_limit=2),
        ).state
        adapter = train_step(rng, adapter)
        save_state(state, tmp_path)
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["v00000004.safetensors"]
    assert load_state(tmp_path).anchor_version == 4
