"""Real phones (NF4 trainer, micro base) of three LoRA ranks, sized by their memory
budgets, in one federation driven by the real orchestrator (ADR 0016)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.client_app import make_client_app
from server.federation import FederationConfig, RoundResult, build_strategy, run_federation
from tests.server.federation.fed_fakes import LoopbackGrid

pytestmark = pytest.mark.slow

RANKS = (2, 4, 8)


@pytest.fixture(scope="module")
def partitions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulation.data import SyntheticConfig, generate_synthetic, write_partitions

    data = generate_synthetic(
        SyntheticConfig(num_clients=3, num_heldout_clients=1, seed=0, max_texts=40)
    )
    return write_partitions(data, tmp_path_factory.mktemp("parts"))


def _budgets(micro_base: Path) -> list[int]:
    """The estimated training peak of each rank at the plan below: budget i fits
    exactly rank i, so the phones must choose 2, 4 and 8."""
    from client.train import LocalTrainer, LoraSettings, estimate_peak_bytes
    from client.train.rank import footprint_at_rank

    fp = LocalTrainer(micro_base, LoraSettings(rank=8, alpha=16.0, ffa=True)).footprint
    return [
        estimate_peak_bytes(
            footprint_at_rank(fp, 8, r), physical_batch_size=4, seq_len=16, dp=False
        )
        for r in RANKS
    ]


@pytest.mark.parametrize("dp_mode", ["none", "user"])
def test_phones_train_the_rank_their_memory_fits_and_the_round_aggregates(
    tmp_path: Path, micro_base: Path, partitions: Path, dp_mode: str
) -> None:
    overrides: dict[str, Any] = {
        "base-model": str(micro_base), "data-dir": str(partitions), "aggregation": "ffa",
        "dp-mode": dp_mode, "local-steps": 2, "batch-size": 4, "seq-len": 16,
        "num-server-rounds": 1, "lora-ranks": ",".join(map(str, RANKS)),
        "client-memory-tiers-mib": "1",  # overridden per phone by its node config
    }  # fmt: skip
    app = make_client_app(overrides)
    budgets = _budgets(micro_base)
    nodes = {
        50 + 3 * i: (app, {"partition-id": i, "memory-budget-bytes": budgets[i % 3]})
        for i in range(4)
    }
    grid = LoopbackGrid(nodes)  # type: ignore[arg-type]
    cfg = FederationConfig(
        num_rounds=1, clients_per_round=3, min_clients=1, dp_mode=dp_mode, aggregation="ffa",
        user_clip=5.0, seed=1,
    )  # fmt: skip
    results: list[RoundResult] = []
    history = run_federation(grid, cfg, build_strategy(cfg), on_round_end=results.append)
    train = history[1]["train"]
    assert train["clients-rejected"] == 0
    if dp_mode == "none":
        assert train["clients-trained"] == 3 and train["round-applied"] == 1
        assert [train[f"clients-rank-{r}"] for r in RANKS] == [1, 1, 1]
    glob = results[-1].global_adapter
    b = [v for k, v in glob.items() if ".lora_B." in k]
    assert b and all(v.shape[1] == 8 for v in b)  # the global adapter has the largest rank
    if dp_mode == "none":
        # Slices 4..7 only the rank-8 phone trained; 0..1 every phone: both moved.
        assert any(np.abs(v[:, 4:]).max() > 0 for v in b)
        assert any(np.abs(v[:, :2]).max() > 0 for v in b)
    ev = history[1]["evaluate"]
    assert ev["clients-nodes"] == 3 and ev["heldout-nodes"] == 1
    assert np.isfinite(ev["clients-loss"])


def test_without_lora_ranks_no_phone_reports_a_rank(micro_base: Path, partitions: Path) -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from client.client_app import ClientSettings, handle_query
    from protocol.records import LORA_RANK, STATUS

    query = Message(
        RecordDict({"config": ConfigRecord({"want": "identity"})}),
        message_type=MessageType.QUERY,
        dst_node_id=1,
    )
    base = {"base-model": str(micro_base), "data-dir": str(partitions), "dp-mode": "none"}
    for extra, want in (({}, None), ({"lora-ranks": "2,8"}, 8)):
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})  # fmt: skip
        status = handle_query(query, ClientSettings.from_context(ctx, {**base, **extra}))[STATUS]
        assert status.get(LORA_RANK) == want
