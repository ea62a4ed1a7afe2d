"""Export a base as the GGUF file phones run with llama.cpp (``fedota base-model export``).

Runs in the release pipeline, not on the phone: it reads a Hugging Face Llama or Qwen2
checkpoint with torch, writes an float GGUF with the ``gguf`` package (weights,
hyper-parameters, tokenizer), and quantizes it with llama.cpp's own quantizer
(``llama_model_quantize``) — no quantization is written by hand here.

Two sources (ADR 0011 says which is the default and why):

* ``nf4`` — the dequantized NF4 weights the phones trained their adapters on (from the
  base's pre-quantized copy, or quantized on the fly from the float checkpoint);
* ``float`` — the float checkpoint itself.

Invariants:
* ``out`` appears complete or not at all (temp file, fsync, rename).
* The tokenizer is checked before the export is accepted: llama.cpp must tokenize a
  set of varied texts (and any the caller adds) exactly as the Hugging Face tokenizer
  does, or the export fails and nothing is written.
* For the ``llama`` architecture the q/k rows are permuted with
  ``gguf_lora.permute_rotary_rows``, the same function the device applies to LoRA ``B``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.errors import ClientInputError
from client.runtime.gguf_lora import gguf_tensor_name, permute_rotary_rows
from client.runtime.gguf_vocab import read_vocab
from protocol import atomic_write_json, replace_file

__all__ = [
    "CHECK_TEXTS",
    "GGUF_QUANTS",
    "GGUF_SOURCES",
    "GgufExport",
    "check_tokenizer",
    "export_gguf",
]

logger = logging.getLogger(__name__)

#: llama.cpp file types (``llama_ftype``) by the name the CLI takes.
GGUF_QUANTS = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}
GGUF_SOURCES = ("nf4", "float")
_ARCHES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
#: Varied text the tokenizer check always runs: spacing, digits, punctuation, code,
#: contractions, accents, CJK, emoji, control characters.
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Numbers: 0 7 42 1234567 3.14159 -2e10 1,000,000",
    "don't we'll they're I'm you've she'd it's",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment",
    "Ünïcödé àccents: café, naïve, Søren, Łódź",
    "日本語のテキストと中文文本",
    "emoji 🙂🚀 and symbols © ® ™ → ≠ ∑",
    "MIXED case, ALLCAPS and camelCaseWords",
    "a",
    "",
    "!!!???...,,,;;;",
    "url https://example.org/path?q=1&r=two#frag",
)


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote (also saved as ``<out>.json`` beside the file)."""

    path: str
    arch: str
    quant: str
    source: str
    bytes: int
    fingerprint: str
    source_dir: str
    tokenizer_texts_checked: int


def _read_config(model_dir: Path) -> tuple[dict[str, Any], str]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ClientInputError(
            f"{model_dir} is not a Hugging Face model directory (no config.json)"
        )
    config = json.loads(path.read_text())
    arch = next((_ARCHES[a] for a in config.get("architectures", []) if a in _ARCHES), None)
    if arch is None:
        raise ClientInputError(
            f"{model_dir}: architecture {config.get('architectures')} is not supported by "
            f"the GGUF export; supported: {', '.join(sorted(_ARCHES))}"
        )
    if config.get("rope_scaling"):
        raise ClientInputError(f"{model_dir}: rope_scaling is not supported by the GGUF export")
    return config, arch


def _nf4_dir(model_dir: Path) -> Path | None:
    for candidate in (model_dir, model_dir / "nf4"):
        cfg = candidate / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("quantization_config"):
            return candidate
    return None


def _weights(model_dir: Path, source: str) -> Iterator[tuple[str, np.ndarray]]:
    """Hugging Face parameter name → float32 array, from the chosen source."""
    import torch

    if source == "float":
        from safetensors import safe_open

        for shard in sorted(model_dir.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name).float().numpy()
        return
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from client.runtime.quantized import load_quantized

    model = load_quantized(_nf4_dir(model_dir) or model_dir)  # float checkpoint: NF4 on load
    with torch.no_grad():
        done = set()
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight: Any = module.weight  # bitsandbytes' Params4bit: data + quant_state
                w = bnbf.dequantize_4bit(weight.data, weight.quant_state)
                done.add(f"{name}.weight")
                yield f"{name}.weight", w.float().numpy()
        for name, param in model.named_parameters():
            if name not in done:
                yield name, param.float().numpy()


def _hparams(writer: Any, config: dict[str, Any], arch: str) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))


def _tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    vocab = read_vocab(model_dir, vocab_size=vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for token_id, add in (
        (vocab.bos_id, writer.add_bos_token_id),
        (vocab.eos_id, writer.add_eos_token_id),
        (vocab.pad_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _write_float_gguf(model_dir: Path, source: str, out: Path, *, half: bool) -> None:
    import gguf

    config, arch = _read_config(model_dir)
    n_blocks, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    tied = bool(config.get("tie_word_embeddings", False))
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(model_dir.name)
    writer.add_file_type(GGUF_QUANTS["f16"] if half else 0)
    _hparams(writer, config, arch)
    _tokenizer(writer, model_dir, int(config["vocab_size"]))
    for name, array in _weights(model_dir, source):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        module, _, suffix = name.rpartition(".")
        target = gguf_tensor_name(arch, n_blocks, module)
        if target is None:
            raise ClientInputError(f"{model_dir}: tensor {name} has no GGUF name for {arch}")
        if arch == "llama" and target.endswith((".attn_q", ".attn_k")):
            array = permute_rotary_rows(array, heads if target.endswith("_q") else kv_heads)
        if half and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(f"{target}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize(src: Path, dst: Path, quant: str, threads: int | None) -> None:
    from client.runtime.llamacpp import LlamaCppError, _backend, llama_log_tail

    lib = _backend()
    params = lib.llama_model_quantize_default_params()
    params.ftype = GGUF_QUANTS[quant]
    params.nthread = threads or 0
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)):
        raise LlamaCppError(f"llama.cpp could not quantize to {quant}: {llama_log_tail()}")


def check_tokenizer(gguf_path: Path, model_dir: Path, texts: Sequence[str] = ()) -> int:
    """Check llama.cpp tokenizes ``CHECK_TEXTS`` and ``texts`` as Hugging Face does.

    Returns the number of texts checked.

    Raises:
        ClientInputError: a text tokenizes differently (the first one is named).
    """
    from tokenizers import Tokenizer

    from client.runtime.llamacpp import LlamaModel

    hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = LlamaModel(gguf_path, vocab_only=True)
    try:
        checked = [*CHECK_TEXTS, *texts]
        for text in checked:
            want, got = hf.encode(text).ids, model.tokenize(text)
            if want != got:
                raise ClientInputError(
                    f"llama.cpp tokenizes {text[:60]!r} as {got[:12]}…, Hugging Face as "
                    f"{want[:12]}…; this tokenizer cannot be exported exactly"
                )
    finally:
        model.close()
    return len(checked)


def export_gguf(
    model_dir: Path | str,
    out: Path | str,
    *,
    quant: str = "q8_0",
    source: str = "nf4",
    check_texts: Sequence[str] = (),
    threads: int | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> GgufExport:
    """Export a Llama/Qwen2 base to a GGUF file, check its tokenizer, fingerprint it.

    Args:
        model_dir: A Hugging Face model directory (a generated base's dir, its float
            checkpoint, or a local Llama/Qwen2 download); tokenizer files included.
        out: Destination ``.gguf`` file (must not exist).
        quant: ``f16``, ``q8_0``, ``q4_0`` or ``q4_k_m`` (see ``GGUF_QUANTS``).
        source: ``nf4`` (the dequantized weights phones train on) or ``float``.
        check_texts: More texts the tokenizer check runs.
        threads: Quantizer threads (default: all cores).
        on_stage: Progress callback with a short description of each stage.

    Raises:
        ClientInputError: unsupported architecture, tokenizer, quant or source; ``out``
            exists; or the tokenizer check failed.
        LlamaCppError: llama.cpp could not quantize or load the result.
    """
    from delta_packager import fingerprint_gguf

    src, dst = Path(model_dir), Path(out)
    if quant not in GGUF_QUANTS:
        raise ClientInputError(f"unknown quant {quant!r}; choose one of {', '.join(GGUF_QUANTS)}")
    if source not in GGUF_SOURCES:
        raise ClientInputError(f"unknown source {source!r}; choose one of {GGUF_SOURCES}")
    if dst.exists():
        raise ClientInputError(f"{dst} exists; choose a new --out or delete it first")
    if dst.suffix != ".gguf":
        raise ClientInputError(f"{dst}: the output file name must end in .gguf")
    _read_config(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = on_stage or (lambda text: logger.info("%s", text))
    with tempfile.TemporaryDirectory(prefix=".gguf-export-", dir=dst.parent) as tmp:
        float_path, final = Path(tmp) / "float.gguf", Path(tmp) / dst.name
        stage(f"writing {'f16' if quant == 'f16' else 'f32'} GGUF from the {source} weights")
        _write_float_gguf(src, source, float_path, half=quant == "f16")
        if quant == "f16":
            float_path.rename(final)
        else:
            stage(f"quantizing to {quant} with llama.cpp")
            _quantize(float_path, final, quant, threads)
        stage("checking llama.cpp tokenizes exactly as Hugging Face")
        checked = check_tokenizer(final, src, check_texts)
        replace_file(final, dst)
    info = GgufExport(
        path=str(dst),
        arch=_read_config(src)[1],
        quant=quant,
        source=source,
        bytes=dst.stat().st_size,
        fingerprint=fingerprint_gguf(dst),
        source_dir=str(src.resolve()),
        tokenizer_texts_checked=checked,
    )
    atomic_write_json(dst.with_suffix(".gguf.json"), asdict(info))
    return info
