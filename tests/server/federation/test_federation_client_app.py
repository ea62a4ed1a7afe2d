"""The real ``ClientApp`` (real NF4 trainer, micro base) driven by the real server
orchestrator over a loopback grid: the record contract, FFA upload, the privacy
ledger, and held-out clients that evaluate but never train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.client_app import make_client_app
from server.federation import FederationConfig, RoundResult, build_strategy, run_federation
from tests.server.federation.fed_fakes import LoopbackGrid

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def partitions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulation.data import SyntheticConfig, generate_synthetic, write_partitions

    data = generate_synthetic(
        SyntheticConfig(num_clients=3, num_heldout_clients=1, seed=0, max_texts=40)
    )
    return write_partitions(data, tmp_path_factory.mktemp("parts"))


def test_one_record_dp_ffa_round_with_real_phones(
    tmp_path: Path, micro_base: Path, partitions: Path
) -> None:
    overrides = {
        "base-model": str(micro_base),
        "data-dir": str(partitions),
        "state-dir": str(tmp_path / "devices"),
        "aggregation": "ffa",
        "dp-mode": "record",
        "target-epsilon": 8.0,
        "local-steps": 2,
        "num-server-rounds": 1,
        "lora-head": "true",  # as a `--run-config` override gives it
    }
    app = make_client_app(overrides)
    grid = LoopbackGrid({50 + 3 * i: (app, {"partition-id": i}) for i in range(4)})
    cfg = FederationConfig(num_rounds=1, clients_per_round=3, min_clients=2, dp_mode="record")
    results: list[RoundResult] = []
    history = run_federation(grid, cfg, build_strategy(cfg), on_round_end=results.append)

    trained = history[1]["train"]
    assert trained["clients-trained"] == 3 and trained["round-applied"] == 1
    assert 0 < trained["record-epsilon"] <= 8.0
    # FFA: the global adapter (and every upload) holds lora_B only; A is the shared seed
    assert results[1].global_adapter and all(".lora_B." in k for k in results[1].global_adapter)
    assert any(k.startswith("base_model.model.lm_head.") for k in results[1].global_adapter)
    # each training phone persisted its ledger; the held-out phone never trained
    index = json.loads((partitions / "index.json").read_text())["partitions"]
    heldout = [p["client_id"] for p in index if p["role"] == "heldout"]
    ledgers = {p.parent.name for p in (tmp_path / "devices").rglob("*.json")}
    assert len(ledgers) == 3 and not ledgers & set(heldout)
    assert ("train", 50 + 3 * 3) not in grid.calls
    ev = history[1]["evaluate"]
    assert ev["clients-nodes"] == 3 and ev["heldout-nodes"] == 1
    assert ev["clients-tokens"] > 0 and ev["heldout-tokens"] > 0


def test_each_phone_spends_its_epsilon_over_the_rounds_it_is_scheduled_in(
    tmp_path: Path, micro_base: Path, partitions: Path
) -> None:
    """Balanced sampling: 3 phones, 2 per round, 2 rounds -> one phone trains twice.

    Each phone is told its own number of rounds, so a phone that trains once spends
    its whole ε = 8 in that round (less noise) instead of planning for every round.
    """
    from client.train import PrivacyLedger

    overrides = {
        "base-model": str(micro_base), "data-dir": str(partitions),
        "state-dir": str(tmp_path / "devices"), "dp-mode": "record", "target-epsilon": 8.0,
        "local-steps": 2, "batch-size": 8, "num-server-rounds": 2,
    }  # fmt: skip
    app = make_client_app(overrides)
    grid = LoopbackGrid({20 + i: (app, {"partition-id": i}) for i in range(4)})
    cfg = FederationConfig(num_rounds=2, clients_per_round=2, min_clients=2, dp_mode="record")
    run_federation(grid, cfg, build_strategy(cfg))

    ledgers = [PrivacyLedger(p.parent, delta=1e-5) for p in (tmp_path / "devices").rglob("*.json")]
    assert sorted(len(led.rounds) for led in ledgers) == [1, 1, 2]
    for led in ledgers:
        assert 7.5 < led.spent_epsilon() <= 8.0  # every phone's budget used, none exceeded
    once = {led.rounds[0].noise_multiplier for led in ledgers if len(led.rounds) == 1}
    twice = next(led for led in ledgers if len(led.rounds) == 2).rounds
    assert twice[0] == twice[1] and max(once) < twice[0].noise_multiplier


def test_evaluation_does_not_depend_on_the_training_block_length(
    tmp_path: Path, micro_base: Path, partitions: Path
) -> None:
    """Runs that train on different seq-len are scored on the same blocks (round 0 equal)."""
    scores = []
    for seq_len in (16, 48):
        overrides = {
            "base-model": str(micro_base),
            "data-dir": str(partitions),
            "state-dir": str(tmp_path / f"devices-{seq_len}"),
            "dp-mode": "none",
            "aggregation": "fedavg",
            "local-steps": 1,
            "seq-len": seq_len,
            "num-server-rounds": 1,
        }
        app = make_client_app(overrides)
        grid = LoopbackGrid({70 + i: (app, {"partition-id": i}) for i in range(4)})
        cfg = FederationConfig(num_rounds=1, clients_per_round=3, min_clients=2, dp_mode="none")
        scores.append(run_federation(grid, cfg, build_strategy(cfg))[0]["evaluate"])
    assert scores[0]["clients-tokens"] > 0
    assert scores[0] == scores[1]


@pytest.mark.parametrize("value", ["maybe", 2])
def test_a_bad_lora_head_value_is_a_clear_error(value: object, micro_base: Path) -> None:
    from flwr.app import Context, RecordDict

    from client import ClientInputError
    from client.client_app import ClientSettings

    context = Context(
        run_id=1,
        node_id=1,
        node_config={"data-file": "x.json"},
        state=RecordDict(),
        run_config={"base-model": str(micro_base), "lora-head": value},  # type: ignore[dict-item]
    )
    with pytest.raises(ClientInputError, match="invalid client setting.*true or false"):
        ClientSettings.from_context(context, {})
