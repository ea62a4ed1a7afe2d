"""The memory-budgeted runtime: THREATS H39–H41, hot-swap and streaming."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from client.runtime import (
    BudgetTooSmallError,
    QuantizedRuntime,
    RequestTooLargeError,
    footprint_from_checkpoint,
    plan_memory,
    repacked_layers,
)
from protocol import LoraShape

MIB = 1 << 20
WORDS = ["hey", "ana", "coffee", "at", "the", "blue", "door", "city", "council", "plan"]


def _budget_for(nf4: Path, kv_tokens: int) -> int:
    """The smallest budget whose plan gives at least ``kv_tokens`` of cache."""
    fp = footprint_from_checkpoint(nf4)
    budget = 16 * MIB
    while True:
        try:
            if plan_memory(fp, budget, adapter_bytes=10 * MIB).kv_capacity_tokens >= kv_tokens:
                return budget
        except BudgetTooSmallError:
            pass
        budget += MIB // 4


@pytest.fixture(scope="module")
def nf4(micro_base: Path) -> Path:
    return micro_base / "nf4"


@pytest.fixture(scope="module")
def small_runtime(nf4: Path) -> QuantizedRuntime:
    return QuantizedRuntime(
        nf4,
        budget_bytes=_budget_for(nf4, 48),
        policy="sliding-window",
        adapter_reserve_bytes=10 * MIB,
    )


def test_budget_below_weights_is_refused_up_front(nf4: Path) -> None:
    with pytest.raises(BudgetTooSmallError) as err:
        QuantizedRuntime(nf4, budget_bytes=1 * MIB)
    assert err.value.needed_bytes > 1 * MIB
    assert f"at least {-(-err.value.needed_bytes // MIB)} MiB" in str(err.value)


@pytest.mark.parametrize("policy", ["refuse", "truncate", "sliding-window"])
def test_request_longer_than_cache_follows_policy(nf4: Path, policy: str) -> None:
    rt = QuantizedRuntime(
        nf4, budget_bytes=_budget_for(nf4, 48), policy=policy, adapter_reserve_bytes=10 * MIB
    )
    prompt = " ".join(WORDS * 12)
    n_prompt = len(rt.tokenizer(prompt)["input_ids"])
    assert n_prompt > rt.capacity
    if policy == "refuse":
        with pytest.raises(RequestTooLargeError, match=f"allows {rt.capacity}"):
            rt.generate(prompt, 8)
        return
    g = rt.generate(prompt, rt.capacity + 10)
    assert g.policy_applied == policy and g.prompt_tokens == n_prompt
    assert g.max_cache_tokens <= rt.capacity
    if policy == "sliding-window":  # keeps generating past the cache size
        eos_stop = g.new_tokens < rt.capacity + 10
        assert eos_stop or g.new_tokens == rt.capacity + 10
    else:
        assert g.new_tokens <= rt.capacity - 1


def test_peak_added_memory_never_exceeds_budget(nf4: Path) -> None:
    rng = random.Random(0)
    for kv_tokens in (32, 160):
        budget = _budget_for(nf4, kv_tokens)
        rt = QuantizedRuntime(nf4, budget_bytes=budget, adapter_reserve_bytes=10 * MIB)
        assert rt.load_peak_added_bytes <= budget
        peaks = []
        for _ in range(12):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 300)))
            g = rt.generate(prompt, rng.randint(1, 40))
            assert g.peak_added_bytes <= budget, (kv_tokens, g)
            peaks.append(g.peak_added_bytes)
        assert max(peaks) > 0  # the meter really measured something
        del rt


def _random_adapter(rt: QuantizedRuntime, spec: LoraShape, seed: int) -> dict[str, np.ndarray]:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    shadow = AutoModelForCausalLM.from_config(rt.model.config)
    peft = get_peft_model(
        shadow, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules="all-linear")
    )
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=gen) * 0.5).numpy()
        for k, v in get_peft_model_state_dict(peft).items()
    }


def test_hot_swap_changes_outputs_without_touching_the_base(
    small_runtime: QuantizedRuntime,
) -> None:
    rt = small_runtime
    prompt = "hey ana, are we"
    plain = rt.generate(prompt, 12).text
    # read after a first request: on AVX512-BF16 CPUs bitsandbytes repacks the NF4
    # weights for its fused kernel at the first forward (ADR 0010), before any adapter
    base_weight = next(p for n, p in rt.model.named_parameters() if "q_proj" in n)
    before = base_weight.detach().clone()
    spec = LoraShape(rank=4, alpha=8.0)
    rt.set_adapter(_random_adapter(rt, spec, 1), spec, version=1)
    first = rt.generate(prompt, 12).text
    seconds = rt.set_adapter(_random_adapter(rt, spec, 2), spec, version=2)
    second = rt.generate(prompt, 12).text
    assert first != plain and second != first and rt.adapter_version == 2
    assert seconds < 1.0
    rt.set_adapter(None)
    assert rt.generate(prompt, 12).text == plain
    assert torch.equal(base_weight.detach(), before)


def test_an_adapter_scores_the_same_before_and_after_another(
    small_runtime: QuantizedRuntime,
) -> None:
    """Hot-swapping never changes the base: the same adapter gives the same loss, bit for
    bit, before and after another one was attached. (Loading through PEFT's state-dict
    path unpacked and lossily re-quantized bitsandbytes' repacked layers on AVX512-BF16
    CPUs, ADR 0010: the golden loss of a re-released adapter moved by 3e-5.)"""
    rt = small_runtime
    spec = LoraShape(rank=4, alpha=8.0)
    texts = ["hey ana, are we still on for coffee", "the city council approved a plan"]
    rt.set_adapter(_random_adapter(rt, spec, 11), spec)
    first = rt.evaluate(texts).loss
    rt.set_adapter(_random_adapter(rt, spec, 12), spec)
    other = rt.evaluate(texts).loss
    rt.set_adapter(_random_adapter(rt, spec, 11), spec)
    assert rt.evaluate(texts).loss == first != other
    rt.set_adapter(None)


def test_adapter_of_wrong_shape_is_rejected(small_runtime: QuantizedRuntime) -> None:
    from client import ClientInputError

    state = _random_adapter(small_runtime, LoraShape(rank=4, alpha=8.0), 3)
    with pytest.raises(ClientInputError, match="does not match rank 2"):
        small_runtime.set_adapter(state, LoraShape(rank=2, alpha=4.0))


def test_stream_yields_the_same_text_as_generate(tiny_base: Path) -> None:
    # The tiny base (400 pretraining steps), not the micro one: 30 steps on short chat
    # messages leave a model that ends every prompt at once (EOS), which streams nothing.
    # The base's bytes follow the CPU's instruction set, so one prompt may still end at
    # once on some machines ("running late for" does on AVX-512): most must stream.
    runtime = QuantizedRuntime(tiny_base / "nf4", budget_bytes=None)
    prompts = ("the city council", "hey, are we still on for", "running late for",
               "the weather today")  # fmt: skip
    streamed = {p: list(runtime.stream(p, 16)) for p in prompts}
    assert sum(len(pieces) > 1 for pieces in streamed.values()) >= 3, streamed
    for prompt, pieces in streamed.items():
        assert "".join(pieces) == runtime.generate(prompt, 16).text


def test_the_runtime_loads_its_model_for_inference_only(nf4: Path) -> None:
    """The runtime never trains, so it keeps bitsandbytes' fused CPU kernel where the
    CPU has one (ADR 0010); training loads keep float matmuls."""
    from bitsandbytes.functional import has_avx512bf16

    from client.train import LocalTrainer, LoraSettings

    runtime = QuantizedRuntime(nf4)
    runtime.generate("hey ana", 2)
    trainer = LocalTrainer(nf4, LoraSettings(rank=2, alpha=4.0))
    trainer.evaluate(None, ["hey ana, are we still on for tonight"])
    assert bool(repacked_layers(runtime.model)) == bool(has_avx512bf16())
    assert not repacked_layers(trainer.model)


def test_evaluate_reports_loss_and_accuracy(small_runtime: QuantizedRuntime) -> None:
    small_runtime.set_adapter(None)
    stats = small_runtime.evaluate(["the city council approved a plan for coffee programs."])
    assert stats.num_tokens > 5 and 0 < stats.loss < 10 and 0 <= stats.accuracy <= 1
