"""② aggregate: LoRA-aware Flower strategies, composed by wrapping.

``LoraStrategy`` samples clients deterministically and averages adapter updates
(``fedavg`` or ``ffa``). Two wrappers add behaviour without subclassing it:

* :class:`UpdateValidation` drops replies whose update is non-finite, has an L2 norm
  above a bound or has the wrong tensors, and logs each rejection (THREATS G32);
* :class:`CentralDP` replaces the weighted mean by DP-FedAvg (clip, sum, Gaussian
  noise, fixed denominator) and keeps the user-level accountant.

Compose as ``UpdateValidation(CentralDP(LoraStrategy(...)))`` so that DP only ever sees
validated updates. Invariants: sampling and noise depend only on the seed, the round
and the population, and contributions are summed in client-id order, so a resumed run
reproduces an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol.records import (
    ARRAYS,
    CONFIG,
    TrainReply,
    arrays_to_numpy,
    decode_eval_reply,
    decode_train_reply,
    numpy_to_arrays,
)
from server.federation.aggregate import (
    Contribution,
    add_delta,
    fedavg_delta,
    subtract,
)
from server.federation.hetero_rank import adapter_rank, pad, rank_aware_fedavg_delta, truncate

__all__ = ["SAMPLINGS", "LoraStrategy", "Population"]

logger = logging.getLogger(__name__)

SAMPLINGS = ("balanced", "uniform", "poisson")


@dataclass
class Population:
    """Which Flower node holds which client, by role (node ids change per run), and
    the LoRA rank each client trains when ranks differ (ADR 0016; empty: all the same)."""

    train: dict[str, int] = field(default_factory=dict)
    heldout: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)


def _messages(record: RecordDict, node_ids: Iterable[int], kind: str) -> list[Message]:
    return [Message(content=record, message_type=kind, dst_node_id=n) for n in node_ids]


class LoraStrategy(Strategy):
    """Seeded client sampling and weighted FedAvg over LoRA adapter tensors.

    Args:
        aggregation: ``fedavg`` (A and B averaged) or ``ffa`` (clients send B only).
        clients_per_round: clients per round, or its expectation under ``poisson``.
        min_clients: fewest usable updates for a round to change the global adapter.
        seed: seeds the per-round sampling.
        sampling: ``balanced`` (that many per round, those that have trained in the
            fewest rounds so far first, seeded ties), ``uniform`` (that many, uniformly
            without replacement, independently each round) or ``poisson`` (each client
            independently with rate ``clients_per_round / N``, as user-level DP assumes).
        num_rounds: rounds in the run; with ``balanced``/``uniform`` each sampled
            client is told how many of them it is scheduled to train in
            (``planned-rounds``), so a phone under record-level DP spreads its ε over
            the rounds it will actually train in (ADR 0006, decision 7).
        eval_max_clients: evaluate on at most this many training clients (a seeded
            subset, the same every round) plus every held-out client; 0 = all.
    """

    def __init__(
        self,
        *,
        aggregation: str,
        clients_per_round: int,
        min_clients: int,
        seed: int,
        sampling: str = "balanced",
        num_rounds: int = 0,
        eval_max_clients: int = 0,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling={sampling!r} is not one of {SAMPLINGS}")
        self.aggregation = aggregation
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.seed = seed
        self.sampling = sampling
        self.num_rounds = num_rounds
        self.eval_max_clients = eval_max_clients
        self.population = Population()
        self.global_adapter: dict[str, np.ndarray] = {}
        self.sampled: dict[int, list[str]] = {}
        self.record_epsilon = 0.0
        self._schedule_ids: list[str] = []
        self._schedule_rounds: list[list[str]] = []

    # -- sampling --------------------------------------------------------------
    @property
    def sample_rate(self) -> float:
        """The per-client inclusion probability actually used (Poisson sampling)."""
        n = len(self.population.train)
        return min(1.0, self.clients_per_round / n) if n else 0.0

    def sample(self, server_round: int) -> list[str]:
        """The client ids that train in ``server_round``.

        A pure function of (seed, round, population): a resumed run samples as an
        uninterrupted one. ``balanced`` replays the rounds before ``server_round``.
        """
        ids = sorted(self.population.train)
        if self.sampling == "balanced":
            if server_round < 1:
                raise ValueError(f"training rounds start at 1, not {server_round}")
            return self._schedule(ids, server_round)[-1]
        rng = np.random.default_rng([self.seed, server_round, 0x5A])
        if self.sampling == "poisson":
            keep = rng.random(len(ids)) < self.sample_rate
            return [cid for cid, k in zip(ids, keep, strict=True) if k]
        k = min(self.clients_per_round, len(ids))
        return sorted(ids[i] for i in rng.choice(len(ids), size=k, replace=False))

    def _schedule(self, ids: list[str], rounds: int) -> list[list[str]]:
        """Balanced sampling of rounds 1..``rounds``: fewest rounds trained first.

        Round r depends only on the rounds before it, so the schedule is extended
        lazily and kept for the population it was made for.
        """
        if self._schedule_ids != ids:
            self._schedule_ids, self._schedule_rounds = list(ids), []
        chosen = self._schedule_rounds
        counts = dict.fromkeys(ids, 0)
        for picked in chosen:
            for cid in picked:
                counts[cid] += 1
        k = min(self.clients_per_round, len(ids))
        while len(chosen) < rounds:
            ties = np.random.default_rng([self.seed, len(chosen) + 1, 0x5A]).random(len(ids))
            order = sorted(range(len(ids)), key=lambda i: (counts[ids[i]], ties[i]))
            chosen.append(sorted(ids[i] for i in order[:k]))
            for cid in chosen[-1]:
                counts[cid] += 1
        return chosen[:rounds]

    def planned_rounds(self) -> dict[str, int]:
        """Client id -> rounds of the run it is scheduled to train in (``{}``: unknown).

        Known for ``balanced`` and ``uniform`` sampling when ``num_rounds`` is set; under
        ``poisson`` sampling any client may train in any round.
        """
        if self.sampling == "poisson" or self.num_rounds < 1:
            return {}
        ids = sorted(self.population.train)
        rounds = (
            self._schedule(ids, self.num_rounds)  # the whole schedule in one pass
            if self.sampling == "balanced"
            else [self.sample(r) for r in range(1, self.num_rounds + 1)]
        )
        counts = dict.fromkeys(ids, 0)
        for picked in rounds:
            for cid in picked:
                counts[cid] += 1
        return counts

    # -- Strategy interface ----------------------------------------------------
    def summary(self) -> None:
        """Log the configuration."""
        logger.info(
            "LoraStrategy: aggregation=%s sampling=%s clients/round=%d min=%d",
            self.aggregation,
            self.sampling,
            self.clients_per_round,
            self.min_clients,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter to this round's sampled clients."""
        self.global_adapter = arrays_to_numpy(arrays)
        chosen = self.sample(server_round)
        self.sampled[server_round] = chosen
        config["server-round"] = server_round
        planned = self.planned_rounds()  # {} under Poisson sampling

        def record(cid: str) -> RecordDict:
            # Each client learns how many rounds it is scheduled in (its own config),
            # and gets the global adapter truncated to its LoRA rank (ADR 0016).
            mine = {"planned-rounds": planned[cid]} if cid in planned else {}
            return RecordDict(
                {ARRAYS: self.arrays_for(cid, arrays), CONFIG: ConfigRecord({**config, **mine})}
            )

        return [
            Message(record(c), message_type=MessageType.TRAIN, dst_node_id=self.population.train[c])
            for c in chosen
        ]

    def arrays_for(self, client_id: str, arrays: ArrayRecord) -> ArrayRecord:
        """The global adapter as ``client_id`` receives it: truncated to its rank."""
        rank = self.population.ranks.get(client_id)
        if rank is None or not self.global_adapter or rank >= adapter_rank(self.global_adapter):
            return arrays
        return numpy_to_arrays(truncate(self.global_adapter, rank))

    def padded(self, reply: TrainReply) -> TrainReply:
        """``reply`` with its adapter zero-padded to the global rank (delta 0 beyond the
        client's rank; ADR 0016). Unchanged when the client reported no rank, or sent
        another rank than it reported (the structure check then rejects it)."""
        rank = self.population.ranks.get(reply.client_id)
        if rank is None or not reply.adapter:
            return reply
        try:
            if adapter_rank(reply.adapter) != rank:
                return reply
        except ValueError:
            return reply
        return dataclasses.replace(reply, adapter=pad(reply.adapter, self.global_adapter))

    def contributions(self, replies: Iterable[TrainReply]) -> dict[str, Contribution]:
        """Deltas of the usable replies against the global adapter they started from."""
        out: dict[str, Contribution] = {}
        for r in map(self.padded, replies):
            if r.status == "ok" and r.adapter is not None:
                out[r.client_id] = Contribution(
                    subtract(r.adapter, self.global_adapter), float(max(r.num_examples, 1))
                )
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted FedAvg of the deltas; ``None`` arrays when too few clients answered."""
        decoded = [decode_train_reply(m) for m in replies]
        metrics = self.train_metrics(server_round, decoded)
        contrib = self.contributions(decoded)
        if len(contrib) < max(self.min_clients, 1):
            logger.warning(
                "round %d: %d usable updates < minimum %d; global adapter unchanged",
                server_round,
                len(contrib),
                self.min_clients,
            )
            metrics["round-applied"] = 0
            return None, metrics
        metrics["round-applied"] = 1
        ranks = self.population.ranks
        for rank in sorted({ranks[c] for c in contrib if c in ranks}):  # ADR 0016
            metrics[f"clients-rank-{rank}"] = sum(ranks.get(c) == rank for c in contrib)
        mean = rank_aware_fedavg_delta(contrib, ranks) if ranks else fedavg_delta(contrib)
        new = add_delta(self.global_adapter, mean)
        return numpy_to_arrays(new), metrics

    def train_metrics(self, server_round: int, decoded: list[TrainReply]) -> MetricRecord:
        """Counts, loss, upload bytes and record-level ε of one round's train replies."""
        ok = [r for r in decoded if r.status == "ok"]
        for r in decoded:
            if r.status != "ok":
                logger.warning(
                    "round %d: client %s did not train: %s (%s)",
                    server_round,
                    r.client_id,
                    r.status,
                    r.message,
                )
        examples = sum(r.num_examples for r in ok)
        loss = (
            math.fsum(r.train_loss * r.num_examples for r in ok) / examples
            if examples
            else float("nan")
        )
        self.record_epsilon = max([self.record_epsilon, *(r.epsilon for r in decoded)])
        sampled = len(self.sampled.get(server_round, []))
        return MetricRecord(
            {
                "clients-sampled": sampled,
                "clients-trained": len(ok),
                "clients-failed": sampled - len(ok),
                "clients-budget-exhausted": sum(r.status == "budget_exhausted" for r in decoded),
                "train-loss": loss,
                "num-examples": examples,
                "upload-bytes": sum(r.upload_bytes for r in ok),
                "record-epsilon": self.record_epsilon,
                "client-noise-multiplier": max([0.0, *(r.noise_multiplier for r in ok)]),
            }
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node evaluates: clients on their held-out text, held-out clients on all."""
        config["server-round"] = server_round
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        ids = sorted(self.population.train)
        if 0 < self.eval_max_clients < len(ids):
            rng = np.random.default_rng([self.seed, 0xE7])
            ids = [ids[i] for i in rng.choice(len(ids), self.eval_max_clients, replace=False)]
        train_nodes = [self.population.train[c] for c in ids]
        nodes = [*train_nodes, *self.population.heldout.values()]
        return _messages(record, sorted(nodes), MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Token-weighted loss, perplexity and accuracy, per role (clients / held-out)."""
        decoded = [d for d in (decode_eval_reply(m) for m in replies) if d is not None]
        out = MetricRecord()
        for role, prefix in (("train", "clients"), ("heldout", "heldout")):
            rs = sorted((d for d in decoded if d.role == role), key=lambda d: d.client_id)
            tokens = sum(d.num_tokens for d in rs)
            if not tokens:
                continue
            loss = math.fsum(d.loss * d.num_tokens for d in rs) / tokens
            out[f"{prefix}-loss"] = loss
            out[f"{prefix}-perplexity"] = math.exp(min(loss, 50.0))
            out[f"{prefix}-accuracy"] = math.fsum(d.accuracy * d.num_tokens for d in rs) / tokens
            out[f"{prefix}-tokens"] = tokens
            out[f"{prefix}-nodes"] = len(rs)
        return out if len(out) else None

    # -- checkpoint state ------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-serialisable state a resumed run needs."""
        return {"record_epsilon": self.record_epsilon}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` output."""
        self.record_epsilon = float(state.get("record_epsilon", 0.0))
