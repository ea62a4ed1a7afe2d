"""Settings are validated once, at construction, with messages that say what to do."""

from __future__ import annotations

import pytest

from client import ClientInputError
from client.train import DPSettings, LoraSettings, TrainConfigError, TrainSettings


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        pytest.param(lambda: LoraSettings(rank=0), "rank", id="rank"),
        pytest.param(lambda: LoraSettings(dropout=1.0), "dropout", id="dropout"),
        pytest.param(lambda: LoraSettings(target_modules=()), "target_modules", id="targets"),
        pytest.param(lambda: DPSettings(accountant="gdp"), "accountant", id="accountant"),
        pytest.param(lambda: DPSettings(delta=0.0), "delta", id="delta"),
        pytest.param(lambda: DPSettings(enabled=True), "exactly one", id="no-sigma-no-eps"),
        pytest.param(
            lambda: DPSettings(enabled=True, noise_multiplier=1.0, target_epsilon=8.0),
            "exactly one",
            id="both",
        ),
        pytest.param(lambda: DPSettings(grad_sample_mode="functorch"), "grad_sample", id="mode"),
        pytest.param(lambda: DPSettings(max_grad_norm=0.0), "max_grad_norm", id="clip"),
        pytest.param(lambda: TrainSettings(local_steps=0), "local_steps", id="steps"),
        pytest.param(lambda: TrainSettings(learning_rate=-1.0), "learning_rate", id="lr"),
        pytest.param(lambda: TrainSettings(seq_len=1), "seq_len", id="seq"),
        pytest.param(lambda: TrainSettings(planned_rounds=0), "planned_rounds", id="rounds"),
    ],
)
def test_invalid_settings_are_refused(factory, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrainConfigError, match=match) as info:
        factory()
    assert isinstance(info.value, ClientInputError)


def test_defaults_are_valid() -> None:
    assert LoraSettings().target_modules is None
    assert not DPSettings().enabled
    assert TrainSettings().planned_rounds == 1
