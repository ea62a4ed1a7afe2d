"""The llama.cpp runtime: THREATS H39–H41 and I43–I44, hot-swap, and agreement with the
NF4 reference runtime on the same base and adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from client import ClientInputError
from client.runtime import (
    BudgetTooSmallError,
    LlamaCppRuntime,
    QuantizedRuntime,
    RequestTooLargeError,
)
from client.runtime.gguf_plan import CTX_STEP, plan_llamacpp_memory, read_gguf_footprint
from client.runtime.llamacpp import lora_file_name
from protocol import LoraShape

pytestmark = pytest.mark.slow
MIB = 2**20
TEXTS = [
    "hey ana, are we still on for coffee at the blue door tonight",
    "the city council approved a plan for new schools",
    "running late, see you at river park",
]


def lora_state(nf4: Path, *, rank: int, seed: int, scale: float = 0.3) -> dict[str, np.ndarray]:
    """A LoRA on every projection of every layer (q/k too: the row permutation matters)."""
    cfg = json.loads((nf4 / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * hidden // cfg["num_attention_heads"]
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            stem = f"base_model.model.model.layers.{layer}.{name}"
            out[f"{stem}.lora_A.weight"] = rng.normal(0, scale, (rank, fan_in)).astype(np.float32)
            out[f"{stem}.lora_B.weight"] = rng.normal(0, scale, (fan_out, rank)).astype(np.float32)
    return out


SPEC = LoraShape(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def runtime(micro_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> LlamaCppRuntime:
    cache = tmp_path_factory.mktemp("lora-cache")
    return LlamaCppRuntime(micro_gguf, budget_bytes=48 * MIB, cache_dir=cache, threads=1)


def test_h39_a_budget_below_the_weights_is_refused_before_loading(micro_gguf: Path) -> None:
    footprint = read_gguf_footprint(micro_gguf)
    with pytest.raises(BudgetTooSmallError) as err:
        LlamaCppRuntime(micro_gguf, budget_bytes=footprint.weights_bytes)
    assert err.value.needed_bytes > footprint.weights_bytes
    assert f"{CTX_STEP}-token cache" in str(err.value) and "raise --budget-mb" in str(err.value)


def test_i44_the_plan_grows_the_cache_with_the_budget_never_past_training_context(
    micro_gguf: Path,
) -> None:
    footprint = read_gguf_footprint(micro_gguf)
    small = plan_llamacpp_memory(footprint, 32 * MIB)
    large = plan_llamacpp_memory(footprint, 4096 * MIB)
    assert small.kv_capacity_tokens % CTX_STEP == 0 and small.kv_capacity_tokens >= CTX_STEP
    assert large.kv_capacity_tokens <= max(CTX_STEP, footprint.n_ctx_train)
    assert small.weights_bytes == footprint.weights_bytes > 0


def test_h40_policies_bound_the_cache(micro_gguf: Path, runtime: LlamaCppRuntime) -> None:
    long_prompt = " ".join(TEXTS * 40)
    capacity = runtime.capacity
    runtime.policy = "refuse"
    with pytest.raises(RequestTooLargeError, match=f"allows {capacity}"):
        runtime.generate(long_prompt, 8)
    runtime.policy = "truncate"
    g = runtime.generate(long_prompt, 8)
    assert g.policy_applied == "truncate" and g.max_cache_tokens <= capacity
    runtime.policy = "sliding-window"
    g = runtime.generate(long_prompt, 8)
    assert g.policy_applied == "sliding-window" and g.max_cache_tokens <= capacity
    assert g.prompt_tokens > capacity


def test_h41_peak_memory_stays_within_the_budget_over_varied_prompts(
    runtime: LlamaCppRuntime, micro_base: Path
) -> None:
    runtime.set_adapter(lora_state(micro_base / "nf4", rank=4, seed=1), SPEC, version=1)
    assert runtime.plan is not None
    budget = runtime.plan.budget_bytes
    assert runtime.load_peak_added_bytes <= budget
    for words in (1, 5, 30, 120, 400):
        g = runtime.generate(" ".join(["coffee at the blue door"] * words), 12)
        assert g.peak_added_bytes <= budget, (words, g.peak_added_bytes, budget)
    stats = runtime.evaluate([" ".join(TEXTS * 30)])
    assert stats.num_tokens > runtime.capacity and runtime.meter.peak_added_bytes() <= budget


def test_streaming_yields_the_generated_text(runtime: LlamaCppRuntime) -> None:
    stats: dict[str, object] = {}
    pieces = list(runtime.stream("hey ana, are we", 10, stats=stats))
    g = runtime.generate("hey ana, are we", 10)
    assert "".join(pieces) == g.text and stats["new_tokens"] == g.new_tokens >= 1
    assert 0 < g.first_token_s <= g.seconds


def test_hot_swap_never_changes_the_base(runtime: LlamaCppRuntime, micro_base: Path) -> None:
    nf4 = micro_base / "nf4"
    a, b = lora_state(nf4, rank=4, seed=2), lora_state(nf4, rank=4, seed=3)
    runtime.set_adapter(None)
    bare = runtime.evaluate(TEXTS)
    runtime.set_adapter(a, SPEC, version=2)
    first = runtime.evaluate(TEXTS)
    runtime.set_adapter(b, SPEC, version=3)
    other = runtime.evaluate(TEXTS)
    runtime.set_adapter(a, SPEC, version=2)
    again = runtime.evaluate(TEXTS)
    runtime.set_adapter(None)
    assert first.loss == again.loss and runtime.evaluate(TEXTS).loss == bare.loss
    assert len({bare.loss, first.loss, other.loss}) == 3  # the adapters do act
    assert runtime.adapter_version is None


def test_materialised_loras_are_named_by_content_and_pruned(
    runtime: LlamaCppRuntime, micro_base: Path
) -> None:
    nf4 = micro_base / "nf4"
    for seed in (4, 5, 6):
        runtime.set_adapter(lora_state(nf4, rank=4, seed=seed), SPEC, version=seed)
    files = sorted(runtime.cache_dir.glob("lora-*.gguf"))
    assert len(files) == 2  # the attached adapter and the one before it
    assert not list(runtime.cache_dir.glob(".*tmp"))


def test_a_lora_pruned_by_another_runtime_sharing_the_cache_is_written_again(
    micro_gguf: Path, micro_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's runtime and the update agent's health check share the device's cache;
    one may prune a LoRA between the other's existence check and its load."""
    state = lora_state(micro_base / "nf4", rank=4, seed=9)
    name = lora_file_name(state, read_gguf_footprint(micro_gguf))
    (tmp_path / name).write_bytes(b"")  # present at the check ...
    rt = LlamaCppRuntime(micro_gguf, cache_dir=tmp_path, threads=1)
    lib = rt.model.lib
    real_init = lib.llama_adapter_lora_init

    def pruned_then_init(model: object, path: bytes) -> object:
        Path(path.decode()).unlink(missing_ok=True)  # ... gone at the load
        monkeypatch.setattr(lib, "llama_adapter_lora_init", real_init)
        return real_init(model, path)

    monkeypatch.setattr(lib, "llama_adapter_lora_init", pruned_then_init)
    try:
        rt.set_adapter(state, SPEC, version=9)
        assert rt.adapter_version == 9 and (tmp_path / name).stat().st_size > 0
        assert rt.generate("the", max_new_tokens=4).text
    finally:
        rt.close()


def test_a_damaged_lora_in_the_cache_is_rebuilt(
    micro_gguf: Path, micro_base: Path, tmp_path: Path
) -> None:
    state = lora_state(micro_base / "nf4", rank=4, seed=10)
    path = tmp_path / lora_file_name(state, read_gguf_footprint(micro_gguf))
    path.write_bytes(b"GGUF truncated")
    rt = LlamaCppRuntime(micro_gguf, cache_dir=tmp_path, threads=1)
    try:
        rt.set_adapter(state, SPEC, version=10)
        assert rt.adapter_version == 10 and path.stat().st_size > 100
    finally:
        rt.close()


def test_i43_a_crash_while_writing_the_lora_leaves_the_old_adapter(
    runtime: LlamaCppRuntime, micro_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nf4 = micro_base / "nf4"
    runtime.set_adapter(lora_state(nf4, rank=4, seed=7), SPEC, version=7)
    before = runtime.evaluate(TEXTS)
    files_before = set(runtime.cache_dir.iterdir())

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        runtime.set_adapter(lora_state(nf4, rank=4, seed=8), SPEC, version=8)
    monkeypatch.undo()
    assert set(runtime.cache_dir.iterdir()) == files_before  # nothing half-written left
    assert runtime.adapter_version == 7 and runtime.evaluate(TEXTS).loss == before.loss


def test_bad_adapters_are_refused_before_touching_the_runtime(
    runtime: LlamaCppRuntime, micro_base: Path
) -> None:
    good = lora_state(micro_base / "nf4", rank=4, seed=9)
    with pytest.raises(ClientInputError, match="does not match rank 8"):
        runtime.set_adapter(good, LoraShape(rank=8, alpha=8.0), version=9)
    with pytest.raises(ClientInputError, match="no tensor in a llama GGUF"):
        runtime.set_adapter({"base_model.model.nope.lora_A.weight": good[next(iter(good))]}, SPEC)
    tight = LlamaCppRuntime(runtime.base_path, adapter_reserve_bytes=1024, threads=1)
    with pytest.raises(BudgetTooSmallError, match="reserved for it"):
        tight.set_adapter(good, SPEC)
    tight.close()


def test_agrees_with_the_nf4_reference_runtime(micro_gguf: Path, micro_base: Path) -> None:
    """Same base (Q8_0 of the NF4 weights) and same adapter: the two backends' losses
    agree within 1 % — the GGUF names, q/k permutation and LoRA scale are right."""
    nf4 = micro_base / "nf4"
    state = lora_state(nf4, rank=4, seed=10, scale=0.2)
    ref = QuantizedRuntime(nf4)
    ref_bare = ref.evaluate(TEXTS).loss
    ref.set_adapter(state, SPEC, version=1)
    ref_lora = ref.evaluate(TEXTS).loss
    rt = LlamaCppRuntime(micro_gguf, threads=1)
    bare = rt.evaluate(TEXTS).loss
    rt.set_adapter(state, SPEC, version=1)
    lora = rt.evaluate(TEXTS).loss
    rt.close()
    assert abs(ref_lora - ref_bare) > 0.05  # the adapter changes the loss visibly
    assert bare == pytest.approx(ref_bare, rel=0.01)
    assert lora == pytest.approx(ref_lora, rel=0.01)
