"""This checkout, its CLI and a device-only install of it, for tests and benchmarks.

* ``REPO`` — the repository root;
* ``fedota_cli`` — run this venv's ``fedota`` CLI in a fresh process;
* ``load_benchmark`` — import a script of ``benchmarks/`` as a module, to test its
  arithmetic without running it;
* ``make_device_venv`` — ``pip install 'fedota[device]'`` of this checkout into a fresh
  virtualenv (what the ``device_venv`` fixture and ``benchmarks/bench_device_install.py``
  build), with llama.cpp's CMake flags from ``llama_cmake_args``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

__all__ = [
    "LLAMA_CMAKE_ARGS_FILE",
    "REPO",
    "fedota_cli",
    "llama_cmake_args",
    "load_benchmark",
    "make_device_venv",
]

REPO = Path(__file__).resolve().parents[1]
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


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``name`` (registered in
    ``sys.modules``, so its dataclasses resolve their module)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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
    "protocol",
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
