"""Packing texts into blocks: one text never straddles two blocks (the DP unit)."""

from __future__ import annotations

import pytest
import torch

from client.train import LocalTrainer, pack_texts
from client.train.data import IGNORE_INDEX


def test_texts_are_packed_whole(trainer: LocalTrainer, texts: list[str]) -> None:
    tok = trainer.tokenizer
    blocks = pack_texts(tok, texts, 32)
    assert blocks.split_texts == 0 and blocks.num_texts == len(texts)
    assert blocks.input_ids.shape[1] == 32
    eos, bos = tok.eos_token_id, tok.bos_token_id
    real = blocks.attention_mask.bool()
    assert int((blocks.input_ids[real] == eos).sum()) == len(texts)
    for row, mask in zip(blocks.input_ids, real, strict=True):
        ids = row[mask].tolist()
        assert ids[0] == bos and ids[-1] == eos  # starts and ends on a text boundary
    assert torch.equal(blocks.labels == IGNORE_INDEX, ~real)
    assert len(blocks) < len(texts)  # several texts per block


def test_long_texts_are_split_and_counted(trainer: LocalTrainer) -> None:
    long_text = " ".join(["the cat runs fast"] * 20)
    blocks = pack_texts(trainer.tokenizer, [long_text, "the dog ."], 16)
    assert blocks.split_texts == 1 and len(blocks) >= 5


@pytest.mark.parametrize("texts", [[], ["", ""]], ids=["none", "empty-strings"])
def test_no_text_gives_no_blocks(trainer: LocalTrainer, texts: list[str]) -> None:
    assert len(pack_texts(trainer.tokenizer, texts, 16)) == 0
