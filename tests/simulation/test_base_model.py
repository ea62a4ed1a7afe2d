"""Base-model bootstrap and its CLI (issue 2 acceptance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.runtime import load_quantized
from simulation import SimulationInputError, init_base_model
from simulation.base_model import load_base_info
from simulation.data import generate_public_texts
from tests.repo_helpers import fedota_cli


def test_same_seed_same_weights(micro_base: Path, micro_preset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    again = init_base_model(
        tmp_path / "again", public_texts=generate_public_texts(600, 0), preset=micro_preset, seed=0
    )
    assert again.fingerprint == load_base_info(micro_base).fingerprint
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        micro_base / "model.safetensors"
    ).read_bytes()


def test_refuses_non_empty_output(micro_preset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(SimulationInputError, match="not empty"):
        init_base_model(tmp_path, public_texts=["a b c"] * 10, preset=micro_preset)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_tiny_preset_loads_everywhere_and_learns(tiny_base: Path) -> None:
    info = load_base_info(tiny_base)
    assert info.preset == "tiny" and 1_000_000 <= info.num_parameters <= 10_000_000
    assert info.final_loss < 2.0  # far below ln(vocab) ≈ 6.5: pretraining worked
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    nf4 = load_quantized(tiny_base / "nf4")
    ids = tok(["the city council approved a plan"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model(ids, labels=ids).loss.item()
        quant = nf4(ids, labels=ids).loss.item()
    assert abs(full - quant) < 0.5  # NF4 stays close to the float model


def test_fingerprint_cli_is_stable_across_processes(tiny_base: Path) -> None:
    runs = [fedota_cli("base-model", "fingerprint", str(tiny_base), "--json") for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    prints = {json.loads(r.stdout)["fingerprint"] for r in runs}
    assert prints == {load_base_info(tiny_base).fingerprint}


def test_sample_cli_prints_continuations(tiny_base: Path) -> None:
    result = fedota_cli(
        "base-model",
        "sample",
        "--model",
        str(tiny_base),
        "--prompt",
        "the city council",
        "--max-new-tokens",
        "8",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("'the city council' → '")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["base-model", "init", "--out", "{tmp}/m", "--preset", "huge"], "unknown preset 'huge'"),
        (["base-model", "init", "--out", "{tmp}/m", "--data", "{tmp}/bad.jsonl"], "line 2:"),
        (
            ["base-model", "init", "--out", "{tmp}/m", "--data", "{tmp}/blank.jsonl", "--strict"],
            'blank.jsonl: 1 malformed line(s): line 2: empty "text"',
        ),
        (["base-model", "sample", "--model", "{tmp}/missing"], "missing does not exist"),
        (["base-model", "fingerprint", "{tmp}/missing"], "missing does not exist"),
    ],
    ids=[
        "unknown-preset",
        "malformed-jsonl",
        "strict-empty-text",
        "missing-model-dir",
        "missing-fingerprint-dir",
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    (tmp_path / "blank.jsonl").write_text('{"text": "fine"}\n{"text": " "}\n')
    result = fedota_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "m").exists()


def test_init_skips_empty_texts_and_says_how_many(tmp_path: Path) -> None:
    """A real corpus has records with an empty text: init skips them (saying so) instead
    of refusing the whole file. A non-empty --out stops it right after reading."""
    lines = [json.dumps({"text": f"public text {i}"}) for i in range(5)]
    lines[1:1] = [json.dumps({"text": ""}), json.dumps({"text": "  "})]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep").write_text("x")
    result = fedota_cli(
        "base-model", "init", "--out", str(tmp_path / "m"), "--data", str(tmp_path / "corpus.jsonl")
    )
    assert result.returncode == 2
    assert "skipped 2 record(s) with an empty text" in result.stderr
    assert "exists and is not empty" in result.stderr  # got past the data
    assert "malformed" not in result.stderr


def test_tiny_base_is_sane_on_users_chat_text(tiny_base: Path) -> None:
    """The public split carries chat syntax (not the users' pattern), so the base is
    uncertain, not confidently wrong, on chat text: loss well under ln(vocab)."""
    import math

    from simulation.base_model import BASE_DATA_VERSION, base_cache_name
    from simulation.data import generate_synthetic

    assert tiny_base.name == base_cache_name("tiny", 0) == f"base-tiny-seed0-v{BASE_DATA_VERSION}"
    data = generate_synthetic(num_clients=2, seed=0)
    texts = [t for c in data.clients for t in c.heldout[:40]]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    assert loss < math.log(len(tok)) - 1.5, loss  # the old base was ≈ 10 nats


def test_pretraining_length_follows_the_size_of_the_text(micro_preset) -> None:  # type: ignore[no-untyped-def]
    """The tiny preset sees the built-in public split (529 blocks) 12 times in its 400
    steps; the stdlib docstrings' public half (3,446 blocks) would get under 2 passes in
    400 steps, so it gets 8: 1,723 steps. A preset without ``min_epochs`` is exact."""
    from simulation.base_model import PRESETS, pretraining_steps

    assert pretraining_steps(PRESETS["tiny"], 529) == 400
    assert pretraining_steps(PRESETS["tiny"], 3446) == 1723
    assert pretraining_steps(micro_preset, 100_000) == micro_preset.steps


def test_init_cli_steps_overrides_the_schedule(tmp_path: Path) -> None:
    result = fedota_cli("base-model", "init", "--out", str(tmp_path / "m"), "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert "3 steps, final loss" in result.stdout
    assert load_base_info(tmp_path / "m").steps == 3
