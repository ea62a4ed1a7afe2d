"""Integration with the foundation: a generated base (byte-level BPE, ``DIR/nf4`` copy)."""

from __future__ import annotations

from pathlib import Path

import torch

from client.train import DPSettings, LocalTrainer, LoraSettings, TrainSettings


def test_trains_on_the_generated_base_from_its_prequantized_copy(micro_base: Path) -> None:
    from simulation.data import generate_synthetic

    data = generate_synthetic(num_clients=2, seed=0)
    client = data.clients[0]
    trainer = LocalTrainer(micro_base, LoraSettings(rank=4, ffa=True))
    assert getattr(trainer.model.get_base_model(), "is_loaded_in_4bit", False)
    digest = trainer.base_digest()
    before = trainer.evaluate(None, client.heldout)
    settings = TrainSettings(local_steps=4, batch_size=4, seq_len=32, learning_rate=1e-2)
    result = trainer.train(
        None, client.train, settings, DPSettings(enabled=True, noise_multiplier=0.5)
    )
    assert result.status == "ok" and result.epsilon is not None
    after = trainer.evaluate(result.adapter, client.heldout)
    assert after.num_tokens == before.num_tokens > 0
    assert trainer.base_digest() == digest
    assert all(torch.isfinite(t).all() for t in result.adapter.values())
