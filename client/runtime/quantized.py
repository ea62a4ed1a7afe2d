"""Load a causal LM as bitsandbytes NF4, and save/load pre-quantized checkpoints.

Invariants:
* The quantization is always NF4 with double quantization, set explicitly: the
  bitsandbytes default ``bnb_4bit_quant_type`` is FP4, which is not what we ship.
* A pre-quantized checkpoint (one whose ``config.json`` carries a bitsandbytes
  ``quantization_config``) is loaded as is: the packed 4-bit tensors go straight into
  ``Linear4bit`` modules and no fp16/fp32 copy of the quantized weights is ever built.
  Embeddings, norms and the output head stay in float, as bitsandbytes keeps them.
* For training (the default), matmuls dequantize NF4 and run in the compute dtype
  (float32 by default) on every CPU. bitsandbytes would otherwise, on CPUs with
  AVX512-BF16, repack a layer's weights at its first no-grad forward in eval mode and
  from then on run it through a bfloat16 kernel that has no backward: LoRA training
  after any evaluation would get no gradient through the base layers (see
  :func:`keep_float_compute`). A model loaded with ``inference_only=True`` (the
  on-device runtime) keeps bitsandbytes' choice, so such CPUs decode through the
  fused kernel (ADR 0010).
* Nothing is fetched from a hub: only local directories are accepted.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.errors import ClientInputError
from delta_packager import TOKENIZER_FILES
from protocol import atomic_dir

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel

logger = logging.getLogger(__name__)


class QuantizedModelError(ClientInputError):
    """The directory is not a loadable local causal language model."""


def nf4_config(compute_dtype: torch.dtype | None = None) -> BitsAndBytesConfig:
    """The one quantization config fedota uses: NF4, double quantization.

    Args:
        compute_dtype: dtype of the matmuls; float32 by default (CPU friendly).
    """
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise QuantizedModelError(
            f"model directory {model_dir} does not exist; pass a local Hugging Face "
            "model directory (e.g. one made by `fedota base-model init --out DIR`)"
        )
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise QuantizedModelError(
            f"{model_dir} is not a Hugging Face model directory: config.json is missing"
        )
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QuantizedModelError(f"{config_path} is not valid JSON: {e}") from e
    if not any(model_dir.glob("*.safetensors")):
        raise QuantizedModelError(
            f"{model_dir} has no *.safetensors weights; only safetensors checkpoints are "
            "loaded (pickled .bin files are refused)"
        )
    return config


def _check_causal_lm(model_dir: Path, config: dict[str, Any]) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    is_causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a in causal_classes for a in architectures)
    )
    if not is_causal:
        arch = f" ({', '.join(architectures)})" if architectures else ""
        raise QuantizedModelError(
            f"{model_dir} holds a {model_type!r} model{arch}, which is not a causal "
            "language model transformers knows (expected e.g. LlamaForCausalLM, "
            "Qwen2ForCausalLM, MistralForCausalLM)"
        )
    try:
        AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise QuantizedModelError(f"{model_dir}/config.json cannot be parsed: {e}") from e


def is_prequantized(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a bitsandbytes 4-bit checkpoint (NF4 packed weights)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return False
    quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    return bool(quant.get("load_in_4bit")) and quant.get("quant_method") == "bitsandbytes"


def load_quantized(
    model_dir: Path | str,
    *,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
    inference_only: bool = False,
) -> PreTrainedModel:
    """Load a local causal LM as NF4: quantize at load, or load a pre-quantized copy.

    Args:
        model_dir: a local Hugging Face causal-LM directory (any architecture that
            ``AutoModelForCausalLM`` supports), in float or pre-quantized form.
        device: ``"cpu"`` or a CUDA device such as ``"cuda"`` / ``"cuda:0"``.
        compute_dtype: matmul dtype; float32 by default.
        inference_only: the model will only run forward passes without gradients.
            bitsandbytes may then repack it for its fused bfloat16 CPU kernel on CPUs
            with AVX512-BF16 (much faster decoding there, bfloat16 precision, no
            backward; docs/benchmarks.md, "Runtime vs the naive path (NF4)"). False,
            the default, keeps every matmul in float on every CPU
            (:func:`keep_float_compute`): what training needs.

    Returns:
        The model in eval mode, with every linear projection a bitsandbytes
        ``Linear4bit`` holding NF4 weights.

    Raises:
        QuantizedModelError: the directory is missing, is not a causal LM, has no
            safetensors weights, or holds a quantization other than bitsandbytes NF4.
    """
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    config = _read_config(path)
    _check_causal_lm(path, config)
    kwargs: dict[str, Any] = {"device_map": device, "local_files_only": True}
    if is_prequantized(path):
        quant = config["quantization_config"]
        if quant.get("bnb_4bit_quant_type") != "nf4":
            raise QuantizedModelError(
                f"{path} is quantized as {quant.get('bnb_4bit_quant_type')!r}, expected "
                "'nf4'; re-quantize it from the float checkpoint"
            )
    elif config.get("quantization_config"):
        raise QuantizedModelError(
            f"{path} is quantized with {config['quantization_config'].get('quant_method')!r}; "
            "only float checkpoints or bitsandbytes NF4 checkpoints are supported"
        )
    else:
        kwargs["quantization_config"] = nf4_config(compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not inference_only:
        keep_float_compute(model)
    model.eval()
    logger.info("loaded %s as NF4 on %s", path, device)
    return model


def keep_float_compute(model: torch.nn.Module) -> int:
    """Keep every NF4 layer on the dequantize-then-matmul path, on any CPU.

    bitsandbytes' ``Linear4bit`` checks at construction whether the CPU has AVX512-BF16
    and, if so, repacks its weights in place at the first forward that runs in eval
    mode without gradients, then sends every later forward (training ones included)
    through a fused bfloat16 kernel. That kernel has no autograd: once a model has been
    evaluated, the LoRA adapters of a layer get no gradient through the base layers
    above it (only through the residual stream and the adapters), and federated
    training silently learns much less (measured in
    docs/adr/0010-float-nf4-compute-on-every-cpu.md, "Context"). Turning the flag off
    keeps training and the evaluation it reports on one numeric path on every machine.

    Returns:
        The number of ``Linear4bit`` layers set.

    Raises:
        QuantizedModelError: a layer was already repacked (evaluated before this call).
    """
    repacked = repacked_layers(model)
    if repacked:
        raise QuantizedModelError(
            f"{repacked[0]} was repacked for bitsandbytes' bfloat16 CPU kernel before "
            "keep_float_compute ran; call it right after loading"
        )
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (a bnb attribute)
            count += 1
    return count


def repacked_layers(model: torch.nn.Module) -> list[str]:
    """Names of the NF4 layers bitsandbytes has repacked for its fused bfloat16 CPU kernel."""
    return [
        name
        for name, module in model.named_modules()
        if hasattr(module, "support_avx512bf16_for_cpu")
        and getattr(
            getattr(getattr(module, "weight", None), "quant_state", None),
            "packing_format_for_cpu",
            False,
        )
    ]


def save_quantized(
    model: PreTrainedModel, out_dir: Path | str, *, tokenizer_dir: Path | str | None = None
) -> Path:
    """Write a pre-quantized checkpoint atomically (``protocol.files.atomic_dir``).

    Args:
        model: a model returned by :func:`load_quantized`.
        out_dir: destination; must not exist yet.
        tokenizer_dir: where to copy tokenizer files from, so the checkpoint is
            self-contained (and the base fingerprint covers the tokenizer).

    Returns:
        ``out_dir``.

    Raises:
        QuantizedModelError: the model is not 4-bit or ``out_dir`` already exists.
    """
    out = Path(out_dir)
    if not getattr(model, "is_loaded_in_4bit", False):
        raise QuantizedModelError("save_quantized needs a 4-bit model from load_quantized")
    if out.exists():
        raise QuantizedModelError(f"{out} already exists; remove it or choose another path")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
    return out


def quantize_checkpoint(src_dir: Path | str, out_dir: Path | str) -> Path:
    """Quantize a float checkpoint to NF4 once, so devices only ever load 4-bit weights.

    Raises:
        QuantizedModelError: as :func:`load_quantized` and :func:`save_quantized`.
    """
    model = load_quantized(src_dir, device="cpu")
    return save_quantized(model, out_dir, tokenizer_dir=src_dir)
