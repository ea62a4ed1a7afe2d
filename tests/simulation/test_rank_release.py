"""OTA bundles per LoRA rank (ADR 0016): one signed release per round holds a bundle set
for every rank present in the fleet, each naming its rank target, and a phone of rank
``r`` is offered, verifies and applies the global adapter truncated to ``r`` only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from delta_packager import (
    AdapterConfig,
    BaseMismatchError,
    PackagerInputError,
    apply_bundle,
    rank_target,
    read_bundle,
)
from delta_packager.trust import init_keys
from protocol import truncate_to_rank
from simulation.fleet.config import RolloutPolicy
from simulation.fleet.rank_release import RankedPublisher

FP = "sha256:" + "a" * 64
FP_GGUF = "sha256:" + "b" * 64
R = 8


class FakeOperator:
    def __init__(self) -> None:
        self.published: list[list[Path]] = []
        self.rollouts: list[tuple[int, str]] = []

    def publish(self, bundles: list[Path], targets: Path) -> dict[str, Any]:
        self.published.append(list(bundles))
        self.targets = json.loads(targets.read_text())
        return {}

    def create_rollout(self, version: int, base: str, **policy: Any) -> dict[str, Any]:
        self.rollouts.append((version, base))
        return {"id": len(self.rollouts)}


class FakePool:
    def __init__(self) -> None:
        self.configs: list[Any] = []

    def evaluate(self, base_dir: Path, budget: Any, adapter: Any, config: Any, texts: Any) -> Any:
        self.configs.append((config.rank, config.alpha, {k: v.shape for k, v in adapter.items()}))

        class Result:
            loss = 1.5

        return Result()


def _global(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "m.layers.0.q_proj.lora_A.weight": rng.normal(0, 0.1, (R, 16)).astype(np.float32),
        "m.layers.0.q_proj.lora_B.weight": rng.normal(0, 0.1, (12, R)).astype(np.float32),
    }


@pytest.fixture
def publisher(tmp_path: Path) -> tuple[RankedPublisher, FakeOperator, FakePool]:
    keys = tmp_path / "keys"
    init_keys(keys)
    operator, pool = FakeOperator(), FakePool()
    pub = RankedPublisher(
        ranks=[4, 2, 8, 4],
        work_dir=tmp_path / "work",
        keys_dir=keys,
        operator=operator,  # type: ignore[arg-type]
        base_dir=tmp_path,
        base_fingerprint=FP,
        adapter_config=AdapterConfig(rank=R, alpha=16.0, target_modules=("q_proj",)),
        golden_texts=["a golden prompt"],
        pool=pool,  # type: ignore[arg-type]
        rollout=RolloutPolicy(),
        min_reports=1,
        compatible_bases=[FP_GGUF],
    )
    return pub, operator, pool


def test_rank_targets_are_distinct_fingerprints_of_base_and_rank() -> None:
    targets = {rank_target(fp, r) for fp in (FP, FP_GGUF) for r in (2, 4, 8)}
    assert len(targets) == 6 and all(t.startswith("sha256:") and len(t) == 71 for t in targets)
    assert rank_target(FP, 4) == rank_target(FP, 4) != FP
    with pytest.raises(PackagerInputError, match="a rank target needs"):
        rank_target("not-a-fingerprint", 4)
    with pytest.raises(PackagerInputError, match="a rank target needs"):
        rank_target(FP, 0)


def test_one_signed_release_per_round_holds_a_bundle_set_per_rank(
    publisher: tuple[RankedPublisher, FakeOperator, FakePool],
) -> None:
    pub, operator, pool = publisher
    assert pub.targets() == {r: rank_target(FP, r) for r in (2, 4, 8)}
    for round_ in (1, 2):
        glob = _global(round_)
        top = pub.release(glob, round=round_)
        releases = top.by_rank
        assert sorted(releases) == [2, 4, 8] and top is not releases[8]
        assert (top.version, top.lora_rank, top.rollout_id) == (round_, 8, releases[8].rollout_id)
        assert top.rollout_ids == tuple(releases[r].rollout_id for r in (2, 4, 8))
        assert {rel.version for rel in releases.values()} == {round_}
        assert {r: rel.lora_rank for r, rel in releases.items()} == {2: 2, 4: 4, 8: 8}
        assert len(operator.published) == round_  # one publish (one release) per round
        paths = operator.published[-1]
        assert len({p.name for p in paths}) == len(paths)  # names never collide
        for r, rel in releases.items():
            full = next(p for p in paths if p.name == f"v{round_}-r{r}-full.fedota")
            bundle = read_bundle(full)
            m = bundle.manifest
            assert m.base_fingerprint == rank_target(FP, r)
            assert m.compatible_bases == (rank_target(FP_GGUF, r),)
            assert (m.adapter_config.rank, m.adapter_config.alpha) == (r, 16.0 * r / R)
            state = apply_bundle(None, bundle, base_fingerprint=rank_target(FP, r))
            want = truncate_to_rank(glob, r)
            assert {k: v.shape for k, v in state.tensors.items()} == {
                k: v.shape for k, v in want.items()
            }
            for k, v in want.items():
                np.testing.assert_allclose(state.tensors[k], v, atol=2e-3)
            # The signed TUF target names the rank target too (what the server indexes).
            tpath = f"adapters/{round_}/{full.name}"
            custom = operator.targets["signed"]["targets"][tpath]["custom"]["fedota"]
            assert custom["base_fingerprint"] == rank_target(FP, r)
            # A phone of another rank, or one that declares no rank, cannot apply it.
            for other in (FP, rank_target(FP, 2 if r != 2 else 4)):
                with pytest.raises(BaseMismatchError):
                    apply_bundle(None, bundle, base_fingerprint=other)
            if round_ == 2:  # closed-loop deltas per rank, against what its phones hold
                delta = next(p for p in paths if p.name == f"v2-r{r}-from1.fedota")
                assert read_bundle(delta).manifest.base_fingerprint == rank_target(FP, r)
            assert rel.golden_loss == 1.5
    assert sorted(operator.rollouts) == sorted(
        (v, rank_target(FP, r)) for v in (1, 2) for r in (2, 4, 8)
    )
    assert sorted({(c[0], c[1]) for c in pool.configs}) == [(2, 4.0), (4, 8.0), (8, 16.0)]


def test_bad_release_and_rollback_go_out_for_every_rank(
    publisher: tuple[RankedPublisher, FakeOperator, FakePool],
) -> None:
    from simulation.fleet import ReleaseRole

    pub, operator, _ = publisher
    good = pub.release(_global(1), round=1)
    bad = pub.release(_global(99), round=2, kind=ReleaseRole.BAD)
    assert bad.kind == ReleaseRole.BAD and {r.kind for r in bad.ranks} == {ReleaseRole.BAD}
    back = pub.rollback(round=2)
    assert back.version == 3 and {r.kind for r in back.ranks} == {ReleaseRole.ROLLBACK}
    assert pub.last_good is back and [r.version for r in pub.releases] == [1, 2, 3]
    for r in (2, 4, 8):  # each rank re-releases its own good adapter, bit for bit
        assert back.by_rank[r].digest == good.by_rank[r].digest != bad.by_rank[r].digest
        assert pub.publishers[r].digests[3] == good.by_rank[r].digest
    assert pub.digests is pub.publishers[8].digests and pub.full_sizes[3] > 0
    assert len(operator.published) == 3 and len(operator.rollouts) == 9


def test_fleet_ranks_above_the_global_rank_are_refused(tmp_path: Path) -> None:
    from simulation.errors import SimulationInputError

    with pytest.raises(SimulationInputError, match="must be 1..8"):
        RankedPublisher(
            ranks=[16], work_dir=tmp_path, keys_dir=tmp_path, operator=None,  # type: ignore[arg-type]
            base_dir=tmp_path, base_fingerprint=FP, adapter_config=AdapterConfig(rank=R),
            golden_texts=[], pool=None, rollout=RolloutPolicy(), min_reports=1,  # type: ignore[arg-type]
        )  # fmt: skip


def test_a_device_of_a_rank_asks_for_its_rank_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.update.agent as agent
    from client.update import DeviceConfig

    monkeypatch.setattr(agent, "fingerprint_base", lambda path: FP)
    config = DeviceConfig(
        server_url="http://x", device_id="d", token="t", base_dir=str(tmp_path),
        base_fingerprint=rank_target(FP, 4), memory_budget_bytes=1 << 26, lora_rank=4,
    )  # fmt: skip
    assert agent._current_base(config).base_fingerprint == rank_target(FP, 4)
    plain = DeviceConfig(**{**config.to_dict(), "lora_rank": None, "base_fingerprint": FP})
    assert agent._current_base(plain).base_fingerprint == FP
    # device.json written before ranks existed still loads (the field defaults to None)
    old = {k: v for k, v in plain.to_dict().items() if k != "lora_rank"}
    assert DeviceConfig(**old).lora_rank is None


# ---------------------------------------------------------------- the real server
class HttpOperator:
    """``Operator``'s two calls over the real OTA app (FastAPI TestClient)."""

    def __init__(self, http: Any, roles: dict[str, str]) -> None:
        self.http, self.roles = http, roles

    def publish(self, bundles: list[Path], targets: Path) -> dict[str, Any]:
        import hashlib

        auth = {"Authorization": f"Bearer {self.roles['publisher']}"}
        for path in bundles:
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            assert self.http.put(f"/v1/blobs/{sha}", content=data, headers=auth).is_success
        reply = self.http.post(
            "/v1/releases",
            content=targets.read_bytes(),
            headers={**auth, "Content-Type": "application/json"},
        )
        assert reply.status_code == 201, reply.text
        return dict(reply.json())

    def create_rollout(self, version: int, base: str, **policy: Any) -> dict[str, Any]:
        body = {"base_fingerprint": base, "to_version": version, **policy}
        auth = {"Authorization": f"Bearer {self.roles['operator']}"}
        reply = self.http.post("/v1/rollouts", json=body, headers=auth)
        assert reply.status_code == 201, reply.text
        return dict(reply.json())


def test_real_server_gives_each_phone_the_bundle_of_its_rank(tmp_path: Path) -> None:
    """Real OTA server, real TUF keys, real agent: phones of rank 4 and 8 each install
    the global adapter truncated to their rank; a phone that declares no rank is
    offered nothing (no release names its plain base)."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from client.update import DeviceConfig, DeviceState, Retrier, check_and_update
    from server.ota import OtaSettings, create_app, make_engine, upgrade
    from tests.client.update.helpers import measured_losses
    from tests.client.update.update_fakes import make_base

    fp = make_base(tmp_path / "nf4")
    keys = tmp_path / "keys"
    init_keys(keys)
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
    glob = _global(5)
    with TestClient(create_app(settings), base_url="http://testserver") as http:
        pub = RankedPublisher(
            ranks=[4, 8], work_dir=tmp_path / "work", keys_dir=keys,
            operator=HttpOperator(http, roles),  # type: ignore[arg-type]
            base_dir=tmp_path / "nf4", base_fingerprint=fp,
            adapter_config=AdapterConfig(rank=R, alpha=16.0, target_modules=("q_proj",)),
            golden_texts=["a golden prompt"], pool=FakePool(),  # type: ignore[arg-type]
            rollout=RolloutPolicy(stages=(100,), quality_tolerance=None), min_reports=1,
        )  # fmt: skip
        pub.release(glob, round=1)
        outcomes = {}
        for name, rank in (("r4", 4), ("r8", 8), ("plain", None)):
            target = fp if rank is None else rank_target(fp, rank)
            enrolled = http.post(
                "/v1/devices",
                json={"base_fingerprint": target, "memory_budget_bytes": 512 * 2**20,
                      "enrollment_secret": "enroll-secret-0123456789"},
            ).json()  # fmt: skip
            state = DeviceState(tmp_path / f"device-{name}")
            state.tuf_dir.mkdir(parents=True)
            (state.tuf_dir / "root.json").write_bytes((keys / "1.root.json").read_bytes())
            state.write_config(
                DeviceConfig(
                    "http://testserver", enrolled["device_id"], enrolled["token"],
                    str(tmp_path / "nf4"), target, 512 * 2**20, lora_rank=rank,
                )
            )  # fmt: skip
            outcome = check_and_update(
                state,
                checker=measured_losses({}),
                http=http,  # type: ignore[arg-type]
                retrier=Retrier(),
            )
            outcomes[name] = (outcome.status, outcome.version, state.read_active())
    for name, rank in (("r4", 4), ("r8", 8)):
        status, version, active = outcomes[name]
        assert (status, version) == ("updated", 1), outcomes[name]
        assert active is not None and active.base_fingerprint == rank_target(fp, rank)
        exact = pub.publishers[rank].state
        assert exact is not None
        want = truncate_to_rank(glob, rank)
        assert {k: v.shape for k, v in active.tensors.items()} == {
            k: v.shape for k, v in want.items()
        }
        for k, v in exact.current.tensors.items():  # device-exact, bit for bit
            np.testing.assert_array_equal(active.tensors[k], v)
    assert outcomes["plain"] == ("no_update", None, None)


def test_fleet_tiers_take_the_ranks_in_order_of_memory() -> None:
    from simulation.errors import SimulationInputError
    from simulation.fleet import DEFAULT_TIERS, FleetConfig, with_lora_ranks

    def ranks(tiers: tuple[Any, ...]) -> dict[str, int | None]:
        return {t.name: t.lora_rank for t in tiers}

    assert ranks(with_lora_ranks(DEFAULT_TIERS, [16, 4, 8])) == {"low": 4, "mid": 8, "high": 16}
    assert ranks(with_lora_ranks(DEFAULT_TIERS, [4, 16])) == {"low": 4, "mid": 16, "high": 16}
    assert ranks(with_lora_ranks(DEFAULT_TIERS, [2, 4, 8, 16, 32])) == {
        "low": 2, "mid": 8, "high": 32,
    }  # fmt: skip
    assert with_lora_ranks(DEFAULT_TIERS, [8]) == DEFAULT_TIERS  # one rank: nothing to size
    assert FleetConfig(tiers=with_lora_ranks(DEFAULT_TIERS, [4, 8])).lora_ranks == (4, 8)
    assert FleetConfig().lora_ranks == ()
    low, *rest = DEFAULT_TIERS
    import dataclasses

    with pytest.raises(SimulationInputError, match="every tier has a lora_rank or none"):
        FleetConfig(tiers=(dataclasses.replace(low, lora_rank=4), *rest))
    with pytest.raises(SimulationInputError, match="lora_rank must be >= 1"):
        dataclasses.replace(low, lora_rank=0)


def test_simulate_gives_the_fleet_the_runs_ranks(tmp_path: Path) -> None:
    """``fedota simulate --lora-ranks`` sizes the fleet's tiers too; one rank or none
    leaves the tiers as they are."""
    from simulation.federated import FederatedConfig
    from simulation.fleet import FleetConfig
    from simulation.pipeline import _fleet_ranks

    def run(**extra: Any) -> FederatedConfig:
        return FederatedConfig(out_dir=tmp_path, dp_mode="none", extra=extra)

    fleet = FleetConfig()
    sized = _fleet_ranks(run(**{"lora-ranks": "4,16,8"}), fleet)
    assert {t.name: t.lora_rank for t in sized.tiers} == {"low": 4, "mid": 8, "high": 16}
    assert _fleet_ranks(run(), fleet) is fleet
    assert _fleet_ranks(run(**{"lora-ranks": "8"}), fleet) is fleet
    assert _fleet_ranks(run(**{"lora-ranks": "2,4"}), sized) is sized  # tiers keep theirs
