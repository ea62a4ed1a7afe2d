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
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.ota_server_helpers import ReleasedServer

REPO = Path(__file__).resolve().parents[1]
MICRO_STEPS = 30
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
LLAMA_CMAKE_ARGS_FILE = REPO / ".ci" / "llama-cmake-args"


def fedota_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``fedota`` CLI in a fresh process (``env``: its environment)."""
    return subprocess.run(
        [sys.executable, "-m", "fedota.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


@pytest.fixture(scope="session")
def micro_preset():  # type: ignore[no-untyped-def]
    from simulation.base_model import BasePreset

    return BasePreset("micro", 512, 64, 2, 4, 2, 128, 32, MICRO_STEPS, 8, 3e-3)


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory: pytest.TempPathFactory, micro_preset) -> Path:  # type: ignore[no-untyped-def]
    from simulation.base_model import init_base_model
    from simulation.data import generate_public_texts

    out = tmp_path_factory.mktemp("bases") / "micro"
    init_base_model(out, public_texts=generate_public_texts(600, 0), preset=micro_preset, seed=0)
    return out


@pytest.fixture(scope="session")
def micro_gguf(micro_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro base exported for the llama.cpp runtime (Q8_0 from its NF4 weights)."""
    from client.runtime.gguf_export import export_gguf

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


def llama_cmake_args() -> str:
    """The CMake flags the Makefile builds llama-cpp-python with (``.ci/llama-cmake-args``)."""
    lines = LLAMA_CMAKE_ARGS_FILE.read_text().splitlines()
    return " ".join(s for line in lines if (s := line.strip()) and not s.startswith("#"))


def _run_checked(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}"


# What the fedota wheel is built from (pyproject.toml's packages and its readme).
_DIST_SOURCES = (
    "pyproject.toml",
    "README.md",
    "fedota",
    "client",
    "server",
    "delta_packager",
    "simulation",
)


def make_device_venv(root: Path) -> Path:
    """Create ``root/venv`` holding ``pip install 'fedota[device]'`` of this checkout.

    The wheel is built from a copy of the sources under ``root`` (not in the checkout,
    whose ``build/`` would keep modules deleted since, and which other runs share), with
    this venv's setuptools (no isolated build environment to download). pip then installs
    it non-editable into a fresh ``python -m venv`` with its normal caches and llama.cpp's
    CMake flags from ``.ci/llama-cmake-args``, so a cache miss builds what ``make setup``
    builds. Returns the venv directory.
    """
    src = root / "src"
    src.mkdir(parents=True)
    for name in _DIST_SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    _run_checked([*pip_wheel, "-q", "-w", str(root / "dist"), str(src)], timeout=300)
    wheel = next((root / "dist").glob("fedota-*.whl"))
    venv = root / "venv"
    _run_checked([sys.executable, "-m", "venv", str(venv)], timeout=300)
    env = {**os.environ, "CMAKE_ARGS": llama_cmake_args()}
    env.pop("PYTHONPATH", None)  # nothing of this checkout on the device's path
    _run_checked(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[device]"],
        timeout=1800,
        env=env,
    )
    return venv


@pytest.fixture(scope="session")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device-only install of this checkout; returns the virtualenv's ``bin`` directory.

    What a phone-side install gets: ``pip install 'fedota[device]'`` (the core set plus
    llama-cpp-python and gguf) in a fresh ``python -m venv``, non-editable, so nothing
    from this repository's tree or this venv leaks in (see ``make_device_venv``). Run its
    CLI as ``device_venv / "fedota"`` (``fedota device enroll|update|status|infer``) and
    its interpreter as ``device_venv / "python"``; run it from a directory other than
    the checkout, or ``python -c`` would import the checkout's packages first.

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
