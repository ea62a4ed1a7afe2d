"""Load real client text from JSONL: one ``{"client_id": ..., "text": ...}`` per line.

The loader is strict about form and forgiving about size: a malformed line (not a JSON
object, no string ``"text"``, a bad ``client_id``) stops the load with the file and its
line number (nothing half-loaded), while a record whose text is empty or whitespace only
is skipped and counted (per client), as real corpora have such records; ``strict=True``
refuses those too. Clients with too little text are dropped or merged into pooled
pseudo-clients as configured. The result has the same structure as the synthetic
generator's, so everything downstream is shared.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from simulation.data.partition import ClientData, FederatedData
from simulation.errors import SimulationInputError

__all__ = [
    "DataFormatError",
    "JsonlOptions",
    "JsonlTexts",
    "SmallClients",
    "describe_skipped",
    "load_jsonl",
    "read_jsonl_corpus",
    "read_jsonl_texts",
]

_MAX_REPORTED = 5
_MAX_CLIENTS_LISTED = 10


class DataFormatError(SimulationInputError):
    """The JSONL file has malformed lines; the message names them by line number."""


class SmallClients(StrEnum):
    """What happens to a client with fewer than ``JsonlOptions.min_texts`` texts."""

    DROP = "drop"  # left out of the run
    MERGE = "merge"  # pooled, in file order, into ``merged-N`` clients


@dataclass(frozen=True)
class JsonlOptions:
    """How to turn per-client texts into a federated partition."""

    min_texts: int = 4
    small_clients: SmallClients = SmallClients.DROP
    heldout_fraction: float = 0.2
    heldout_clients_fraction: float = 0.1
    seed: int = 0
    strict: bool = False  # refuse records with an empty text instead of skipping them

    def validate(self) -> None:
        if self.small_clients not in tuple(SmallClients):
            raise SimulationInputError(
                f"small_clients must be 'drop' or 'merge', got {self.small_clients!r}"
            )
        if self.min_texts < 2:
            raise SimulationInputError("min_texts must be ≥ 2 (a train and a held-out text)")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise SimulationInputError("heldout_fraction must be in (0, 1)")
        if not 0.0 <= self.heldout_clients_fraction < 1.0:
            raise SimulationInputError("heldout_clients_fraction must be in [0, 1)")


def _parse_line(line: str) -> tuple[str | None, str] | str:
    """Return (client_id, text) or an error description; the text may be blank."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    text = obj.get("text")
    if not isinstance(text, str):
        return 'missing string field "text"'
    cid = obj.get("client_id")
    if cid is not None and not isinstance(cid, str | int):
        return '"client_id" must be a string or an integer'
    return (None if cid is None else str(cid)), text


@dataclass(frozen=True)
class _Records:
    records: list[tuple[str | None, str]]
    skipped: dict[str | None, int]  # client id (None: none given) -> empty texts skipped


def _read_records(path: Path, *, need_client_id: bool, strict: bool) -> _Records:
    if not path.is_file():
        raise SimulationInputError(f"data file {path} does not exist")
    records: list[tuple[str | None, str]] = []
    skipped: dict[str | None, int] = defaultdict(int)
    errors: list[str] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parsed = _parse_line(line)
                if isinstance(parsed, tuple) and need_client_id and parsed[0] is None:
                    parsed = 'missing field "client_id"'
                if isinstance(parsed, tuple) and not parsed[1].strip() and strict:
                    parsed = 'empty "text" (refused in strict mode; without it, skipped)'
                if isinstance(parsed, str):
                    errors.append(f"line {lineno}: {parsed}")
                elif not parsed[1].strip():
                    skipped[parsed[0]] += 1
                else:
                    records.append(parsed)
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path} is not UTF-8 text: {e}") from e
    if errors:
        more = f" (and {len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
        raise DataFormatError(
            f"{path}: {len(errors)} malformed line(s): {'; '.join(errors[:_MAX_REPORTED])}{more}."
            ' Each line must be {"client_id": "...", "text": "..."}'
        )
    if not records:
        empty = f" ({sum(skipped.values())} records with an empty text)" if skipped else ""
        raise DataFormatError(f"{path} has no records with text{empty}")
    return _Records(records, dict(skipped))


@dataclass(frozen=True)
class JsonlTexts:
    """The texts of a JSONL file and how many records were skipped for an empty text."""

    texts: tuple[str, ...]
    skipped_empty: int


def read_jsonl_corpus(path: Path | str, *, strict: bool = False) -> JsonlTexts:
    """All non-empty ``"text"`` values of a JSONL file (``client_id`` optional).

    Records whose text is empty or whitespace only are skipped and counted.

    Args:
        path: The JSONL file, one ``{"text": ...}`` object per line.
        strict: Refuse records with an empty text instead of skipping them.

    Raises:
        DataFormatError: a line is malformed (the message names the file and the line),
            or no record has text.
    """
    read = _read_records(Path(path), need_client_id=False, strict=strict)
    return JsonlTexts(tuple(t for _, t in read.records), sum(read.skipped.values()))


def read_jsonl_texts(path: Path | str, *, strict: bool = False) -> tuple[str, ...]:
    """The texts of :func:`read_jsonl_corpus` (records with an empty text skipped).

    Raises:
        DataFormatError: a line is malformed (the message names it) or no record has text.
    """
    return read_jsonl_corpus(path, strict=strict).texts


def describe_skipped(path: Path | str, per_client: Mapping[str, int]) -> str:
    """One line saying how many records of ``path`` were skipped for an empty text, and
    of which clients (the ten with the most first); ``""`` when none were."""
    total = sum(per_client.values())
    if not total:
        return ""
    ranked = sorted(per_client.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{c}: {n}" for c, n in ranked[:_MAX_CLIENTS_LISTED])
    more = len(ranked) - _MAX_CLIENTS_LISTED
    shown += f", and {more} more clients" if more > 0 else ""
    return (
        f"{path}: skipped {total} record(s) with an empty text (per client: {shown}); "
        "--strict refuses them instead"
    )


def _split(cid: str, texts: list[str], fraction: float) -> ClientData:
    n_held = max(1, round(len(texts) * fraction))
    return ClientData(cid, tuple(texts[:-n_held]), tuple(texts[-n_held:]))


def load_jsonl(path: Path | str, options: JsonlOptions | None = None) -> FederatedData:
    """Load a federated data set from JSONL.

    Records whose text is empty or whitespace only are skipped (``options.strict``:
    refused) and counted per client in ``meta["skipped_empty_texts"]``. Clients with
    fewer than ``options.min_texts`` texts are dropped, or with
    ``small_clients="merge"`` pooled (in file order) into ``merged-N`` clients of at
    least that size. A seeded share of the clients is held out entirely.

    Raises:
        DataFormatError: malformed lines, named by line number (with ``strict``, empty
            texts too).
        SimulationInputError: bad options, or no client left to train.
    """
    opts = options or JsonlOptions()
    opts.validate()
    by_client: dict[str, list[str]] = defaultdict(list)
    read = _read_records(Path(path), need_client_id=True, strict=opts.strict)
    for cid, text in read.records:
        assert cid is not None
        by_client[cid].append(text)
    kept = {c: t for c, t in by_client.items() if len(t) >= opts.min_texts}
    small = [c for c in by_client if c not in kept]
    if opts.small_clients == SmallClients.MERGE and small:
        pool: list[str] = []
        merged = 0
        for c in small:
            pool.extend(by_client[c])
            if len(pool) >= opts.min_texts:
                kept[f"merged-{merged}"] = pool
                merged, pool = merged + 1, []
        if pool and merged:
            kept[f"merged-{merged - 1}"].extend(pool)
    if not kept:
        raise SimulationInputError(
            f"{path}: no client has at least {opts.min_texts} texts; lower min_texts or "
            "use small_clients='merge'"
        )
    ids = sorted(kept)
    order = np.random.default_rng(opts.seed).permutation(len(ids))
    n_heldout = int(len(ids) * opts.heldout_clients_fraction)
    heldout_ids = {ids[i] for i in order[:n_heldout]}
    clients = [_split(c, kept[c], opts.heldout_fraction) for c in ids if c not in heldout_ids]
    heldout = [_split(c, kept[c], opts.heldout_fraction) for c in ids if c in heldout_ids]
    return FederatedData(
        clients=tuple(clients),
        heldout_clients=tuple(heldout),
        source=str(path),
        meta={
            "dropped_clients": len(small) if opts.small_clients == SmallClients.DROP else 0,
            "skipped_empty_texts": dict(sorted((str(c), n) for c, n in read.skipped.items())),
        },
    )
