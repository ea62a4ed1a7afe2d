"""Heterogeneous LoRA ranks (ADR 0016): truncation, zero-padding, rank-aware averaging.

The homogeneous case must be today's aggregation bit for bit (plain and DP), the
heterogeneous case must average each rank slice over exactly the clients that hold it,
and under central DP a padded update keeps its clipped norm and each slice is divided
by the *population's* expected cohort, never this round's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from protocol import truncate_to_rank
from protocol.records import LORA_RANK, arrays_to_numpy
from server.federation import FederationConfig, build_strategy, run_federation
from server.federation.aggregate import (
    Contribution,
    clip_delta,
    delta_norm,
    fedavg_delta,
    noised_sum_delta,
)
from server.federation.hetero_rank import (
    adapter_rank,
    pad,
    rank_aware_fedavg_delta,
    rank_aware_noised_sum_delta,
    rank_segments,
    truncate,
)
from tests.server.federation.fed_fakes import LoopbackGrid

R = 8
SHAPES = {
    "layers.0.q_proj.lora_A.weight": (R, 5),
    "layers.0.q_proj.lora_B.weight": (6, R),
    "layers.1.v_proj.lora_A.weight": (R, 3),
    "layers.1.v_proj.lora_B.weight": (4, R),
}


def _adapter(seed: int, *, names: Any = SHAPES, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 1, SHAPES[k]).astype(dtype) for k in names}


def _b_only() -> list[str]:
    return [k for k in SHAPES if "lora_B" in k]


def _contributions(
    n: int, ranks: dict[str, int] | None = None, *, names: Any = SHAPES
) -> dict[str, Contribution]:
    """n clients' deltas (zero beyond each one's rank), weights 10 + i."""
    out = {}
    for i in range(n):
        cid = f"c{i}"
        delta = _adapter(100 + i, names=names, dtype=np.float64)
        r = (ranks or {}).get(cid, R)
        delta = pad(truncate(delta, r), _zeros(names))
        out[cid] = Contribution(delta, 10.0 + i)
    return out


def _zeros(names: Any = SHAPES) -> dict[str, np.ndarray]:
    return {k: np.zeros(SHAPES[k]) for k in names}


def _bits(a: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in a.items()}  # type: ignore[misc]


# -- exact in the homogeneous case ----------------------------------------------------
@pytest.mark.parametrize("names", [list(SHAPES), _b_only()], ids=["fedavg", "ffa"])
@pytest.mark.parametrize("ranks", [{}, {f"c{i}": R for i in range(5)}], ids=["absent", "all-R"])
def test_homogeneous_ranks_give_fedavg_bit_for_bit(names: list[str], ranks: dict) -> None:
    contrib = _contributions(5, names=names)
    got = rank_aware_fedavg_delta(contrib, ranks)
    assert _bits(got) == _bits(fedavg_delta(contrib))


@pytest.mark.parametrize("names", [list(SHAPES), _b_only()], ids=["fedavg", "ffa"])
def test_homogeneous_ranks_give_dp_fedavgs_noised_sum_bit_for_bit(names: list[str]) -> None:
    clipped = {
        cid: clip_delta(c.delta, 0.7)[0] for cid, c in _contributions(4, names=names).items()
    }
    population = [f"c{i}" for i in range(10)]
    template = _zeros(names)
    want = noised_sum_delta(
        clipped,
        template=template,
        clip=0.7,
        noise_multiplier=1.3,
        expected_clients=0.4 * len(population),
        rng=np.random.default_rng([3, 1, 0xD9]),
    )
    got = rank_aware_noised_sum_delta(
        clipped,
        template=template,
        clip=0.7,
        noise_multiplier=1.3,
        sample_rate=0.4,
        population=population,
        ranks=dict.fromkeys(population, R),
        rng=np.random.default_rng([3, 1, 0xD9]),
    )
    assert _bits(got) == _bits(want)


# -- truncation and padding -----------------------------------------------------------
def test_truncation_keeps_the_first_rank_one_terms_of_b_times_a() -> None:
    g = _adapter(1)
    for r in (1, 3, R):
        t = truncate(g, r)
        assert adapter_rank(t) == r
        for layer in ("layers.0.q_proj", "layers.1.v_proj"):
            a, b = g[f"{layer}.lora_A.weight"], g[f"{layer}.lora_B.weight"]
            terms = sum(np.outer(b[:, j], a[j]) for j in range(r))
            got = t[f"{layer}.lora_B.weight"] @ t[f"{layer}.lora_A.weight"]
            np.testing.assert_allclose(got, terms, rtol=1e-5, atol=1e-6)
    assert {k: v.shape for k, v in truncate_to_rank(g, 3).items()} == {
        k: v.shape for k, v in truncate(g, 3).items()
    }
    with pytest.raises(ValueError, match="cannot truncate a rank-8 adapter to rank 9"):
        truncate(g, 9)


def test_padding_gives_a_zero_delta_beyond_the_rank_and_keeps_the_norm() -> None:
    glob = _adapter(1)
    local = {k: v + 0.25 for k, v in truncate(glob, 3).items()}
    padded = pad(local, glob)
    assert {k: v.shape for k, v in padded.items()} == {k: v.shape for k, v in glob.items()}
    delta = {k: padded[k].astype(np.float64) - glob[k].astype(np.float64) for k in glob}
    small = {k: local[k].astype(np.float64) - truncate(glob, 3)[k] for k in local}
    for k, d in delta.items():
        beyond = d[3:] if "lora_A" in k else d[:, 3:]
        assert not beyond.any()
    assert delta_norm(delta) == delta_norm(small)
    np.testing.assert_array_equal(truncate(padded, 3)["layers.0.q_proj.lora_A.weight"],
                                  local["layers.0.q_proj.lora_A.weight"])  # fmt: skip


def test_rank_segments_cut_at_every_rank_with_the_clients_above() -> None:
    segs = rank_segments({"a": 2, "b": 8, "c": 4, "d": 4}, 8)
    assert segs == [(0, 2, ["a", "b", "c", "d"]), (2, 4, ["b", "c", "d"]), (4, 8, ["b"])]
    assert rank_segments({"a": 2}, 8) == [(0, 2, ["a"]), (2, 8, [])]
    with pytest.raises(ValueError, match="client ranks must lie in 1..8"):
        rank_segments({"a": 16}, 8)


# -- the heterogeneous mean -----------------------------------------------------------
@pytest.mark.parametrize("names", [list(SHAPES), _b_only()], ids=["fedavg", "ffa"])
def test_each_rank_slice_is_the_weighted_mean_over_the_clients_that_hold_it(
    names: list[str],
) -> None:
    ranks = {"c0": 2, "c1": 4, "c2": 4, "c3": 8}
    contrib = _contributions(4, ranks, names=names)
    got = rank_aware_fedavg_delta(contrib, ranks)
    for k in names:
        axis = 0 if "lora_A" in k else 1
        for j in range(R):
            holders = [c for c, r in ranks.items() if r > j]
            w = sum(contrib[c].weight for c in holders)
            want = (
                sum(contrib[c].weight * np.take(contrib[c].delta[k], j, axis=axis) for c in holders)
                / w
            )
            np.testing.assert_allclose(np.take(got[k], j, axis=axis), want, rtol=1e-12)
    # Plain FedAvg of the padded deltas would shrink the high slices by the zeros.
    plain = fedavg_delta(contrib)
    b = "layers.0.q_proj.lora_B.weight"
    assert np.abs(plain[b][:, 4:]).sum() < np.abs(got[b][:, 4:]).sum()


def test_slices_no_client_holds_stay_zero() -> None:
    ranks = {"c0": 2, "c1": 4}
    got = rank_aware_fedavg_delta(_contributions(2, ranks), ranks)
    assert not got["layers.0.q_proj.lora_B.weight"][:, 4:].any()
    assert not got["layers.0.q_proj.lora_A.weight"][4:].any()


# -- central DP -----------------------------------------------------------------------
def test_dp_slices_are_divided_by_the_populations_expected_cohort() -> None:
    """Noised sum ÷ q·N_j with N_j from the population (not from who was sampled)."""
    pop_ranks = {f"p{i}": (2, 4, 8)[i % 3] for i in range(12)}  # 4 phones of each rank
    sampled = {"p0": 2, "p4": 4}  # this round: no rank-8 phone at all
    names = _b_only()
    contrib = _contributions(2, {"c0": 2, "c1": 4}, names=names)
    clipped = {
        pid: clip_delta(c.delta, 0.5)[0] for pid, c in zip(sampled, contrib.values(), strict=True)
    }
    template = _zeros(names)
    kw: dict[str, Any] = dict(template=template, clip=0.5, noise_multiplier=0.8)
    got = rank_aware_noised_sum_delta(
        clipped, sample_rate=0.25, population=list(pop_ranks), ranks=pop_ranks,
        rng=np.random.default_rng(7), **kw,
    )  # fmt: skip
    total = noised_sum_delta(clipped, expected_clients=1.0, rng=np.random.default_rng(7), **kw)
    for k in names:  # total: the noised sum itself (denominator 1)
        for lo, hi, holders in ((0, 2, 12), (2, 4, 8), (4, 8, 4)):
            np.testing.assert_allclose(
                got[k][:, lo:hi], total[k][:, lo:hi] / (0.25 * holders), rtol=1e-12
            )


def test_dp_a_padded_clipped_update_moves_the_noised_sum_by_at_most_the_clip() -> None:
    """Sensitivity: with one client in or out (same noise) the sum moves by ≤ clip."""
    names = _b_only()
    ranks = {"c0": 2, "c1": 4, "c2": 8}
    contrib = _contributions(3, ranks, names=names)
    clip = 0.3
    clipped = {cid: clip_delta(c.delta, clip)[0] for cid, c in contrib.items()}
    assert all(delta_norm(d) <= clip * (1 + 1e-12) for d in clipped.values())
    kw: dict[str, Any] = dict(
        template=_zeros(names), clip=clip, noise_multiplier=1.0, sample_rate=1.0,
        population=list(ranks), ranks=ranks,
    )  # fmt: skip
    denominators = {"0": 3.0, "1": 2.0, "2": 1.0}  # q·N_j for slices 0-1, 2-3, 4-7
    for left_out in ranks:
        rest = {c: d for c, d in clipped.items() if c != left_out}
        a = rank_aware_noised_sum_delta(clipped, rng=np.random.default_rng(1), **kw)
        b = rank_aware_noised_sum_delta(rest, rng=np.random.default_rng(1), **kw)
        diff = {}
        for k in names:  # undo the (data-independent) division: back to the sums
            d = a[k] - b[k]
            scale = np.array([denominators["0"]] * 2 + [denominators["1"]] * 2 + [1.0] * 4)
            diff[k] = d * scale[None, :]
        assert delta_norm(diff) <= clip * (1 + 1e-9)


# -- through the strategy, with phones of three ranks ---------------------------------
def _phone_app(ffa: bool) -> ClientApp:
    """A numpy phone of rank ``lora-rank`` (node config): reports it, checks that the
    adapter it receives is truncated to it, moves halfway to its target slice."""
    app = ClientApp()

    def status(ctx: Context) -> ConfigRecord:
        record = ConfigRecord(
            {"client-id": str(ctx.node_config["client-id"]), "role": "train", "status": "ok",
             "message": ""}
        )  # fmt: skip
        if "lora-rank" in ctx.node_config:
            record[LORA_RANK] = int(ctx.node_config["lora-rank"])
        return record

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        content = RecordDict({"status": status(ctx)})
        if msg.content["config"].get("want") == "initial-adapter":
            init = {k: (v if "lora_A" in k else np.zeros_like(v)) for k, v in _adapter(0).items()}
            names = [k for k in init if not (ffa and "lora_A" in k)]
            content["arrays"] = ArrayRecord(array_dict={k: Array(init[k]) for k in names})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        rank, idx = int(ctx.node_config.get("lora-rank", R)), int(ctx.node_config["index"])
        glob = arrays_to_numpy(msg.content.array_records["arrays"])
        assert adapter_rank(glob) == rank, "the server must send the phone's rank"
        tgt = truncate(_adapter(50 + idx), rank)
        new = {k: (glob[k] + 0.5 * (tgt[k] - glob[k])).astype(np.float32) for k in glob}
        metrics = MetricRecord({"num-examples": 10 + idx, "train-loss": 1.0, "steps": 1,
                                "epsilon": 0.0, "noise-multiplier": 0.0})  # fmt: skip
        arrays = ArrayRecord(array_dict={k: Array(v) for k, v in sorted(new.items())})
        return Message(
            RecordDict({"status": status(ctx), "arrays": arrays, "metrics": metrics}), reply_to=msg
        )

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        metrics = MetricRecord({"eval-loss": 1.0, "eval-accuracy": 0.5, "num-tokens": 10})
        return Message(RecordDict({"status": status(ctx), "metrics": metrics}), reply_to=msg)

    return app


def _grid(ranks: Sequence[int | None], ffa: bool) -> LoopbackGrid:
    """One phone per entry; ``None``: a phone that reports no rank (trains rank R)."""
    app = _phone_app(ffa)
    nodes: dict[int, tuple[ClientApp, dict[str, Any]]] = {}
    for i, r in enumerate(ranks):
        node: dict[str, Any] = {"client-id": f"c{i}", "index": i}
        nodes[100 + i] = (app, node if r is None else {**node, "lora-rank": r})
    return LoopbackGrid(nodes)


def _cfg(**kw: Any) -> FederationConfig:
    base: dict[str, Any] = dict(
        num_rounds=1, clients_per_round=6, min_clients=1, aggregation="ffa", dp_mode="none",
        max_update_norm=100.0,
    )  # fmt: skip
    return FederationConfig(**{**base, **kw})


def _final(
    ranks: Sequence[int | None], **kw: Any
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    c = _cfg(**kw)
    last: dict[str, np.ndarray] = {}
    history = run_federation(
        _grid(ranks, c.aggregation == "ffa"),
        c,
        build_strategy(c),
        on_round_end=lambda r: last.update(r.global_adapter),
    )
    return last, history


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
def test_a_round_with_three_ranks_is_the_rank_aware_mean(aggregation: str) -> None:
    ranks = [2, 2, 4, 4, 8, 8]
    final, history = _final(ranks, aggregation=aggregation)
    assert history[1]["train"]["clients-rejected"] == 0
    assert history[1]["train"]["clients-trained"] == 6
    init = {k: (v if "lora_A" in k else np.zeros_like(v)) for k, v in _adapter(0).items()}
    contrib = {}
    for i, r in enumerate(ranks):
        tgt = truncate(_adapter(50 + i), r)
        local = {k: (truncate(init, r)[k] + 0.5 * (tgt[k] - truncate(init, r)[k])) for k in tgt}
        local = {k: v.astype(np.float32) for k, v in local.items()}
        names = [k for k in init if not (aggregation == "ffa" and "lora_A" in k)]
        padded = pad({k: local[k] for k in names}, init)
        delta = {k: padded[k].astype(np.float64) - init[k].astype(np.float64) for k in names}
        contrib[f"c{i}"] = Contribution(delta, 10.0 + i)
    mean = rank_aware_fedavg_delta(contrib, {f"c{i}": r for i, r in enumerate(ranks)})
    assert set(final) == set(mean)  # ffa: the global adapter holds B only
    for k in mean:
        want = (init[k].astype(np.float64) + mean[k]).astype(np.float32)
        np.testing.assert_array_equal(final[k], want)


def test_homogeneous_phones_that_report_their_rank_change_nothing() -> None:
    """Phones all at the global rank that report it give, bit for bit, the adapter of
    phones that report nothing (today's path): the rank-aware path is exact."""
    for aggregation in ("fedavg", "ffa"):
        reported, _ = _final([R] * 6, aggregation=aggregation)
        silent, _ = _final([None] * 6, aggregation=aggregation)
        assert _bits(reported) == _bits(silent)


def test_user_dp_with_mixed_ranks_spends_the_same_epsilon_and_keeps_slices_unheld_zero() -> None:
    kw: dict[str, Any] = dict(dp_mode="user", user_clip=0.5, seed=4, clients_per_round=3)
    mixed, mixed_history = _final([2, 2, 4, 4, 4, 4], **kw)
    _, same_history = _final([R] * 6, **kw)
    assert mixed_history[1]["train"]["user-epsilon"] == same_history[1]["train"]["user-epsilon"]
    for k, v in mixed.items():
        if "lora_B" in k:
            assert not v[:, 4:].any(), "no phone holds slices 4..7: they stay at zero"
            assert v[:, :4].any()


def test_a_reply_of_another_rank_than_reported_is_rejected_with_the_rank_in_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grid = _grid([2, 4, 8], ffa=True)
    grid.apps[100][1]["lora-rank"] = 2
    app = grid.apps[100][0]
    wrong = ClientApp()

    @wrong.query()
    def query(msg: Message, ctx: Context) -> Message:
        return app(msg, ctx)

    @wrong.train()
    def train(msg: Message, ctx: Context) -> Message:
        reply = app(msg, ctx)
        arrays = arrays_to_numpy(reply.content.array_records["arrays"])
        bad = {k: np.concatenate([v, v[:, :1]], axis=1) for k, v in arrays.items()}  # rank 3
        reply.content["arrays"] = ArrayRecord(array_dict={k: Array(v) for k, v in bad.items()})
        return reply

    @wrong.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return app(msg, ctx)

    grid.apps[100] = (wrong, grid.apps[100][1])
    c = _cfg()
    history = run_federation(grid, c, build_strategy(c))
    assert history[1]["train"]["clients-rejected"] == 1
    assert "LoRA rank 3 differs from the global adapter's rank 8" in caplog.text
    assert math.isfinite(history[1]["train"]["train-loss"])


# -- the run config -------------------------------------------------------------------
def test_run_config_carries_the_allowed_ranks_and_the_memory_tiers() -> None:
    from protocol import RunConfig

    run = RunConfig(lora_ranks="16,4,8", client_memory_tiers_mib="224,221")
    assert run.allowed_ranks == (4, 8, 16) and run.global_rank == 16
    assert run.memory_tiers_bytes == (224 << 20, 221 << 20)  # order kept: tier i
    resolved = run.resolved()
    assert (resolved.lora_rank, resolved.lora_alpha) == (16, 32.0)
    assert RunConfig.from_flower(run.to_flower()) == run
    default = RunConfig()
    assert default.allowed_ranks == () and default.resolved().lora_rank == default.lora_rank
    for bad in ("4,x", "0,4", "-8"):
        assert RunConfig(lora_ranks=bad).problems() == [
            f"lora-ranks={bad!r} (need comma-separated integers ≥ 1, e.g. 4,8,16)"
        ]
    assert RunConfig(client_memory_tiers_mib="64,,").problems()


def test_a_rank_above_the_global_one_counts_as_the_global_rank() -> None:
    contrib = _contributions(3)
    got = rank_aware_fedavg_delta(contrib, {"c0": 4 * R, "c1": R})
    assert _bits(got) == _bits(fedavg_delta(contrib))
