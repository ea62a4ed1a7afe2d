"""Fixtures for the delta_packager tests (builders live in packager_helpers)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from delta_packager import AdapterConfig
from tests.delta_packager.packager_helpers import random_adapter


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
