"""⑧ infer: the quantized runtime a phone runs — NF4 base, hot-swappable LoRA adapter,
generation and evaluation inside a memory budget.

Invariants:
* The plan (``client.runtime.budget``) is made from file headers before the model is
  loaded; a budget that cannot hold the model is refused before anything is allocated.
* The KV cache never holds more than ``plan.kv_capacity_tokens`` tokens and the prompt
  is prefilled in bounded chunks; a request that does not fit is handled by the declared
  policy — ``sliding-window``, ``truncate`` or ``refuse`` — never by growing.
* Swapping the adapter copies tensors into the existing LoRA layers (or re-injects them
  when the adapter shape changes); the base weights are never reloaded or modified.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from client.errors import ClientInputError
from client.runtime.budget import (
    BudgetTooSmallError,
    MemoryPlan,
    footprint_from_checkpoint,
    plan_memory,
)
from client.runtime.interface import (
    POLICIES,
    EvalStats,
    Generation,
    fit_request,
    generate_via_stream,
)
from client.runtime.memory import MemoryMeter, release_free_memory
from client.runtime.quantized import load_quantized
from protocol import LoraShape

__all__ = ["ADAPTER_NAME", "QuantizedRuntime", "lora_parameters", "warm_up_libraries"]

logger = logging.getLogger(__name__)

_DEFAULT_ADAPTER_RANK = 16


def warm_up_libraries() -> None:
    """Import and initialise the libraries, so the baseline includes them (the budget
    covers only what the runtime itself adds)."""
    import bitsandbytes.functional as bnbf
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    with torch.no_grad():
        w = torch.randn(64, 64)
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4")
        x = torch.randn(2, 64)
        _ = x @ bnbf.dequantize_4bit(packed, state).t()


#: PEFT's name for the one adapter a model carries (the default of ``get_peft_model``).
ADAPTER_NAME = "default"


def lora_parameters(peft_model: Any) -> dict[str, Any]:
    """A PEFT model's LoRA parameters by adapter-state name.

    Adapter-state names are PEFT's state-dict names: the parameter names without the
    adapter name (``...q_proj.lora_A.weight``), as bundles and client updates carry them.
    """
    return {
        n.replace(f".{ADAPTER_NAME}.", "."): p
        for n, p in peft_model.named_parameters()
        if ".lora_" in n
    }


def _lora_config(spec: LoraShape) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=cast(int, spec.alpha),  # PEFT annotates int but scales by any number
        lora_dropout=0.0,
        target_modules=list(spec.target_modules) if spec.target_modules else "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


class QuantizedRuntime:
    """NF4 base + optional LoRA adapter, answering requests within ``budget_bytes``.

    Args:
        base_dir: a pre-quantized NF4 checkpoint with tokenizer files.
        budget_bytes: memory the runtime may add (``None``: unbounded, still chunked).
        policy: what to do when a request does not fit the cache (see ``POLICIES``).
        adapter_reserve_bytes: budget kept for the adapter; by default a rank-16 LoRA
            on every linear projection.

    Raises:
        ClientInputError: unknown policy or unusable model directory.
        BudgetTooSmallError: the budget cannot hold the model (before loading it).
    """

    kind = "nf4"

    def __init__(
        self,
        base_dir: Path | str,
        *,
        budget_bytes: int | None = None,
        policy: str = "sliding-window",
        adapter_reserve_bytes: int | None = None,
        device: str = "cpu",
    ) -> None:
        if policy not in POLICIES:
            raise ClientInputError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        self.base_dir = Path(base_dir)
        self.policy = policy
        warm_up_libraries()
        self.meter = MemoryMeter.start()
        footprint = footprint_from_checkpoint(self.base_dir)
        if adapter_reserve_bytes is None:
            per_layer = 2 * footprint.hidden_size * 4 + 3 * (
                footprint.hidden_size + footprint.intermediate_size
            )
            adapter_reserve_bytes = _DEFAULT_ADAPTER_RANK * per_layer * footprint.num_layers * 4
        self.plan: MemoryPlan | None = (
            plan_memory(footprint, budget_bytes, adapter_bytes=adapter_reserve_bytes)
            if budget_bytes is not None
            else None
        )
        self._adapter_reserve = adapter_reserve_bytes
        self._load(device)
        self.load_peak_added_bytes = self.meter.peak_added_bytes()

    def _load(self, device: str) -> None:
        from transformers import AutoTokenizer

        self.model: Any = load_quantized(self.base_dir, device=device, inference_only=True)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.base_dir, local_files_only=True)
        self._peft: Any = None
        self._spec: LoraShape | None = None
        self.adapter_version: int | None = None
        max_pos = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.capacity = min(max_pos, self.plan.kv_capacity_tokens if self.plan else max_pos)
        self.chunk = self.plan.prefill_chunk_tokens if self.plan else 64

    # ------------------------------------------------------------------ adapter
    @property
    def lm(self) -> Any:
        """The module requests run through (the PEFT wrapper once an adapter is set)."""
        return self._peft if self._peft is not None else self.model

    def set_adapter(
        self,
        state: Mapping[str, Any] | None,
        spec: LoraShape | None = None,
        *,
        version: int | None = None,
    ) -> float:
        """Hot-swap the LoRA adapter (``None``: run the bare base). Returns seconds taken.

        Raises:
            ClientInputError: the state does not match the adapter shape.
            BudgetTooSmallError: the adapter is larger than the budget reserved for it.
        """
        import numpy as np
        import torch
        from peft import get_peft_model

        t0 = time.perf_counter()
        if state is None:
            if self._peft is not None:
                self._peft.disable_adapter_layers()
            self.adapter_version = None
            return time.perf_counter() - t0
        if spec is None:
            raise ClientInputError("set_adapter needs the LoraShape of the state")
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in state.items()
        }
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self._adapter_reserve:
            raise BudgetTooSmallError(
                f"adapter of {size} bytes exceeds the {self._adapter_reserve} bytes reserved "
                "for it; create the runtime with a larger adapter_reserve_bytes",
                needed_bytes=size,
            )
        self._check_shapes(tensors, spec)
        if self._peft is None or spec != self._spec:
            if self._peft is not None:
                self.model = self._peft.unload()
            self._peft = get_peft_model(self.model, _lora_config(spec))
            self._peft.eval()
            self._spec = spec
        self._copy_lora_tensors(tensors, spec)
        self._peft.enable_adapter_layers()
        self.adapter_version = version
        return time.perf_counter() - t0

    def _copy_lora_tensors(self, tensors: Mapping[str, Any], spec: LoraShape) -> None:
        """Copy the adapter into the PEFT model's LoRA parameters, by name, in place.

        Not through PEFT's ``set_peft_model_state_dict``: it reads the whole model's
        ``state_dict()``, and bitsandbytes answers that, for a layer repacked for its
        fused CPU kernel (ADR 0010), by unpacking the layer and re-quantizing its scales,
        lossily; the next forward repacks it. Every hot-swap would nudge the base, and
        the same adapter would score differently before and after another one.

        Raises:
            ClientInputError: LoRA tensors missing from the state, or unexpected ones.
        """
        import torch

        assert self._peft is not None
        params = lora_parameters(self._peft)
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ClientInputError(
                f"adapter state does not match rank {spec.rank} on "
                f"{spec.target_modules or 'all linear'}: {len(missing)} tensors missing, "
                f"{len(unexpected)} unexpected (e.g. {(missing or unexpected)[0]})"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].dtype))

    def _check_shapes(self, tensors: Mapping[str, Any], spec: LoraShape) -> None:
        """Validate an adapter against the base's linear layers before touching the model."""
        base = self._peft.get_base_model() if self._peft is not None else self.model
        modules = dict(base.named_modules())
        problems = []
        for name, t in tensors.items():
            stem, _, kind = name.removeprefix("base_model.model.").rpartition(".lora_")
            layer = modules.get(stem)
            if layer is None or not hasattr(layer, "in_features"):
                problems.append(f"{name}: no linear layer {stem!r} in the base")
                continue
            want = (
                (spec.rank, layer.in_features)
                if kind == "A.weight"
                else (layer.out_features, spec.rank)
                if kind == "B.weight"
                else None
            )
            if want is None or tuple(t.shape) != want:
                problems.append(f"{name}: shape {tuple(t.shape)}, expected {want}")
        if problems or not tensors:
            raise ClientInputError(
                f"adapter state does not match rank {spec.rank} on "
                f"{spec.target_modules or 'all linear'} projections of this base: "
                f"{len(problems)} bad tensors (e.g. {problems[0] if problems else 'empty'})"
            )

    # ------------------------------------------------------------------ generation
    def _fit(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], int, str | None]:
        return fit_request(ids, max_new_tokens, capacity=self.capacity, policy=self.policy)

    def _forward(self, tokens: list[int], cache: Any) -> Any:
        import torch

        logits = None
        for i in range(0, len(tokens), self.chunk):
            piece = torch.tensor([tokens[i : i + self.chunk]])
            out = self.lm(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
        return logits

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        stats: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece.

        Raises:
            RequestTooLargeError: the request does not fit and the policy is ``refuse``.
        """
        import torch
        from transformers import DynamicCache

        given = list(self.tokenizer(prompt)["input_ids"])
        ids, max_new, applied = self._fit(given, max_new_tokens)
        gen = torch.Generator().manual_seed(seed)
        self.meter.reset_peak()
        t0 = time.perf_counter()
        tokens, new, emitted, max_cache = list(ids), [], "", 0
        first_token_s = 0.0
        keep = max(1, self.capacity // 2)
        with torch.no_grad():
            cache = DynamicCache(config=self.model.config)
            logits = self._forward(tokens[-self.capacity :], cache)
            max_cache = cache.get_seq_length()
            for _ in range(max_new):
                nxt = self._pick(logits, temperature, gen)
                first_token_s = first_token_s or time.perf_counter() - t0
                tokens.append(nxt)
                new.append(nxt)
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if text[len(emitted) :]:
                    yield text[len(emitted) :]
                    emitted = text
                if nxt == self.tokenizer.eos_token_id or len(new) == max_new:
                    break
                if cache.get_seq_length() + 1 > self.capacity:  # slide: re-encode the tail
                    del cache
                    cache = DynamicCache(config=self.model.config)
                    logits = self._forward(tokens[-keep:], cache)
                else:
                    logits = self._forward([nxt], cache)
                max_cache = max(max_cache, cache.get_seq_length())
            del cache
        release_free_memory()
        if stats is not None:
            stats.update(
                prompt_tokens=len(given),
                new_tokens=len(new),
                policy_applied=applied,
                max_cache_tokens=max_cache,
                seconds=time.perf_counter() - t0,
                first_token_s=first_token_s,
                peak_added_bytes=self.meter.peak_added_bytes(),
            )

    @staticmethod
    def _pick(logits: Any, temperature: float, gen: Any) -> int:
        import torch

        if temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate a continuation of ``prompt`` (greedy unless ``temperature > 0``).

        Raises:
            RequestTooLargeError: the request does not fit and the policy is ``refuse``.
        """
        return generate_via_stream(
            self, prompt, max_new_tokens, temperature=temperature, seed=seed, on_text=on_text
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, texts: list[str]) -> EvalStats:
        """Mean next-token loss and top-1 accuracy, in windows that fit the budget."""
        import torch

        window = self._eval_window()
        total_loss, correct, count = 0.0, 0, 0
        self.meter.reset_peak()
        with torch.no_grad():
            for text in texts:
                ids = self.tokenizer(text)["input_ids"]
                for i in range(0, max(1, len(ids) - 1), window):
                    piece = torch.tensor([ids[i : i + window + 1]])
                    if piece.shape[1] < 2:
                        continue
                    logits = self.lm(input_ids=piece, use_cache=False).logits[0, :-1]
                    target = piece[0, 1:]
                    total_loss += float(
                        torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                    )
                    correct += int((logits.argmax(-1) == target).sum())
                    count += int(target.numel())
        release_free_memory()
        if count == 0:
            return EvalStats(loss=math.nan, accuracy=math.nan, num_tokens=0)
        return EvalStats(loss=total_loss / count, accuracy=correct / count, num_tokens=count)

    def close(self) -> None:
        """Drop the model (its memory is freed at the next collection; idempotent)."""
        self._peft = None
        self.model = None
        release_free_memory()

    def _eval_window(self) -> int:
        if self.plan is None:
            return 128
        fp = footprint_from_checkpoint(self.base_dir)
        room = self.plan.working_bytes + self.plan.kv_bytes
        window = self.capacity
        while (
            window > 8
            and (fp.activation_bytes(window, window) + 3 * window * fp.vocab_size * 4) > room
        ):
            window //= 2
        return window
