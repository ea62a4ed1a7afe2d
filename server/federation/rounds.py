"""The server's orchestrator: discover nodes, evaluate round 0, then train round by round.

Reads top to bottom: ``run_federation`` = discover → (resume | baseline) → for each
round: train → aggregate → evaluate → checkpoint → ``on_round_end``.

Invariants:
* Round 0 is the evaluation of the initial adapter (the base model: LoRA ``B`` = 0).
* A checkpoint is written after every completed round *before* ``on_round_end`` runs,
  so a crash never re-runs a round whose callback (e.g. an OTA release) already fired;
  the cost is that a crash between the two skips that round's callback.
* Node ids are not stable across runs; clients are identified by the ``client-id``
  their node reports, and all sampling is by client id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from protocol.records import (
    ARRAYS,
    CONFIG,
    LORA_RANK,
    STATUS,
    arrays_to_numpy,
    numpy_to_arrays,
)
from server.errors import ServerError, ServerInputError
from server.federation.checkpoint import Checkpoint, load_latest, save_checkpoint
from server.federation.config import FederationConfig
from server.federation.strategy import Population

__all__ = ["RoundCallback", "RoundResult", "discover", "run_federation"]

logger = logging.getLogger(__name__)

_PULL_INTERVAL_S = 0.1  # as Flower's InMemoryGrid.send_and_receive
_PROGRESS_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class RoundResult:
    """What one completed round produced (round 0: the baseline evaluation only).

    Attributes:
        round: the round number.
        global_adapter: the global adapter after the round.
        train: aggregated train metrics (empty for round 0).
        evaluate: aggregated evaluation metrics (``clients-*`` and ``heldout-*``).
        elapsed_s: wall time of the round.
    """

    round: int
    global_adapter: dict[str, np.ndarray]
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """The metrics (not the tensors) as plain JSON values."""
        return {
            "round": self.round,
            "train": self.train,
            "evaluate": self.evaluate,
            "elapsed_s": self.elapsed_s,
        }


RoundCallback = Callable[[RoundResult], None]


class FederationError(ServerError):
    """The federation cannot proceed (no nodes, no training clients)."""

    exit_code = 4


def _metrics(record: MetricRecord | None) -> dict[str, float]:
    return {k: float(v) for k, v in (record or {}).items()}  # type: ignore[arg-type]


def _wait_for_nodes(grid: Grid, cfg: FederationConfig) -> list[int]:
    deadline = time.monotonic() + cfg.connect_timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < max(cfg.num_nodes, 1):
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {cfg.num_nodes} nodes connected within "
                f"{cfg.connect_timeout_s:.0f}s; start more SuperNodes or lower num-nodes"
            )
        time.sleep(0.5)
    return nodes


def _query(want: str, node: int) -> Message:
    return Message(
        content=RecordDict({CONFIG: ConfigRecord({"want": want})}),
        message_type=MessageType.QUERY,
        dst_node_id=node,
    )


def _gather(
    grid: Grid, messages: list[Message], *, stall_timeout_s: float, what: str
) -> list[Message]:
    """Push ``messages`` and pull replies until all came or none came for ``stall_timeout_s``.

    Unlike ``Grid.send_and_receive``, whose timeout bounds the whole exchange, this one
    bounds the silence between replies: 10,000 simulated nodes on two Ray actors answer
    steadily but take longer in total than any sensible connect timeout.
    """
    outstanding = {mid for mid in grid.push_messages(messages) if mid}
    total = len(outstanding)
    replies: list[Message] = []
    last_reply = last_log = time.monotonic()
    while outstanding:
        pulled = list(grid.pull_messages(outstanding))
        outstanding.difference_update(m.metadata.reply_to_message_id for m in pulled)
        replies.extend(pulled)
        now = time.monotonic()
        if pulled:
            last_reply = now
        elif now - last_reply > stall_timeout_s:
            break
        if now - last_log >= _PROGRESS_LOG_INTERVAL_S:
            logger.info("%s: %s of %s nodes answered", what, f"{len(replies):,}", f"{total:,}")
            last_log = now
        if outstanding:
            time.sleep(_PULL_INTERVAL_S)
    return replies


def discover(grid: Grid, cfg: FederationConfig) -> tuple[Population, dict[str, np.ndarray]]:
    """Ask every node who it is, and one training client for the initial adapter.

    Discovery waits as long as replies keep coming: it gives up only when no node has
    answered for ``cfg.connect_timeout_s`` (large simulated populations answer slowly).

    Raises:
        FederationError: fewer than ``num_nodes`` nodes connect in time, or nodes stop
            answering before all have identified themselves, or no node holds a
            training client, or no initial adapter comes back.
    """
    nodes = _wait_for_nodes(grid, cfg)
    queries = [_query("identity", n) for n in nodes]
    replies = _gather(grid, queries, stall_timeout_s=cfg.connect_timeout_s, what="identity")
    if len(replies) < len(nodes):
        raise FederationError(
            f"discovery stalled: {len(replies):,} of {len(nodes):,} nodes answered, then "
            f"none for {cfg.connect_timeout_s:.0f}s; check that the SuperNodes (or "
            "simulation actors) are alive, or raise connect-timeout-s"
        )
    pop = Population()
    for reply in replies:
        if reply.has_error() or STATUS not in reply.content.config_records:
            logger.warning(
                "node %d did not identify itself; it will be left out", reply.metadata.src_node_id
            )
            continue
        status = reply.content.config_records[STATUS]
        role = "heldout" if status.get("role") == "heldout" else "train"
        getattr(pop, role)[str(status["client-id"])] = reply.metadata.src_node_id
        if LORA_RANK in status:  # the phone trains this rank (ADR 0016)
            rank = int(status[LORA_RANK])  # type: ignore[arg-type]
            if rank >= 1:
                pop.ranks[str(status["client-id"])] = rank
            else:
                logger.warning(
                    "client %s reported LoRA rank %d; ignored", status["client-id"], rank
                )
    if not pop.train:
        raise FederationError("no connected node holds a training client; check the data")
    first = pop.train[min(pop.train)]
    ask = _query("initial-adapter", first)
    adapter = _gather(grid, [ask], stall_timeout_s=cfg.connect_timeout_s, what="initial adapter")
    for reply in adapter:
        if not reply.has_error() and ARRAYS in reply.content.array_records:
            logger.info(
                "population: %d training clients, %d held-out clients",
                len(pop.train),
                len(pop.heldout),
            )
            return pop, arrays_to_numpy(reply.content.array_records[ARRAYS])
    raise FederationError(f"node {first} did not send the initial adapter")


def _evaluate(
    grid: Grid, strategy: Any, rnd: int, adapter: dict[str, np.ndarray], cfg: FederationConfig
) -> dict[str, float]:
    msgs = strategy.configure_evaluate(rnd, numpy_to_arrays(adapter), ConfigRecord(), grid)
    replies = grid.send_and_receive(msgs, timeout=cfg.round_timeout_s)
    return _metrics(strategy.aggregate_evaluate(rnd, replies))


def _train(
    grid: Grid, strategy: Any, rnd: int, adapter: dict[str, np.ndarray], cfg: FederationConfig
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    config = ConfigRecord({"num-server-rounds": cfg.num_rounds})
    msgs = list(strategy.configure_train(rnd, numpy_to_arrays(adapter), config, grid))
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout_s)) if msgs else []
    new, metrics = strategy.aggregate_train(rnd, replies)
    train = _metrics(metrics)
    train["clients-dropped"] = float(len(msgs) - len(replies))
    return (arrays_to_numpy(new) if new is not None else adapter), train


def _checkpoint(
    cfg: FederationConfig, strategy: Any, result: RoundResult, history: list[dict[str, Any]]
) -> None:
    if cfg.checkpoint_dir is None:
        return
    state = {"config": cfg.fingerprint(), "strategy": strategy.state(), "history": history}
    save_checkpoint(cfg.checkpoint_dir, Checkpoint(result.round, result.global_adapter, state))


def _resume(cfg: FederationConfig, strategy: Any) -> Checkpoint | None:
    if cfg.checkpoint_dir is None:
        return None
    ckpt = load_latest(cfg.checkpoint_dir)
    if ckpt is None:
        return None
    if ckpt.state.get("config") != cfg.fingerprint():
        raise ServerInputError(
            f"checkpoint in {cfg.checkpoint_dir} was made with {ckpt.state.get('config')}, "
            f"this run uses {cfg.fingerprint()}; use another checkpoint dir or the same settings"
        )
    strategy.load_state(ckpt.state.get("strategy", {}))
    logger.info("resuming after round %d from %s", ckpt.round, cfg.checkpoint_dir)
    return ckpt


def run_federation(
    grid: Grid,
    cfg: FederationConfig,
    strategy: Any,
    *,
    on_round_end: RoundCallback | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a whole federated training and return the per-round history.

    Args:
        grid: Flower's grid to the nodes.
        cfg: the validated federation settings.
        strategy: a :class:`~server.federation.strategy.LoraStrategy`, possibly wrapped.
        on_round_end: called after each completed, checkpointed round (and round 0).

    Returns:
        One JSON-able dict per round, round 0 first (``RoundResult.as_json``).

    Raises:
        FederationError: nodes cannot be discovered.
        ServerInputError: the checkpoint does not match this run's settings.
    """
    population, adapter = discover(grid, cfg)
    strategy.population = population
    ckpt = _resume(cfg, strategy)
    history: list[dict[str, Any]]
    if ckpt is not None:
        adapter, history, start = dict(ckpt.adapter), list(ckpt.state["history"]), ckpt.round + 1
    else:
        t0 = time.monotonic()
        baseline = RoundResult(
            0, adapter, {}, _evaluate(grid, strategy, 0, adapter, cfg), time.monotonic() - t0
        )
        history, start = [baseline.as_json()], 1
        _checkpoint(cfg, strategy, baseline, history)
        if on_round_end:
            on_round_end(baseline)
    for rnd in range(start, cfg.num_rounds + 1):
        t0 = time.monotonic()
        adapter, train = _train(grid, strategy, rnd, adapter, cfg)
        evaluation = _evaluate(grid, strategy, rnd, adapter, cfg)
        result = RoundResult(rnd, adapter, train, evaluation, time.monotonic() - t0)
        history.append(result.as_json())
        _checkpoint(cfg, strategy, result, history)
        logger.info("round %d: train %s eval %s", rnd, train, evaluation)
        if on_round_end:
            on_round_end(result)
    return history
