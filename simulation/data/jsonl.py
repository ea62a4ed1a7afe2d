"""Load real client text from JSONL: one ``{"client_id": ..., "text": ...}`` per line.

The loader is strict about form and forgiving about size: a malformed line stops the
load with its line number (nothing half-loaded), while clients with too little text are
dropped or merged into pooled pseudo-clients as configured. The result has the same
structure as the synthetic generator's, so everything downstream is shared.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulation.data.partition import ClientData, FederatedData
from simulation.errors import SimulationInputError

__all__ = ["DataFormatError", "JsonlOptions", "load_jsonl", "read_jsonl_texts"]

_MAX_REPORTED = 5


class DataFormatError(SimulationInputError):
    """The JSONL file has malformed lines; the message names them by line number."""


@dataclass(frozen=True)
class JsonlOptions:
    """How to turn per-client texts into a federated partition."""

    min_texts: int = 4
    small_clients: str = "drop"  # "drop" | "merge"
    heldout_fraction: float = 0.2
    heldout_clients_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.small_clients not in ("drop", "merge"):
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
    """Return (client_id, text) or an error description."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        return 'missing or empty string field "text"'
    cid = obj.get("client_id")
    if cid is not None and not isinstance(cid, str | int):
        return '"client_id" must be a string or an integer'
    return (None if cid is None else str(cid)), text


def _read_records(path: Path, *, need_client_id: bool) -> list[tuple[str | None, str]]:
    if not path.is_file():
        raise SimulationInputError(f"data file {path} does not exist")
    records: list[tuple[str | None, str]] = []
    errors: list[str] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parsed = _parse_line(line)
                if isinstance(parsed, tuple) and need_client_id and parsed[0] is None:
                    parsed = 'missing field "client_id"'
                if isinstance(parsed, str):
                    errors.append(f"line {lineno}: {parsed}")
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
        raise DataFormatError(f"{path} has no records")
    return records


def read_jsonl_texts(path: Path | str) -> tuple[str, ...]:
    """All ``"text"`` values of a JSONL file (``client_id`` optional), e.g. public text.

    Raises:
        DataFormatError: a line is malformed (the message names it) or the file is empty.
    """
    return tuple(t for _, t in _read_records(Path(path), need_client_id=False))


def _split(cid: str, texts: list[str], fraction: float) -> ClientData:
    n_held = max(1, round(len(texts) * fraction))
    return ClientData(cid, tuple(texts[:-n_held]), tuple(texts[-n_held:]))


def load_jsonl(path: Path | str, options: JsonlOptions | None = None) -> FederatedData:
    """Load a federated data set from JSONL.

    Clients with fewer than ``options.min_texts`` texts are dropped, or with
    ``small_clients="merge"`` pooled (in file order) into ``merged-N`` clients of at
    least that size. A seeded share of the clients is held out entirely.

    Raises:
        DataFormatError: malformed lines, named by line number.
        SimulationInputError: bad options, or no client left to train.
    """
    opts = options or JsonlOptions()
    opts.validate()
    by_client: dict[str, list[str]] = defaultdict(list)
    for cid, text in _read_records(Path(path), need_client_id=True):
        assert cid is not None
        by_client[cid].append(text)
    kept = {c: t for c, t in by_client.items() if len(t) >= opts.min_texts}
    small = [c for c in by_client if c not in kept]
    if opts.small_clients == "merge" and small:
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
        meta={"dropped_clients": len(small) if opts.small_clients == "drop" else 0},
    )
