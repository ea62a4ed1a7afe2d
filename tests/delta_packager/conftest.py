"""Fixtures for the delta_packager tests (builders live in packager_helpers)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from delta_packager.manifest import AdapterConfig

# Test modules import the builders as ``packager_helpers`` (pytest runs with
# --import-mode=importlib, which does not put test directories on sys.path).
sys.path.insert(0, str(Path(__file__).parent))

from packager_helpers import random_adapter


@pytest.fixture
def adapter_config() -> AdapterConfig:
    return AdapterConfig(
        rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), ffa=False, peft_config={"r": 4}
    )


@pytest.fixture
def make_adapter() -> Callable[[int], dict[str, np.ndarray]]:
    def make(seed: int = 0) -> dict[str, np.ndarray]:
        return random_adapter(np.random.default_rng(seed))

    return make
