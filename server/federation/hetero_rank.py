"""② aggregate: LoRA adapters of different ranks in one federation (HetLoRA-style).

Each phone trains the rank its memory allows (``client.train.rank``); the global
adapter has the largest rank ``R`` of the run. A rank-``r`` phone receives the global
adapter *truncated* to its rank — the first ``r`` rows of every ``lora_A`` and the
first ``r`` columns of every ``lora_B`` (:func:`truncate`) — and sends back an adapter
of rank ``r``. Its update is *zero-padded* to rank ``R`` (:func:`pad`: the missing
rank slices take the global adapter's values, so the delta there is exactly zero), and
each rank slice ``j`` is averaged over the clients whose rank exceeds ``j`` only
(:func:`rank_aware_fedavg_delta`), with today's weights. Why this rule and not an
SVD redistribution: docs/adr/0016-heterogeneous-lora-ranks.md.

Invariants:
* Pure numpy, no Flower, no I/O, like :mod:`server.federation.aggregate`.
* **Exact in the homogeneous case**: when every client has the global rank, the one
  rank segment's cohort is every client, the factors and the summation order are
  :func:`~server.federation.aggregate.fedavg_delta`'s, and the result is bitwise equal
  to it; :func:`rank_aware_noised_sum_delta` likewise equals
  :func:`~server.federation.aggregate.noised_sum_delta` bit for bit.
* ``B·A`` of a truncated adapter is the sum of its first ``r`` rank-one terms
  ``b_j a_jᵀ``, so slice ``j`` means the same thing on every phone that holds it. The
  phones keep the LoRA scale ``alpha / rank`` of the global rank (alpha scaled with
  the rank, ``client.train.rank.scaled_alpha``) for the same reason.
* Central DP: padding adds zeros, so a clipped update keeps its norm ≤ ``clip`` and
  the noised sum's sensitivity is unchanged. The per-slice denominators are the
  *expected* cohort sizes ``q·N_j`` (``N_j``: clients of the population with rank >
  ``j``, known before any data is seen), so dividing by them is post-processing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import numpy as np

from protocol import lora_rank_axis, truncate_to_rank
from server.federation.aggregate import Adapter, Contribution

__all__ = [
    "adapter_rank",
    "pad",
    "rank_aware_fedavg_delta",
    "rank_aware_noised_sum_delta",
    "rank_segments",
    "truncate",
]


def _take(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return array[start:stop] if axis == 0 else array[:, start:stop]


def adapter_rank(adapter: Adapter) -> int:
    """The LoRA rank of ``adapter`` (the rank axis of every LoRA tensor).

    Raises:
        ValueError: no LoRA tensor, or tensors of different ranks.
    """
    ranks = {
        int(np.shape(v)[axis])
        for k, v in adapter.items()
        if (axis := lora_rank_axis(k)) is not None
    }
    if len(ranks) != 1:
        raise ValueError(f"an adapter has one LoRA rank, this one has {sorted(ranks) or 'none'}")
    return ranks.pop()


def truncate(adapter: Adapter, rank: int) -> dict[str, np.ndarray]:
    """The first ``rank`` rank slices of every LoRA tensor (other tensors copied).

    Raises:
        ValueError: ``rank`` is below 1 or above the adapter's rank.
    """
    full = adapter_rank(adapter)
    if not 1 <= rank <= full:
        raise ValueError(f"cannot truncate a rank-{full} adapter to rank {rank}")
    return {k: np.array(v, copy=True) for k, v in truncate_to_rank(adapter, rank).items()}


def pad(update: Adapter, reference: Adapter) -> dict[str, np.ndarray]:
    """``update`` (rank ``r``) raised to ``reference``'s rank ``R ≥ r``.

    The slices ``r..R-1`` take ``reference``'s values, so ``pad(u, g) - g`` is the
    client's delta followed by zeros. Tensors of ``update`` that already have the
    reference shape, and tensors whose non-rank dimensions differ, are copied as they
    are (the structure check rejects the latter with its own message).
    """
    out = {}
    for name, value in update.items():
        value = np.asarray(value)
        axis, ref = lora_rank_axis(name), reference.get(name)
        if axis is None or ref is None or value.ndim != 2 or value.shape == ref.shape:
            out[name] = np.array(value, copy=True)
            continue
        other = 1 - axis
        if value.shape[other] != ref.shape[other] or value.shape[axis] > ref.shape[axis]:
            out[name] = np.array(value, copy=True)
            continue
        r = value.shape[axis]
        rest = _take(ref, axis, r, ref.shape[axis]).astype(value.dtype, copy=False)
        out[name] = np.concatenate([value, rest], axis=axis)
    return out


def rank_segments(ranks: Mapping[str, int], full_rank: int) -> list[tuple[int, int, list[str]]]:
    """``(start, stop, cohort)`` per run of rank slices with the same cohort.

    The cohort of slice ``j`` is the clients whose rank exceeds ``j``, in client-id
    order; slices no client holds get an empty cohort. Segments cover ``0..full_rank``.

    Raises:
        ValueError: a rank below 1 or above ``full_rank``.
    """
    bad = {cid: r for cid, r in ranks.items() if not 1 <= r <= full_rank}
    if bad:
        raise ValueError(f"client ranks must lie in 1..{full_rank}, got {bad}")
    cuts = sorted({0, full_rank, *ranks.values()})
    return [
        (start, stop, sorted(cid for cid, r in ranks.items() if r >= stop))
        for start, stop in itertools.pairwise(cuts)
    ]


def _cohort_sum(
    deltas: Mapping[str, Adapter], cohort: list[str], name: str, piece: tuple[int, int, int] | None,
    factor: Mapping[str, float],
) -> np.ndarray:  # fmt: skip
    """``Σ_i delta_i[name][piece] · factor_i`` in ``cohort`` order (float64), first term
    assigned, the rest added: :func:`aggregate._sorted_sum`'s arithmetic exactly."""
    total: np.ndarray | None = None
    for cid in cohort:
        value = deltas[cid][name]
        if piece is not None:
            value = _take(value, *piece)
        term = value.astype(np.float64) * factor[cid]
        total = term if total is None else total + term
    assert total is not None
    return total


def _same_names(deltas: Mapping[str, Adapter]) -> set[str]:
    keys = sorted(deltas)
    names = set(deltas[keys[0]])
    for cid in keys[1:]:
        if set(deltas[cid]) != names:
            raise ValueError(f"client {cid} sent a different set of tensors than {keys[0]}")
    return names


def rank_aware_fedavg_delta(
    contributions: Mapping[str, Contribution], ranks: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Weighted mean of zero-padded deltas, each rank slice over the clients that hold it.

    Args:
        contributions: deltas at the global rank ``R`` (padded with :func:`pad`, so zero
            beyond each client's rank), with today's weights (examples trained on).
        ranks: client id → the rank it trained; a client without an entry, or with a
            rank above ``R``, has rank ``R`` (it received, and holds, all of it).

    Returns:
        For a LoRA tensor, slice ``j`` = ``Σ_{i: r_i > j} w_i δ_i[j] / Σ_{i: r_i > j} w_i``
        (zero where no client holds the slice); any other tensor is the plain weighted
        mean. Bitwise equal to ``fedavg_delta`` when every client has rank ``R``.

    Raises:
        ValueError: no contributions, a non-positive cohort weight, clients that sent
            different tensor names, or a rank outside ``1..R``.
    """
    if not contributions:
        raise ValueError("nothing to aggregate: no accepted client updates")
    deltas = {cid: c.delta for cid, c in contributions.items()}
    names = _same_names(deltas)
    full = adapter_rank(next(iter(deltas.values())))
    own = {cid: min(ranks.get(cid, full), full) for cid in contributions}
    segments = rank_segments(own, full)

    def factors(cohort: list[str]) -> dict[str, float]:
        weight = math.fsum(contributions[cid].weight for cid in cohort)
        if not weight > 0:
            raise ValueError(f"total aggregation weight must be positive, got {weight}")
        return {cid: contributions[cid].weight / weight for cid in cohort}

    everyone = sorted(contributions)
    out: dict[str, np.ndarray] = {}
    for name in sorted(names):
        axis = lora_rank_axis(name)
        if axis is None:
            out[name] = _cohort_sum(deltas, everyone, name, None, factors(everyone))
            continue
        if len(segments) == 1 and segments[0][2] == everyone:  # homogeneous: whole tensors
            out[name] = _cohort_sum(deltas, everyone, name, None, factors(everyone))
            continue
        shape = np.shape(deltas[everyone[0]][name])
        total = np.zeros(shape, dtype=np.float64)
        for start, stop, cohort in segments:
            if cohort:
                piece = _cohort_sum(deltas, cohort, name, (axis, start, stop), factors(cohort))
                if axis == 0:
                    total[start:stop] = piece
                else:
                    total[:, start:stop] = piece
        out[name] = total
    return out


def rank_aware_noised_sum_delta(
    clipped: Mapping[str, Adapter],
    *,
    template: Adapter,
    clip: float,
    noise_multiplier: float,
    sample_rate: float,
    population: Iterable[str],
    ranks: Mapping[str, int],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """DP-FedAvg over zero-padded updates, slice ``j`` divided by ``q·N_j``.

    The sum of the clipped deltas gets ``N(0, (σ·clip)²)`` noise on every coordinate,
    drawn exactly as :func:`~server.federation.aggregate.noised_sum_delta` draws it. Then
    LoRA rank slice ``j`` is divided by ``q·N_j``, where ``N_j`` counts the clients of the
    *population* (not of this round's sample) whose rank exceeds ``j``: a constant fixed
    before any data is seen, so the division is post-processing and ε is unchanged.
    Other tensors are divided by ``q·N``.

    Args:
        clipped: zero-padded deltas, each already clipped to L2 norm ``clip``.
        template: names and shapes of the global-rank tensors.
        clip: the clip bound (noise scale).
        noise_multiplier: σ.
        sample_rate: q, the Poisson rate of client sampling.
        population: every training client's id.
        ranks: client id → its rank; a client without an entry, or above the global
            rank, has the global rank.
        rng: seeded per round by the caller.

    Raises:
        ValueError: an empty population, a non-positive ``q``, a negative σ, or a rank
            outside ``1..R``.
    """
    full = adapter_rank(template)
    population_ranks = {cid: min(ranks.get(cid, full), full) for cid in population}
    if not population_ranks or sample_rate <= 0 or noise_multiplier < 0:
        raise ValueError("need a population, sample_rate > 0 and noise_multiplier >= 0")
    segments = rank_segments(population_ranks, full)
    everyone = float(len(population_ranks))
    ones = dict.fromkeys(clipped, 1.0)
    if clipped:
        _same_names(clipped)
    std = noise_multiplier * clip
    out: dict[str, np.ndarray] = {}
    for name in sorted(template):
        shape = template[name].shape
        summed = (
            _cohort_sum(clipped, sorted(clipped), name, None, ones)
            if clipped
            else np.zeros(shape, dtype=np.float64)
        )
        noised = summed + rng.normal(0.0, std, size=shape)
        axis = lora_rank_axis(name)
        if axis is None:
            out[name] = noised / (sample_rate * everyone)
            continue
        divisor = np.empty(shape[axis], dtype=np.float64)
        for start, stop, cohort in segments:
            # A slice no client of the population holds stays zero (noise included).
            divisor[start:stop] = sample_rate * len(cohort) if cohort else math.inf
        out[name] = noised / (divisor[:, None] if axis == 0 else divisor[None, :])
    return out
