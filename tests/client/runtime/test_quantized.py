"""NF4 loading of arbitrary local causal LMs, and pre-quantized checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from client.runtime import (
    QuantizedModelError,
    is_prequantized,
    keep_float_compute,
    load_quantized,
    quantize_checkpoint,
    repacked_layers,
    save_quantized,
)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def _tiny_random(arch: str, out: Path) -> Path:
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out)
    return out


def _linear4bit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_float_checkpoint_loads_as_nf4_and_round_trips(arch: str, tmp_path: Path) -> None:
    src = _tiny_random(arch, tmp_path / "float")
    model = load_quantized(src)
    layers = _linear4bit_modules(model)
    assert len(layers) == 2 * 7  # q k v o gate up down in each of 2 layers
    for layer in layers:
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.dtype == torch.uint8
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = model(x).logits

    saved = save_quantized(model, tmp_path / "nf4")
    assert is_prequantized(saved) and not is_prequantized(src)
    reloaded = load_quantized(saved)
    assert len(_linear4bit_modules(reloaded)) == len(layers)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)


def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def test_evaluation_keeps_float_matmuls_and_the_gradient_through_the_base(
    tmp_path: Path,
) -> None:
    """An evaluated model trains like a fresh one (bitsandbytes' bf16 CPU kernel is off).

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` at its first no-grad
    eval forward and runs it in bfloat16 from then on, without a backward; the input
    gradient below would then differ from a fresh model's.
    """
    src = _tiny_random("llama", tmp_path / "float")
    evaluated, fresh = load_quantized(src), load_quantized(src)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        evaluated(x)
    import bitsandbytes.functional as bnbf

    for layer in _linear4bit_modules(evaluated):
        state = layer.weight.quant_state
        assert not getattr(state, "packing_format_for_cpu", False)
        h = torch.randn(3, layer.in_features)
        with torch.no_grad():
            reference = h @ bnbf.dequantize_4bit(layer.weight.data, state).T
            torch.testing.assert_close(layer(h), reference, rtol=1e-5, atol=1e-6)

    grads = []
    for model in (evaluated, fresh):
        model.train()
        embeds = model.get_input_embeddings()(x).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.square().mean().backward()
        grads.append(embeds.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


@pytest.mark.skipif(not _has_avx512bf16(), reason="bitsandbytes repacks only on AVX512-BF16")
def test_a_model_repacked_before_keep_float_compute_is_refused(tmp_path: Path) -> None:
    model = load_quantized(_tiny_random("llama", tmp_path / "float"))
    for layer in _linear4bit_modules(model):
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on this CPU
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 4)))
    assert repacked_layers(model)
    with pytest.raises(QuantizedModelError, match="repacked"):
        keep_float_compute(model)


def test_an_inference_only_model_may_use_the_fused_cpu_kernel(tmp_path: Path) -> None:
    """``inference_only`` leaves bitsandbytes' kernel choice alone (ADR 0010).

    On CPUs with AVX512-BF16 the layers are repacked at the first no-grad forward and
    decode in bfloat16; elsewhere nothing changes. Either way the logits stay within
    bfloat16 error of the float path, and the default load is never repacked.
    """
    src = _tiny_random("llama", tmp_path / "float")
    exact, fast = load_quantized(src), load_quantized(src, inference_only=True)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = exact(x).logits
        fast(x)  # the first no-grad forward repacks, where bitsandbytes repacks at all
        got = fast(x).logits

    assert bool(repacked_layers(fast)) == _has_avx512bf16()
    assert not repacked_layers(exact)
    assert float((got - reference).norm() / reference.norm()) < 2e-2


def test_prequantized_checkpoint_holds_packed_weights_only(tmp_path: Path) -> None:
    from safetensors import safe_open

    nf4 = quantize_checkpoint(_tiny_random("llama", tmp_path / "f"), tmp_path / "q")
    config = json.loads((nf4 / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    with safe_open(str(nf4 / "model.safetensors"), "pt") as f:
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q_proj.dtype == torch.uint8 and q_proj.numel() == 64 * 64 // 2


def test_save_refuses_existing_directory(tmp_path: Path) -> None:
    model = load_quantized(_tiny_random("llama", tmp_path / "f"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(QuantizedModelError, match="already exists"):
        save_quantized(model, tmp_path / "taken")


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(QuantizedModelError, match=r"nowhere does not exist"):
        load_quantized(tmp_path / "nowhere")


def test_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(QuantizedModelError, match="config.json is missing"):
        load_quantized(tmp_path)


def test_non_causal_lm_is_refused(tmp_path: Path) -> None:
    BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(
        QuantizedModelError, match="'bert' model \\(BertModel\\), which is not a causal"
    ):
        load_quantized(tmp_path)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    src = _tiny_random("llama", tmp_path / "m")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(QuantizedModelError, match="no \\*.safetensors weights"):
        load_quantized(src)
