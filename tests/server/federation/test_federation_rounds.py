"""The server orchestrator against numpy phones on a loopback grid.

Covers THREATS G32 (bad updates excluded and logged), G33 (dropouts down to a
minimum), G34 (resume after a crash = uninterrupted run), user-level DP and the
round-0 / per-round evaluation split into clients' held-out text and held-out clients.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.federation import FederationConfig, RoundResult, build_strategy, run_federation
from tests.server.federation.fed_fakes import fake_phone_app, make_grid, population_target


def run(
    cfg: FederationConfig,
    *,
    ffa: bool = True,
    num_train: int = 6,
    misbehave: dict[str, Any] | None = None,
    node_offset: int = 1000,
    on_round_end: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    grid = make_grid(
        fake_phone_app(ffa=ffa, misbehave=misbehave), num_train=num_train, node_offset=node_offset
    )
    last: dict[str, np.ndarray] = {}

    def keep(result: RoundResult) -> None:
        last.clear()
        last.update(result.global_adapter)
        if on_round_end:
            on_round_end(result)

    history = run_federation(grid, cfg, build_strategy(cfg), on_round_end=keep)
    return history, last


def without_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**h, "elapsed_s": 0} for h in history]


def cfg(**kw: Any) -> FederationConfig:
    base: dict[str, Any] = dict(
        num_rounds=3,
        clients_per_round=3,
        min_clients=2,
        aggregation="ffa",
        dp_mode="none",
        max_update_norm=50.0,
    )
    base.update(kw)
    return FederationConfig(**base)


def test_rounds_train_evaluate_and_improve_on_both_populations() -> None:
    history, _final = run(cfg())
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert history[0]["train"] == {}  # round 0 = evaluation of the initial adapter
    for h in history[1:]:
        assert h["train"]["clients-sampled"] == 3
        assert h["train"]["clients-trained"] == 3
        assert h["train"]["round-applied"] == 1
    losses = [h["evaluate"]["clients-loss"] for h in history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert history[-1]["evaluate"]["heldout-nodes"] == 1
    assert history[-1]["evaluate"]["clients-nodes"] == 6
    assert "heldout-perplexity" in history[-1]["evaluate"]


def test_ffa_keeps_a_frozen_and_uploads_half_of_fedavg() -> None:
    h_ffa, g_ffa = run(cfg(aggregation="ffa"), ffa=True)
    h_avg, g_avg = run(cfg(aggregation="fedavg"), ffa=False)
    from tests.server.federation.fed_fakes import initial_adapter

    init = initial_adapter()
    for k in init:
        if "lora_A" in k:
            np.testing.assert_array_equal(g_ffa[k], init[k])
            assert not np.array_equal(g_avg[k], init[k])
    assert h_ffa[1]["train"]["upload-bytes"] * 2 == pytest.approx(
        h_avg[1]["train"]["upload-bytes"], rel=0.05
    )


def test_sampling_is_seeded_and_independent_of_node_ids() -> None:
    a, ga = run(cfg(seed=3), node_offset=1000)
    b, gb = run(cfg(seed=3), node_offset=5000)
    assert without_time(a) == without_time(b)
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k])


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()}, id="nan"),
        pytest.param(lambda a: {k: np.full_like(v, np.inf) for k, v in a.items()}, id="inf"),
        pytest.param(lambda a: {k: v * 1e4 for k, v in a.items()}, id="huge-norm"),
        pytest.param(
            lambda a: {**a, "extra.lora_B.weight": np.ones(2, np.float32)}, id="unknown-tensor"
        ),
    ],
)
def test_g32_bad_updates_are_excluded_and_logged(bad: Any, caplog: Any) -> None:
    everyone_bad = {f"c{i}": bad for i in range(6) if i != 0 and i % 2 == 0}
    with caplog.at_level(logging.WARNING, logger="server.federation"):
        history, final = run(cfg(clients_per_round=6, min_clients=1), misbehave=everyone_bad)
    assert all(np.isfinite(v).all() for v in final.values())
    assert all(np.abs(v).max() < 10 for v in final.values())
    for h in history[1:]:
        assert h["train"]["clients-rejected"] == 2
        assert h["train"]["round-applied"] == 1
    assert "rejected update" in caplog.text


B0, A0 = "layers.0.q_proj.lora_B.weight", "layers.0.q_proj.lora_A.weight"
MALFORMED = [
    pytest.param(lambda a: {k: v for k, v in a.items() if k != B0}, "missing 1 of", id="missing"),
    pytest.param(
        lambda a: {**a, "layers.2.k_proj.lora_B.weight": np.zeros((4, 2), np.float32)},
        "does not exchange: layers.2.k_proj.lora_B.weight",
        id="extra",
    ),
    pytest.param(lambda a: {**a, B0: a[B0].reshape(2, 4)}, "shape (2, 4) differs", id="shape"),
    pytest.param(
        lambda a: {**a, B0: np.pad(a[B0], ((0, 0), (0, 1)))}, "LoRA rank 3 differs", id="rank"
    ),
    pytest.param(
        lambda a: {k: v.astype(np.float16) for k, v in a.items()}, "dtype float16", id="float16"
    ),
    pytest.param(
        lambda a: {k: v.astype(np.int64) for k, v in a.items()}, "dtype int64", id="int64"
    ),
]


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
@pytest.mark.parametrize(("malform", "reason"), MALFORMED)
def test_g32_a_malformed_reply_is_excluded_and_the_others_are_aggregated(
    aggregation: str, malform: Any, reason: str, caplog: Any
) -> None:
    """Issue 22 item 2: a reply whose tensors do not match the global adapter is dropped
    with one log line naming the client, and the round aggregates the other replies."""
    c = cfg(aggregation=aggregation, clients_per_round=6, min_clients=1, num_rounds=2)
    ffa = aggregation == "ffa"
    with caplog.at_level(logging.WARNING, logger="server.federation"):
        history, final = run(c, ffa=ffa, misbehave={"c2": malform, "c4": malform})
    _, without_them = run(c, ffa=ffa, misbehave={"c2": lambda a: None, "c4": lambda a: None})
    for k in without_them:  # exactly the aggregate of c0, c1, c3 and c5
        np.testing.assert_array_equal(final[k], without_them[k])
    for h in history[1:]:
        assert h["train"]["clients-rejected"] == 2
        assert h["train"]["clients-trained"] == 4
        assert h["train"]["round-applied"] == 1
    for rnd in (1, 2):
        for cid in ("c2", "c4"):
            lines = [
                r.getMessage()
                for r in caplog.records
                if r.getMessage().startswith(f"round {rnd}: rejected update from client {cid} ")
            ]
            assert len(lines) == 1 and reason in lines[0], lines


def test_g32_under_ffa_a_reply_that_moves_the_frozen_a_is_excluded(caplog: Any) -> None:
    from tests.server.federation.fed_fakes import initial_adapter

    moved = {A0: initial_adapter()[A0] + 1.0}
    with caplog.at_level(logging.WARNING, logger="server.federation"):
        history, final = run(
            cfg(clients_per_round=6, min_clients=1, num_rounds=1),
            misbehave={"c3": lambda a: {**a, **moved}},
        )
    np.testing.assert_array_equal(final[A0], initial_adapter()[A0])  # A stays frozen
    assert history[1]["train"]["clients-rejected"] == 1
    assert f"client c3 (node 1021): 1 tensor(s) the global adapter does not exchange: {A0}" in (
        caplog.text
    )


@pytest.mark.parametrize("dp_mode", ["none", "user"])
def test_g32_a_round_whose_every_reply_is_malformed_leaves_the_adapter_unchanged(
    dp_mode: str,
) -> None:
    """Every reply rejected behaves as every client dropping out: the round completes,
    nothing is applied (the global adapter and its evaluation stay as in round 0)."""
    from tests.server.federation.fed_fakes import initial_adapter

    missing = {f"c{i}": (lambda a: {k: v for k, v in a.items() if k != B0}) for i in range(6)}
    c = cfg(dp_mode=dp_mode, user_clip=1.0, clients_per_round=6, min_clients=1, num_rounds=2)
    history, final = run(c, misbehave=missing)
    for h in history[1:]:
        assert h["train"]["clients-rejected"] == 6
        assert h["train"]["clients-trained"] == 0
        assert h["train"]["round-applied"] == 0
    assert history[-1]["evaluate"] == history[0]["evaluate"]
    for k, v in initial_adapter().items():
        np.testing.assert_array_equal(final[k], v)


def test_g33_round_completes_with_the_clients_that_remain() -> None:
    drop = {f"c{i}": (lambda a: None) for i in (1, 3)}
    history, _ = run(cfg(clients_per_round=6, min_clients=3), misbehave=drop)
    for h in history[1:]:
        assert h["train"]["clients-trained"] == 4
        assert h["train"]["clients-failed"] == 2
        assert h["train"]["round-applied"] == 1
    assert history[-1]["evaluate"]["clients-loss"] < history[0]["evaluate"]["clients-loss"]


def test_g33_below_the_minimum_the_global_adapter_is_unchanged() -> None:
    drop = {f"c{i}": (lambda a: None) for i in range(1, 6)}
    history, _ = run(cfg(clients_per_round=6, min_clients=2), misbehave=drop)
    for h in history[1:]:
        assert h["train"]["clients-trained"] == 1
        assert h["train"]["round-applied"] == 0
    assert history[-1]["evaluate"] == history[0]["evaluate"]


class Crash(RuntimeError):
    pass


def crash_after(round_number: int) -> Any:
    def hook(result: RoundResult) -> None:
        if result.round == round_number:
            raise Crash(f"killed after round {round_number}")

    return hook


@pytest.mark.parametrize("dp_mode", ["none", "user"])
def test_g34_resume_after_a_crash_matches_an_uninterrupted_run(
    tmp_path: Path, dp_mode: str
) -> None:
    kw: dict[str, Any] = dict(
        num_rounds=4, dp_mode=dp_mode, seed=7, user_clip=0.5, clients_per_round=3, min_clients=1
    )
    full_history, full = run(cfg(**kw, checkpoint_dir=tmp_path / "full"))

    ckpt = tmp_path / "crashy"
    with pytest.raises(Crash):
        run(cfg(**kw, checkpoint_dir=ckpt), on_round_end=crash_after(2))
    seen: list[int] = []
    resumed_history, resumed = run(
        cfg(**kw, checkpoint_dir=ckpt),
        node_offset=9000,
        on_round_end=lambda r: seen.append(r.round),
    )
    assert seen == [3, 4]  # rounds 0-2 are not re-run (nor re-published)
    assert without_time(resumed_history) == without_time(full_history)
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k])
    if dp_mode == "user":
        assert (
            resumed_history[-1]["train"]["user-epsilon"]
            == full_history[-1]["train"]["user-epsilon"]
        )


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path) -> None:
    from server import ServerInputError

    run(cfg(num_rounds=1, checkpoint_dir=tmp_path))
    with pytest.raises(ServerInputError, match="checkpoint"):
        run(cfg(num_rounds=2, checkpoint_dir=tmp_path, aggregation="fedavg"), ffa=False)


def test_user_level_dp_spends_at_most_the_target_and_adds_noise() -> None:
    history, final = run(
        cfg(dp_mode="user", target_epsilon=8.0, user_clip=1.0, num_rounds=3), num_train=6
    )
    eps = [h["train"]["user-epsilon"] for h in history[1:]]
    assert 0 < eps[0] < eps[1] < eps[2] <= 8.0 + 1e-6
    assert history[1]["train"]["user-noise-multiplier"] > 0
    _plain_history, plain = run(cfg(num_rounds=3))
    diff = sum(float(np.abs(final[k] - plain[k]).sum()) for k in final)
    assert diff > 1e-3


def test_user_level_dp_mean_is_unbiased_with_many_clients() -> None:
    """With a large population the DP update tracks the clipped mean (σ·C/(qN) → 0)."""
    c = cfg(
        dp_mode="user",
        user_noise_multiplier=1.0,
        user_clip=5.0,
        clients_per_round=60,
        num_rounds=1,
        min_clients=1,
    )
    history, final = run(c, num_train=120)
    tgt = population_target(120)
    start_err = sum(float(np.sum(tgt[k] ** 2)) for k in tgt if "lora_B" in k)
    err = sum(float(np.sum((final[k] - tgt[k]) ** 2)) for k in tgt if "lora_B" in k)
    assert err < start_err  # moved towards the population optimum despite the noise
    assert history[1]["train"]["clients-sampled"] > 30  # Poisson, q = 0.5


def test_record_level_epsilon_is_the_max_reported_by_clients() -> None:
    history, _ = run(cfg(clients_per_round=6))
    assert history[-1]["train"]["record-epsilon"] == pytest.approx(0.5 * 5)


def _strategy(sampling: str, *, clients: int = 6, per_round: int = 4, rounds: int = 5) -> Any:
    from server.federation import LoraStrategy

    s = LoraStrategy(
        aggregation="ffa", clients_per_round=per_round, min_clients=1, seed=7,
        sampling=sampling, num_rounds=rounds,
    )  # fmt: skip
    s.population.train = {f"c{i}": 100 + i for i in range(clients)}
    return s


def test_balanced_sampling_spreads_rounds_evenly_and_tells_each_client_its_rounds() -> None:
    from flwr.app import ArrayRecord, ConfigRecord

    s = _strategy("balanced")
    picked = [s.sample(r) for r in range(1, 6)]
    assert all(len(p) == 4 for p in picked)
    counts = {c: sum(c in p for p in picked) for c in s.population.train}
    assert max(counts.values()) - min(counts.values()) <= 1  # 20 slots over 6 clients: 3 or 4
    assert s.planned_rounds() == counts
    assert [_strategy("balanced").sample(r) for r in range(5, 0, -1)] == picked[::-1]  # replayable
    config = ConfigRecord({"num-server-rounds": 5})
    messages = list(s.configure_train(2, ArrayRecord(), config, None))  # type: ignore[arg-type]
    by_node = {m.metadata.dst_node_id: m.content.config_records["config"] for m in messages}
    assert sorted(by_node) == sorted(s.population.train[c] for c in picked[1])
    for cid in picked[1]:
        assert by_node[s.population.train[cid]]["planned-rounds"] == counts[cid]


def test_uniform_sampling_draws_each_round_alone_and_poisson_plans_nothing() -> None:
    uniform = _strategy("uniform", per_round=2, rounds=6)
    counts = uniform.planned_rounds()
    assert sum(counts.values()) == 12 and counts == {
        c: sum(c in uniform.sample(r) for r in range(1, 7)) for c in uniform.population.train
    }
    assert _strategy("poisson").planned_rounds() == {}
    with pytest.raises(ValueError, match="sampling"):
        _strategy("round-robin")
    from server import ServerInputError

    with pytest.raises(ServerInputError, match="client-sampling"):
        FederationConfig.from_run_config({"client-sampling": "sometimes"})
