"""The Hugging Face tokenizer of a base, as GGUF tokenizer metadata for llama.cpp.

Supported: byte-level BPE tokenizers (``tokenizer.json`` with a ``BPE`` model), which is
what the generated base, the Llama 3 family and the Qwen2 family use. llama.cpp does
not run a tokenizer's pre-tokenizer from its description: it knows a fixed set by name
(``tokenizer.ggml.pre``). :func:`pre_tokenizer_name` recognises the three whose
splitting rules these families use — GPT-2's byte-level regex, Llama 3's and Qwen2's —
and refuses any other with a clear error. The export then checks on varied text that
llama.cpp tokenizes exactly as the Hugging Face tokenizer does (``gguf_export``).

Token types follow llama.cpp: special added tokens are ``CONTROL``, other added tokens
``USER_DEFINED``, ids the tokenizer leaves empty below the model's vocabulary size are
``UNUSED`` placeholders (``[PAD<id>]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.errors import ClientInputError

__all__ = ["GgufVocab", "pre_tokenizer_name", "read_vocab"]

_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}"
    "\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}"
    "\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class GgufVocab:
    """What llama.cpp needs of a tokenizer."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for a ``tokenizer.json`` pre-tokenizer.

    Raises:
        ClientInputError: not one of the byte-level splitters llama.cpp implements.
    """
    kind = (pre_tokenizer or {}).get("type")
    if (
        kind == "ByteLevel"
        and pre_tokenizer
        and pre_tokenizer.get("use_regex", True)
        and not pre_tokenizer.get("add_prefix_space", False)
    ):
        return "gpt-2"
    if kind == "Sequence" and pre_tokenizer:
        parts = pre_tokenizer.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            name = _SPLITS.get(parts[0].get("pattern", {}).get("Regex", ""))
            if name is not None:
                return name
    raise ClientInputError(
        f"tokenizer pre-tokenizer {json.dumps(pre_tokenizer)[:120]} is not one llama.cpp "
        "implements; supported: byte-level BPE as in GPT-2, Llama 3 and Qwen2"
    )


def _token_id(name: Any, vocab: dict[str, int]) -> int | None:
    if isinstance(name, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        name = name.get("content")
    return vocab.get(name) if isinstance(name, str) else None


def _adds_bos(post: dict[str, Any] | None) -> bool:
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(_adds_bos(p) for p in post.get("processors", []))
    single = post.get("single", []) if post.get("type") == "TemplateProcessing" else []
    return bool(single) and "SpecialToken" in single[0]


def read_vocab(model_dir: Path, *, vocab_size: int) -> GgufVocab:
    """Read ``tokenizer.json`` (and ``tokenizer_config.json``) of a model directory.

    Args:
        model_dir: A Hugging Face model directory (float or NF4 copy).
        vocab_size: The model's embedding rows; ids past the tokenizer's are padded.

    Raises:
        ClientInputError: no ``tokenizer.json``, not byte-level BPE, or a tokenizer
            larger than the model's vocabulary.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ClientInputError(
            f"{model_dir} has no tokenizer.json; the GGUF export needs a fast "
            "(tokenizers) byte-level BPE tokenizer"
        )
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ClientInputError(
            f"{path}: tokenizer model {model.get('type')!r} is not supported; the GGUF "
            "export handles byte-level BPE (GPT-2, Llama 3, Qwen2 families)"
        )
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    for tid, tok in added.items():
        vocab.setdefault(tok["content"], tid)
    if max(vocab.values()) >= vocab_size:
        raise ClientInputError(
            f"{path}: token id {max(vocab.values())} is past the model's {vocab_size} "
            "embedding rows"
        )
    by_id = {tid: tok for tok, tid in vocab.items()}
    tokens, types = [], []
    for tid in range(vocab_size):
        if tid in added:
            tokens.append(added[tid]["content"])
            types.append(_CONTROL if added[tid].get("special") else _USER_DEFINED)
        elif tid in by_id:
            tokens.append(by_id[tid])
            types.append(_NORMAL)
        else:
            tokens.append(f"[PAD{tid}]")
            types.append(_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    return GgufVocab(
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=_token_id(config.get("bos_token"), vocab),
        eos_id=_token_id(config.get("eos_token"), vocab),
        pad_id=_token_id(config.get("pad_token"), vocab),
        add_bos=_adds_bos(spec.get("post_processor")),
        chat_template=template if isinstance(template, str) else None,
    )
