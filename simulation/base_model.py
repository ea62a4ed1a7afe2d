"""Base-model bootstrap: a byte-level BPE tokenizer and a small Llama pretrained on
the public split, written as a standard Hugging Face directory plus its NF4 copy.

Nothing can be downloaded from a model hub here, so fedota makes its own base.
Layout of ``DIR`` after :func:`init_base_model`::

    DIR/config.json, model.safetensors, generation_config.json   float checkpoint
    DIR/tokenizer.json, tokenizer_config.json                    tokenizer
    DIR/nf4/                                                     pre-quantized NF4 copy
    DIR/fedota_base.json                                         preset, seed, loss, fingerprint

Invariants: the same (texts, preset, seed) give byte-identical weights and the same
fingerprint; ``DIR`` appears complete or not at all (built in a temp dir, then renamed).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from protocol import atomic_dir
from simulation.errors import SimulationInputError

__all__ = [
    "BASE_DATA_VERSION",
    "BASE_INFO_FILE",
    "PRESETS",
    "BaseModelInfo",
    "BasePreset",
    "base_cache_name",
    "ensure_base_model",
    "init_base_model",
    "load_base_info",
    "pretraining_steps",
]

logger = logging.getLogger(__name__)

BASE_INFO_FILE = "fedota_base.json"
# Version of the public split + pretraining recipe; part of the cache directory name, so
# a cached base built from older text or an older schedule is never reused.
BASE_DATA_VERSION = 2
NF4_SUBDIR = "nf4"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")


@dataclass(frozen=True)
class BasePreset:
    """Architecture and pretraining schedule of a generated base model.

    ``steps`` is the least number of optimizer steps; on a larger corpus pretraining runs
    until it has seen the text ``min_epochs`` times (:func:`pretraining_steps`; 0, the
    default, makes ``steps`` exact).
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    steps: int
    batch_size: int
    learning_rate: float
    min_epochs: float = 0.0


PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset("tiny", 2048, 192, 4, 6, 2, 512, 64, 400, 16, 3e-3, min_epochs=8),
    "small": BasePreset("small", 4096, 384, 6, 6, 2, 1024, 128, 1500, 16, 2e-3, min_epochs=8),
}


@dataclass(frozen=True)
class BaseModelInfo:
    """What ``fedota_base.json`` records about a generated base model."""

    path: str
    preset: str
    seed: int
    num_parameters: int
    steps: int
    final_loss: float
    fingerprint: str
    nf4_path: str
    data: str


def _train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )


def _token_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> Any:
    import torch

    ids: list[int] = []
    for row in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // seq_len
    if n_blocks < 2:
        raise SimulationInputError(
            f"the pretraining text has only {len(ids)} tokens; need at least {2 * seq_len}"
        )
    return torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)


def _build_model(preset: BasePreset, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=max(256, 4 * preset.seq_len),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def pretraining_steps(preset: BasePreset, n_blocks: int) -> int:
    """Steps to pretrain ``preset`` on ``n_blocks`` blocks of ``preset.seq_len`` tokens:
    the preset's ``steps``, or ``min_epochs`` passes over the text if that is more.

    The synthetic public split (≈530 blocks of 64 tokens) is seen 12 times in the tiny
    preset's 400 steps; a real corpus a few times larger would be seen only twice, and
    a base that has barely learned its language leaves federated fine-tuning little to
    build on (docs/benchmarks.md, "Federated training on real text").
    """
    return max(preset.steps, math.ceil(preset.min_epochs * n_blocks / preset.batch_size))


def _pretrain(
    model: Any,
    blocks: Any,
    preset: BasePreset,
    seed: int,
    on_step: Callable[[int, int, float], None] | None,
) -> float:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate, weight_decay=0.01)
    warmup = max(1, preset.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, preset.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    ema = float("nan")
    for step in range(preset.steps):
        idx = torch.randint(0, blocks.shape[0], (preset.batch_size,), generator=gen)
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if math.isnan(ema) else 0.9 * ema + 0.1 * loss.item()
        if on_step is not None:
            on_step(step + 1, preset.steps, ema)
    model.eval()
    return ema


def init_base_model(
    out_dir: Path | str,
    *,
    public_texts: Sequence[str],
    preset: BasePreset | str = "tiny",
    seed: int = 0,
    data_label: str = "synthetic",
    steps: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> BaseModelInfo:
    """Train a tokenizer and pretrain a Llama base on ``public_texts``; write ``out_dir``.

    Args:
        out_dir: destination directory; must not exist or be empty.
        public_texts: the public pretraining corpus.
        preset: ``"tiny"``, ``"small"`` or a :class:`BasePreset`.
        seed: makes the result reproducible bit for bit.
        data_label: where the text came from, recorded in ``fedota_base.json``.
        steps: optimizer steps; default :func:`pretraining_steps` (the preset's steps,
            more on a corpus too large to see ``min_epochs`` times in them).
        on_step: progress callback ``(step, total_steps, smoothed_loss)``.

    Raises:
        SimulationInputError: unknown preset, ``out_dir`` not empty, too little text, or
            ``steps`` below 1.
    """
    import torch

    from client.runtime import quantize_checkpoint
    from delta_packager import fingerprint_checkpoint

    spec = _resolve_preset(preset)
    if steps is not None and steps < 1:
        raise SimulationInputError(f"steps must be at least 1, got {steps}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise SimulationInputError(f"{out} exists and is not empty; choose a new --out")
    with atomic_dir(out) as tmp:
        torch.manual_seed(seed)
        tokenizer = _train_tokenizer(public_texts, spec.vocab_size)
        blocks = _token_blocks(public_texts, tokenizer, spec.seq_len)
        spec = replace(spec, steps=steps or pretraining_steps(spec, blocks.shape[0]))
        model = _build_model(spec, tokenizer)
        final_loss = _pretrain(model, blocks, spec, seed, on_step)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        nf4 = quantize_checkpoint(tmp, tmp / NF4_SUBDIR)
        info = BaseModelInfo(
            path=str(out),
            preset=spec.name,
            seed=seed,
            num_parameters=sum(p.numel() for p in model.parameters()),
            steps=spec.steps,
            final_loss=round(final_loss, 6),
            fingerprint=fingerprint_checkpoint(nf4),
            nf4_path=str(out / NF4_SUBDIR),
            data=data_label,
        )
        (tmp / BASE_INFO_FILE).write_text(json.dumps(asdict(info), indent=2))
    logger.info("base model %s written to %s (loss %.3f)", spec.name, out, final_loss)
    return info


def _resolve_preset(preset: BasePreset | str) -> BasePreset:
    if isinstance(preset, BasePreset):
        return preset
    if preset not in PRESETS:
        raise SimulationInputError(
            f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[preset]


def load_base_info(model_dir: Path | str) -> BaseModelInfo:
    """Read ``fedota_base.json`` of a generated base.

    Raises:
        SimulationInputError: the directory was not made by ``fedota base-model init``.
    """
    path = Path(model_dir) / BASE_INFO_FILE
    if not path.is_file():
        raise SimulationInputError(
            f"{model_dir} is not a fedota base model ({BASE_INFO_FILE} missing); "
            "create one with `fedota base-model init --out DIR`"
        )
    return BaseModelInfo(**json.loads(path.read_text()))


def base_cache_name(preset: str, seed: int) -> str:
    """Directory name of the cached base for (preset, seed), e.g. ``base-tiny-seed0-v2``."""
    return f"base-{preset}-seed{seed}-v{BASE_DATA_VERSION}"


def ensure_base_model(
    cache_dir: Path | str,
    *,
    preset: str = "tiny",
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Return the cached base for (preset, seed) on the synthetic public split, building
    it on first use. Later calls (and later commands) reuse it.

    Raises:
        SimulationInputError: unknown preset.
    """
    from simulation.data import generate_public_texts

    spec = _resolve_preset(preset)
    path = Path(cache_dir) / base_cache_name(spec.name, seed)
    if (path / BASE_INFO_FILE).is_file():
        return path
    texts = generate_public_texts(3000, seed)
    init_base_model(path, public_texts=texts, preset=spec, seed=seed, on_step=on_step)
    return path
