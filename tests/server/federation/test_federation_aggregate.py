"""Aggregation math: order invariance, FFA exactness, FedAvg inexactness, clipping, DP."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from server.federation.aggregate import (
    Contribution,
    add_delta,
    clip_delta,
    delta_norm,
    exchanged_names,
    fedavg_delta,
    is_finite,
    noised_sum_delta,
    structure_error,
    subtract,
)

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def contributions(draw: st.DrawFn) -> dict[str, Contribution]:
    n = draw(st.integers(1, 6))
    shape = draw(st.sampled_from([(3,), (2, 3), (4, 2)]))
    out = {}
    for i in range(n):
        delta = {
            "a": draw(arrays(np.float32, shape, elements=finite)),
            "b": draw(arrays(np.float32, (2,), elements=finite)),
        }
        out[f"client-{i}"] = Contribution(delta, draw(st.floats(0.1, 100)))
    return out


@settings(max_examples=60, deadline=None)
@given(contributions(), st.randoms(use_true_random=False))
def test_fedavg_is_order_invariant_bit_for_bit(contrib: dict[str, Contribution], rnd) -> None:
    keys = list(contrib)
    rnd.shuffle(keys)
    shuffled = {k: contrib[k] for k in keys}
    a, b = fedavg_delta(contrib), fedavg_delta(shuffled)
    for name in a:
        assert np.array_equal(a[name], b[name])


@settings(max_examples=60, deadline=None)
@given(contributions())
def test_fedavg_matches_the_weighted_mean(contrib: dict[str, Contribution]) -> None:
    total = sum(c.weight for c in contrib.values())
    got = fedavg_delta(contrib)
    for name in got:
        want = sum(c.delta[name].astype(np.float64) * c.weight for c in contrib.values()) / total
        np.testing.assert_allclose(got[name], want, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_ffa_averaging_b_with_shared_a_equals_averaging_the_products(
    n: int, rank: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    a_shared = rng.normal(size=(rank, 6))  # frozen, identical on every client
    bs = [rng.normal(size=(5, rank)) for _ in range(n)]
    weights = rng.uniform(0.5, 3.0, size=n)
    contrib = {f"c{i}": Contribution({"B": bs[i]}, float(weights[i])) for i in range(n)}
    mean_b = fedavg_delta(contrib)["B"]
    mean_products = sum(w * (b @ a_shared) for w, b in zip(weights, bs, strict=True)) / sum(weights)
    np.testing.assert_allclose(mean_b @ a_shared, mean_products, rtol=1e-10, atol=1e-10)


def test_fedavg_of_a_and_b_separately_is_inexact() -> None:
    """Why ``ffa`` exists: mean(B) @ mean(A) differs from mean(B @ A) in general."""
    rng = np.random.default_rng(1)
    As = [rng.normal(size=(2, 4)) for _ in range(2)]
    Bs = [rng.normal(size=(4, 2)) for _ in range(2)]
    contrib = {f"c{i}": Contribution({"A": As[i], "B": Bs[i]}, 1.0) for i in range(2)}
    avg = fedavg_delta(contrib)
    exact = (Bs[0] @ As[0] + Bs[1] @ As[1]) / 2
    assert not np.allclose(avg["B"] @ avg["A"], exact, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (3, 4), elements=finite), st.floats(0.01, 5.0))
def test_clip_bounds_the_norm_and_keeps_small_updates(x: np.ndarray, clip: float) -> None:
    clipped, norm = clip_delta({"x": x}, clip)
    assert delta_norm(clipped) <= clip * (1 + 1e-9)
    assert norm == pytest.approx(float(np.linalg.norm(x.astype(np.float64))))
    if norm <= clip:
        np.testing.assert_array_equal(clipped["x"], x.astype(np.float64))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "minus-inf"])
def test_non_finite_updates_are_detected_and_never_clipped(value: float) -> None:
    delta = {"x": np.array([1.0, value])}
    assert not is_finite(delta)
    assert delta_norm(delta) == math.inf
    with pytest.raises(ValueError, match="non-finite"):
        clip_delta(delta, 1.0)


def test_noised_sum_uses_the_fixed_denominator_and_the_given_noise() -> None:
    clipped = {"a": {"w": np.ones(4)}, "b": {"w": 3 * np.ones(4)}}
    template = {"w": np.zeros(4)}
    no_noise = noised_sum_delta(
        clipped,
        template=template,
        clip=1.0,
        noise_multiplier=0.0,
        expected_clients=4.0,
        rng=np.random.default_rng(0),
    )
    np.testing.assert_allclose(no_noise["w"], np.ones(4))  # (1 + 3) / 4, not / 2
    big = noised_sum_delta(
        {},
        template={"w": np.zeros(20_000)},
        clip=0.5,
        noise_multiplier=2.0,
        expected_clients=1.0,
        rng=np.random.default_rng(0),
    )
    assert float(np.std(big["w"])) == pytest.approx(1.0, rel=0.03)  # σ·clip


def test_subtract_and_add_round_trip_and_check_shapes() -> None:
    g = {"w": np.arange(4, dtype=np.float32)}
    local = {"w": g["w"] + 0.25}
    d = subtract(local, g)
    np.testing.assert_array_equal(add_delta(g, d)["w"], local["w"])
    assert add_delta(g, d)["w"].dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        subtract({"w": np.zeros(3)}, g)


def test_empty_or_weightless_aggregation_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing to aggregate"):
        fedavg_delta({})
    with pytest.raises(ValueError, match="positive"):
        fedavg_delta({"a": Contribution({"w": np.zeros(1)}, 0.0)})


A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
GLOBAL = {A: np.ones((2, 4), np.float32), B: np.zeros((4, 2), np.float32)}


def test_ffa_clients_exchange_b_only_and_fedavg_clients_everything() -> None:
    assert exchanged_names(GLOBAL, "ffa") == {B}
    assert exchanged_names(GLOBAL, "fedavg") == {A, B}
    assert exchanged_names({B: GLOBAL[B]}, "ffa") == {B}  # the phones' own initial adapter


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param(
            lambda u: {k: v for k, v in u.items() if k != B}, "missing 1 of", id="missing"
        ),
        pytest.param(
            lambda u: {**u, "m.k_proj.lora_B.weight": u[B]}, "does not exchange", id="extra"
        ),
        pytest.param(lambda u: {**u, B: u[B].reshape(2, 4)}, "shape (2, 4) differs", id="shape"),
        pytest.param(
            lambda u: {**u, B: np.zeros((4, 3), np.float32)}, "LoRA rank 3 differs", id="rank"
        ),
        pytest.param(lambda u: {**u, B: u[B].astype(np.float16)}, "dtype float16", id="float16"),
        pytest.param(lambda u: {**u, B: u[B].astype(np.int64)}, "dtype int64", id="int64"),
    ],
)
def test_structure_error_names_what_is_wrong(aggregation: str, change: Any, reason: str) -> None:
    names = exchanged_names(GLOBAL, aggregation)
    update = {k: GLOBAL[k] + 0.5 for k in names}
    assert structure_error(update, GLOBAL, names=names) is None
    why = structure_error(change(update), GLOBAL, names=names)
    assert why is not None
    assert reason in why
    assert B in why or "m.k_proj.lora_B.weight" in why  # names the offending tensor


def test_a_lora_a_tensor_is_extra_under_ffa_and_its_rank_is_checked_under_fedavg() -> None:
    ffa, fedavg = exchanged_names(GLOBAL, "ffa"), exchanged_names(GLOBAL, "fedavg")
    sent_a = {A: GLOBAL[A], B: GLOBAL[B]}
    assert "does not exchange" in str(structure_error(sent_a, GLOBAL, names=ffa))
    wrong_rank = {A: np.ones((3, 4), np.float32), B: GLOBAL[B]}
    assert "LoRA rank 3 differs from the global adapter's rank 2" in str(
        structure_error(wrong_rank, GLOBAL, names=fedavg)
    )
