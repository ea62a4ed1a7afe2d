"""② aggregate: strategy wrappers that add validation and central DP to ``LoraStrategy``.

* :class:`UpdateValidation` drops replies whose update has the wrong tensors (missing,
  extra, another dtype, shape or LoRA rank than the global adapter), is non-finite or
  has an L2 norm above a bound, and logs each rejection with the client's id, so one
  malformed client never aborts a round (THREATS G32);
* :class:`CentralDP` replaces the weighted mean by DP-FedAvg (clip, sum, Gaussian
  noise, fixed denominator ``q·N``) and keeps the user-level accountant. The noise is
  drawn from a generator seeded by ``(seed, round)`` so a resumed run reproduces it.
  With an :class:`~server.federation.adaptive_clip.AdaptiveClip` the clip follows a
  target quantile of the update norms (Andrew et al. 2021);
* :class:`ServerOptimization` applies the aggregated update (the noised one under
  central DP) with a server optimizer (``fedavgm``, ``fedadam``, ``fedyogi``):
  the optimizer only post-processes what DP released, so ε is unchanged.

Compose as ``UpdateValidation(ServerOptimization?(CentralDP?(LoraStrategy(...))))`` so
that DP only ever sees validated updates, and the optimizer only the noised mean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol.records import TrainReply, arrays_to_numpy, decode_train_reply, numpy_to_arrays
from server.errors import ServerInputError
from server.federation.accountant import UserLevelAccountant, calibrate_noise_multiplier
from server.federation.adaptive_clip import AdaptiveClip, update_noise_multiplier
from server.federation.aggregate import (
    add_delta,
    clip_delta,
    delta_norm,
    exchanged_names,
    is_finite,
    noised_sum_delta,
    structure_error,
    subtract,
)
from server.federation.hetero_rank import rank_aware_noised_sum_delta
from server.federation.optimizers import ServerOptimizer
from server.federation.strategy import Population

__all__ = ["CentralDP", "ServerOptimization", "UpdateValidation"]

logger = logging.getLogger(__name__)


class _Wrapper(Strategy):
    """Delegates everything to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # sample_rate, global_adapter, min_clients…
        return getattr(self.inner, name)

    @property
    def population(self) -> Population:
        """The population of the innermost strategy (set once nodes are discovered)."""
        return self.inner.population  # type: ignore[no-any-return]

    @population.setter
    def population(self, value: Population) -> None:
        self.inner.population = value

    def summary(self) -> None:
        """Log the configuration."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self.inner.configure_train(server_round, arrays, config, grid)  # type: ignore[no-any-return]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate to the wrapped strategy."""
        return self.inner.aggregate_train(server_round, replies)  # type: ignore[no-any-return]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)  # type: ignore[no-any-return]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)  # type: ignore[no-any-return]

    def state(self) -> dict[str, Any]:
        """State of the wrapped strategy."""
        return {"inner": self.inner.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` output."""
        self.inner.load_state(state.get("inner", {}))


class UpdateValidation(_Wrapper):
    """Exclude non-finite, oversized or malformed client updates before aggregation.

    Args:
        inner: the strategy that aggregates what passes.
        max_update_norm: largest accepted L2 norm of ``adapter - global`` (0: no bound).
    """

    def __init__(self, inner: Any, *, max_update_norm: float) -> None:
        super().__init__(inner)
        self.max_update_norm = max_update_norm

    def check(self, reply: TrainReply) -> str | None:
        """Why ``reply`` must be excluded, or ``None`` when it is acceptable.

        Structure first (the exact tensor names of the aggregation mode, then each
        tensor's dtype, shape and LoRA rank against the global adapter), so that the
        arithmetic after it never meets a malformed update.
        """
        if reply.status != "ok" or reply.adapter is None:
            return None  # not an update: counted as "did not train", not as rejected
        glob = self.inner.global_adapter
        names = exchanged_names(glob, self.inner.aggregation)
        adapter = self.inner.padded(reply).adapter  # a lower LoRA rank: zero delta beyond it
        wrong = structure_error(adapter, glob, names=names)
        if wrong is not None:
            return wrong
        delta = subtract(adapter, glob)
        if not is_finite(delta):
            return "update contains NaN or Inf"
        norm = delta_norm(delta)
        if self.max_update_norm > 0 and norm > self.max_update_norm:
            return f"update norm {norm:.4g} exceeds bound {self.max_update_norm:.4g}"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid updates (logged), aggregate the rest with the wrapped strategy."""
        kept, rejected = [], 0
        for msg in replies:
            reply = decode_train_reply(msg)
            reason = self.check(reply)
            if reason is None:
                kept.append(msg)
                continue
            rejected += 1
            logger.warning(
                "round %d: rejected update from client %s (node %d): %s",
                server_round,
                reply.client_id,
                reply.node_id,
                reason,
            )
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["clients-rejected"] = rejected
        return arrays, metrics


class CentralDP(_Wrapper):
    """User-level DP-FedAvg: clip each update, add Gaussian noise, track ε.

    Args:
        inner: a ``LoraStrategy`` (or wrapper of one) with ``sampling="poisson"``.
        clip: L2 bound on each client's update.
        noise_multiplier: σ; ``None`` calibrates it from ``target_epsilon``.
        target_epsilon: the user-level ε the whole run may spend.
        num_rounds: rounds planned (for calibration).
        delta: δ of the guarantee.
        seed: seeds the noise (per round, so resume reproduces it).
        adaptive: adapt the clip to a quantile of the update norms (its ``clip`` is the
            initial one and replaces ``clip``); ``None``: a fixed clip.

    Raises:
        ValueError: the wrapped strategy does not sample with Poisson sampling.
    """

    def __init__(
        self,
        inner: Any,
        *,
        clip: float,
        noise_multiplier: float | None,
        target_epsilon: float,
        num_rounds: int,
        delta: float,
        seed: int,
        adaptive: AdaptiveClip | None = None,
    ) -> None:
        super().__init__(inner)
        if inner.sampling != "poisson":
            raise ValueError("user-level DP accounting assumes Poisson client sampling")
        self.adaptive = adaptive
        self.clip = adaptive.clip if adaptive is not None else clip
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.num_rounds = num_rounds
        self.seed = seed
        self.accountant = UserLevelAccountant(delta=delta)

    def resolve_noise(self) -> float:
        """σ, calibrated on first use from the sampling rate actually in force."""
        if self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon,
                sample_rate=self.inner.sample_rate,
                rounds=self.num_rounds,
                delta=self.accountant.delta,
            )
            logger.info(
                "user-level DP: σ=%.4f for ε=%.3g over %d rounds at q=%.4f",
                self.noise_multiplier,
                self.target_epsilon,
                self.num_rounds,
                self.inner.sample_rate,
            )
        return self.noise_multiplier

    def update_noise(self, expected_clients: float) -> float:
        """σ_Δ of the update sum: ``z`` itself, or its share beside the adaptive count.

        Raises:
            ServerInputError: the count's noise is too small to leave the updates any.
        """
        z = self.resolve_noise()
        if self.adaptive is None:
            return z
        try:
            return update_noise_multiplier(z, self.adaptive.resolve_count_stddev(expected_clients))
        except ValueError as e:
            raise ServerInputError(str(e)) from e

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg aggregate of the (already validated) replies."""
        replies = list(replies)
        sigma = self.resolve_noise()
        q = self.inner.sample_rate
        expected = q * len(self.inner.population.train)
        sigma_update = self.update_noise(expected)
        _, metrics = self.inner.aggregate_train(server_round, replies)
        metrics = metrics if metrics is not None else MetricRecord()
        contrib = self.inner.contributions(decode_train_reply(m) for m in replies)
        clip = self.clip  # this round's; the adaptive rule sets the next one below
        clipped, norms = {}, []
        for cid in sorted(contrib):
            clipped[cid], norm = clip_delta(contrib[cid].delta, clip)
            norms.append(norm)
        # Composed whether or not the update is applied: the sampling happened.
        eps = self.accountant.record_round(sample_rate=q, noise_multiplier=sigma)
        metrics["user-epsilon"] = eps
        metrics["user-noise-multiplier"] = sigma
        metrics["clients-clipped"] = sum(n > clip for n in norms)
        metrics["user-clip"] = clip
        if self.adaptive is not None:
            metrics["user-update-noise-multiplier"] = sigma_update
            metrics["user-unclipped-share"] = self.adaptive.update(
                norms,
                expected_clients=expected,
                rng=np.random.default_rng([self.seed, server_round, 0xC1]),
            )
            self.clip = self.adaptive.clip
        if len(contrib) < max(self.inner.min_clients, 1):
            metrics["round-applied"] = 0
            return None, metrics
        glob = self.inner.global_adapter
        template = next(iter(contrib.values())).delta
        rng = np.random.default_rng([self.seed, server_round, 0xD9])
        ranks = self.inner.population.ranks
        noisy = (
            rank_aware_noised_sum_delta(  # ADR 0016: slice j divided by q·N_j
                clipped,
                template=template,
                clip=clip,
                noise_multiplier=sigma_update,
                sample_rate=q,
                population=self.inner.population.train,
                ranks=ranks,
                rng=rng,
            )
            if ranks
            else noised_sum_delta(
                clipped,
                template=template,
                clip=clip,
                noise_multiplier=sigma_update,
                expected_clients=expected,
                rng=rng,
            )
        )
        metrics["round-applied"] = 1
        return numpy_to_arrays(add_delta(glob, noisy)), metrics

    def state(self) -> dict[str, Any]:
        """Wrapped state plus the accountant and σ."""
        return {
            "inner": self.inner.state(),
            "accountant": self.accountant.state(),
            "noise_multiplier": self.noise_multiplier,
            **({"clip": self.adaptive.state()} if self.adaptive is not None else {}),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` output."""
        self.inner.load_state(state.get("inner", {}))
        if "accountant" in state:
            self.accountant = UserLevelAccountant.from_state(state["accountant"])
        if state.get("noise_multiplier") is not None:
            self.noise_multiplier = float(state["noise_multiplier"])
        if self.adaptive is not None and "clip" in state:
            self.adaptive.load_state(state["clip"])
            self.clip = self.adaptive.clip


class ServerOptimization(_Wrapper):
    """Apply the wrapped strategy's aggregated update with a server optimizer.

    The wrapped strategy returns ``global + Δ`` (Δ the weighted mean, or under
    :class:`CentralDP` the clipped, noised mean); this wrapper recovers Δ over the
    exchanged tensors and returns ``optimizer.step(global, Δ)`` instead. Δ is read
    back from the float32 adapter, so it carries float32 rounding of the global
    adapter (far below any DP noise). Rounds that change nothing (``None`` arrays)
    leave the optimizer's moments untouched.

    Args:
        inner: the strategy whose update is applied.
        optimizer: the server optimizer and its moments.
    """

    def __init__(self, inner: Any, *, optimizer: ServerOptimizer) -> None:
        super().__init__(inner)
        self.optimizer = optimizer

    def summary(self) -> None:
        """Log the configuration."""
        self.inner.summary()
        logger.info("server optimizer: %s", self.optimizer.settings)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped aggregate, stepped by the server optimizer."""
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        glob = self.inner.global_adapter
        names = exchanged_names(glob, self.inner.aggregation)
        aggregated = arrays_to_numpy(arrays)
        delta = subtract({k: aggregated[k] for k in names}, glob)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["server-update-norm"] = delta_norm(delta)
        return numpy_to_arrays(self.optimizer.step(glob, delta)), metrics

    def state(self) -> dict[str, Any]:
        """Wrapped state plus the optimizer's moments."""
        return {"inner": self.inner.state(), "optimizer": self.optimizer.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` output."""
        self.inner.load_state(state.get("inner", {}))
        self.optimizer.load_state(state.get("optimizer", {}))
