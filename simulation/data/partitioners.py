"""How records are split over simulated phones: Flower Datasets' partitioners.

``--partition`` names a scheme and its parameters in a small grammar::

    SPEC  := SCHEME [":" PARAM ("," PARAM)*]      e.g. dirichlet:alpha=0.3,by=label
    PARAM := KEY "=" VALUE

* ``natural``: ``by`` (client_id) — ``NaturalIdPartitioner``, one client per value;
* ``iid``: no keys — ``IidPartitioner``;
* ``dirichlet``: ``alpha`` (0.5), ``by`` (label), ``min_size`` (4), ``self_balancing``
  (false) — ``DirichletPartitioner``;
* ``shard``: ``shards_per_client`` (2), ``shard_size`` (records / shards), ``by``
  (label) — ``ShardPartitioner``;
* ``pathological``: ``classes_per_client`` (2), ``by`` (label), ``assignment``
  (random | deterministic | first-deterministic) — ``PathologicalPartitioner``;
* ``linear``, ``square``, ``exponential``: no keys — client i's share of the records
  grows as i, i², eⁱ (``LinearPartitioner``, ``SquarePartitioner``,
  ``ExponentialPartitioner``);
* ``size``: ``sizes`` (records per client, ``/``-separated, e.g. ``sizes=40/10/10``) —
  ``SizePartitioner``; the records left over are used by no client.

``natural`` makes one client per distinct value of its column and ``size`` one per size
given; every other scheme makes as many clients as asked. ``by`` names the column whose
value is a record's label: label skew (``dirichlet``, ``shard``, ``pathological``) needs
one on text, e.g. a topic (the synthetic generator gives every message its topic as
``label``).

Invariants: the same records, spec, client count and seed give the same partition.
``natural`` keeps the records' order within a client; the other schemes shuffle the
records with the seed first (as ``flwr_datasets.FederatedDataset`` does), because
``IidPartitioner`` and the size-skewed partitioners take rows in order.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from simulation.errors import SimulationInputError

__all__ = [
    "NATURAL",
    "SCHEMES",
    "PartitionError",
    "PartitionRecord",
    "PartitionSpec",
    "PartitionSpecError",
    "parse_partition_spec",
    "partition_texts",
    "partitioner_name",
]

Param = str | int | float | bool | tuple[int, ...]


class PartitionSpecError(SimulationInputError):
    """A ``--partition`` spec does not follow the grammar, or names an unknown key."""


class PartitionError(SimulationInputError):
    """The records cannot be partitioned as the spec asks (a missing column, too few
    records for the clients, an unreachable minimum size)."""


@dataclass(frozen=True)
class _Key:
    name: str
    kind: type
    default: Param | None
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive, unless ``positive``
    positive: bool = False


_BY_LABEL = _Key("by", str, "label")
SCHEMES: Mapping[str, tuple[_Key, ...]] = {
    "natural": (_Key("by", str, "client_id"),),
    "iid": (),
    "dirichlet": (
        _Key("alpha", float, 0.5, positive=True),
        _BY_LABEL,
        _Key("min_size", int, 4, minimum=0),
        _Key("self_balancing", bool, False),
    ),
    "shard": (
        _Key("shards_per_client", int, 2, minimum=1),
        _Key("shard_size", int, None, minimum=1),
        _BY_LABEL,
    ),
    "pathological": (
        _Key("classes_per_client", int, 2, minimum=1),
        _BY_LABEL,
        _Key("assignment", str, "random", ("random", "deterministic", "first-deterministic")),
    ),
    "linear": (),
    "square": (),
    "exponential": (),
    "size": (_Key("sizes", tuple, None, minimum=1),),
}
_SIZED_BY_SPEC = ("natural", "size")  # schemes whose spec, not the caller, sets the clients
_GRAMMAR = "SCHEME[:KEY=VALUE,...]"


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``--partition``: the scheme and every parameter, defaults filled in.

    Build one with :func:`parse_partition_spec`; ``str()`` gives the canonical spec.
    """

    scheme: str
    params: tuple[tuple[str, Param], ...] = ()

    def param(self, name: str) -> Param | None:
        return dict(self.params).get(name)

    @property
    def column(self) -> str | None:
        """The column the scheme reads besides ``text`` (``by``), if any."""
        by = self.param("by")
        return None if by is None else str(by)

    def __str__(self) -> str:
        if not self.params:
            return self.scheme
        return self.scheme + ":" + ",".join(f"{k}={_show(v)}" for k, v in self.params)

    def record(self, seed: int, *, partitioner: str | None) -> PartitionRecord:
        """What ``summary.json`` keeps of the partition (``config.partition``)."""
        return PartitionRecord(str(self), self.scheme, dict(self.params), seed, partitioner)


@dataclass(frozen=True)
class PartitionRecord:
    """How a run's clients were made: ``config.partition`` of ``summary.json``.

    ``partitioner`` is the Flower Datasets class that ran, or ``None`` where the
    synthetic generator's users are the clients (no partitioner runs).
    """

    spec: str
    scheme: str
    params: dict[str, Param]
    seed: int
    partitioner: str | None


NATURAL = PartitionSpec("natural", (("by", "client_id"),))


def _show(value: Param) -> str:
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _value(spec: str, key: _Key, raw: str) -> Param:
    def bad(expected: str) -> PartitionSpecError:
        return PartitionSpecError(
            f"--partition {spec!r}: {key.name}={raw!r} is not {expected}; the form is {_GRAMMAR}"
        )

    value: int | float
    if key.kind is tuple:  # integers >= minimum, "/"-separated
        try:
            sizes = tuple(int(part) for part in raw.split("/"))
        except ValueError:
            raise bad("integers separated by /, e.g. 40/10/10") from None
        if key.minimum is not None and min(sizes) < key.minimum:
            raise bad(f"integers ≥ {key.minimum:g}")
        return sizes
    if key.kind is bool:
        if raw.lower() not in ("true", "false"):
            raise bad("true or false")
        return raw.lower() == "true"
    if key.kind is str:
        if not raw:
            raise bad("a non-empty name")
        if key.choices and raw not in key.choices:
            raise bad(f"one of {', '.join(key.choices)}")
        return raw
    try:
        value = int(raw) if key.kind is int else float(raw)
    except ValueError:
        raise bad("an integer" if key.kind is int else "a number") from None
    if not math.isfinite(value):
        raise bad("a finite number")
    if key.positive and not value > 0:
        raise bad("a number > 0")
    if key.minimum is not None and value < key.minimum:
        raise bad(f"≥ {key.minimum:g}")
    return value


def parse_partition_spec(spec: str) -> PartitionSpec:
    """Parse ``SCHEME[:KEY=VALUE,...]`` (module docstring) into a :class:`PartitionSpec`.

    Raises:
        PartitionSpecError: an unknown scheme or key, a repeated key, a value of the
            wrong kind or out of range, or a malformed spec; one line saying which.
    """
    text = spec.strip()
    scheme, _, rest = text.partition(":")
    scheme = scheme.strip().lower()
    if scheme not in SCHEMES:
        what = f"unknown scheme {scheme!r}" if scheme else "no scheme"
        raise PartitionSpecError(
            f"--partition {spec!r}: {what}; the form is {_GRAMMAR} with SCHEME one of "
            f"{', '.join(SCHEMES)}"
        )
    keys = {k.name: k for k in SCHEMES[scheme]}
    given: dict[str, Param] = {}
    for item in rest.split(",") if rest.strip() else ():
        name, eq, raw = (part.strip() for part in item.partition("="))
        if not eq or not name:
            raise PartitionSpecError(
                f"--partition {spec!r}: {item.strip()!r} is not KEY=VALUE; the form is {_GRAMMAR}"
            )
        if name not in keys:
            takes = f"takes {', '.join(keys)}" if keys else "takes no parameters"
            raise PartitionSpecError(f"--partition {spec!r}: {scheme} {takes}; not {name!r}")
        if name in given:
            raise PartitionSpecError(f"--partition {spec!r}: {name} is given twice")
        given[name] = _value(spec, keys[name], raw)
    missing = [k.name for k in SCHEMES[scheme] if k.kind is tuple and k.name not in given]
    if missing:
        raise PartitionSpecError(
            f"--partition {spec!r}: {scheme} needs {missing[0]}=..., e.g. {scheme}:sizes=40/10/10"
        )
    params = ((k.name, given.get(k.name, k.default)) for k in SCHEMES[scheme])
    return PartitionSpec(scheme, tuple((k, v) for k, v in params if v is not None))


def _partitioner(spec: PartitionSpec, num_partitions: int, seed: int) -> Any:
    from flwr_datasets import partitioner as fp

    p = dict(spec.params)
    by_scheme: dict[str, dict[str, Any]] = {
        "natural": {"partition_by": p.get("by")},
        "dirichlet": {
            "num_partitions": num_partitions,
            "partition_by": p.get("by"),
            "alpha": p.get("alpha"),
            "min_partition_size": p.get("min_size"),
            "self_balancing": p.get("self_balancing"),
            "seed": seed,
        },
        "shard": {
            "num_partitions": num_partitions,
            "partition_by": p.get("by"),
            "num_shards_per_partition": p.get("shards_per_client"),
            "shard_size": p.get("shard_size"),
            "seed": seed,
        },
        "pathological": {
            "num_partitions": num_partitions,
            "partition_by": p.get("by"),
            "num_classes_per_partition": p.get("classes_per_client"),
            "class_assignment_mode": p.get("assignment"),
            "seed": seed,
        },
        "size": {"partition_sizes": _sizes(p.get("sizes"))},
    }
    kwargs = by_scheme.get(spec.scheme, {"num_partitions": num_partitions})  # iid, skewed
    return getattr(fp, _CLASSES[spec.scheme])(**kwargs)


def _sizes(value: Param | None) -> list[int]:
    return list(value) if isinstance(value, tuple) else []


def partitioner_name(spec: PartitionSpec) -> str:
    """The Flower Datasets class that carries out ``spec``."""
    return _CLASSES[spec.scheme]


_CLASSES = {
    "natural": "NaturalIdPartitioner",
    "iid": "IidPartitioner",
    "dirichlet": "DirichletPartitioner",
    "shard": "ShardPartitioner",
    "pathological": "PathologicalPartitioner",
    "linear": "LinearPartitioner",
    "square": "SquarePartitioner",
    "exponential": "ExponentialPartitioner",
    "size": "SizePartitioner",
}


def partition_texts(
    texts: Sequence[str],
    columns: Mapping[str, Sequence[str]],
    spec: PartitionSpec,
    *,
    num_partitions: int,
    seed: int,
) -> dict[str, list[str]]:
    """Split ``texts`` over clients as ``spec`` says, with Flower Datasets.

    Args:
        texts: one text per record.
        columns: further columns, one value per record, as strings; ``spec.column``
            must be among them.
        spec: the scheme and its parameters.
        num_partitions: the clients to make (``natural`` makes one per distinct value,
            ``size`` one per size).
        seed: seeds the shuffle and the partitioner.

    Returns:
        Client name → its texts, in partition-id order: for ``natural`` the column's
        value, else ``part-00000``, ``part-00001``, ...

    Raises:
        PartitionError: the column is missing, or the partitioner cannot make
            ``num_partitions`` clients from these records (its reason in one line).
    """
    import datasets

    column = spec.column
    if column is not None and column not in columns:
        have = ", ".join(["text", *sorted(columns)])
        raise PartitionError(
            f"--partition {spec}: the records have no column {column!r} (they have {have}); "
            "name another with by=COLUMN"
        )
    table: dict[str, list[str]] = {"text": list(texts)}
    if column is not None:
        table[column] = list(columns[column])
    if spec.scheme not in _SIZED_BY_SPEC and num_partitions < 1:
        raise PartitionError(f"--partition {spec}: need at least 1 client, got {num_partitions}")
    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict(table)
    if spec.scheme != "natural":
        dataset = dataset.shuffle(seed=seed).flatten_indices()
    part = _partitioner(spec, num_partitions, seed)
    part.dataset = dataset
    try:
        # Flower Datasets warns on each Dirichlet redraw and draws a tqdm bar for the
        # natural ids; the outcome (or its error) is what the caller needs.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            count = part.num_partitions
            loaded = [part.load_partition(i)["text"] for i in range(count)]
    except ValueError as e:
        reason = " ".join(str(e).split())
        raise PartitionError(
            f"--partition {spec}: cannot split {len(table['text'])} records over "
            f"{len(_sizes(spec.param('sizes'))) or num_partitions} clients: {reason}"
        ) from e
    if spec.scheme == "natural":
        names = [str(part.partition_id_to_natural_id[i]) for i in range(count)]
    else:
        names = [f"part-{i:05d}" for i in range(count)]
    return {name: list(t) for name, t in zip(names, loaded, strict=True)}
