"""The OTA half end to end: real ``fedota serve`` on loopback, real TUF, real bundles,
the real update agent on every simulated phone, the micro NF4 base for health checks.

One full-mode demo run (3 releases + a bad one + its rollback, every fault injected) is
shared by the assertions below; a lightweight run checks that inference is shared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from client.update import GOLDEN_FILE
from delta_packager import AdapterConfig
from simulation.fleet import DEFAULT_TIERS, PLOTS, FaultShares, FleetConfig, RolloutPolicy, Tier
from simulation.ota_rollout import demo_adapter, finish, on_round_end, run_fleet_demo, start_ota

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(micro_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("e2e")
    # Everyone online at every poll, so the bad release's first stage (half of the 11
    # devices on the fleet's base; the server draws the buckets) reports at once. With
    # probability 12/2048 it holds fewer than min_reports=2 devices; the operator then
    # advances to 100% and the threshold trips there (still never installed anywhere).
    tiers = tuple(
        Tier(t.name, t.share, t.budget_bytes, t.bandwidth_bps, 1.0, t.runtime)
        for t in DEFAULT_TIERS
    )
    cfg = FleetConfig(
        devices=12,
        tiers=tiers,
        faults=FaultShares(1 / 12, 1 / 12, 1 / 12, 1 / 12, bad_release_round=2),
        rollout=RolloutPolicy((50, 100), max_failure_rate=0.5, min_reports=2),
        max_polls_per_round=4,
        golden_prompts=2,
        heldout_texts=2,
        seed=1,
    )
    result = run_fleet_demo(out, base_dir=micro_base / "nf4", fleet=cfg, rounds=3)
    return out, result


def test_fleet_invariants_hold(demo: tuple[Path, dict[str, Any]]) -> None:
    _, result = demo
    fleet = result["fleet"]
    assert fleet["devices"] == 12
    assert fleet["mixed_state"] == 0, fleet["mixed_examples"]
    assert fleet["budget_violations"] == 0
    assert fleet["killed_inconsistent_before_restart"] == 0
    assert fleet["other_base_offered"] == 0
    assert fleet["healthy_not_on_latest"] == 0  # every healthy device on the latest good
    assert fleet["healthy_on_latest"] == fleet["healthy_devices"] == 11
    assert fleet["final_versions"] == {"4": 11, "none": 1}  # the other base has nothing
    assert 0 < fleet["bytes_downloaded"] < fleet["bytes_if_full_model"]
    assert fleet["apply_ms_p50"] is not None and fleet["apply_ms_p50"] > 0
    tiers = fleet["tiers"]
    for tier in tiers.values():
        peak = tier["peak_memory_bytes_max"]
        assert peak is None or 0 < peak <= tier["budget_bytes"]
    assert fleet["peak_memory_bytes_max"] == max(
        t["peak_memory_bytes_max"] for t in tiers.values() if t["peak_memory_bytes_max"]
    )


def test_phones_on_both_runtimes_update_and_agree(demo: tuple[Path, dict[str, Any]]) -> None:
    """The default tiers run llama.cpp (low, mid) and NF4 (high) side by side, each
    phone on its own base form, and both take the same releases."""
    _, result = demo
    runtimes = result["fleet"]["runtimes"]
    assert set(runtimes) == {"llamacpp", "nf4"}
    assert {t["runtime"] for t in result["fleet"]["tiers"].values()} == {"llamacpp", "nf4"}
    gguf, nf4 = runtimes["llamacpp"], runtimes["nf4"]
    assert gguf["base_fingerprint"] != nf4["base_fingerprint"]
    for r in (gguf, nf4):
        assert r["devices"] > 0 and r["updates"] > 0 and r["budget_violations"] == 0
        assert r["apply_ms_p50"] > 0 and r["peak_memory_bytes_max"] > 0


def test_the_fleets_gguf_base_evaluates_like_its_nf4_base(
    demo: tuple[Path, dict[str, Any]], micro_base: Path
) -> None:
    """Same adapter, same texts: the llama.cpp phones' Q8_0 export (of the NF4 weights)
    and the NF4 runtime agree on the loss (ADR 0011)."""
    from simulation.fleet import RuntimePool

    out, _ = demo
    (gguf,) = (out / "ota" / "gguf").glob("*-q8_0.gguf")
    config = AdapterConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    adapter = demo_adapter(micro_base / "nf4", config, seed=1, round=3)
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, says the phone"]
    pool = RuntimePool()
    try:
        on_gguf = pool.evaluate(gguf, None, adapter, config, texts)
        on_nf4 = pool.evaluate(micro_base / "nf4", None, adapter, config, texts)
    finally:
        pool.close()
    assert on_gguf.tokens == on_nf4.tokens > 0
    assert on_gguf.loss == pytest.approx(on_nf4.loss, rel=0.02)


def test_faults_have_their_expected_outcomes(demo: tuple[Path, dict[str, Any]]) -> None:
    _, result = demo
    fleet = result["fleet"]
    assert fleet["faults"] == {
        "killed": 1,
        "mirror": 1,
        "other_base": 1,
        "far_behind": 1,
        "none": 8,
    }
    assert fleet["killed_mid_apply"] == 1  # killed once, restarted, consistent
    # The corrupted mirror: its payload misses the signed hash, a transport problem that
    # is retried (ADR 0007), never a failed install; nothing else was refused either.
    retries = fleet["retries"]
    assert set(retries) == {"payload_mismatch"} and retries["payload_mismatch"] >= 1
    assert fleet["rejections"] == {} and fleet["failed"] == 0
    assert fleet["rolled_back"] >= 2  # the bad release's first stage (min_reports=2)
    assert fleet["far_behind_caught_up_with_full"] == 1  # never a chain it cannot apply
    kinds = fleet["updates_by_bundle"]
    assert kinds["delta"] > 0 and kinds["full"] > 0


def test_bad_release_auto_paused_and_rolled_back(demo: tuple[Path, dict[str, Any]]) -> None:
    _, result = demo
    by_version = {r["version"]: r for r in result["rollouts"]}
    assert [r["kind"] for r in result["rollouts"]] == ["good", "bad", "rollback", "good"]
    bad = by_version[2]
    assert bad["auto_paused"] and bad["pause_reason"] == "threshold"
    assert bad["state"] == "cancelled" and bad["stages_reached"] in (1, 2)
    assert bad["rolled_back_by"] == 3 and bad["installed"] == 0 and bad["failed"] >= 2
    rollback = by_version[3]
    assert rollback["golden_loss"] == by_version[1]["golden_loss"]  # same payload as v1
    for version in (1, 3, 4):
        assert by_version[version]["stages_reached"] == 2
        assert not by_version[version]["paused"]
    assert by_version[4]["bundle_bytes"] < by_version[4]["full_bundle_bytes"]  # a delta


def test_devices_hold_exactly_a_released_adapter_on_disk(
    demo: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = demo
    devices = sorted((out / "ota" / "devices").iterdir())
    assert len(devices) == 12
    versions = []
    for d in devices:
        journal = d / "journal.json"
        assert not journal.exists() or json.loads(journal.read_text()) == {"step": "idle"}
        assert json.loads((d / GOLDEN_FILE).read_text())
        active = d / "active.json"
        versions.append(json.loads(active.read_text())["version"] if active.exists() else None)
    assert sorted(v for v in versions if v is not None) == [4] * 11


def test_report_has_plots_and_a_table(demo: tuple[Path, dict[str, Any]]) -> None:
    out, _ = demo
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000
    md = (out / "fleet.md").read_text()
    assert "| mixed_state | 0 |" in md
    assert "| v2 | planted bad release (fault injection) |" in md  # labelled as planted


def test_lightweight_fleet_through_the_on_round_end_callback(
    micro_base: Path, tmp_path: Path
) -> None:
    from server.federation import RoundResult

    nf4 = micro_base / "nf4"
    cfg = FleetConfig(
        devices=12,
        faults=FaultShares(0.0, 0.0, 0.0, 0.0, bad_release_round=None),
        rollout=RolloutPolicy((100,), min_reports=2),
        lightweight=True,
        publish_every=2,
        max_polls_per_round=3,
        golden_prompts=2,
    )
    config = AdapterConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    with start_ota(tmp_path, base_dir=nf4, adapter_config=config, fleet=cfg) as ctx:
        callback = on_round_end(ctx)
        for r in range(0, 5):  # round 0 (baseline) and odd rounds are not published
            adapter = demo_adapter(nf4, config, seed=0, round=r)
            metrics = {"epsilon": 0.5 * r, "heldout-loss": 3.0}
            callback(RoundResult(r, adapter, {"train-loss": 2.0}, metrics))
        parts = finish(ctx)
    assert set(parts) == {"fleet", "rollouts"}
    assert [(r["version"], r["round"]) for r in parts["rollouts"]] == [(1, 2), (2, 4)]
    fleet = parts["fleet"]
    assert fleet["mixed_state"] == 0 and fleet["healthy_not_on_latest"] == 0
    assert fleet["final_versions"] == {"2": 12}
    # 2 releases: one publisher measurement each + at most one per (tier, release).
    assert fleet["inferences"] <= 2 + 2 * 3 < 2 * 12


def test_phones_of_each_rank_get_their_rank_through_the_ota_path(
    micro_base: Path, tmp_path: Path
) -> None:
    """Tiers of several LoRA ranks (ADR 0016): one signed release per round with a
    bundle set per rank, one rollout per rank, and each phone ends on the global
    adapter truncated to its tier's rank, the planted bad release stopped in both."""
    from client.update import DeviceState
    from simulation.fleet import with_lora_ranks

    tiers = tuple(
        Tier(t.name, t.share, t.budget_bytes, t.bandwidth_bps, 1.0, t.runtime)
        for t in DEFAULT_TIERS
    )
    cfg = FleetConfig(
        devices=12,
        tiers=with_lora_ranks(tiers, [2, 4]),
        faults=FaultShares(0.0, 0.0, 0.0, 0.0, bad_release_round=2),
        rollout=RolloutPolicy((50, 100), max_failure_rate=0.5, min_reports=2),
        lightweight=True,
        max_polls_per_round=4,
        golden_prompts=2,
        seed=3,
    )
    result = run_fleet_demo(tmp_path, base_dir=micro_base / "nf4", fleet=cfg, rounds=3)
    fleet = result["fleet"]
    assert {n: t["lora_rank"] for n, t in fleet["tiers"].items()} == {
        "low": 2, "mid": 4, "high": 4,
    }  # fmt: skip
    assert fleet["mixed_state"] == 0, fleet["mixed_examples"]
    assert fleet["healthy_not_on_latest"] == 0 and fleet["final_versions"] == {"4": 12}
    rows = [(r["version"], r["lora_rank"], r["kind"]) for r in result["rollouts"]]
    kinds = ["good", "bad", "rollback", "good"]
    assert rows == [(v, r, kinds[v - 1]) for v in (1, 2, 3, 4) for r in (2, 4)]
    for r in result["rollouts"]:
        if r["kind"] == "bad":
            assert r["state"] == "cancelled" and r["installed"] == 0
            assert r["rolled_back_by"] == 3
        else:
            assert r["stages_reached"] == 2 and not r["paused"] and r["installed"] > 0
    by_rank: dict[int, int] = {}
    for d in sorted((tmp_path / "ota" / "devices").iterdir()):
        state = DeviceState(d)
        rank = state.read_config().lora_rank
        active = state.read_active()
        assert rank in (2, 4) and active is not None and active.version == 4
        shapes = {k.rsplit(".", 2)[-2]: v.shape for k, v in active.tensors.items()}
        assert shapes["lora_A"][0] == rank and shapes["lora_B"][1] == rank
        by_rank[rank] = by_rank.get(rank, 0) + 1
    assert set(by_rank) == {2, 4}
    assert "| v4 (rank 2) | good |" in (tmp_path / "fleet.md").read_text()
