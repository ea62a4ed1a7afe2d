"""FedProx on the phone (issue 25 item 2): ``μ/2·‖w − w_global‖²`` over the LoRA tensors,
in plain training and beside Opacus' DP-SGD, where it must be added after the noise
(post-processing) and never be clipped with the per-sample gradients."""

from __future__ import annotations

import pytest
import torch

from client.train import DPSettings, LocalTrainer, TrainConfigError, TrainSettings
from client.train._loops import add_proximal_term

FAST = TrainSettings(local_steps=6, learning_rate=1e-2, batch_size=4, seq_len=32, seed=3)


def _with(mu: float) -> TrainSettings:
    return TrainSettings(**{**FAST.__dict__, "proximal_mu": mu})


def test_the_proximal_gradient_is_mu_times_the_distance_to_the_global() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    add_proximal_term(opt, 0.1)  # anchor: w as it is now
    with torch.no_grad():
        w.add_(torch.tensor([0.4, 0.2]))  # the model moved away from the global
    w.grad = torch.tensor([1.0, 0.0])  # the data's gradient
    opt.step()
    # w ← w − lr·(g + μ·(w − w₀)) = (1.4, −1.8) − 0.5·((1, 0) + 0.1·(0.4, 0.2))
    torch.testing.assert_close(w.detach(), torch.tensor([0.88, -1.81]), rtol=0, atol=1e-7)


def test_mu_zero_registers_nothing() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    add_proximal_term(opt, 0.0)
    assert not opt._optimizer_step_pre_hooks


def test_under_opacus_the_term_is_added_after_the_noise_and_not_clipped() -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    def step(mu: float) -> torch.Tensor:
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 1, bias=False)
        model = GradSampleModule(layer)
        sgd = torch.optim.SGD(layer.parameters(), lr=1.0)
        add_proximal_term(sgd, mu)
        with torch.no_grad():
            layer.weight.add_(1.0)  # w − w₀ = (1, 1, 1)
        opt = DPOptimizer(
            sgd,
            noise_multiplier=2.0,
            max_grad_norm=1e-3,  # clips the data gradient to almost nothing
            expected_batch_size=4,
            generator=torch.Generator().manual_seed(5),
        )
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        return layer.weight.detach().clone()

    without, with_mu = step(0.0), step(0.5)
    # Same noise, same clipped data gradient: the only difference is lr·μ·(w − w₀) =
    # 0.5 per coordinate, which a clipped term (≤ 1e-3/4 per example) could never reach.
    torch.testing.assert_close(without - with_mu, torch.full((1, 3), 0.5), rtol=0, atol=1e-6)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(torch.sum((a[k] - b[k]) ** 2) for k in a) ** 0.5)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_fedprox_keeps_the_adapter_nearer_the_global_and_mu_zero_is_fedavg(
    trainer: LocalTrainer, texts: list[str], dp: bool
) -> None:
    settings = DPSettings(enabled=True, noise_multiplier=0.8) if dp else DPSettings()
    start = trainer.train(None, texts, FAST, DPSettings()).adapter  # B ≠ 0, A moved
    plain = trainer.train(start, texts, FAST, settings)
    zero = trainer.train(start, texts, _with(0.0), settings)
    prox = trainer.train(start, texts, _with(50.0), settings)
    for k in plain.adapter:  # μ = 0 is plain local training, bit for bit
        assert torch.equal(zero.adapter[k], plain.adapter[k])
    assert prox.status == "ok" and prox.steps == FAST.local_steps
    assert _distance(prox.adapter, start) < 0.8 * _distance(plain.adapter, start)
    if dp:  # the same mechanism ran and was accounted: μ spends no ε
        assert prox.epsilon == plain.epsilon and prox.noise_multiplier == 0.8


def test_negative_mu_is_refused() -> None:
    with pytest.raises(TrainConfigError, match="proximal_mu"):
        TrainSettings(proximal_mu=-0.1)
