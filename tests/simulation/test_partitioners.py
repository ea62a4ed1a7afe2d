"""``--partition``: Flower Datasets' partitioners over text records in every --data format."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedota.cli import app
from simulation import SimulationInputError
from simulation.data import (
    NATURAL,
    DataFormatError,
    FederatedData,
    JsonlOptions,
    PartitionError,
    PartitionSpecError,
    SyntheticConfig,
    generate_synthetic,
    load_data_file,
    load_jsonl,
    load_synthetic,
    parse_partition_spec,
)
from tests.repo_helpers import fedota_cli

LABELS = ("sports", "food", "travel", "music", "work")
USERS = 7
RECORDS = 420


def _records(n: int = RECORDS) -> list[dict[str, str]]:
    """Unique texts that name their label; users write in an interleaved order."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        label = LABELS[int(rng.integers(len(LABELS)))]
        out.append({"client_id": f"user{i % USERS}", "text": f"{label} note {i}", "label": label})
    return out


def _write_jsonl(rows: list[dict[str, str]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_with_datasets(kind: str) -> Callable[[list[dict[str, str]], Path], Path]:
    def write(rows: list[dict[str, str]], path: Path) -> Path:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if kind == "disk":
            ds.save_to_disk(str(path))
        elif kind == "arrow":  # the Arrow stream file save_to_disk writes
            ds.save_to_disk(str(path.with_suffix(".dir")))
            (arrow,) = path.with_suffix(".dir").glob("*.arrow")
            arrow.rename(path)
        elif kind == "json":
            ds.to_json(str(path))
        elif kind == "csv":
            ds.to_csv(str(path), index=False)
        else:
            ds.to_parquet(str(path))
        return path

    return write


FORMATS = {
    "data.jsonl": _write_jsonl,
    "data.json": _write_with_datasets("json"),
    "data.csv": _write_with_datasets("csv"),
    "data.parquet": _write_with_datasets("parquet"),
    "data.arrow": _write_with_datasets("arrow"),
    "saved": _write_with_datasets("disk"),
}


def _by_client(data: FederatedData) -> dict[str, list[str]]:
    """Every client's texts (train then held-out, i.e. in its own order)."""
    return {c.client_id: [*c.train, *c.heldout] for c in (*data.clients, *data.heldout_clients)}


def _label(text: str) -> str:
    return text.split(" ", 1)[0]


def _load(path: Path, spec: str, clients: int = 4, seed: int = 0) -> FederatedData:
    opts = JsonlOptions(seed=seed, heldout_clients_fraction=0.0)
    return load_data_file(path, opts, partition=parse_partition_spec(spec), num_clients=clients)


def _check_natural(parts: dict[str, list[str]], rows: list[dict[str, str]]) -> None:
    grouped: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        grouped[r["client_id"]].append(r["text"])
    assert parts == grouped  # one client per client_id, texts in file order


def _check_iid(parts: dict[str, list[str]], rows: list[dict[str, str]]) -> None:
    sizes = [len(t) for t in parts.values()]
    assert len(parts) == 4 and max(sizes) - min(sizes) <= 1
    assert sorted(t for ts in parts.values() for t in ts) == sorted(r["text"] for r in rows)


def _check_dirichlet(parts: dict[str, list[str]], rows: list[dict[str, str]]) -> None:
    assert len(parts) == 4 and min(len(t) for t in parts.values()) >= 4  # min_size
    assert sorted(t for ts in parts.values() for t in ts) == sorted(r["text"] for r in rows)


def _check_shard(parts: dict[str, list[str]], rows: list[dict[str, str]]) -> None:
    # 4 clients × 2 shards of ⌊420 / 8⌋ records, cut from the records sorted by label.
    assert sorted(len(t) for t in parts.values()) == [104] * 4
    texts = [t for ts in parts.values() for t in ts]
    assert len(set(texts)) == len(texts) and set(texts) <= {r["text"] for r in rows}


def _check_pathological(parts: dict[str, list[str]], rows: list[dict[str, str]]) -> None:
    assert len(parts) == 4
    assert all(len({_label(t) for t in ts}) == 1 for ts in parts.values())  # one class each


def _check_growing(parts: dict[str, list[str]], rows: list[dict[str, str]]) -> None:
    sizes = [len(parts[f"part-{i:05d}"]) for i in range(4)]
    assert sizes == sorted(sizes) and sizes[-1] > 2 * sizes[0]
    assert sum(sizes) == len(rows)


SCHEMES: dict[str, Callable[[dict[str, list[str]], list[dict[str, str]]], None]] = {
    "natural": _check_natural,
    "iid": _check_iid,
    "dirichlet:alpha=0.5,by=label": _check_dirichlet,
    "shard:shards_per_client=2": _check_shard,
    "pathological:classes_per_client=1": _check_pathological,
    "linear": _check_growing,
    "square": _check_growing,
    "exponential": _check_growing,
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_scheme_partitions_every_format_alike(tmp_path: Path, name: str) -> None:
    rows = _records()
    path = FORMATS[name](rows, tmp_path / name)
    reference = _write_jsonl(rows, tmp_path / "reference.jsonl")
    for spec, check in SCHEMES.items():
        parts = _by_client(_load(path, spec))
        check(parts, rows)
        # The format is only how records are stored: the same records, the same clients.
        assert parts == _by_client(_load(reference, spec)), spec


@pytest.mark.parametrize("spec", ["iid", "dirichlet:alpha=0.5", "shard", "exponential"])
def test_a_seed_gives_the_same_partition(tmp_path: Path, spec: str) -> None:
    path = _write_jsonl(_records(), tmp_path / "d.jsonl")
    assert _load(path, spec, seed=3) == _load(path, spec, seed=3)
    assert _by_client(_load(path, spec, seed=3)) != _by_client(_load(path, spec, seed=4))


def _label_skew(data: FederatedData) -> float:
    """Mean over clients of the total-variation distance between the client's label mix
    and the whole data set's: 0 = every client like the population."""
    parts = _by_client(data)
    everyone = Counter(_label(t) for ts in parts.values() for t in ts)
    total = sum(everyone.values())
    distances = []
    for texts in parts.values():
        mine = Counter(_label(t) for t in texts)
        distances.append(0.5 * sum(abs(mine[k] / len(texts) - everyone[k] / total) for k in LABELS))
    return float(np.mean(distances))


def test_dirichlet_skew_grows_as_alpha_shrinks(tmp_path: Path) -> None:
    path = _write_jsonl(_records(2000), tmp_path / "d.jsonl")
    skew = {
        alpha: _label_skew(_load(path, f"dirichlet:alpha={alpha},min_size=0", clients=8))
        for alpha in (0.1, 1.0, 1000.0)
    }
    assert skew[0.1] > skew[1.0] > skew[1000.0], skew
    assert skew[0.1] > 0.4, skew  # a few labels per client (0.65 when written)
    assert skew[1000.0] < 0.1, skew  # every client close to the population's mix (0.01)
    iid = _label_skew(_load(path, "iid", clients=8))
    assert iid < 0.1


def test_natural_by_another_column_groups_by_it(tmp_path: Path) -> None:
    rows = _records()
    path = _write_jsonl(rows, tmp_path / "d.jsonl")
    parts = _by_client(_load(path, "natural:by=label"))
    assert set(parts) == set(LABELS)
    assert all({_label(t) for t in ts} == {label} for label, ts in parts.items())


def test_natural_keeps_small_clients_rules_and_heldout_clients(tmp_path: Path) -> None:
    rows = _records(60)
    path = _write_jsonl(rows, tmp_path / "d.jsonl")
    data = load_data_file(path, JsonlOptions(seed=1, heldout_clients_fraction=0.3))
    assert data == load_jsonl(path, JsonlOptions(seed=1, heldout_clients_fraction=0.3))
    assert len(data.heldout_clients) == int(USERS * 0.3)
    assert data.partition is not None and data.partition.spec == "natural:by=client_id"
    assert data.partition.partitioner == "NaturalIdPartitioner" and data.partition.seed == 1
    for c in data.clients:  # train/held-out split per client: the last 20 % held out
        assert len(c.heldout) == max(1, round(c.num_texts * 0.2))


def test_other_schemes_need_no_client_id(tmp_path: Path) -> None:
    rows = [{"text": r["text"], "label": r["label"]} for r in _records()]
    path = _write_jsonl(rows, tmp_path / "d.jsonl")
    data = _load(path, "dirichlet:alpha=1")
    assert len(data.clients) == 4
    with pytest.raises(DataFormatError, match='line 1: missing field "client_id"'):
        _load(path, "natural")


def test_the_synthetic_default_is_the_generator_and_its_topics_are_labels() -> None:
    cfg = SyntheticConfig(num_clients=4, num_heldout_clients=1, seed=2, max_texts=300)
    default = load_synthetic(cfg)
    assert default.clients == generate_synthetic(cfg).clients  # unchanged by --partition
    assert default.heldout_clients == generate_synthetic(cfg).heldout_clients
    assert default.partition is not None and default.partition.partitioner is None
    skewed = load_synthetic(cfg, parse_partition_spec("pathological:classes_per_client=1"))
    assert len(skewed.clients) == 4 and skewed.heldout_clients == default.heldout_clients
    assert skewed.partition is not None and skewed.partition.partitioner == (
        "PathologicalPartitioner"
    )
    for c in skewed.clients:  # one topic each: every message names one activity's venue
        venues = Counter(v for t in c.train for v in _VENUES if v in t)
        assert len(venues) <= 1, (c.client_id, venues)
    natural = load_synthetic(cfg, parse_partition_spec("natural:by=client_id"))
    assert natural == default


_VENUES = ("the blue door", "noodle corner", "river park", "iron works", "the old cinema")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("", "no scheme; the form is SCHEME[:KEY=VALUE,...]", id="empty"),
        pytest.param("random", "unknown scheme 'random'", id="unknown-scheme"),
        pytest.param("dirichlet:alpha", "'alpha' is not KEY=VALUE", id="no-equals"),
        pytest.param("dirichlet:alpha=0", "alpha='0' is not a number > 0", id="alpha-zero"),
        pytest.param("dirichlet:alpha=x", "alpha='x' is not a number", id="alpha-nan-text"),
        pytest.param("dirichlet:alpha=inf", "is not a finite number", id="alpha-inf"),
        pytest.param("dirichlet:beta=1", "dirichlet takes alpha, by, min_size", id="bad-key"),
        pytest.param("iid:alpha=1", "iid takes no parameters; not 'alpha'", id="iid-params"),
        pytest.param("shard:shards_per_client=0", "is not ≥ 1", id="zero-shards"),
        pytest.param("shard:shards_per_client=1.5", "is not an integer", id="float-shards"),
        pytest.param("dirichlet:alpha=1,alpha=2", "alpha is given twice", id="repeated"),
        pytest.param("pathological:assignment=best", "one of random, deterministic", id="mode"),
        pytest.param("dirichlet:self_balancing=1", "is not true or false", id="bool"),
        pytest.param("size", "size needs sizes=..., e.g. size:sizes=40/10/10", id="no-sizes"),
        pytest.param("size:sizes=4/x", "is not integers separated by /", id="sizes-text"),
        pytest.param("size:sizes=4/0", "sizes='4/0' is not integers ≥ 1", id="sizes-zero"),
    ],
)
def test_bad_specs_are_one_clear_line(spec: str, message: str) -> None:
    with pytest.raises(PartitionSpecError) as err:
        parse_partition_spec(spec)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, SimulationInputError)  # the CLI's exit 2


def test_spec_round_trips_with_defaults_filled_in() -> None:
    spec = parse_partition_spec(" Dirichlet : alpha = 0.3 , by = topic ")
    assert str(spec) == "dirichlet:alpha=0.3,by=topic,min_size=4,self_balancing=false"
    assert parse_partition_spec(str(spec)) == spec
    assert parse_partition_spec("natural") == NATURAL
    assert str(parse_partition_spec("shard:shard_size=10")).startswith("shard:shards_per_client=2")


def test_size_makes_one_client_per_size_given(tmp_path: Path) -> None:
    spec = parse_partition_spec("size: sizes = 200/50/10")
    assert str(spec) == "size:sizes=200/50/10" and parse_partition_spec(str(spec)) == spec
    path = _write_jsonl(_records(), tmp_path / "d.jsonl")
    data = _load(path, str(spec), clients=9)  # the sizes, not --clients, set the count
    parts = _by_client(data)
    assert [len(t) for t in parts.values()] == [200, 50, 10]
    texts = [t for ts in parts.values() for t in ts]
    assert len(set(texts)) == len(texts)  # disjoint; the 160 left over go unused
    assert data.partition is not None and data.partition.partitioner == "SizePartitioner"
    assert _by_client(_load(path, str(spec), seed=1)) != parts  # shuffled by the seed
    with pytest.raises(PartitionError, match="cannot split 420 records over 2 clients"):
        _load(path, "size:sizes=400/40")


def test_records_that_cannot_be_partitioned_are_refused(tmp_path: Path) -> None:
    path = _write_jsonl(_records(50), tmp_path / "d.jsonl")
    with pytest.raises(PartitionError, match="cannot split 50 records over 40 clients"):
        _load(path, "exponential", clients=40)
    with pytest.raises(DataFormatError, match='line 1: missing field "topic"'):
        _load(path, "dirichlet:by=topic")
    csv = _write_with_datasets("csv")([{"text": "a b"}] * 10, tmp_path / "d.csv")
    with pytest.raises(DataFormatError, match="has no column 'label' .*it has text"):
        _load(csv, "shard")
    saved = tmp_path / "dict"
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_records(10))}).save_to_disk(
        str(saved)
    )
    with pytest.raises(DataFormatError, match="holds the splits train"):
        _load(saved, "iid")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="cannot read it as parquet"):
        _load(broken, "iid")


def test_empty_texts_in_a_table_are_skipped_or_refused(tmp_path: Path) -> None:
    rows = [*_records(40), {"client_id": "user0", "text": " ", "label": "food"}]
    path = _write_with_datasets("parquet")(rows, tmp_path / "d.parquet")
    data = _load(path, "natural")
    assert data.meta["skipped_empty_texts"] == {"user0": 1}
    with pytest.raises(DataFormatError, match='row 40: empty "text"'):
        load_data_file(path, JsonlOptions(strict=True))


RUNNER = CliRunner()


def test_data_partition_command_writes_the_scheme(tmp_path: Path) -> None:
    path = _write_with_datasets("csv")(_records(), tmp_path / "d.csv")
    out = tmp_path / "parts"
    result = RUNNER.invoke(
        app,
        ["data", "partition", "--data", str(path), "--out", str(out), "--clients", "5",
         "--partition", "pathological:classes_per_client=1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert len(index["partitions"]) == 5
    for p in index["partitions"]:
        record = json.loads((out / f"partition-{p['partition_id']}.json").read_text())
        assert len({_label(t) for t in record["train"] + record["heldout"]}) == 1


def test_simulate_refuses_a_bad_spec_before_any_work(tmp_path: Path) -> None:
    result = fedota_cli(
        "simulate", "--partition", "dirichlet:alpha=-1", "--out", str(tmp_path / "r")
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --partition 'dirichlet:alpha=-1': alpha='-1' is not a number > 0; the form "
        "is SCHEME[:KEY=VALUE,...]"
    ]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_simulate_trains_on_the_partition_and_records_it(tmp_path: Path, micro_base: Path) -> None:
    path = _write_with_datasets("parquet")(_records(), tmp_path / "d.parquet")
    out = tmp_path / "run"
    result = fedota_cli(
        "simulate", "--no-ota", "--no-dp", "--clients", "3", "--clients-per-round", "3",
        "--rounds", "1", "--local-steps", "2", "--base-model", str(micro_base), "--seed", "5",
        "--data", str(path), "--partition", "dirichlet:alpha=0.5,by=label", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["clients"] == 3
    assert summary["config"]["partition"] == {
        "spec": "dirichlet:alpha=0.5,by=label,min_size=4,self_balancing=false",
        "scheme": "dirichlet",
        "params": {"alpha": 0.5, "by": "label", "min_size": 4, "self_balancing": False},
        "seed": 5,
        "partitioner": "DirichletPartitioner",
    }
    index = json.loads((out / "partitions" / "index.json").read_text())
    assert [p["client_id"] for p in index["partitions"]] == [f"part-{i:05d}" for i in range(3)]
    assert summary["rounds"][0]["clients_sampled"] == 3  # the partition's 3 clients
    assert summary["rounds"][0]["applied"]
