"""LocalTrainer: plain training, adapter exchange, FFA-LoRA, DP-SGD guards (THREATS G37)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.train import (
    AdapterMismatchError,
    DPSettings,
    LocalTrainer,
    LoraSettings,
    PrivacyGuardError,
    TrainSettings,
)

FAST = TrainSettings(local_steps=6, learning_rate=1e-2, batch_size=4, seq_len=32, seed=3)


def test_plain_training_lowers_heldout_loss(trainer: LocalTrainer, texts: list[str]) -> None:
    before = trainer.evaluate(None, texts[40:])
    result = trainer.train(None, texts[:40], FAST, DPSettings())
    after = trainer.evaluate(result.adapter, texts[40:])
    assert result.status == "ok" and result.steps == FAST.local_steps
    assert result.epsilon is None and result.noise_multiplier is None
    assert after.loss < before.loss - 0.1
    assert after.num_tokens == before.num_tokens > 0
    assert 0.0 <= after.accuracy <= 1.0


def test_adapter_names_are_peft_state_dict_names(trainer: LocalTrainer) -> None:
    from peft import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(trainer.model))
    assert set(trainer.trainable_names()) == expected
    assert all(".default." not in n for n in expected)
    assert set(trainer.initial_adapter()) == expected


def test_train_starts_from_the_given_adapter(trainer: LocalTrainer, texts: list[str]) -> None:
    first = trainer.train(None, texts, FAST, DPSettings())
    again = trainer.train(None, texts, FAST, DPSettings())
    onward = trainer.train(first.adapter, texts, FAST, DPSettings())
    for name in first.adapter:
        assert torch.equal(first.adapter[name], again.adapter[name])
    assert any(not torch.equal(first.adapter[n], onward.adapter[n]) for n in first.adapter)


def test_ffa_sends_only_b_and_a_is_identical_on_every_client(
    ffa_trainer: LocalTrainer, word_base: Path, texts: list[str]
) -> None:
    names = ffa_trainer.trainable_names()
    assert names and all(".lora_B." in n for n in names)
    other = LocalTrainer(word_base, LoraSettings(rank=4, alpha=8.0, ffa=True, init_seed=7))
    result = ffa_trainer.train(None, texts, FAST, DPSettings())
    other.train(result.adapter, texts[:5], FAST, DPSettings())
    a_names = [n for n in ffa_trainer.slots.params if ".lora_A." in n]
    for n in a_names:
        assert torch.equal(ffa_trainer.slots.params[n], other.slots.params[n])
    assert set(result.adapter) == set(names)


def test_no_text_returns_no_data(trainer: LocalTrainer) -> None:
    result = trainer.train(None, [], FAST, DPSettings(enabled=True, noise_multiplier=1.0))
    assert result.status == "no_data" and result.steps == 0 and result.epsilon is None
    assert set(result.adapter) == set(trainer.trainable_names())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        pytest.param(lambda a: a.pop(next(iter(a))), "missing", id="missing-tensor"),
        pytest.param(lambda a: a.update({"bogus.weight": torch.zeros(1)}), "unknown", id="extra"),
        pytest.param(
            lambda a: a.update({k: torch.zeros(3, 3) for k in list(a)[:1]}), "shape", id="shape"
        ),
        pytest.param(
            lambda a: a.update({k: v.fill_(float("nan")) for k, v in list(a.items())[:1]}),
            "NaN",
            id="nan",
        ),
    ],
)
def test_bad_adapters_are_refused(trainer: LocalTrainer, mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    adapter = trainer.initial_adapter()
    mutate(adapter)
    with pytest.raises(AdapterMismatchError, match=match):
        trainer.train(adapter, ["the cat ."], FAST, DPSettings())


def test_g37_dp_moves_lora_and_leaves_quantized_base_bit_identical(
    trainer: LocalTrainer, texts: list[str]
) -> None:
    digest = trainer.base_digest()
    start = trainer.initial_adapter()
    dp = DPSettings(enabled=True, noise_multiplier=0.8, max_grad_norm=1.0)
    result = trainer.train(start, texts, FAST, dp)
    assert result.status == "ok" and result.steps == FAST.local_steps
    assert result.noise_multiplier == 0.8 and result.epsilon is not None and result.epsilon > 0
    moved = [n for n in start if not torch.equal(start[n], result.adapter[n])]
    # every B moved (B starts at 0; A only moves once B is nonzero, after the first step)
    assert {n for n in start if ".lora_B." in n} <= set(moved)
    assert trainer.base_digest() == digest
    import bitsandbytes as bnb

    linear4 = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(not p.requires_grad for m in linear4 for p in m.parameters())


def test_opacus_per_sample_grads_match_single_sample_grads(
    trainer: LocalTrainer, texts: list[str]
) -> None:
    """The opacus issue 820 guard: per-sample gradients of LoRA tensors are the real ones."""
    from opacus import GradSampleModule

    from client.train import pack_texts
    from client.train._loops import per_sample_loss

    rng = torch.Generator().manual_seed(0)
    nudged = {
        k: v + 0.05 * torch.randn(v.shape, generator=rng)
        for k, v in trainer.initial_adapter().items()
    }
    trainer.slots.load(nudged)
    blocks = pack_texts(trainer.tokenizer, texts[:12], 32)
    params = trainer.slots.trainable()
    gsm = GradSampleModule(trainer.model, batch_first=True, loss_reduction="sum")
    trainer.model.train()  # Opacus captures activations only in training mode
    try:
        per_sample_loss(
            gsm, blocks.input_ids, blocks.attention_mask, blocks.labels
        ).sum().backward()
        batched = [p.grad_sample.clone() for p in params]
    finally:
        gsm.cleanup()
    for i in range(len(blocks)):
        for p in params:
            p.grad = None
        sl = slice(i, i + 1)
        per_sample_loss(
            trainer.model, blocks.input_ids[sl], blocks.attention_mask[sl], blocks.labels[sl]
        ).sum().backward()
        for p, gs in zip(params, batched, strict=True):
            torch.testing.assert_close(gs[i], p.grad, rtol=1e-4, atol=1e-6)
    for p in params:
        p.grad = None
    trainer.model.eval()


def test_missing_per_sample_grads_refuse_the_step(
    trainer: LocalTrainer, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If Opacus' hooks do not reach a LoRA tensor the trainer must fail, not train silently."""
    from client.train import _loops

    real = _loops.per_sample_loss
    victim = trainer.slots.trainable()[0]
    handles = []

    def drop_one(module, *args):  # type: ignore[no-untyped-def]
        handles.append(victim.register_hook(lambda g: _drop(victim)))
        return real(module, *args)

    monkeypatch.setattr(_loops, "per_sample_loss", drop_one)
    try:
        with pytest.raises(PrivacyGuardError, match="per-sample"):
            trainer.train(None, texts, FAST, DPSettings(enabled=True, noise_multiplier=1.0))
    finally:
        for handle in handles:
            handle.remove()


def _drop(param: torch.nn.Parameter) -> None:
    if hasattr(param, "grad_sample"):
        param.grad_sample = None


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_still_take_noisy_steps(
    trainer: LocalTrainer, texts: list[str], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few blocks, batch 1: some Poisson batches are empty and must still add noise."""
    from client.train import _loops

    empties: list[int] = []
    real = _loops._empty_step
    monkeypatch.setattr(_loops, "_empty_step", lambda *a: (empties.append(1), real(*a))[1])
    settings = TrainSettings(local_steps=12, batch_size=1, seq_len=128, seed=1)
    dp = DPSettings(enabled=True, noise_multiplier=1.0, accountant="rdp", grad_sample_mode=mode)
    result = trainer.train(None, texts[:24], settings, dp)
    assert result.status == "ok" and result.steps == 12
    assert result.sample_rate == pytest.approx(1 / result.num_examples)
    assert empties, "the seed produced no empty batch: the path under test did not run"
    assert all(torch.isfinite(t).all() for t in result.adapter.values())


def test_ghost_clipping_matches_hooks_clipping(trainer: LocalTrainer, texts: list[str]) -> None:
    """Same seed, same sampling and noise: fast gradient clipping gives the same update."""
    settings = TrainSettings(local_steps=3, batch_size=8, seq_len=32, seed=4)
    results = {
        mode: trainer.train(
            None,
            texts,
            settings,
            DPSettings(enabled=True, noise_multiplier=1.0, accountant="rdp", grad_sample_mode=mode),
        )
        for mode in ("hooks", "ghost")
    }
    for name, tensor in results["hooks"].adapter.items():
        torch.testing.assert_close(results["ghost"].adapter[name], tensor, rtol=1e-3, atol=1e-5)


def test_base_digest_sees_a_change_to_the_nf4_quantization_state(trainer: LocalTrainer) -> None:
    """The G37 check has power: flipping one absmax byte of one NF4 weight changes it."""
    import bitsandbytes as bnb

    layer = next(m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    absmax = layer.weight.quant_state.absmax
    digest = trainer.base_digest()
    original = absmax.clone()
    try:
        absmax.view(torch.uint8)[0] ^= 1
        assert trainer.base_digest() != digest
    finally:
        absmax.copy_(original)
    assert trainer.base_digest() == digest


def test_dp_trains_on_one_block_per_text(trainer: LocalTrainer, texts: list[str]) -> None:
    """Record-level ε is per text: DP-SGD samples texts, plain training packs them."""
    dp = DPSettings(enabled=True, noise_multiplier=1.0, accountant="rdp")
    private = trainer.train(None, texts[:20], FAST, dp)
    plain = trainer.train(None, texts[:20], FAST, DPSettings())
    assert private.num_examples == 20 > plain.num_examples
    assert private.sample_rate == pytest.approx(1 / -(-20 // FAST.batch_size))  # type: ignore[operator]


def test_adapt_head_adds_the_output_head_and_dp_trains_it(
    word_base: Path, texts: list[str]
) -> None:
    plain = LocalTrainer(word_base, LoraSettings(rank=4, alpha=8.0, ffa=True, init_seed=7))
    head = LocalTrainer(
        word_base, LoraSettings(rank=4, alpha=8.0, ffa=True, init_seed=7, adapt_head=True)
    )
    extra = set(head.trainable_names()) - set(plain.trainable_names())
    assert extra == {"base_model.model.lm_head.lora_B.weight"}
    assert set(plain.trainable_names()) < set(head.trainable_names())
    digest = head.base_digest()
    dp = DPSettings(enabled=True, noise_multiplier=0.8, max_grad_norm=1.0)
    start = head.initial_adapter()
    result = head.train(start, texts, FAST, dp)
    name = "base_model.model.lm_head.lora_B.weight"
    assert result.status == "ok" and not torch.equal(start[name], result.adapter[name])
    assert head.base_digest() == digest
    # the head's frozen weight stays frozen: only LoRA parameters require gradients
    lm_head = head.model.get_base_model().lm_head
    assert not lm_head.base_layer.weight.requires_grad


def test_adapt_head_names_only_the_listed_modules_plus_the_head(word_base: Path) -> None:
    head = LocalTrainer(
        word_base,
        LoraSettings(rank=2, alpha=4.0, target_modules=("v_proj",), adapt_head=True),
    )
    modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in head.trainable_names()}
    assert modules == {"v_proj", "lm_head"}


def test_adapt_head_without_a_linear_head_is_a_clear_error() -> None:
    from client.train._model import lora_targets

    class NoHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def get_output_embeddings(self) -> None:
            return None

    with pytest.raises(AdapterMismatchError, match="no linear output head"):
        lora_targets(NoHead(), LoraSettings(adapt_head=True))
    assert lora_targets(NoHead(), LoraSettings()) == "all-linear"
