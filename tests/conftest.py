"""Shared fixtures: generated base models, built once per test session.

* ``micro_base`` — a ~100k-parameter base (seconds to build) for tests that need a real
  tokenizer + model directory but not its quality.
* ``tiny_base`` — the real ``tiny`` preset made by the CLI exactly as a user would
  (``fedota base-model init``), cached under ``.cache/test-bases`` (or
  ``$FEDOTA_TEST_CACHE``) so repeated local runs reuse it.
* ``micro_gguf`` — the micro base exported as a Q8_0 GGUF for the llama.cpp runtime.
* ``device_venv`` — the ``bin`` directory of a fresh virtualenv holding a device-only
  install (``pip install 'fedota[device]'``: no torch, no server), for tests that run
  ``fedota device ...`` as a phone would, e.g. against a server started from this venv.
* ``released_micro_server`` — a real ``fedota serve`` (this venv) holding release v1 for
  the micro base and ``micro_gguf``, rolled out to every device
  (``tests/ota_server_helpers.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.repo_helpers import REPO, fedota_cli, make_device_venv

if TYPE_CHECKING:
    from tests.ota_server_helpers import ReleasedServer

MICRO_STEPS = 30
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.fixture(scope="session")
def micro_preset():  # type: ignore[no-untyped-def]
    from simulation import BasePreset

    return BasePreset("micro", 512, 64, 2, 4, 2, 128, 32, MICRO_STEPS, 8, 3e-3)


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory: pytest.TempPathFactory, micro_preset) -> Path:  # type: ignore[no-untyped-def]
    from simulation import init_base_model
    from simulation.data import generate_public_texts

    out = tmp_path_factory.mktemp("bases") / "micro"
    init_base_model(out, public_texts=generate_public_texts(600, 0), preset=micro_preset, seed=0)
    return out


@pytest.fixture(scope="session")
def micro_gguf(micro_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro base exported for the llama.cpp runtime (Q8_0 from its NF4 weights)."""
    from client.runtime import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "micro-q8_0.gguf"
    export_gguf(micro_base, out, quant="q8_0", source="nf4")
    return out


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    cache = Path(os.environ.get("FEDOTA_TEST_CACHE", REPO / ".cache" / "test-bases"))
    from simulation.base_model import base_cache_name

    out = cache / base_cache_name("tiny", 0)  # versioned: a stale cached base is never reused
    if not (out / "fedota_base.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # With torch's default threads, as a user runs it: the suite pins one thread
        # (OMP_NUM_THREADS=1), but nothing else runs while a session fixture is built,
        # and pretraining on every core takes 67 s instead of 115 s on 2 cores. The
        # result is bit-identical either way (same fingerprint).
        env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
        result = fedota_cli(
            "base-model", "init", "--out", str(out), "--preset", "tiny", timeout=1800, env=env
        )
        assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device-only install of this checkout; returns the virtualenv's ``bin`` directory.

    What a phone-side install gets: ``pip install 'fedota[device]'`` (the core set plus
    llama-cpp-python and gguf) in a fresh ``python -m venv``, non-editable, so nothing
    from this repository's tree or this venv leaks in (see ``make_device_venv`` in
    ``tests/repo_helpers.py``). Run its CLI as ``device_venv / "fedota"`` (``fedota
    device enroll|update|status|infer``) and its interpreter as ``device_venv /
    "python"``; run it from a directory other than the checkout, or ``python -c`` would
    import the checkout's packages first.

    With a warm pip wheel cache this takes about 20 s; on a miss pip compiles llama.cpp
    (4-5 minutes on 2 cores) with exactly the Makefile's flags, so the wheel it caches is
    the one ``make setup`` would build.
    """
    return make_device_venv(tmp_path_factory.mktemp("device-venv")) / "bin"


@pytest.fixture(scope="session")
def released_micro_server(
    micro_base: Path, micro_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReleasedServer]:
    """A real ``fedota serve`` with release v1 for the micro base and ``micro_gguf``.

    Shared by every test of the session that enrolls a device against it (each enrolls
    its own device); see ``tests/ota_server_helpers.py``.
    """
    from tests.ota_server_helpers import released_server

    work = tmp_path_factory.mktemp("released-server")
    with released_server(work, nf4=micro_base / "nf4", gguf=micro_gguf) as server:
        yield server
