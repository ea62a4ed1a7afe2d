"""The federated partition: which texts each simulated phone holds.

Both the synthetic generator and the JSONL loader produce a :class:`FederatedData`:
training clients, each with a train and a held-out split, plus fully held-out clients
that never train (they measure generalisation to new users). ``write_partitions``
lays it out on disk, one JSON file per Flower partition id, because the phone-side
``ClientApp`` reads its own local data and must not import this package.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from protocol import atomic_write_text
from simulation.data.partitioners import PartitionRecord

__all__ = [
    "PARTITION_INDEX",
    "Canary",
    "ClientData",
    "FederatedData",
    "TokenStats",
    "read_partition",
    "tokenize_stats",
    "write_partitions",
]

PARTITION_INDEX = "index.json"


@dataclass(frozen=True)
class ClientData:
    """One phone's local text."""

    client_id: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    @property
    def num_texts(self) -> int:
        return len(self.train) + len(self.heldout)


@dataclass(frozen=True)
class Canary:
    """A secret phrase planted in one client's training text, for privacy audits."""

    client_id: str
    text: str
    repeats: int


@dataclass(frozen=True)
class FederatedData:
    """A whole federated data set: training clients, held-out clients, public text."""

    clients: tuple[ClientData, ...]
    heldout_clients: tuple[ClientData, ...] = ()
    public_texts: tuple[str, ...] = ()
    canaries: tuple[Canary, ...] = ()
    source: str = "synthetic"
    meta: dict[str, Any] = field(default_factory=dict)
    partition: PartitionRecord | None = None  # how the clients were made (--partition)

    def client(self, client_id: str) -> ClientData:
        for c in (*self.clients, *self.heldout_clients):
            if c.client_id == client_id:
                return c
        raise KeyError(client_id)


def write_partitions(data: FederatedData, out_dir: Path | str) -> Path:
    """Write one ``partition-<i>.json`` per client plus ``index.json``.

    Partition ids ``0 .. len(clients)-1`` are the training clients, in order; the
    held-out clients follow. Each file holds ``{"client_id", "role", "train",
    "heldout"}`` with ``role`` either ``"train"`` or ``"heldout"``.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    roles = [("train", c) for c in data.clients] + [("heldout", c) for c in data.heldout_clients]
    for pid, (role, c) in enumerate(roles):
        record = {
            "client_id": c.client_id,
            "role": role,
            "train": list(c.train),
            "heldout": list(c.heldout),
        }
        atomic_write_text(out / f"partition-{pid}.json", json.dumps(record))
        index.append(
            {
                "partition_id": pid,
                "client_id": c.client_id,
                "role": role,
                "num_train": len(c.train),
                "num_heldout": len(c.heldout),
            }
        )
    atomic_write_text(
        out / PARTITION_INDEX, json.dumps({"source": data.source, "partitions": index}, indent=1)
    )
    return out


def read_partition(partition_dir: Path | str, partition_id: int) -> dict[str, Any]:
    """Read one partition file written by :func:`write_partitions`."""
    record: dict[str, Any] = json.loads(
        (Path(partition_dir) / f"partition-{partition_id}.json").read_text(encoding="utf-8")
    )
    return record


class _Tokenizer(Protocol):
    def __call__(self, text: list[str], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TokenStats:
    """Token counts per client under the base model's tokenizer."""

    train_tokens: dict[str, int]
    heldout_tokens: dict[str, int]

    @property
    def total_train_tokens(self) -> int:
        return sum(self.train_tokens.values())


def _count(tokenizer: _Tokenizer, texts: Sequence[str]) -> int:
    if not texts:
        return 0
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return sum(len(x) for x in ids)


def tokenize_stats(data: FederatedData, tokenizer: _Tokenizer) -> TokenStats:
    """Tokenize every client's text with the base model's tokenizer and count tokens."""
    everyone = (*data.clients, *data.heldout_clients)
    return TokenStats(
        train_tokens={c.client_id: _count(tokenizer, c.train) for c in everyone},
        heldout_tokens={c.client_id: _count(tokenizer, c.heldout) for c in everyone},
    )
