"""The trainer tests' word-level tiny Llama and its filler texts (fixtures in conftest.py).

The base is random (not pretrained): hidden 64, 2 layers, vocab < 128. A word-level
tokenizer keeps every digit a token, which makes canary candidates exactly comparable.
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["background_texts", "build_word_base"]

WORDS = [
    "the",
    "a",
    "in",
    "of",
    "my",
    "our",
    "user",
    "friend",
    "likes",
    "to",
    "eat",
    "apples",
    "bananas",
    "bread",
    "and",
    "goes",
    "home",
    "every",
    "day",
    "with",
    "cat",
    "dog",
    "runs",
    "fast",
    "slow",
    "red",
    "blue",
    "green",
    "is",
    "pin",
    "code",
    "secret",
    "alice",
    "bob",
    "carol",
    "door",
    "key",
    "number",
    "today",
    "tomorrow",
    "morning",
    "evening",
    "walks",
    "reads",
    "books",
    "city",
    "park",
    "train",
    "bus",
]
DIGITS = [str(i) for i in range(10)]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_word_base(out: Path, seed: int = 0) -> Path:
    """Write a random tiny Llama and a word-level tokenizer as an HF directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS, *DIGITS, ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def background_texts(n: int, seed: int) -> list[str]:
    """Seeded filler sentences in the tokenizer's vocabulary."""
    rng = random.Random(seed)
    subjects = ["the user", "my friend", "the cat", "the dog", "alice", "bob", "carol"]
    verbs = ["likes to eat", "walks to", "reads books in", "runs to", "goes to"]
    objects = ["apples", "bananas", "bread", "the park", "the city", "home"]
    times = ["every day", "today", "tomorrow", "in the morning", "in the evening"]
    return [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(times)} ."
        for _ in range(n)
    ]
