"""Server optimizers (fedavgm, fedadam, fedyogi), fedprox on the server, and the adaptive
clip of user-level DP: each rule against hand-computed numbers, then composed with
``ffa``, with ``CentralDP`` and with checkpoints, on numpy phones (issue 25, items 2-3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.federation import FederationConfig, RoundResult, build_strategy, run_federation
from server.federation.adaptive_clip import AdaptiveClip, update_noise_multiplier
from server.federation.optimizers import ServerOptimizer, ServerOptimizerSettings
from server.federation.strategy import LoraStrategy
from server.federation.wrappers import CentralDP, ServerOptimization, UpdateValidation
from tests.server.federation.fed_fakes import fake_phone_app, initial_adapter, make_grid


def cfg(**kw: Any) -> FederationConfig:
    base: dict[str, Any] = dict(
        num_rounds=3,
        clients_per_round=3,
        min_clients=2,
        aggregation="ffa",
        dp_mode="none",
        max_update_norm=50.0,
    )
    return FederationConfig(**{**base, **kw})


def run(
    c: FederationConfig,
    *,
    ffa: bool = True,
    num_train: int = 6,
    node_offset: int = 1000,
    on_round_end: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    grid = make_grid(fake_phone_app(ffa=ffa), num_train=num_train, node_offset=node_offset)
    last: dict[str, np.ndarray] = {}

    def keep(result: RoundResult) -> None:
        last.clear()
        last.update(result.global_adapter)
        if on_round_end:
            on_round_end(result)

    return run_federation(grid, c, build_strategy(c), on_round_end=keep), last


class Crash(RuntimeError):
    pass


def crash_after(round_number: int) -> Any:
    def hook(result: RoundResult) -> None:
        if result.round == round_number:
            raise Crash(f"killed after round {round_number}")

    return hook


def _opt(name: str, **kw: Any) -> ServerOptimizer:
    return ServerOptimizer(ServerOptimizerSettings(name=name, **kw))


def _vec(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float64)}


# -- each optimizer against numbers worked out by hand --------------------------------
def test_fedavgm_is_sgd_with_momentum_on_the_negative_update() -> None:
    opt = _opt("fedavgm", learning_rate=0.5, momentum=0.9)
    x1 = opt.step(_vec(1.0, 2.0), _vec(0.1, -0.2))  # v = Δ₁ = (0.1, -0.2)
    np.testing.assert_allclose(x1["w"], [1.05, 1.9], rtol=0, atol=1e-15)
    x2 = opt.step(x1, _vec(0.3, 0.0))  # v = 0.9·(0.1, -0.2) + (0.3, 0) = (0.39, -0.18)
    np.testing.assert_allclose(x2["w"], [1.245, 1.81], rtol=0, atol=1e-15)


def _adam_by_hand(
    x: float, deltas: list[float], *, eta: float, b1: float, b2: float, tau: float, yogi: bool
) -> float:
    m, v = 0.0, tau * tau
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if yogi:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d)
        else:
            v = b2 * v + (1 - b2) * d * d
        x = x + eta * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_follow_reddi_et_al_alg_2(name: str) -> None:
    hp = dict(learning_rate=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    opt = _opt(name, **hp)
    # coordinate 0: a large update then a small one (Yogi's v shrinks on the second);
    # coordinate 1: a negative update; coordinate 2: none at all.
    deltas = [_vec(0.2, -0.1, 0.0), _vec(0.001, -0.05, 0.0)]
    x = _vec(0.0, 1.0, -3.0)
    for d in deltas:
        x = opt.step(x, d)
    for i, start in enumerate([0.0, 1.0, -3.0]):
        want = _adam_by_hand(
            start,
            [float(d["w"][i]) for d in deltas],
            eta=0.01,
            b1=0.9,
            b2=0.99,
            tau=1e-3,
            yogi=name == "fedyogi",
        )
        assert x["w"][i] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert x["w"][2] == -3.0  # no update, no move (m stays 0)


def test_yogi_and_adam_differ_once_the_update_shrinks() -> None:
    kw = dict(learning_rate=0.01)
    adam, yogi = _opt("fedadam", **kw), _opt("fedyogi", **kw)
    for d in (_vec(1.0), _vec(1e-3)):
        adam.step(_vec(0.0), d)
        yogi.step(_vec(0.0), d)
    # Adam's v decays multiplicatively (0.99·v), Yogi's additively by (1−β₂)·Δ².
    assert yogi.v["w"][0] == pytest.approx(1e-6 + 0.01 - 0.01 * 1e-6, rel=1e-12)
    assert adam.v["w"][0] == pytest.approx(0.99 * (0.99e-6 + 0.01) + 0.01 * 1e-6, rel=1e-12)


def test_optimizer_state_survives_json_exactly() -> None:
    a = _opt("fedadam", learning_rate=0.01)
    a.step(_vec(0.0, 1.0), _vec(0.3, -0.7))
    b = _opt("fedadam", learning_rate=0.01)
    b.load_state(json.loads(json.dumps(a.state())))
    np.testing.assert_array_equal(
        a.step(_vec(0.5, 0.5), _vec(0.1, 0.2))["w"], b.step(_vec(0.5, 0.5), _vec(0.1, 0.2))["w"]
    )


def test_optimizer_keeps_the_adapter_dtype_and_untouched_tensors() -> None:
    glob = {"a": np.ones(2, np.float32), "b": np.zeros(2, np.float32)}
    out = _opt("fedavgm", learning_rate=1.0).step(glob, {"b": np.array([0.5, -0.5])})
    assert out["a"].dtype == out["b"].dtype == np.float32
    np.testing.assert_array_equal(out["a"], glob["a"])
    np.testing.assert_array_equal(out["b"], [0.5, -0.5])


@pytest.mark.parametrize(
    "bad",
    [
        dict(name="fedavg", learning_rate=1.0),
        dict(name="fedadam", learning_rate=0.0),
        dict(name="fedavgm", learning_rate=1.0, momentum=1.0),
        dict(name="fedyogi", learning_rate=0.1, tau=0.0),
    ],
    ids=["not-an-optimizer", "zero-lr", "momentum-1", "tau-0"],
)
def test_optimizer_settings_refuse_out_of_range(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerOptimizerSettings(**bad)


# -- the strategies in the round loop ------------------------------------------------
def _chain(strategy: Any) -> list[type]:
    out = []
    while strategy is not None:
        out.append(type(strategy))
        strategy = getattr(strategy, "__dict__", {}).get("inner")
    return out


@pytest.mark.parametrize(
    ("kw", "chain"),
    [
        (dict(), [UpdateValidation, LoraStrategy]),
        (dict(strategy="fedprox"), [UpdateValidation, LoraStrategy]),
        (dict(strategy="fedadam"), [UpdateValidation, ServerOptimization, LoraStrategy]),
        (
            dict(strategy="fedyogi", dp_mode="user"),
            [UpdateValidation, ServerOptimization, CentralDP, LoraStrategy],
        ),
    ],
    ids=["fedavg", "fedprox", "fedadam", "fedyogi-user-dp"],
)
def test_build_strategy_puts_the_optimizer_outside_central_dp(
    kw: dict[str, Any], chain: list[type]
) -> None:
    assert _chain(build_strategy(cfg(**kw))) == chain


def test_fedavg_round_is_the_weighted_mean_of_the_deltas_exactly() -> None:
    """Round 1 by hand: phone i moves halfway to target(i), weight 10 + i."""
    from tests.server.federation.fed_fakes import target

    _, final = run(cfg(num_rounds=1, clients_per_round=6, aggregation="fedavg"), ffa=False)
    glob = initial_adapter()
    for k, g in glob.items():
        g64 = g.astype(np.float64)
        total = sum(
            (10.0 + i) * ((g + 0.5 * (target(i)[k] - g)).astype(np.float32) - g64) for i in range(6)
        )
        want = (g64 + total / sum(10.0 + i for i in range(6))).astype(np.float32)
        np.testing.assert_allclose(final[k], want, rtol=0, atol=2e-7)


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
@pytest.mark.parametrize(
    "same",
    [
        dict(strategy="fedprox"),  # server side it is FedAvg: μ acts on the phones only
        dict(strategy="fedavgm", server_momentum=0.0, server_learning_rate=1.0),
    ],
    ids=["fedprox", "fedavgm-lr1-mom0"],
)
def test_strategies_that_reduce_to_fedavg_give_fedavgs_adapter_bit_for_bit(
    aggregation: str, same: dict[str, Any]
) -> None:
    kw = dict(num_rounds=3, aggregation=aggregation)
    base_history, base = run(cfg(**kw), ffa=aggregation == "ffa")
    history, final = run(cfg(**kw, **same), ffa=aggregation == "ffa")
    for k in base:
        np.testing.assert_array_equal(final[k], base[k])
    assert [h["evaluate"] for h in history] == [h["evaluate"] for h in base_history]


def _one_round_delta(**kw: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    history, final = run(cfg(num_rounds=1, **kw))
    glob = initial_adapter()
    return {k: final[k].astype(np.float64) - glob[k].astype(np.float64) for k in final}, history


@pytest.mark.parametrize("dp_mode", ["none", "user"])
def test_fedadam_steps_on_the_update_fedavg_would_apply_under_ffa_and_dp(dp_mode: str) -> None:
    """Under ffa A stays frozen; under user-level DP the optimizer consumes the *noised*
    mean (the one plain DP-FedAvg applies, same seed) and ε is unchanged."""
    dp = dict(dp_mode=dp_mode, user_clip=0.5, seed=3, clients_per_round=4, min_clients=1)
    applied, plain_history = _one_round_delta(**dp)
    _, adam_history = _one_round_delta(**dp, strategy="fedadam", server_learning_rate=0.01)
    _, final = run(cfg(num_rounds=1, **dp, strategy="fedadam", server_learning_rate=0.01))
    glob = initial_adapter()
    for k, g in glob.items():
        if "lora_A" in k:
            np.testing.assert_array_equal(final[k], g)  # ffa: never exchanged, never moved
            continue
        d = applied[k]
        want = g + 0.01 * (0.1 * d) / (np.sqrt(0.99 * 1e-6 + 0.01 * d * d) + 1e-3)
        np.testing.assert_allclose(final[k], want, rtol=0, atol=1e-6)
        assert np.abs(final[k] - g).max() > 1e-3
    if dp_mode == "user":
        assert adam_history[1]["train"]["user-epsilon"] == plain_history[1]["train"]["user-epsilon"]


@pytest.mark.parametrize(
    "kw",
    [
        dict(strategy="fedadam", dp_mode="none"),
        dict(
            strategy="fedavgm", dp_mode="user", user_clip_quantile=0.5, user_clip_count_stddev=1.0
        ),
    ],
    ids=["fedadam", "fedavgm-adaptive-clip"],
)
def test_resume_restores_the_optimizer_and_the_clip(tmp_path: Path, kw: dict[str, Any]) -> None:
    common = dict(num_rounds=4, seed=5, user_clip=0.5, min_clients=1, **kw)
    full_history, full = run(cfg(**common, checkpoint_dir=tmp_path / "full"))
    with pytest.raises(Crash):
        run(cfg(**common, checkpoint_dir=tmp_path / "c"), on_round_end=crash_after(2))
    resumed_history, resumed = run(cfg(**common, checkpoint_dir=tmp_path / "c"), node_offset=9000)
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k])
    strip = [{**h, "elapsed_s": 0} for h in full_history]
    assert [{**h, "elapsed_s": 0} for h in resumed_history] == strip


def test_resume_refuses_a_checkpoint_of_another_strategy(tmp_path: Path) -> None:
    from server import ServerInputError

    run(cfg(num_rounds=1, checkpoint_dir=tmp_path, strategy="fedadam"))
    with pytest.raises(ServerInputError, match="checkpoint"):
        run(cfg(num_rounds=2, checkpoint_dir=tmp_path, strategy="fedyogi"))


def test_checkpoint_fingerprint_holds_the_lora_ranks_when_set() -> None:
    from server.federation import FederationConfig

    assert "lora_ranks" not in FederationConfig().fingerprint()  # old checkpoints resume
    ranked = FederationConfig.from_run_config({"lora-ranks": "16,4,8"})
    assert ranked.lora_ranks == (4, 8, 16)
    assert ranked.fingerprint()["lora_ranks"] == [4, 8, 16]
    assert (
        ranked.fingerprint()
        != FederationConfig.from_run_config({"lora-ranks": "4,8"}).fingerprint()
    )
    assert ranked.run_config().allowed_ranks == (4, 8, 16)


# -- adaptive clipping (Andrew et al. 2021) -------------------------------------------
def test_update_noise_leaves_the_count_its_share_of_the_calibrated_sigma() -> None:
    # z⁻² = σ_Δ⁻² + (2σ_b)⁻²: at z = 1, σ_b = 2.5 (m = 50, the paper's m/20)
    assert update_noise_multiplier(1.0, 2.5) == pytest.approx((1 - 1 / 25) ** -0.5)
    sigma_update = update_noise_multiplier(0.8, 1.0)
    assert sigma_update**-2 + 2.0**-2 == pytest.approx(0.8**-2)
    with pytest.raises(ValueError, match="count"):
        update_noise_multiplier(1.0, 0.5)


def test_adaptive_clip_takes_one_geometric_step_on_the_noisy_centred_count() -> None:
    clip = AdaptiveClip(clip=1.0, quantile=0.5, learning_rate=0.2, count_stddev=0.7)
    share = clip.update([0.5, 1.0, 2.0, 3.0], expected_clients=5.0, rng=np.random.default_rng(9))
    noise = np.random.default_rng(9).normal(0.0, 0.7)
    want_share = (0.5 + 0.5 - 0.5 - 0.5 + noise) / 5.0 + 0.5  # 0.5 and 1.0 are unclipped
    assert share == pytest.approx(want_share, rel=1e-12)
    assert clip.clip == pytest.approx(math.exp(-0.2 * (want_share - 0.5)), rel=1e-12)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_adaptive_clip_converges_to_the_target_quantile_of_the_norms(quantile: float) -> None:
    norms = np.linspace(0.01, 10.0, 200)  # uniform: the γ-quantile is ≈ 10γ
    clip = AdaptiveClip(clip=0.1, quantile=quantile, learning_rate=0.2, count_stddev=1.0)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(400):
        clip.update(norms, expected_clients=200.0, rng=rng)
        history.append(clip.clip)
    assert np.median(history[-100:]) == pytest.approx(10.0 * quantile, rel=0.1)


def test_user_dp_with_adaptive_clip_moves_the_clip_and_spends_the_same_epsilon() -> None:
    kw = dict(dp_mode="user", seed=2, num_rounds=4, clients_per_round=4, min_clients=1)
    fixed_history, _ = run(cfg(**kw, user_clip=0.05))
    history, _ = run(
        cfg(**kw, user_clip=0.05, user_clip_quantile=0.5, user_clip_count_stddev=1.0),
        num_train=6,
    )
    clips = [h["train"]["user-clip"] for h in history[1:]]
    assert clips[0] == 0.05 and clips[-1] > clips[0]  # every update is above 0.05 at first
    for h, f in zip(history[1:], fixed_history[1:], strict=True):
        assert h["train"]["user-epsilon"] == f["train"]["user-epsilon"]
        z = h["train"]["user-noise-multiplier"]
        assert h["train"]["user-update-noise-multiplier"] == pytest.approx(
            update_noise_multiplier(z, 1.0)
        )


@pytest.mark.parametrize(
    "bad",
    [
        dict(user_clip_quantile=0.5),  # needs user-level DP
        dict(dp_mode="user", user_clip_quantile=1.5),
        dict(strategy="fedsgd"),
        dict(server_beta2=1.0),
    ],
    ids=["quantile-without-user-dp", "quantile-above-1", "unknown-strategy", "beta2-1"],
)
def test_federation_config_refuses_bad_strategy_settings(bad: dict[str, Any]) -> None:
    from server import ServerInputError

    with pytest.raises(ServerInputError):
        FederationConfig(**{"dp_mode": "none", **bad})


def test_the_run_config_round_trips_every_strategy_key() -> None:
    from protocol import RunConfig

    c = FederationConfig(
        dp_mode="user",
        strategy="fedyogi",
        server_learning_rate=0.02,
        server_momentum=0.5,
        server_beta1=0.8,
        server_beta2=0.95,
        server_tau=1e-2,
        user_clip_quantile=0.7,
        user_clip_lr=0.1,
        user_clip_count_stddev=3.0,
    )
    again = FederationConfig.from_run_config(
        RunConfig.from_flower(c.run_config().to_flower()).to_flower()
    )
    assert again == c
