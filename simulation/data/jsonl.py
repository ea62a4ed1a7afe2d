"""Load real client text from JSONL: one ``{"client_id": ..., "text": ...}`` per line.

The loader is strict about form and forgiving about size: a malformed line (not a JSON
object, no string ``"text"``, a bad ``client_id``) stops the load with the file and its
line number (nothing half-loaded), while a record whose text is empty or whitespace only
is skipped and counted (per client), as real corpora have such records; ``strict=True``
refuses those too. ``simulation.data.load`` turns the records into clients
(``--partition``), and drops or merges clients with too little text as
:class:`JsonlOptions` says.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from simulation.errors import SimulationInputError

__all__ = [
    "DataFormatError",
    "JsonlOptions",
    "JsonlRows",
    "JsonlTexts",
    "SmallClients",
    "describe_skipped",
    "read_jsonl_corpus",
    "read_jsonl_rows",
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


def _parse_line(line: str, columns: tuple[str, ...] = ()) -> _Row | str:
    """Return (client_id, text, values of ``columns``) or an error description; the
    text may be blank."""
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
    values = []
    for column in columns:
        value = obj.get(column)
        if value is None:
            return f'missing field "{column}" (the --partition scheme reads it)'
        if not isinstance(value, str | int):
            return f'"{column}" must be a string or an integer'
        values.append(str(value))
    return (None if cid is None else str(cid)), text, tuple(values)


_Row = tuple[str | None, str, tuple[str, ...]]  # client id, text, further columns


@dataclass(frozen=True)
class JsonlRows:
    """The records of a JSONL file with text, and the empty-text records skipped."""

    records: list[tuple[str | None, str]]  # (client id or None, text)
    values: list[tuple[str, ...]]  # per record, the asked-for further columns
    skipped: dict[str | None, int]  # client id (None: none given) -> empty texts skipped


def read_jsonl_rows(
    path: Path | str, *, need_client_id: bool, columns: tuple[str, ...] = (), strict: bool
) -> JsonlRows:
    """Every record of a JSONL file: its ``client_id``, ``text`` and ``columns``.

    Raises:
        SimulationInputError: the file does not exist.
        DataFormatError: malformed lines, named by number (a missing ``client_id``
            with ``need_client_id``, a missing column of ``columns``; with ``strict``,
            an empty text), or no record with text.
    """
    path = Path(path)
    if not path.is_file():
        raise SimulationInputError(f"data file {path} does not exist")
    records: list[tuple[str | None, str]] = []
    values: list[tuple[str, ...]] = []
    skipped: dict[str | None, int] = defaultdict(int)
    errors: list[str] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parsed = _parse_line(line, columns)
                if isinstance(parsed, tuple) and need_client_id and parsed[0] is None:
                    parsed = 'missing field "client_id"'
                if isinstance(parsed, tuple) and not parsed[1].strip() and strict:
                    parsed = 'empty "text" (refused in strict mode; without it, skipped)'
                if isinstance(parsed, str):
                    errors.append(f"line {lineno}: {parsed}")
                elif not parsed[1].strip():
                    skipped[parsed[0]] += 1
                else:
                    records.append(parsed[:2])
                    values.append(parsed[2])
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
    return JsonlRows(records, values, dict(skipped))


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
    read = read_jsonl_rows(path, need_client_id=False, strict=strict)
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
