"""Encode/decode round trips (property tests) and encoding choices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from delta_packager import BundleFormatError, PackagerInputError
from delta_packager.encode import EncodedTensor, decode_tensor, encode_tensor, expected_parts

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=24)
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@_SETTINGS
@given(hnp.arrays(np.float32, shapes, elements=finite))
def test_fp32_round_trip_is_exact(x: np.ndarray) -> None:
    assert decode_tensor(encode_tensor(x, "fp32")).tobytes() == x.tobytes()


@_SETTINGS
@given(hnp.arrays(np.float32, shapes, elements=finite))
def test_fp16_round_trip_equals_a_half_cast(x: np.ndarray) -> None:
    enc = encode_tensor(x, "fp16")
    got = decode_tensor(enc)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.array_equal(got, x.astype(np.float16).astype(np.float32))


@_SETTINGS
@given(hnp.arrays(np.float32, shapes, elements=finite))
def test_int8_error_is_at_most_half_a_step_per_scale_group(x: np.ndarray) -> None:
    enc = encode_tensor(x, "int8")
    got = decode_tensor(enc)
    assert got.shape == x.shape
    if enc.encoding == "zero":
        assert not np.any(x.view(np.uint32))
        return
    scale = enc.parts["scale"]
    assert np.all(np.isfinite(scale)) and np.all(scale >= 0)
    assert enc.parts["q"].dtype == np.int8 and int(np.min(enc.parts["q"])) >= -127
    if enc.encoding == "int8_col":
        step = np.broadcast_to(scale[None, :], x.shape)
    else:
        step = np.repeat(scale, x.size // scale.size).reshape(x.shape)
    # Half a quantization step, plus float32 rounding of the division and product.
    assert np.all(np.abs(got - x) <= step * 0.5 * (1 + 1e-5) + np.abs(x) * 1e-6)


@_SETTINGS
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_int8_decoding_is_deterministic_and_picks_fewer_scales(
    rows: int, cols: int, seed: int
) -> None:
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    a, b = encode_tensor(x, "int8"), encode_tensor(x.copy(), "int8")
    assert decode_tensor(a).tobytes() == decode_tensor(b).tobytes()
    assert a.encoding == ("int8_col" if rows > cols else "int8_row")
    assert a.parts["scale"].shape == ((cols,) if rows > cols else (rows,))


@pytest.mark.parametrize("scheme", ["fp32", "fp16", "int8"])
def test_all_zero_tensor_is_stored_as_nothing(scheme: str) -> None:
    enc = encode_tensor(np.zeros((8, 16), np.float32), scheme)  # type: ignore[arg-type]
    assert enc.encoding == "zero" and enc.stored_bytes == 0
    assert np.array_equal(decode_tensor(enc), np.zeros((8, 16), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_input_is_refused(bad: float) -> None:
    x = np.ones((4, 4), np.float32)
    x[1, 2] = bad
    with pytest.raises(PackagerInputError, match="NaN or Inf"):
        encode_tensor(x, "int8")


def test_fp16_overflow_falls_back_to_fp32() -> None:
    x = np.array([[1e6, 1.0]], np.float32)
    enc = encode_tensor(x, "fp16")
    assert enc.encoding == "fp32" and np.array_equal(decode_tensor(enc), x)


def test_all_zero_row_keeps_zero_scale_and_codes() -> None:
    x = np.zeros((3, 5), np.float32)
    x[1] = np.linspace(-1, 1, 5)
    enc = encode_tensor(x, "int8")
    assert enc.encoding == "int8_row"
    assert enc.parts["scale"][0] == 0 and enc.parts["scale"][2] == 0
    assert not np.any(decode_tensor(enc)[[0, 2]])


@pytest.mark.parametrize(
    ("encoding", "shape", "parts"),
    [
        ("int8_col", (2, 3, 4), {}),
        ("bf4", (2, 2), {}),
        ("int8_row", (2, 3), {"q": np.zeros((2, 3), np.int8)}),
        ("fp16", (2, 3), {"data": np.zeros((2, 3), np.float32)}),
    ],
    ids=["int8-col-needs-2d", "unknown-encoding", "missing-scale", "wrong-dtype"],
)
def test_decode_refuses_parts_that_do_not_match(
    encoding: str, shape: tuple[int, ...], parts: dict[str, np.ndarray]
) -> None:
    with pytest.raises(BundleFormatError):
        decode_tensor(EncodedTensor(encoding, shape, parts))


def test_expected_parts_for_int8_row_on_3d_tensor() -> None:
    assert expected_parts("int8_row", (2, 3, 4)) == {"q": ("i1", (2, 3, 4)), "scale": ("<f4", (2,))}
