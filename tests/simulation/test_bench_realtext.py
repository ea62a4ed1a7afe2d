"""bench_realtext's corpus: the standard library's docstrings, one module per phone, a
seeded public half for pretraining and a federated half that ``--data`` loads.

The benchmark itself takes about 25 minutes; these tests cover what decides its
figures before any training: which text is public, which is federated, and how the
gains are computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from simulation import FederatedConfig, load_data
from tests.repo_helpers import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_realtext")


@pytest.fixture(scope="module")
def corpus(bench: ModuleType) -> dict[str, list[str]]:
    return bench.stdlib_docstrings()


def test_docstrings_group_by_module_and_skip_tests_and_demos(corpus: dict[str, list[str]]) -> None:
    assert {"email", "asyncio", "logging", "json"} <= corpus.keys()
    assert not {"test", "idlelib", "turtledemo", "lib2to3"} & corpus.keys()
    assert all(len(doc) >= 40 for docs in corpus.values() for doc in docs)
    assert any("JSON" in doc for doc in corpus["json"])


def test_split_is_seeded_disjoint_and_keeps_modules_with_enough_text(
    bench: ModuleType, corpus: dict[str, list[str]]
) -> None:
    public, phones = bench.split_corpus(corpus, min_docstrings=12, seed=0)
    again = bench.split_corpus(corpus, min_docstrings=12, seed=0)
    other = bench.split_corpus(corpus, min_docstrings=12, seed=1)
    assert (public, phones) == again and public != other[0]
    assert not public.keys() & phones.keys()
    assert abs(len(public) - len(phones)) <= 1
    assert all(len(docs) >= 12 for docs in (public | phones).values())
    assert public.keys() | phones.keys() == {m for m, d in corpus.items() if len(d) >= 12}


def test_federated_half_loads_as_fedota_simulate_data_loads_it(
    bench: ModuleType, corpus: dict[str, list[str]], tmp_path: Path
) -> None:
    _, phones = bench.split_corpus(corpus, min_docstrings=12, seed=0)
    data_file = tmp_path / "federated.jsonl"
    bench.write_jsonl(data_file, phones)
    first = json.loads(data_file.read_text().splitlines()[0])
    assert set(first) == {"client_id", "text"}
    data = load_data(FederatedConfig(out_dir=tmp_path / "probe", data_file=data_file))
    assert len(data.clients) + len(data.heldout_clients) == len(phones)
    assert data.heldout_clients, "some phones must be held out for the held-out column"


def test_gains_are_over_each_rows_own_start_and_shares_of_centralized(bench: ModuleType) -> None:
    rows = {
        "base": {"eval_accuracy": 0.20},
        "fed-no-dp": {"eval_accuracy": 0.21, "baseline_accuracy": 0.20},
        "fed-user-dp": {"eval_accuracy": 0.19, "baseline_accuracy": 0.20},
        "centralized": {"eval_accuracy": 0.24},
    }
    out = bench.shares(rows)
    assert out["fed-no-dp_gain"] == pytest.approx(0.01)
    assert out["fed-no-dp_share_of_centralized"] == pytest.approx(0.25)
    assert out["fed-user-dp_share_of_fed_no_dp"] == pytest.approx(-1.0)
