"""The wire contract between the ``ServerApp`` and the phones' ``ClientApp``.

Both sides import this module (the phone does not ship server code, the server no
client code), so every record and key name is written here once; the
deployment-engine test runs both halves against each other over real Flower.

A train reply carries:
* ``ArrayRecord "arrays"`` — the trained adapter tensors (``ffa``: ``lora_B`` only);
* ``MetricRecord "metrics"`` — ``num-examples``, ``train-loss``, ``steps``, ``epsilon``
  (the phone's cumulative record-level ε, 0 without DP), ``noise-multiplier``;
* ``ConfigRecord "status"`` — ``client-id``, ``role``, ``status`` (a
  :class:`ReplyStatus`), ``message``.

An evaluate reply carries ``MetricRecord "metrics"`` (``eval-loss``, ``eval-accuracy``,
``num-tokens``, ``server-round``) and the same ``ConfigRecord "status"``. Requests carry
``ConfigRecord "config"`` (``server-round``, ``planned-rounds``, ``want``).

Needs Flower and numpy, not torch: the phone converts its tensors to numpy first.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

__all__ = [
    "ARRAYS",
    "CONFIG",
    "LORA_RANK",
    "METRICS",
    "STATUS",
    "EvalReply",
    "ReplyStatus",
    "Role",
    "TrainReply",
    "arrays_to_numpy",
    "decode_eval_reply",
    "decode_train_reply",
    "eval_metrics",
    "numpy_to_arrays",
    "status_record",
    "train_metrics",
]

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"


class Role(StrEnum):
    """What a phone does in the federation."""

    TRAIN = "train"  # trains and evaluates on its held-out split
    HELDOUT = "heldout"  # never trains; evaluates on all of its text


class ReplyStatus(StrEnum):
    """The status a reply reports (the phone's three, and the server's two verdicts)."""

    OK = "ok"
    BUDGET_EXHAUSTED = "budget_exhausted"  # the phone's lifetime ε budget is spent
    NO_DATA = "no_data"  # nothing to train or evaluate on
    ERROR = "error"  # the client app failed (server side: Flower's error reply)
    MALFORMED = "malformed"  # the reply lacks what its status promises


#: Key of the identity reply's status record: the LoRA rank the phone trains, when
#: the run allows several (``RunConfig.lora_ranks``; ADR 0016).
LORA_RANK = "lora-rank"


def status_record(client_id: str, role: str, status: str, message: str = "") -> ConfigRecord:
    """The ``"status"`` record every reply carries."""
    return ConfigRecord(
        {"client-id": client_id, "role": str(role), "status": str(status), "message": message}
    )


def train_metrics(
    *, num_examples: int, train_loss: float, steps: int, epsilon: float, noise_multiplier: float
) -> MetricRecord:
    """The ``"metrics"`` record of a train reply."""
    return MetricRecord(
        {
            "num-examples": int(num_examples),
            "train-loss": float(train_loss),
            "steps": int(steps),
            "epsilon": float(epsilon),
            "noise-multiplier": float(noise_multiplier),
        }
    )


def eval_metrics(
    *, loss: float, accuracy: float, num_tokens: int, server_round: int
) -> MetricRecord:
    """The ``"metrics"`` record of an evaluate reply."""
    return MetricRecord(
        {
            "eval-loss": float(loss),
            "eval-accuracy": float(accuracy),
            "num-tokens": int(num_tokens),
            "server-round": int(server_round),
        }
    )


def numpy_to_arrays(adapter: dict[str, np.ndarray]) -> ArrayRecord:
    """Wrap an adapter as an ``ArrayRecord`` in sorted name order."""
    return ArrayRecord(
        array_dict={k: Array(np.ascontiguousarray(adapter[k])) for k in sorted(adapter)}
    )


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unwrap an ``ArrayRecord`` into name → numpy array."""
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


@dataclass(frozen=True)
class TrainReply:
    """A decoded train reply (or the reason there is none to use)."""

    node_id: int
    client_id: str
    status: str
    message: str
    adapter: dict[str, np.ndarray] | None
    num_examples: int
    train_loss: float
    epsilon: float
    noise_multiplier: float
    upload_bytes: int


@dataclass(frozen=True)
class EvalReply:
    """A decoded evaluate reply."""

    node_id: int
    client_id: str
    role: str
    loss: float
    accuracy: float
    num_tokens: int


def _status(msg: Message) -> tuple[str, str, str, str]:
    rec = msg.content.config_records.get(STATUS)
    if rec is None:
        return (
            str(msg.metadata.src_node_id),
            Role.TRAIN,
            ReplyStatus.MALFORMED,
            "reply lacks a status record",
        )
    return (
        str(rec.get("client-id", msg.metadata.src_node_id)),
        str(rec.get("role", Role.TRAIN)),
        str(rec.get("status", ReplyStatus.OK)),
        str(rec.get("message", "")),
    )


def decode_train_reply(msg: Message) -> TrainReply:
    """Decode one train reply; errors become a ``TrainReply`` with status ``error``."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        reason = str(msg.error.reason or "the client app failed")
        return TrainReply(node, str(node), ReplyStatus.ERROR, reason, None, 0, 0.0, 0.0, 0.0, 0)
    client_id, _role, status, text = _status(msg)
    metrics = msg.content.metric_records.get(METRICS)
    record = msg.content.array_records.get(ARRAYS)
    adapter = arrays_to_numpy(record) if record is not None and len(record) else None
    upload = record.count_bytes() if record is not None else 0
    if status == ReplyStatus.OK and (adapter is None or metrics is None):
        status, text = ReplyStatus.MALFORMED, "status ok but no arrays or metrics in the reply"
    m: dict[str, Any] = dict(metrics) if metrics is not None else {}
    return TrainReply(
        node_id=node,
        client_id=client_id,
        status=status,
        message=text,
        adapter=adapter,
        num_examples=int(m.get("num-examples", 0)),
        train_loss=float(m.get("train-loss", float("nan"))),
        epsilon=float(m.get("epsilon", 0.0)),
        noise_multiplier=float(m.get("noise-multiplier", 0.0)),
        upload_bytes=upload,
    )


def decode_eval_reply(msg: Message) -> EvalReply | None:
    """Decode one evaluate reply; ``None`` for an error or an empty evaluation."""
    if msg.has_error():
        return None
    client_id, role, status, _ = _status(msg)
    record = msg.content.metric_records.get(METRICS)
    if status != ReplyStatus.OK or record is None:
        return None
    metrics: dict[str, Any] = dict(record)
    tokens = int(metrics.get("num-tokens", 0))
    if tokens <= 0:
        return None
    return EvalReply(
        node_id=msg.metadata.src_node_id,
        client_id=client_id,
        role=role,
        loss=float(metrics["eval-loss"]),
        accuracy=float(metrics["eval-accuracy"]),
        num_tokens=tokens,
    )
