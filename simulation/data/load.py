"""Turn ``--data`` (or the synthetic users) into a :class:`FederatedData`.

Three steps: read the records, split them over clients with Flower Datasets
(``--partition``, :mod:`simulation.data.partitioners`), then do what its partitioners
do not: drop clients with fewer than ``min_texts`` texts (or merge them into
``merged-N`` clients), hold a seeded share of the clients out entirely, and split each
client's texts into train and held-out (the last ``heldout_fraction``).

``--data`` is read by its name:

* a directory: a data set written by ``datasets.Dataset.save_to_disk``;
* ``*.json`` (JSON lines or one JSON array), ``*.csv``, ``*.parquet``, ``*.arrow``:
  read by ``datasets``;
* anything else: JSONL, read strictly line by line (:mod:`simulation.data.jsonl`).

Every format needs a string column ``text``, plus the column the scheme reads
(``client_id`` for the default ``natural`` scheme). Records whose text is empty are
skipped and counted per client (``strict``: refused).

Invariant: the same file, options, scheme, client count and seed give the same clients.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulation.data.jsonl import DataFormatError, JsonlOptions, SmallClients, read_jsonl_rows
from simulation.data.partition import ClientData, FederatedData
from simulation.data.partitioners import (
    NATURAL,
    PartitionSpec,
    partition_texts,
    partitioner_name,
)
from simulation.data.synthetic import (
    SyntheticConfig,
    generate_public_texts,
    generate_synthetic,
    synthetic_heldout_clients,
    synthetic_records,
)
from simulation.errors import SimulationInputError

__all__ = ["TABLE_FORMATS", "load_data_file", "load_jsonl", "load_synthetic"]

TABLE_FORMATS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
NO_CLIENT = "(no client_id)"  # the skipped-text count of records without a client id
_MAX_REPORTED = 5


@dataclass(frozen=True)
class _Table:
    texts: tuple[str, ...]
    columns: dict[str, tuple[str, ...]]  # further columns, values as strings
    skipped: dict[str, int]  # client id -> records skipped for an empty text


def _read_jsonl(path: Path, column: str | None, strict: bool) -> _Table:
    extra = () if column in (None, "client_id") else (str(column),)
    rows = read_jsonl_rows(path, need_client_id=column == "client_id", columns=extra, strict=strict)
    columns = {c: tuple(v[i] for v in rows.values) for i, c in enumerate(extra)}
    ids = [cid for cid, _ in rows.records]
    if all(cid is not None for cid in ids):
        columns["client_id"] = tuple(str(cid) for cid in ids)
    skipped = {NO_CLIENT if c is None else c: n for c, n in rows.skipped.items()}
    return _Table(tuple(t for _, t in rows.records), columns, skipped)


def _load_dataset(path: Path) -> Any:
    """``path`` as a ``datasets.Dataset``, nothing cached outside a temporary directory."""
    import datasets
    import pyarrow as pa
    from datasets.exceptions import DatasetGenerationError

    datasets.disable_progress_bars()
    fmt = "a save_to_disk directory" if path.is_dir() else TABLE_FORMATS[path.suffix.lower()]
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(loaded, datasets.DatasetDict):
                raise DataFormatError(
                    f"{path} holds the splits {', '.join(loaded)}, not one data set; point "
                    f"--data at one of them, e.g. {path / next(iter(loaded))}"
                )
            return loaded
        if fmt == "arrow":
            return datasets.Dataset.from_file(str(path), in_memory=True)
        read = {
            "json": datasets.Dataset.from_json,
            "csv": datasets.Dataset.from_csv,
            "parquet": datasets.Dataset.from_parquet,
        }[fmt]
        with tempfile.TemporaryDirectory(prefix="fedota-data-") as cache:
            return read(str(path), cache_dir=cache, keep_in_memory=True)
    except DataFormatError:
        raise
    except (OSError, ValueError, TypeError, pa.ArrowException, DatasetGenerationError) as e:
        cause = e.__cause__ or e
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        raise DataFormatError(f"{path}: cannot read it as {fmt} ({reason})") from e


def _read_dataset(path: Path, column: str | None, strict: bool) -> _Table:
    dataset = _load_dataset(path)
    names = list(dataset.column_names)
    wanted = ["text", *([column] if column else [])]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataFormatError(
            f"{path} has no column {', '.join(map(repr, missing))} (it has "
            f"{', '.join(names) or 'none'}); every format needs a string 'text' column, and "
            "--partition reads the column its by= names"
        )
    labels = list(dataset[column]) if column else []
    ids = (
        [None if v is None else str(v) for v in dataset["client_id"]]
        if "client_id" in names
        else []
    )
    texts: list[str] = []
    kept_labels: list[str] = []
    kept_ids: list[str | None] = []
    skipped: dict[str, int] = defaultdict(int)
    errors: list[str] = []
    for i, text in enumerate(dataset["text"]):
        if text is not None and not isinstance(text, str):
            errors.append(f'row {i}: "text" is {type(text).__name__}, not a string')
            continue
        if column and (isinstance(labels[i], bool) or not isinstance(labels[i], str | int)):
            errors.append(f'row {i}: "{column}" is {labels[i]!r}, not a string or an integer')
            continue
        cid = ids[i] if ids else None
        if text is None or not text.strip():
            if strict:
                errors.append(f'row {i}: empty "text" (refused in strict mode)')
            else:
                skipped[NO_CLIENT if cid is None else cid] += 1
            continue
        texts.append(text)
        kept_labels += [str(labels[i])] if column else []
        kept_ids.append(cid)
    if errors:
        more = f" (and {len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
        raise DataFormatError(
            f"{path}: {len(errors)} bad row(s): {'; '.join(errors[:_MAX_REPORTED])}{more}"
        )
    if not texts:
        raise DataFormatError(f"{path} has no records with text")
    columns = {str(column): tuple(kept_labels)} if column else {}
    if ids and "client_id" not in columns and all(c is not None for c in kept_ids):
        columns["client_id"] = tuple(str(c) for c in kept_ids)
    return _Table(tuple(texts), columns, dict(skipped))


def _read(path: Path, column: str | None, strict: bool) -> _Table:
    if not path.exists():
        raise SimulationInputError(f"data file {path} does not exist")
    if path.is_dir() or path.suffix.lower() in TABLE_FORMATS:
        return _read_dataset(path, column, strict)
    return _read_jsonl(path, column, strict)


def _split(cid: str, texts: Sequence[str], fraction: float) -> ClientData:
    n_held = max(1, round(len(texts) * fraction))
    return ClientData(cid, tuple(texts[:-n_held]), tuple(texts[-n_held:]))


def _federate(
    by_client: dict[str, list[str]], opts: JsonlOptions, *, source: str
) -> tuple[list[ClientData], list[ClientData], int]:
    """Drop or merge small clients, hold some out, split each: (train, held-out, dropped)."""
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
            f"{source}: no client has at least {opts.min_texts} texts; lower min_texts or "
            "use small_clients='merge'"
        )
    ids = sorted(kept)
    order = np.random.default_rng(opts.seed).permutation(len(ids))
    n_heldout = int(len(ids) * opts.heldout_clients_fraction)
    heldout_ids = {ids[i] for i in order[:n_heldout]}
    clients = [_split(c, kept[c], opts.heldout_fraction) for c in ids if c not in heldout_ids]
    heldout = [_split(c, kept[c], opts.heldout_fraction) for c in ids if c in heldout_ids]
    dropped = len(small) if opts.small_clients == SmallClients.DROP else 0
    return clients, heldout, dropped


def load_data_file(
    path: Path | str,
    options: JsonlOptions | None = None,
    *,
    partition: PartitionSpec = NATURAL,
    num_clients: int = 0,
) -> FederatedData:
    """Load ``path`` (any format of the module docstring) as federated clients.

    Args:
        path: the data file or ``save_to_disk`` directory.
        options: minimum texts per client, held-out shares, seed, strictness.
        partition: how records become clients; the default makes one client per
            ``client_id``.
        num_clients: the clients to make, for every scheme but ``natural``.

    Raises:
        DataFormatError: unreadable data or malformed records (JSONL: by line number),
            or no ``text`` column or the column the scheme reads.
        PartitionError: the scheme cannot make ``num_clients`` clients of these records.
        SimulationInputError: bad options, or no client left to train.
    """
    opts = options or JsonlOptions()
    opts.validate()
    path = Path(path)
    table = _read(path, partition.column, opts.strict)
    by_client = partition_texts(
        table.texts, table.columns, partition, num_partitions=num_clients, seed=opts.seed
    )
    if partition.scheme == "natural":  # small clients merge in the order they first appear
        first_seen = dict.fromkeys(table.columns[str(partition.column)])
        by_client = {c: by_client[c] for c in first_seen}
    clients, heldout, dropped = _federate(by_client, opts, source=str(path))
    return FederatedData(
        clients=tuple(clients),
        heldout_clients=tuple(heldout),
        source=str(path),
        meta={
            "dropped_clients": dropped,
            "skipped_empty_texts": dict(sorted(table.skipped.items())),
        },
        partition=partition.record(opts.seed, partitioner=partitioner_name(partition)),
    )


def load_jsonl(path: Path | str, options: JsonlOptions | None = None) -> FederatedData:
    """:func:`load_data_file` with one client per ``client_id`` (``natural``).

    Raises:
        DataFormatError: malformed lines, named by line number (with ``strict``, empty
            texts too).
        SimulationInputError: bad options, or no client left to train.
    """
    return load_data_file(path, options)


def load_synthetic(config: SyntheticConfig, partition: PartitionSpec = NATURAL) -> FederatedData:
    """The synthetic data set, its training users' messages re-partitioned as asked.

    ``natural`` by ``client_id`` is the generator's own data set (one client per user,
    no partitioner runs). Any other scheme pools the ``config.num_clients`` users'
    messages (columns ``client_id``: the user, ``label``: the message's topic) and
    splits them over ``config.num_clients`` clients; the held-out users stay as they are.

    Raises:
        SimulationInputError: a config value is out of range, or canaries were asked
            for with a scheme other than the generator's own.
        PartitionError: the scheme cannot split the messages over the clients.
    """
    record = partition.record(config.seed, partitioner=None)
    if partition == NATURAL:
        return dataclasses.replace(generate_synthetic(config), partition=record)
    if config.canary_clients:
        raise SimulationInputError(
            f"canaries are planted in the generator's own users; --partition {partition} "
            "re-partitions their messages, so drop one or the other"
        )
    records = synthetic_records(config)
    by_client = partition_texts(
        records.texts,
        {"client_id": records.client_ids, "label": records.labels},
        partition,
        num_partitions=config.num_clients,
        seed=config.seed,
    )
    opts = JsonlOptions(
        heldout_fraction=config.heldout_fraction, heldout_clients_fraction=0.0, seed=config.seed
    )
    clients, _, dropped = _federate(by_client, opts, source="synthetic data")
    return FederatedData(
        clients=tuple(clients),
        heldout_clients=synthetic_heldout_clients(config),
        public_texts=generate_public_texts(config.num_public_texts, config.seed),
        source="synthetic",
        meta={"seed": config.seed, "num_clients": config.num_clients, "dropped_clients": dropped},
        partition=dataclasses.replace(record, partitioner=partitioner_name(partition)),
    )
