"""Fleet building blocks without a server: config validation, profiles, faults, consistency."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from client.update import ActivePointer, DeviceState
from delta_packager import AdapterState, fingerprint_checkpoint
from simulation import SimulationInputError
from simulation.fleet import FaultShares, FleetConfig, RolloutPolicy, Tier, corrupt_adapter
from simulation.fleet.device import consistency
from simulation.fleet.faults import KILL_STEPS, CorruptingMirror, KillAt, Killed
from simulation.fleet.faults import other_base as make_other_base
from simulation.fleet.fleet import draw_profiles
from simulation.fleet.runtimes import adapter_digest


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: Tier("x", 0.0, 1, 1.0, 0.5), id="tier-share-zero"),
        pytest.param(lambda: Tier("x", 1.0, 1, 1.0, 1.5), id="tier-availability"),
        pytest.param(lambda: FaultShares(0.5, 0.5, 0.0, 0.0), id="faults-sum"),
        pytest.param(lambda: FaultShares(bad_release_round=0), id="bad-round-zero"),
        pytest.param(lambda: RolloutPolicy((10, 50)), id="stages-not-100"),
        pytest.param(lambda: RolloutPolicy((50, 10, 100)), id="stages-decreasing"),
        pytest.param(lambda: FleetConfig(devices=0), id="no-devices"),
        pytest.param(
            lambda: FleetConfig(tiers=(Tier("a", 1, 1, 1, 1), Tier("a", 1, 1, 1, 1))),
            id="duplicate-tier",
        ),
    ],
)
def test_invalid_config_is_refused(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SimulationInputError):
        build()


def test_profiles_are_deterministic_disjoint_and_cover_every_fault() -> None:
    cfg = FleetConfig(devices=40, faults=FaultShares(0.05, 0.05, 0.05, 0.05), seed=3)
    a, b = draw_profiles(cfg), draw_profiles(cfg)
    assert a == b
    faults = [p.fault for p in a]
    for name in ("killed", "mirror", "other_base", "far_behind"):
        assert faults.count(name) == 2, name  # 5% of 40, one fault per device
    assert faults.count("none") == 32
    assert {p.kill_step for p in a if p.fault == "killed"} <= set(KILL_STEPS)
    assert all(p.kill_step is None for p in a if p.fault != "killed")
    assert {p.tier.name for p in a} == {"low", "mid", "high"}
    small = draw_profiles(FleetConfig(devices=3, faults=FaultShares(0.1, 0.1, 0.1, 0.1)))
    assert [p.fault for p in small].count("none") >= 1  # never a fleet of faults only


def test_reports_needed_scales_with_the_first_stage() -> None:
    assert RolloutPolicy((10, 100)).reports_needed(40) == 2
    assert RolloutPolicy((10, 100)).reports_needed(10_000) == 250
    assert RolloutPolicy((10, 100), min_reports=7).reports_needed(10_000) == 7


def test_auto_stages_give_the_first_stage_about_eight_phones() -> None:
    from simulation.fleet import auto_stages

    assert auto_stages(16) == (50, 100)
    assert auto_stages(24) == (33, 50, 100)
    assert auto_stages(10_000) == (10, 50, 100)
    for n in (1, 5, 16, 24, 48, 80, 100, 1000):
        stages = auto_stages(n)
        RolloutPolicy(stages)  # valid
        assert n * stages[0] / 100 >= min(7.5, n / 2)  # about 8, half of a small fleet


def test_corrupting_mirror_flips_one_byte_of_bundles_only() -> None:
    payload = bytes(range(256)) * 4

    def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload)

    mirror = CorruptingMirror(httpx.MockTransport(serve))
    with httpx.Client(transport=mirror, base_url="http://127.0.0.1") as http:
        bundle = http.get("/tuf/targets/adapters/1/abc.v1-full.fedota").content
        meta = http.get("/tuf/2.targets.json").content
        mirror.active = False
        clean = http.get("/tuf/targets/adapters/1/abc.v1-full.fedota").content
    assert meta == payload and clean == payload
    assert len(bundle) == len(payload)
    assert sum(x != y for x, y in zip(bundle, payload, strict=True)) == 1
    assert mirror.corrupted == 1


def test_kill_at_fires_once_at_its_step() -> None:
    hook = KillAt("swap_pointer")
    hook("stage")
    with pytest.raises(Killed) as info:
        hook("swap_pointer")
    assert info.value.step == "swap_pointer"
    hook("swap_pointer")  # the restarted run passes


def test_other_base_has_another_fingerprint_and_same_weights(
    micro_base: Path, tmp_path: Path
) -> None:
    nf4 = micro_base / "nf4"
    alt = make_other_base(nf4, tmp_path / "alt")
    assert fingerprint_checkpoint(alt) != fingerprint_checkpoint(nf4)
    weights = sorted(p.name for p in nf4.glob("*.safetensors"))
    assert weights and all((alt / w).read_bytes() == (nf4 / w).read_bytes() for w in weights)
    assert make_other_base(nf4, tmp_path / "alt") == alt  # reused


def test_corrupt_adapter_changes_only_b() -> None:
    rng = np.random.default_rng(0)
    good = {
        "m.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32),
        "m.lora_B.weight": rng.normal(size=(8, 4)).astype(np.float32) * 1e-3,
    }
    bad = corrupt_adapter(good, seed=1)
    np.testing.assert_array_equal(bad["m.lora_A.weight"], good["m.lora_A.weight"])
    assert np.abs(bad["m.lora_B.weight"]).mean() > 100 * np.abs(good["m.lora_B.weight"]).mean()
    assert adapter_digest(bad) != adapter_digest(good)


def test_consistency_detects_a_slot_that_is_not_a_released_adapter(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "dev")
    tensors = {"m.lora_A.weight": np.ones((2, 3), np.float32)}
    fp = "sha256:" + "0" * 64
    state.write_slot("a", AdapterState(1, 1, fp, tensors))
    state.set_active(ActivePointer("a", 1, 1))
    digests = {1: adapter_digest(tensors)}
    assert consistency(state, digests) is None
    assert consistency(state, {1: "0" * 64}) is not None  # not bit-identical to v1
    state.set_active(ActivePointer("a", 2, 2))
    assert "pointer says v2" in str(consistency(state, {**digests, 2: "x"}))
    state.write_journal({"step": "staged"})
    assert "journal" in str(consistency(state, digests))
    assert consistency(DeviceState(tmp_path / "fresh"), digests) is None  # no adapter
