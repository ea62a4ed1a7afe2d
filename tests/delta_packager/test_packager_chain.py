"""Closed-loop deltas, apply, fallback and collapse (THREATS B8, B11, C12, C14)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delta_packager import (
    AdapterConfig,
    AdapterState,
    BaseMismatchError,
    ChainMismatchError,
    PackagePolicy,
    PackagerInputError,
    PackagerState,
    PackagerStateError,
    Provenance,
    RollbackError,
    apply_bundle,
    build_bundle,
    package_version,
    parse_bundle,
)
from tests.delta_packager.packager_helpers import FP_X, FP_Y, random_adapter, same_bits, train_step

Adapter = dict[str, np.ndarray]


def _release_chain(
    adapters: list[Adapter], config: AdapterConfig, policy: PackagePolicy
) -> tuple[list[PackagerState], list[bytes]]:
    states: list[PackagerState] = []
    bundles: list[bytes] = []
    state = None
    for adapter in adapters:
        result = package_version(
            adapter, previous=state, base_fingerprint=FP_X, adapter_config=config, policy=policy
        )
        state = result.state
        states.append(state)
        bundles.append(result.bundle_bytes)
    return states, bundles


def _rounds(seed: int, n: int, *, lr: float = 1e-3) -> list[Adapter]:
    rng = np.random.default_rng(seed)
    adapters = [random_adapter(rng)]
    for _ in range(n - 1):
        adapters.append(train_step(rng, adapters[-1], lr=lr))
    return adapters


def test_twenty_chained_int8_deltas_equal_the_packager_reconstruction_bit_for_bit(
    adapter_config: AdapterConfig,
) -> None:
    adapters = _rounds(0, 21)
    states, bundles = _release_chain(adapters, adapter_config, PackagePolicy(chain_limit=20))
    device: AdapterState | None = None
    for state, data in zip(states, bundles, strict=True):
        device = apply_bundle(device, parse_bundle(data), base_fingerprint=FP_X)
        assert same_bits(dict(device.tensors), dict(state.current.tensors))
    assert device is not None and device.version == 21
    kinds = [parse_bundle(b).manifest.kind for b in bundles]
    assert kinds == ["full"] + ["delta"] * 20


def test_closed_loop_error_does_not_accumulate_but_open_loop_does(
    adapter_config: AdapterConfig,
) -> None:
    """The reason for closed loop: open-loop int8 deltas drift, closed-loop ones do not."""
    from delta_packager.encode import decode_tensor, encode_tensor

    adapters = _rounds(3, 21, lr=5e-3)
    states, _ = _release_chain(
        adapters, adapter_config, PackagePolicy(chain_limit=20, full_encoding="fp32")
    )
    closed = max(
        float(np.max(np.abs(states[-1].current.tensors[k] - adapters[-1][k]))) for k in adapters[-1]
    )
    open_loop = {k: v.copy() for k, v in adapters[0].items()}
    for prev, new in itertools.pairwise(adapters):
        for k in open_loop:
            open_loop[k] = open_loop[k] + decode_tensor(encode_tensor(new[k] - prev[k], "int8"))
    drift = max(float(np.max(np.abs(open_loop[k] - adapters[-1][k]))) for k in open_loop)
    one_step = (
        max(float(np.max(np.abs(adapters[-1][k] - adapters[-2][k]))) for k in adapters[-1]) / 127
    )
    assert closed <= one_step * 0.51 + 1e-7
    assert drift > 3 * closed


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**16),
    rounds=st.integers(2, 9),
    chain_limit=st.integers(0, 4),
    encoding=st.sampled_from(["int8", "fp16"]),
)
def test_any_chain_and_any_catch_up_bundle_reconstruct_the_same_state(
    adapter_config: AdapterConfig, seed: int, rounds: int, chain_limit: int, encoding: str
) -> None:
    policy = PackagePolicy(chain_limit=chain_limit, max_behind=4, delta_encoding=encoding)  # type: ignore[arg-type]
    states, bundles = _release_chain(_rounds(seed, rounds), adapter_config, policy)
    device: AdapterState | None = None
    for state, data in zip(states, bundles, strict=True):
        device = apply_bundle(device, parse_bundle(data), base_fingerprint=FP_X)
        assert same_bits(dict(device.tensors), dict(state.current.tensors))
    # A device at any earlier version (or none) catches up to the latest exactly.
    final = states[-1]
    for held in [None, *states[:-1]]:
        data = build_bundle(
            final, from_version=None if held is None else held.latest_version, policy=policy
        )
        bundle = parse_bundle(data)
        start = None if held is None else held.current
        if bundle.manifest.kind == "full":
            start = (
                start
                if held is None or held.current.release_counter < bundle.manifest.release_counter
                else None
            )
        got = apply_bundle(start, bundle, base_fingerprint=FP_X)
        assert same_bits(dict(got.tensors), dict(final.current.tensors))


def test_chain_limit_starts_a_new_full_anchor(adapter_config: AdapterConfig) -> None:
    states, bundles = _release_chain(_rounds(1, 7), adapter_config, PackagePolicy(chain_limit=2))
    kinds = [parse_bundle(b).manifest.kind for b in bundles]
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta", "full"]
    assert states[-1].anchor_version == 7 and len(states[-1].chain) == 1


@pytest.mark.parametrize(
    ("held", "kind", "from_version", "steps"),
    [
        (7, "delta", 7, [8]),
        (6, "delta", 6, [7, 8]),  # collapsed: one bundle, two stacked steps
        (5, "full", None, [5, 6, 7, 8]),  # on the chain but more than max_behind=2 back
        (3, "full", None, [5, 6, 7, 8]),  # behind the anchor (v5)
        (None, "full", None, [5, 6, 7, 8]),
    ],
    ids=["one-behind", "two-behind-collapsed", "too-far-behind", "before-anchor", "no-adapter"],
)
def test_device_far_behind_gets_full_or_collapsed_delta(
    adapter_config: AdapterConfig,
    held: int | None,
    kind: str,
    from_version: int | None,
    steps: list[int],
) -> None:
    """THREATS C14: never a chain the device cannot apply."""
    policy = PackagePolicy(chain_limit=3, max_behind=2)
    states, _ = _release_chain(_rounds(2, 8), adapter_config, policy)
    bundle = parse_bundle(build_bundle(states[-1], from_version=held, policy=policy))
    m = bundle.manifest
    assert (m.kind, m.from_version, [s.to_version for s in m.steps]) == (kind, from_version, steps)
    device = None if held is None or kind == "full" else states[held - 1].current
    got = apply_bundle(device, bundle, base_fingerprint=FP_X)
    assert same_bits(dict(got.tensors), dict(states[-1].current.tensors))


def test_delta_from_another_version_is_refused(adapter_config: AdapterConfig) -> None:
    states, bundles = _release_chain(_rounds(4, 3), adapter_config, PackagePolicy())
    with pytest.raises(ChainMismatchError, match="from version 2 to 3, the device holds version 1"):
        apply_bundle(states[0].current, parse_bundle(bundles[2]), base_fingerprint=FP_X)
    with pytest.raises(ChainMismatchError, match="holds version None"):
        apply_bundle(None, parse_bundle(bundles[1]), base_fingerprint=FP_X)


def test_older_release_is_refused_as_rollback(adapter_config: AdapterConfig) -> None:
    """THREATS B8: a genuine but older bundle offered again."""
    states, bundles = _release_chain(_rounds(5, 3), adapter_config, PackagePolicy())
    with pytest.raises(RollbackError, match="release counter is 1, the installed adapter's is 3"):
        apply_bundle(states[2].current, parse_bundle(bundles[0]), base_fingerprint=FP_X)
    with pytest.raises(RollbackError):  # replaying the installed release
        apply_bundle(states[2].current, parse_bundle(bundles[2]), base_fingerprint=FP_X)


def test_rollback_to_old_adapter_is_a_new_higher_release(adapter_config: AdapterConfig) -> None:
    """THREATS B11: the operator re-releases v1's weights as v3."""
    adapters = _rounds(6, 2)
    states, _ = _release_chain(adapters, adapter_config, PackagePolicy(delta_encoding="fp32"))
    result = package_version(
        adapters[0],
        previous=states[-1],
        base_fingerprint=FP_X,
        adapter_config=adapter_config,
        policy=PackagePolicy(delta_encoding="fp32"),
    )
    m = result.bundle.manifest
    assert (m.to_version, m.release_counter) == (3, 3)
    device = apply_bundle(states[-1].current, result.bundle, base_fingerprint=FP_X)
    assert device.release_counter == 3
    for k, v in adapters[0].items():
        np.testing.assert_allclose(device.tensors[k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device_fp", [FP_Y], ids=["other-base"])
def test_bundle_for_another_base_is_refused(adapter_config: AdapterConfig, device_fp: str) -> None:
    """THREATS C12: bundle for base X forced onto a device holding base Y."""
    _, bundles = _release_chain(_rounds(7, 1), adapter_config, PackagePolicy())
    with pytest.raises(BaseMismatchError, match=f"built for base {FP_X}.*holds {device_fp}"):
        apply_bundle(None, parse_bundle(bundles[0]), base_fingerprint=device_fp)


def test_packager_refuses_to_continue_a_state_for_another_base(
    adapter_config: AdapterConfig,
) -> None:
    states, _ = _release_chain(_rounds(8, 1), adapter_config, PackagePolicy())
    with pytest.raises(PackagerStateError, match="start a new state"):
        package_version(
            _rounds(8, 1)[0],
            previous=states[0],
            base_fingerprint=FP_Y,
            adapter_config=adapter_config,
        )


def test_layout_change_forces_a_full_bundle(adapter_config: AdapterConfig) -> None:
    states, _ = _release_chain(_rounds(9, 2), adapter_config, PackagePolicy())
    wider = random_adapter(np.random.default_rng(1), rank=8)
    with pytest.raises(PackagerInputError, match="rank 4"):
        package_version(
            wider, previous=states[-1], base_fingerprint=FP_X, adapter_config=adapter_config
        )
    rank8 = AdapterConfig(rank=8, alpha=16.0, target_modules=adapter_config.target_modules)
    result = package_version(
        wider, previous=states[-1], base_fingerprint=FP_X, adapter_config=rank8
    )
    assert result.bundle.manifest.kind == "full" and result.state.latest_version == 3


@pytest.mark.parametrize(
    "corrupt",
    [lambda a: a.__setitem__(next(iter(a)), a[next(iter(a))] * np.nan), lambda a: a.clear()],
    ids=["nan-weights", "empty"],
)
def test_broken_adapter_is_refused(
    adapter_config: AdapterConfig, corrupt: Callable[[Adapter], None]
) -> None:
    adapter = _rounds(10, 1)[0]
    corrupt(adapter)
    with pytest.raises(PackagerInputError):
        package_version(
            adapter, previous=None, base_fingerprint=FP_X, adapter_config=adapter_config
        )


def test_ffa_frozen_a_costs_nothing_in_a_delta(adapter_config: AdapterConfig) -> None:
    adapters = _rounds(11, 1)
    moved = {k: (v + 1e-3 if ".lora_B." in k else v) for k, v in adapters[0].items()}
    states, _ = _release_chain([adapters[0]], adapter_config, PackagePolicy(full_encoding="fp32"))
    result = package_version(
        moved, previous=states[0], base_fingerprint=FP_X, adapter_config=adapter_config
    )
    encs = result.bundle.manifest.steps[0].encodings
    assert all(e == "zero" for k, e in encs.items() if ".lora_A." in k)
    assert all(e.startswith("int8") for k, e in encs.items() if ".lora_B." in k)


def test_provenance_travels_in_the_manifest(adapter_config: AdapterConfig) -> None:
    prov = Provenance(
        round=3,
        num_clients=5,
        aggregation="ffa",
        clip_norm=1.0,
        noise_multiplier=0.8,
        epsilon=2.5,
        delta=1e-5,
        eval_metrics={"loss": 2.25},
    )
    result = package_version(
        _rounds(12, 1)[0],
        previous=None,
        base_fingerprint=FP_X,
        adapter_config=adapter_config,
        provenance=prov,
    )
    assert parse_bundle(result.bundle_bytes).manifest.provenance == prov


@pytest.mark.parametrize(
    ("deadband", "a_is_zero"), [(0.5, True), (0.0, False)], ids=["deadband", "no-deadband"]
)
def test_frozen_a_after_an_int8_anchor_is_not_resent(
    adapter_config: AdapterConfig, deadband: float, a_is_zero: bool
) -> None:
    """FFA keeps A fixed; the int8 anchor's rounding residual must not ship every round."""
    adapter = _rounds(13, 1)[0]
    policy = PackagePolicy(deadband_steps=deadband)
    states, _ = _release_chain([adapter], adapter_config, policy)
    moved = {k: (v + 1e-3 if ".lora_B." in k else v) for k, v in adapter.items()}
    result = package_version(
        moved,
        previous=states[0],
        base_fingerprint=FP_X,
        adapter_config=adapter_config,
        policy=policy,
    )
    encs = result.bundle.manifest.steps[0].encodings
    assert all((e == "zero") == a_is_zero for k, e in encs.items() if ".lora_A." in k)
    # Either way the device stays within half an int8 step of the weights.
    for k, v in moved.items():
        step = float(np.max(np.abs(v))) / 127
        assert float(np.max(np.abs(result.state.current.tensors[k] - v))) <= 0.5 * step * (1 + 1e-4)


_shape = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    shapes=st.lists(_shape, min_size=1, max_size=4),
    encoding=st.sampled_from(["int8", "fp16"]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-4, 1.0, 100.0]),
)
def test_encode_apply_round_trip_across_shapes(
    adapter_config: AdapterConfig,
    shapes: list[tuple[int, int]],
    encoding: str,
    seed: int,
    scale: float,
) -> None:
    """prev + decode(encode(new - prev)) is the packager's state exactly and near ``new``."""
    rng = np.random.default_rng(seed)
    prev = {
        f"t{i}.weight": (scale * rng.standard_normal(s)).astype(np.float32)
        for i, s in enumerate(shapes)
    }
    new = {
        k: (v + 0.1 * scale * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in prev.items()
    }
    policy = PackagePolicy(full_encoding="fp32", delta_encoding=encoding, deadband_steps=0)  # type: ignore[arg-type]
    first = package_version(
        prev, previous=None, base_fingerprint=FP_X, adapter_config=adapter_config, policy=policy
    )
    assert same_bits(dict(first.state.current.tensors), prev)  # fp32 full is lossless
    second = package_version(
        new,
        previous=first.state,
        base_fingerprint=FP_X,
        adapter_config=adapter_config,
        policy=policy,
    )
    device = apply_bundle(
        first.state.current, parse_bundle(second.bundle_bytes), base_fingerprint=FP_X
    )
    assert same_bits(dict(device.tensors), dict(second.state.current.tensors))
    for k, v in new.items():
        d = np.abs(v - prev[k])
        # fp16: half an ulp relative, or half the subnormal spacing (2**-25) absolute.
        bound = d.max() / 254 * 1.01 if encoding == "int8" else d.max() * 2.0**-11 + 2.0**-25
        assert (
            float(np.max(np.abs(device.tensors[k] - v)))
            <= bound + float(np.max(np.abs(v))) * 2.0**-22
        )
