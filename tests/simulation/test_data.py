"""Federated data: the synthetic generator and the JSONL loader."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from simulation import SimulationInputError
from simulation.data import (
    DataFormatError,
    JsonlOptions,
    generate_synthetic,
    load_jsonl,
    read_partition,
    tokenize_stats,
    write_partitions,
)
from simulation.data.synthetic import (
    ABBREV,
    ACTIVITIES,
    ACTIVITY_VENUE,
    CHAT_TEMPLATES,
    ITEMS,
    NAMES,
    TIMES,
)


def test_synthetic_is_deterministic_and_client_independent_of_population() -> None:
    a = generate_synthetic(num_clients=5, seed=3)
    b = generate_synthetic(num_clients=5, seed=3)
    assert a == b
    bigger = generate_synthetic(num_clients=50, seed=3)
    assert bigger.clients[:5] == a.clients
    assert generate_synthetic(num_clients=5, seed=4).clients != a.clients


def test_synthetic_is_non_iid() -> None:
    data = generate_synthetic(num_clients=200, seed=0)
    sizes = np.array([c.num_texts for c in data.clients])
    assert sizes.max() >= 4 * np.median(sizes)  # quantity skew (power law)
    venue_share = []
    for c in data.clients[:50]:
        counts = [sum(v in t for t in c.train) for v in ACTIVITY_VENUE.values()]
        venue_share.append(max(counts) / max(1, sum(counts)))
    assert np.median(venue_share) > 2 / len(ACTIVITY_VENUE)  # topic skew


def _true_pair_share(texts: tuple[str, ...]) -> float:
    """Among texts naming exactly one activity and one venue, the share that pair them
    the way the users do (activity → its venue)."""
    hits = total = 0
    for t in texts:
        acts = [a for a in ACTIVITY_VENUE if f" {a} " in f" {t} "]
        venues = [v for v in ACTIVITY_VENUE.values() if v in t]
        if len(acts) == 1 and len(venues) == 1:
            total += 1
            hits += ACTIVITY_VENUE[acts[0]] == venues[0]
    assert total >= 100, total
    return hits / total


def test_population_pattern_is_absent_from_public_split() -> None:
    data = generate_synthetic(num_clients=20, seed=0)
    users = tuple(t for c in data.clients for t in c.train)
    # The public split knows the words and chat syntax (venues included) …
    for venue in ACTIVITY_VENUE.values():
        assert any(venue in t for t in data.public_texts)
        assert any(venue in t for t in users)
    # … but not the association: venues follow activities at chance level (1/12),
    # while users always name an activity's own venue.
    assert _true_pair_share(data.public_texts) < 2 / len(ACTIVITY_VENUE)
    assert _true_pair_share(users) > 0.95
    # … and never one of the users' templates (common chat phrases, yes; a template, no).
    template = _template_matcher()
    assert all(template(t) for t in users)
    assert not [t for t in data.public_texts if template(t)]


def _template_matcher() -> Callable[[str], bool]:
    """Whether a text (abbreviations expanded) starts like an instance of a user template."""
    fields = {
        "friend": NAMES,
        "activity": ACTIVITIES,
        "venue": tuple(ACTIVITY_VENUE.values()),
        "time": TIMES,
        "item": ITEMS,
    }

    def field(m: re.Match[str]) -> str:
        name = m.group(1)
        return r"\d+" if name == "n" else "(?:" + "|".join(map(re.escape, fields[name])) + ")"

    patterns = [
        re.compile(re.sub(r"\\\{(\w+)\\\}", field, re.escape(t)), re.IGNORECASE)
        for t in CHAT_TEMPLATES
    ]
    expand = {short: word for word, short in ABBREV.items()}

    def matches(text: str) -> bool:
        full = " ".join(expand.get(w, w) for w in text.lower().split(" "))
        return any(p.match(full) for p in patterns)

    return matches


def test_splits_and_heldout_clients() -> None:
    data = generate_synthetic(num_clients=8, num_heldout_clients=3, seed=0)
    assert len(data.clients) == 8 and len(data.heldout_clients) == 3
    ids = [c.client_id for c in (*data.clients, *data.heldout_clients)]
    assert len(set(ids)) == len(ids)
    for c in data.clients:
        assert c.train and c.heldout
        assert len(c.heldout) == max(1, round(c.num_texts * 0.2))


def test_canaries_are_planted_only_where_asked() -> None:
    data = generate_synthetic(num_clients=4, seed=0, canary_clients=(2,), canary_repeats=7)
    (canary,) = data.canaries
    assert canary.client_id == data.clients[2].client_id
    assert data.clients[2].train.count(canary.text) == 7
    others = [t for i, c in enumerate(data.clients) if i != 2 for t in (*c.train, *c.heldout)]
    assert canary.text not in others


def test_max_texts_caps_every_client() -> None:
    data = generate_synthetic(num_clients=4, num_heldout_clients=1, seed=0, max_texts=40)
    assert {c.num_texts for c in (*data.clients, *data.heldout_clients)} == {40}
    default = generate_synthetic(num_clients=4, seed=0)
    assert min(c.num_texts for c in default.clients) >= 500  # records for record-level DP


def test_bad_synthetic_options_are_named() -> None:
    with pytest.raises(SimulationInputError, match="num_clients"):
        generate_synthetic(num_clients=0)
    with pytest.raises(SimulationInputError, match="max_texts"):
        generate_synthetic(max_texts=1)
    with pytest.raises(SimulationInputError, match="unknown synthetic data option"):
        generate_synthetic(num_users=3)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_loads_clients_and_holds_some_out(tmp_path: Path) -> None:
    lines = [json.dumps({"client_id": f"u{i % 10}", "text": f"message {i}"}) for i in range(100)]
    data = load_jsonl(
        _write(tmp_path / "d.jsonl", lines), JsonlOptions(heldout_clients_fraction=0.2)
    )
    assert len(data.clients) == 8 and len(data.heldout_clients) == 2
    assert all(len(c.train) == 8 and len(c.heldout) == 2 for c in data.clients)


def test_jsonl_malformed_lines_are_reported_by_number(tmp_path: Path) -> None:
    lines = [
        json.dumps({"client_id": "a", "text": "ok"}),
        "{not json",
        json.dumps({"client_id": "a"}),
        json.dumps(["a", "b"]),
        json.dumps({"text": "no id"}),
    ]
    with pytest.raises(DataFormatError) as err:
        load_jsonl(_write(tmp_path / "bad.jsonl", lines))
    message = str(err.value)
    for n in (2, 3, 4, 5):
        assert f"line {n}:" in message
    assert "line 1:" not in message


@pytest.mark.parametrize(("mode", "expected_clients"), [("drop", 2), ("merge", 3)])
def test_jsonl_small_clients_dropped_or_merged(
    tmp_path: Path, mode: str, expected_clients: int
) -> None:
    lines = [json.dumps({"client_id": "big1", "text": f"t{i}"}) for i in range(10)]
    lines += [json.dumps({"client_id": "big2", "text": f"s{i}"}) for i in range(10)]
    lines += [json.dumps({"client_id": f"tiny{i}", "text": f"x{i}"}) for i in range(5)]
    data = load_jsonl(
        _write(tmp_path / "d.jsonl", lines),
        JsonlOptions(min_texts=4, small_clients=mode, heldout_clients_fraction=0),
    )
    assert len(data.clients) == expected_clients
    total = sum(c.num_texts for c in data.clients)
    assert total == (20 if mode == "drop" else 25)


def test_partitions_round_trip_and_tokenize(tmp_path: Path, micro_base: Path) -> None:
    from transformers import AutoTokenizer

    data = generate_synthetic(num_clients=3, num_heldout_clients=1, seed=0)
    write_partitions(data, tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [p["role"] for p in index["partitions"]] == ["train"] * 3 + ["heldout"]
    record = read_partition(tmp_path, 3)
    assert record["client_id"] == data.heldout_clients[0].client_id
    assert tuple(record["train"]) == data.heldout_clients[0].train
    stats = tokenize_stats(data, AutoTokenizer.from_pretrained(micro_base))
    assert all(n > 0 for n in stats.train_tokens.values())


def _corpus_with_empty_texts(path: Path) -> Path:
    """A real corpus's shape: most records fine, some with an empty or blank text."""
    lines = [json.dumps({"client_id": "a", "text": f"hello {i}"}) for i in range(6)]
    lines += [json.dumps({"client_id": "a", "text": ""})] * 2
    lines += [json.dumps({"client_id": "b", "text": f"hi {i}"}) for i in range(5)]
    lines += [json.dumps({"client_id": "b", "text": " \t\n "})]
    lines += [json.dumps({"client_id": "c", "text": ""})]  # a client with nothing left
    return _write(path, lines)


def test_jsonl_empty_texts_are_skipped_and_counted_per_client(tmp_path: Path) -> None:
    from simulation.data import describe_skipped

    path = _corpus_with_empty_texts(tmp_path / "d.jsonl")
    data = load_jsonl(path, JsonlOptions(heldout_clients_fraction=0))
    assert {c.client_id: c.num_texts for c in data.clients} == {"a": 6, "b": 5}
    assert all(t.strip() for c in data.clients for t in (*c.train, *c.heldout))
    assert data.meta["skipped_empty_texts"] == {"a": 2, "b": 1, "c": 1}
    note = describe_skipped(path, data.meta["skipped_empty_texts"])
    assert "skipped 4 record(s) with an empty text" in note
    assert "a: 2, b: 1, c: 1" in note and "--strict" in note
    assert describe_skipped(path, {}) == ""


def test_jsonl_strict_refuses_empty_texts_by_line(tmp_path: Path) -> None:
    path = _corpus_with_empty_texts(tmp_path / "d.jsonl")
    with pytest.raises(DataFormatError) as err:
        load_jsonl(path, JsonlOptions(strict=True))
    message = str(err.value)
    assert str(path) in message and "4 malformed line(s)" in message
    assert 'line 7: empty "text"' in message and "line 1:" not in message
    assert "\n" not in message


def test_public_texts_skip_empty_but_still_refuse_malformed_lines(tmp_path: Path) -> None:
    from simulation.data import read_jsonl_corpus, read_jsonl_texts

    good = _write(tmp_path / "p.jsonl", ['{"text": "one"}', '{"text": "  "}', '{"text": "two"}'])
    corpus = read_jsonl_corpus(good)
    assert corpus.texts == ("one", "two") and corpus.skipped_empty == 1
    assert read_jsonl_texts(good) == ("one", "two")
    with pytest.raises(DataFormatError, match='line 2: empty "text"'):
        read_jsonl_corpus(good, strict=True)
    only_empty = _write(tmp_path / "e.jsonl", ['{"text": ""}'])
    with pytest.raises(DataFormatError, match="no records with text"):
        read_jsonl_corpus(only_empty)
    for bad_line, why in [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"text": 5}', 'missing string field "text"'),
    ]:
        bad = _write(tmp_path / "bad.jsonl", ['{"text": ""}', bad_line])
        with pytest.raises(DataFormatError) as err:
            read_jsonl_corpus(bad)
        assert f"{bad}: 1 malformed line(s): line 2: {why}" in str(err.value)
