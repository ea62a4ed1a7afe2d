"""Packing texts into blocks: one text never straddles two blocks; under DP one text is
one block, so a neighbouring dataset differs in exactly one block (the DP unit)."""

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


def test_unpacked_blocks_hold_one_text_each(trainer: LocalTrainer, texts: list[str]) -> None:
    blocks = pack_texts(trainer.tokenizer, texts, 32, pack=False)
    assert len(blocks) == blocks.num_texts == len(texts) and blocks.split_texts == 0
    eos = trainer.tokenizer.eos_token_id
    assert all(int((row == eos).sum()) == 1 for row in blocks.input_ids)


def _rows(blocks: object) -> list[tuple[int, ...]]:
    return [tuple(r.tolist()) for r in blocks.input_ids]  # type: ignore[attr-defined]


def test_removing_one_text_removes_exactly_one_unpacked_block(
    trainer: LocalTrainer, texts: list[str]
) -> None:
    """The add/remove-one neighbouring relation DP-SGD's accountant assumes holds per text
    only without packing: greedy packing shifts every later text into other blocks."""
    tok = trainer.tokenizer
    full = _rows(pack_texts(tok, texts, 32, pack=False))
    less = _rows(pack_texts(tok, texts[1:], 32, pack=False))
    assert len(full) - len(less) == 1 and [r for r in full if r not in less] == full[:1]
    # Why DP does not pack: equal-length texts, two per block; dropping the first
    # re-pairs all of them, so the neighbouring datasets differ in every block.
    same = [f"my friend likes {w}" for w in ("apples", "bananas", "bread", "cat", "dog", "day")]
    width = 2 * len(tok(same[0], add_special_tokens=False)["input_ids"]) + 4
    packed_full = _rows(pack_texts(tok, same, width))
    packed_less = _rows(pack_texts(tok, same[1:], width))
    assert len(packed_full) == 3 and not set(packed_full) & set(packed_less)


def test_long_texts_are_split_and_counted(trainer: LocalTrainer) -> None:
    long_text = " ".join(["the cat runs fast"] * 20)
    blocks = pack_texts(trainer.tokenizer, [long_text, "the dog ."], 16)
    assert blocks.split_texts == 1 and len(blocks) >= 5


@pytest.mark.parametrize("texts", [[], ["", ""]], ids=["none", "empty-strings"])
def test_no_text_gives_no_blocks(trainer: LocalTrainer, texts: list[str]) -> None:
    assert len(pack_texts(trainer.tokenizer, texts, 16)) == 0


def test_trimming_drops_only_all_padding_columns_and_keeps_losses(
    trainer: LocalTrainer, texts: list[str]
) -> None:
    from client.train._loops import per_sample_loss

    blocks = pack_texts(trainer.tokenizer, texts, 48, pack=False)
    trimmed = blocks.trimmed()
    longest = int(blocks.attention_mask.sum(dim=1).max())
    assert longest < 48 and trimmed.input_ids.shape == (len(blocks), longest)
    assert not blocks.attention_mask[:, longest:].any()  # only padding was cut
    assert torch.equal(trimmed.input_ids, blocks.input_ids[:, :longest])
    assert trimmed.num_label_tokens == blocks.num_label_tokens
    with torch.no_grad():
        full = per_sample_loss(
            trainer.model, blocks.input_ids, blocks.attention_mask, blocks.labels
        )
        cut = per_sample_loss(
            trainer.model, trimmed.input_ids, trimmed.attention_mask, trimmed.labels
        )
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    assert len(pack_texts(trainer.tokenizer, [], 48).trimmed()) == 0
