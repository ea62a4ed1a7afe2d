"""Fixtures for the on-device trainer tests: a word-level tiny Llama built in seconds.

The base is random (not pretrained): hidden 64, 2 layers, vocab < 128, so a LoRA
step takes milliseconds on one core. A word-level tokenizer keeps every digit a
token, which makes canary candidates exactly comparable. Trainers are session-scoped
(the NF4 base is loaded once, as on a phone); every ``train`` call starts from the
adapter it is given, so sharing them does not couple tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.client.train.helpers import background_texts, build_word_base


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # 2 shared cores: intra-op threads only add contention for models this small.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def word_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_word_base(tmp_path_factory.mktemp("train-base") / "word")


@pytest.fixture(scope="session")
def trainer(word_base: Path):  # type: ignore[no-untyped-def]
    from client.train import LocalTrainer, LoraSettings

    return LocalTrainer(word_base, LoraSettings(rank=4, alpha=8.0))


@pytest.fixture(scope="session")
def ffa_trainer(word_base: Path):  # type: ignore[no-untyped-def]
    from client.train import LocalTrainer, LoraSettings

    return LocalTrainer(word_base, LoraSettings(rank=4, alpha=8.0, ffa=True, init_seed=7))


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return background_texts(60, seed=1)
