"""Turn a device's raw texts into fixed-length token blocks (the unit of DP-SGD).

Two layouts:

* ``pack=True`` (plain training, evaluation): texts are packed greedily into blocks of
  ``seq_len`` tokens without splitting a text across blocks — few padding tokens.
* ``pack=False`` (the record-level DP unit): every text starts its own block. Greedy
  packing is *not* a valid DP unit: removing one text shifts every later text into
  other blocks, so neighbouring datasets would differ in many blocks. With one text per
  block, adding or removing a text adds or removes exactly one block and the
  record-level epsilon is per text.

In both layouts a text longer than ``seq_len`` is cut into several blocks;
:class:`Blocks` counts those texts so the caller can report that they are protected
at group level (k blocks -> group of k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Blocks", "pack_texts"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Blocks:
    """Packed token blocks: ``input_ids``/``labels`` are [n, seq_len]; -100 = ignored."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_texts: int
    split_texts: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: str | torch.device) -> Blocks:
        """The same blocks on ``device``."""
        return Blocks(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.num_texts,
            self.split_texts,
        )

    def trimmed(self) -> Blocks:
        """The same blocks without the trailing columns that are padding in every block.

        Padding is on the right and masked out of attention and loss, so per-block
        losses and gradients do not change; training on one text per block (DP) then
        costs the longest text's length, not ``seq_len``.
        """
        width = int(self.attention_mask.sum(dim=1).max()) if len(self) else 0
        return Blocks(
            self.input_ids[:, :width],
            self.attention_mask[:, :width],
            self.labels[:, :width],
            self.num_texts,
            self.split_texts,
        )

    @property
    def num_label_tokens(self) -> int:
        """Tokens that contribute to the loss (targets of next-token prediction)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = []
    for ids in encoded:
        if not ids:
            continue
        seq = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        out.append(seq)
    return out


def _chunks(seq: list[int], seq_len: int) -> list[list[int]]:
    return [seq[i : i + seq_len] for i in range(0, len(seq), seq_len)]


def pack_texts(tokenizer: Any, texts: Sequence[str], seq_len: int, *, pack: bool = True) -> Blocks:
    """Tokenize ``texts`` into blocks of ``seq_len`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (callable, with ``pad_token_id``/``eos``).
        texts: raw texts of one device.
        seq_len: tokens per block.
        pack: several short texts share a block; False gives each text its own
            block(s), the unit record-level DP-SGD needs.

    Returns:
        The blocks; padded positions have attention 0 and label -100.
    """
    blocks: list[list[int]] = []
    current: list[int] = []
    split = 0
    encoded = _encode(tokenizer, texts)
    for seq in encoded:
        if len(seq) > seq_len:
            split += 1
            if current:
                blocks.append(current)
                current = []
            blocks.extend(_chunks(seq, seq_len))
            continue
        if current and (not pack or len(current) + len(seq) > seq_len):
            blocks.append(current)
            current = []
        current = current + seq
    if current:
        blocks.append(current)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = torch.full((len(blocks), seq_len), int(pad), dtype=torch.long)
    mask = torch.zeros((len(blocks), seq_len), dtype=torch.long)
    for i, block in enumerate(blocks):
        ids[i, : len(block)] = torch.tensor(block, dtype=torch.long)
        mask[i, : len(block)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return Blocks(ids, mask, labels, num_texts=len(encoded), split_texts=split)
