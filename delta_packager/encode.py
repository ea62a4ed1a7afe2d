"""③ package — per-tensor encodings of adapter tensors and deltas (numpy only).

Encodings (the names are part of bundle format version 1):

* ``fp32`` — lossless little-endian float32.
* ``fp16`` — IEEE half precision; values outside the fp16 range are refused.
* ``int8_row`` — symmetric int8 codes with one float32 scale per row of the tensor
  viewed as ``(shape[0], -1)``: ``x ≈ q * scale[row]``.
* ``int8_col`` — the same with one scale per column of a 2-D tensor. Chosen for tall
  matrices (LoRA ``B`` is ``out × r``) so there are ``r`` scales, not ``out``.
* ``zero`` — the tensor is all zeros; nothing is stored (a frozen FFA ``A`` delta).

Invariants:

* ``decode_tensor`` is deterministic: a float32 cast followed by one float32 multiply
  per element, no reductions, so the packager and every device decode identical bits.
* Scales are finite and non-negative; an all-zero row has scale 0 and codes 0.
* Inputs with NaN or Inf are refused; they never reach a bundle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from delta_packager.errors import BundleFormatError, PackagerInputError

__all__ = [
    "ENCODINGS",
    "EncodedTensor",
    "Scheme",
    "decode_tensor",
    "encode_tensor",
    "expected_parts",
]

logger = logging.getLogger(__name__)

Scheme = Literal["fp32", "fp16", "int8"]
"""What the packager asks for; ``int8`` resolves to ``int8_row`` or ``int8_col``."""

ENCODINGS = ("fp32", "fp16", "int8_row", "int8_col", "zero")

_INT8_MAX = 127
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor in encoded form.

    Attributes:
        encoding: One of ``ENCODINGS``.
        shape: Shape of the decoded float32 tensor.
        parts: Stored arrays by part name: ``"data"`` (fp32/fp16), or ``"q"`` (int8)
            and ``"scale"`` (float32); empty for ``zero``.
    """

    encoding: str
    shape: tuple[int, ...]
    parts: Mapping[str, np.ndarray]

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data this encoding stores (before compression)."""
        return sum(int(a.nbytes) for a in self.parts.values())


def _rows_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return (1, 1)
    rows = shape[0]
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    if len(shape) == 1:
        return (1, rows)
    return (rows, cols)


def expected_parts(encoding: str, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return the stored parts an encoding needs: part name -> (numpy dtype, shape).

    The strict parser uses this to check every stored tensor against the manifest.

    Raises:
        BundleFormatError: ``encoding`` is unknown, or ``int8_col`` on a non-2-D shape.
    """
    if encoding == "fp32":
        return {"data": ("<f4", shape)}
    if encoding == "fp16":
        return {"data": ("<f2", shape)}
    if encoding == "zero":
        return {}
    if encoding == "int8_row":
        rows, _ = _rows_view_shape(shape)
        return {"q": ("i1", shape), "scale": ("<f4", (rows,))}
    if encoding == "int8_col":
        if len(shape) != 2:
            raise BundleFormatError(
                f"encoding int8_col needs a 2-D tensor, observed shape {list(shape)}; "
                "the bundle is malformed: rebuild it with `fedota package`"
            )
        return {"q": ("i1", shape), "scale": ("<f4", (shape[1],))}
    raise BundleFormatError(
        f"unknown tensor encoding {encoding!r}; expected one of {list(ENCODINGS)}: "
        "the bundle needs a newer fedota, or is corrupt"
    )


def _int8_codes(x2: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 quantization along ``axis`` of a 2-D float32 array."""
    absmax = np.max(np.abs(x2), axis=axis).astype(np.float32)
    scale = (absmax / np.float32(_INT8_MAX)).astype(np.float32)
    # A scale that underflows to 0 while absmax > 0 would lose the row: keep the smallest
    # positive float32 instead (the codes then saturate at ±127, still finite).
    scale = np.where((scale == 0) & (absmax > 0), np.float32(np.finfo(np.float32).tiny), scale)
    safe = np.where(scale == 0, np.float32(1), scale)
    div = x2 / (safe[:, None] if axis == 1 else safe[None, :])
    q = np.clip(np.rint(div), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scale.astype(np.float32)


def encode_tensor(x: np.ndarray, scheme: Scheme) -> EncodedTensor:
    """Encode one float tensor with ``scheme``.

    ``int8`` chooses ``int8_col`` for 2-D tensors with more rows than columns (fewer
    scales) and ``int8_row`` otherwise. All-zero tensors become ``zero``. ``fp16``
    falls back to ``fp32`` for values beyond the fp16 range (logged).

    Args:
        x: The tensor (any float dtype; converted to float32 first).
        scheme: ``"fp32"``, ``"fp16"`` or ``"int8"``.

    Returns:
        The encoded tensor.

    Raises:
        PackagerInputError: ``x`` has NaN/Inf values, or ``scheme`` is unknown.
    """
    arr = np.ascontiguousarray(x, dtype=np.float32)
    shape = tuple(int(d) for d in arr.shape)
    if not np.all(np.isfinite(arr)):
        raise PackagerInputError(
            f"tensor of shape {list(shape)} has NaN or Inf values; expected finite "
            "numbers: check the aggregation that produced this adapter"
        )
    if not np.any(arr.view(np.uint32)):  # bitwise: -0.0 is kept, not turned into +0.0
        return EncodedTensor("zero", shape, {})
    if scheme == "fp32":
        return EncodedTensor("fp32", shape, {"data": arr.copy()})
    if scheme == "fp16":
        if float(np.max(np.abs(arr))) > _FP16_MAX:
            logger.warning("tensor of shape %s exceeds the fp16 range; stored as fp32", shape)
            return EncodedTensor("fp32", shape, {"data": arr.copy()})
        return EncodedTensor("fp16", shape, {"data": arr.astype(np.float16)})
    if scheme == "int8":
        if arr.ndim == 2 and arr.shape[0] > arr.shape[1]:
            q, scale = _int8_codes(arr, axis=0)
            return EncodedTensor("int8_col", shape, {"q": q, "scale": scale})
        rows, cols = _rows_view_shape(shape)
        q, scale = _int8_codes(arr.reshape(rows, cols), axis=1)
        return EncodedTensor("int8_row", shape, {"q": q.reshape(shape), "scale": scale})
    raise PackagerInputError(f"unknown encoding scheme {scheme!r}; expected fp32, fp16 or int8")


def decode_tensor(enc: EncodedTensor) -> np.ndarray:
    """Decode to a fresh float32 array, bit-for-bit the same on every machine.

    Raises:
        BundleFormatError: the parts do not match the encoding (unknown encoding,
            missing part, wrong dtype or shape).
    """
    want = expected_parts(enc.encoding, enc.shape)
    if set(want) != set(enc.parts):
        raise BundleFormatError(
            f"encoding {enc.encoding} needs parts {sorted(want)}, observed {sorted(enc.parts)}"
        )
    for name, (dtype, shape) in want.items():
        part = enc.parts[name]
        if part.dtype != np.dtype(dtype) or tuple(part.shape) != shape:
            raise BundleFormatError(
                f"part {name!r} of a {enc.encoding} tensor is {part.dtype}{list(part.shape)}, "
                f"expected {np.dtype(dtype)}{list(shape)}"
            )
    if enc.encoding == "zero":
        return np.zeros(enc.shape, dtype=np.float32)
    if enc.encoding in ("fp32", "fp16"):
        return np.array(enc.parts["data"], dtype=np.float32, copy=True)
    # int8 -> float32 is exact, so casting inside the ufunc loop gives the same bits as
    # casting first; one float32 multiply per element, no temporaries.
    q, scale = enc.parts["q"], enc.parts["scale"]
    if enc.encoding == "int8_col":
        return np.multiply(q, scale[None, :], dtype=np.float32)
    rows, cols = _rows_view_shape(enc.shape)
    out = np.multiply(q.reshape(rows, cols), scale[:, None], dtype=np.float32)
    return out.reshape(enc.shape)
