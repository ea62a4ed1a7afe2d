"""② aggregate: the pure arithmetic of LoRA adapter aggregation.

No Flower, no I/O, no randomness of its own: every function maps numpy arrays to
numpy arrays, so the rules can be property-tested in isolation.

Invariants:
* Aggregation is **order-invariant bit for bit**: contributions are keyed by client id
  and summed in sorted key order, in float64, then cast back to the tensor's dtype.
  A round therefore gives the same global adapter whichever client answered first.
* ``fedavg`` averages ``lora_A`` and ``lora_B`` separately. The product of the averages
  is not the average of the products, so this rule is inexact (Sun et al. 2024,
  "Improving LoRA in privacy-preserving federated learning", FFA-LoRA §3).
* ``ffa`` only ever receives ``lora_B``: ``A`` is frozen at a seeded init shared by all
  clients, so ``mean_i(B_i) @ A == mean_i(B_i @ A)`` — the average is exact, and the
  upload is half of ``fedavg`` for square projections.
* An update is aggregated only if it has exactly the tensors the mode exchanges
  (:func:`exchanged_names`), each with the global adapter's dtype and shape (so the
  LoRA rank too): :func:`structure_error` says why not, before any arithmetic runs.
* Central DP (DP-FedAvg, McMahan et al. 2018, Alg. 1 with the fixed-denominator
  estimator): each client's delta is clipped to L2 norm ``clip``; the sum gets Gaussian
  noise of standard deviation ``noise_multiplier * clip`` and is divided by the
  *expected* number of clients, so one user's influence is bounded by ``clip / E[m]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Adapter",
    "Contribution",
    "add_delta",
    "clip_delta",
    "delta_norm",
    "exchanged_names",
    "fedavg_delta",
    "is_finite",
    "noised_sum_delta",
    "structure_error",
    "subtract",
]

#: An adapter (or an adapter delta): PEFT state-dict name → array.
Adapter = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Contribution:
    """One client's accepted update for a round.

    Attributes:
        delta: the client's adapter minus the global adapter, for the keys it sent.
        weight: aggregation weight (number of training examples for plain FedAvg).
    """

    delta: Adapter
    weight: float


def exchanged_names(reference: Adapter, aggregation: str) -> frozenset[str]:
    """The tensor names every client must send back for ``reference``.

    ``fedavg``: all of them. ``ffa``: all but the frozen ``lora_A`` tensors (the
    phones' initial adapter holds ``lora_B`` only, so that is usually all of them too).
    """
    if aggregation == "ffa":
        return frozenset(k for k in reference if ".lora_A." not in k)
    return frozenset(reference)


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _rank_axis(name: str) -> int | None:
    """Where the LoRA rank sits: ``lora_A`` is ``(rank, in)``, ``lora_B`` ``(out, rank)``."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def _shape_error(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    axis = _rank_axis(name)
    if axis is not None and len(got) == len(want) == 2:
        others_match = all(
            g == w for i, (g, w) in enumerate(zip(got, want, strict=True)) if i != axis
        )
        if others_match:
            return (
                f"{name}: LoRA rank {got[axis]} differs from the global adapter's rank "
                f"{want[axis]} (shape {got}, expected {want})"
            )
    return f"{name}: shape {got} differs from the global adapter's {want}"


def structure_error(update: Adapter, reference: Adapter, *, names: frozenset[str]) -> str | None:
    """Why ``update`` cannot be aggregated against ``reference``, or ``None``.

    Checks, in this order: the exact set of tensor names (``names``, from
    :func:`exchanged_names`), then for each name the dtype and the shape (a shape that
    differs only in the rank axis is reported as a LoRA rank mismatch). The values are
    not looked at: finiteness and norm are the caller's next checks.
    """
    missing = sorted(names - set(update))
    if missing:
        return f"missing {len(missing)} of {len(names)} exchanged tensor(s): {_few(missing)}"
    extra = sorted(set(update) - names)
    if extra:
        return f"{len(extra)} tensor(s) the global adapter does not exchange: {_few(extra)}"
    for name in sorted(names):
        got, want = np.asarray(update[name]), reference[name]
        if got.dtype != want.dtype:
            return f"{name}: dtype {got.dtype} differs from the global adapter's {want.dtype}"
        if got.shape != want.shape:
            return _shape_error(name, got.shape, want.shape)
    return None


def subtract(local: Adapter, reference: Adapter) -> dict[str, np.ndarray]:
    """``local - reference`` for every key of ``local``, computed in float64.

    Raises:
        KeyError: ``reference`` lacks a key of ``local``.
        ValueError: a shape differs between the two.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in local.items():
        ref = reference[key]
        if value.shape != ref.shape:
            raise ValueError(f"{key}: shape {value.shape} differs from global {ref.shape}")
        out[key] = value.astype(np.float64) - ref.astype(np.float64)
    return out


def add_delta(base: Adapter, delta: Adapter) -> dict[str, np.ndarray]:
    """``base + delta`` (keys absent from ``delta`` are copied); dtypes follow ``base``."""
    out = {k: np.array(v, copy=True) for k, v in base.items()}
    for key, d in delta.items():
        out[key] = (base[key].astype(np.float64) + d).astype(base[key].dtype)
    return out


def is_finite(delta: Adapter) -> bool:
    """True when no tensor holds NaN or ±Inf."""
    return all(bool(np.isfinite(v).all()) for v in delta.values())


def delta_norm(delta: Adapter) -> float:
    """The global L2 norm over all tensors of an update (``inf`` when non-finite)."""
    total = math.fsum(float(np.sum(np.square(v.astype(np.float64)))) for v in delta.values())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clip_delta(delta: Adapter, clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``delta`` so its global L2 norm is at most ``clip``.

    Returns:
        The clipped delta and the norm before clipping.

    Raises:
        ValueError: ``clip`` is not positive, or the delta is not finite.
    """
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    norm = delta_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("cannot clip a non-finite update; reject it first")
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v.astype(np.float64) * scale for k, v in delta.items()}, norm


def _sorted_sum(
    contributions: Mapping[str, Contribution], factors: Mapping[str, float]
) -> dict[str, np.ndarray]:
    keys = sorted(contributions)
    names = set(contributions[keys[0]].delta)
    for cid in keys[1:]:
        if set(contributions[cid].delta) != names:
            raise ValueError(f"client {cid} sent a different set of tensors than {keys[0]}")
    total: dict[str, np.ndarray] = {}
    for cid in keys:  # fixed order: float addition is not associative
        for name, value in contributions[cid].delta.items():
            term = value.astype(np.float64) * factors[cid]
            total[name] = term if name not in total else total[name] + term
    return total


def fedavg_delta(contributions: Mapping[str, Contribution]) -> dict[str, np.ndarray]:
    """Weighted mean of the clients' deltas (weights normalised to sum to one).

    Used by both ``fedavg`` (keys hold A and B) and ``ffa`` (keys hold B only); the
    rule is the same, what differs is which tensors the clients train and send.

    Raises:
        ValueError: no contributions, a non-positive total weight, or clients that
            sent different tensor names.
    """
    if not contributions:
        raise ValueError("nothing to aggregate: no accepted client updates")
    total_weight = math.fsum(c.weight for c in contributions.values())
    if not total_weight > 0:
        raise ValueError(f"total aggregation weight must be positive, got {total_weight}")
    factors = {cid: c.weight / total_weight for cid, c in contributions.items()}
    return _sorted_sum(contributions, factors)


def noised_sum_delta(
    clipped: Mapping[str, Adapter],
    *,
    template: Adapter,
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """DP-FedAvg: ``(sum of clipped deltas + N(0, (σ·clip)²)) / expected_clients``.

    Args:
        clipped: already clipped deltas keyed by client id (may be empty: the noise is
            still added, as the privacy analysis assumes).
        template: names and shapes of the tensors being aggregated.
        clip: the L2 bound each delta was clipped to.
        noise_multiplier: σ, noise standard deviation in units of ``clip``.
        expected_clients: the fixed denominator ``q · N``.
        rng: the source of the Gaussian noise (seeded per round by the caller).

    Raises:
        ValueError: a non-positive ``expected_clients`` or a negative σ.
    """
    if expected_clients <= 0 or noise_multiplier < 0:
        raise ValueError("expected_clients must be > 0 and noise_multiplier >= 0")
    total: dict[str, np.ndarray]
    if clipped:
        total = _sorted_sum(
            {k: Contribution(v, 1.0) for k, v in clipped.items()}, dict.fromkeys(clipped, 1.0)
        )
    else:
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
    std = noise_multiplier * clip
    for name in sorted(template):
        shape = template[name].shape
        total[name] = (total[name] + rng.normal(0.0, std, size=shape)) / expected_clients
    return total
