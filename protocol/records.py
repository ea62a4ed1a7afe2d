"""The wire contract between the ``ServerApp`` and the phones' ``ClientApp``.

The client side (``client/client_app.py``) cannot import this module (the phone does
not ship server code), so the record and key names below are mirrored there; the
deployment-engine test runs both halves against each other.

A train reply carries:
* ``ArrayRecord "arrays"`` — the trained adapter tensors (``ffa``: ``lora_B`` only);
* ``MetricRecord "metrics"`` — ``num-examples``, ``train-loss``, ``steps``, ``epsilon``
  (the phone's cumulative record-level ε, 0 without DP), ``noise-multiplier``;
* ``ConfigRecord "status"`` — ``client-id``, ``role``, ``status`` (``ok``,
  ``budget_exhausted``, ``no_data``), ``message``.

An evaluate reply carries ``MetricRecord "metrics"`` (``eval-loss``, ``eval-accuracy``,
``num-tokens``) and the same ``ConfigRecord "status"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "STATUS",
    "EvalReply",
    "TrainReply",
    "arrays_to_numpy",
    "decode_eval_reply",
    "decode_train_reply",
    "numpy_to_arrays",
]

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"


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
        return str(msg.metadata.src_node_id), "train", "malformed", "reply lacks a status record"
    return (
        str(rec.get("client-id", msg.metadata.src_node_id)),
        str(rec.get("role", "train")),
        str(rec.get("status", "ok")),
        str(rec.get("message", "")),
    )


def decode_train_reply(msg: Message) -> TrainReply:
    """Decode one train reply; errors become a ``TrainReply`` with status ``error``."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        reason = str(msg.error.reason or "the client app failed")
        return TrainReply(node, str(node), "error", reason, None, 0, 0.0, 0.0, 0.0, 0)
    client_id, _role, status, text = _status(msg)
    metrics = msg.content.metric_records.get(METRICS)
    record = msg.content.array_records.get(ARRAYS)
    adapter = arrays_to_numpy(record) if record is not None and len(record) else None
    upload = record.count_bytes() if record is not None else 0
    if status == "ok" and (adapter is None or metrics is None):
        status, text = "malformed", "status ok but no arrays or metrics in the reply"
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
    if status != "ok" or record is None:
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
