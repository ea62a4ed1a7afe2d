"""⑧ infer: the one small interface every device runtime backend implements.

Two backends answer it (DESIGN decision 11):

* ``llamacpp`` — llama.cpp over a GGUF base (``client.runtime.llamacpp``): what phones
  run; torch-free.
* ``nf4`` — transformers + bitsandbytes NF4 + PEFT (``client.runtime.runtime``): the
  reference, shared with on-device training.

The update agent's health check, the fleet simulation and ``fedota device infer`` only
use what :class:`DeviceRuntime` names, and pick a backend with :func:`open_runtime`.
The base's form decides the backend: a ``.gguf`` file is run by llama.cpp, a
pre-quantized checkpoint directory by the NF4 runtime.

This module imports nothing heavy: neither torch nor llama.cpp.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from client.errors import ClientError, ClientInputError
from client.runtime.budget import MemoryPlan
from client.runtime.memory import MemoryMeter

__all__ = [
    "POLICIES",
    "RUNTIME_KINDS",
    "AdapterSpec",
    "DeviceRuntime",
    "EvalStats",
    "Generation",
    "RequestTooLargeError",
    "RuntimeKind",
    "fit_request",
    "open_runtime",
    "runtime_kind_of",
]

POLICIES = ("sliding-window", "truncate", "refuse")
RuntimeKind = Literal["llamacpp", "nf4"]
RUNTIME_KINDS: tuple[RuntimeKind, ...] = get_args(RuntimeKind)


class RequestTooLargeError(ClientError):
    """A request does not fit the KV cache and the policy is ``refuse``."""

    exit_code = 3


@dataclass(frozen=True)
class AdapterSpec:
    """The LoRA shape an adapter state belongs to (from the bundle manifest)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] | None = None  # None: all linear projections


@dataclass(frozen=True)
class Generation:
    """One answered request."""

    text: str
    prompt_tokens: int  # as given, before any truncation
    new_tokens: int
    policy_applied: str | None
    peak_added_bytes: int
    seconds: float
    max_cache_tokens: int
    first_token_s: float = 0.0  # time to the first generated token (prefill included)


@dataclass(frozen=True)
class EvalStats:
    """Next-token loss and top-1 accuracy over some texts."""

    loss: float
    accuracy: float
    num_tokens: int


class DeviceRuntime(Protocol):
    """What the update agent, the fleet and the CLI need of a runtime backend.

    Attributes:
        kind: ``"llamacpp"`` or ``"nf4"``.
        plan: How the memory budget is spent (``None``: no budget).
        meter: Measures the memory the runtime adds over its baseline.
        load_peak_added_bytes: Peak added while loading the base.
        adapter_version: Version of the attached adapter (``None``: bare base).
        capacity: Most tokens the KV cache holds.
    """

    kind: str
    plan: MemoryPlan | None
    meter: MemoryMeter
    load_peak_added_bytes: int
    adapter_version: int | None
    capacity: int

    def set_adapter(
        self,
        state: Mapping[str, Any] | None,
        spec: AdapterSpec | None = None,
        *,
        version: int | None = None,
    ) -> float:
        """Hot-swap the LoRA adapter (``None``: bare base); returns seconds taken."""
        ...

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        stats: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Yield generated text piece by piece; fill ``stats`` at the end."""
        ...

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate a continuation of ``prompt``."""
        ...

    def evaluate(self, texts: list[str]) -> EvalStats:
        """Mean next-token loss and top-1 accuracy over ``texts``."""
        ...

    def close(self) -> None:
        """Release the model and its buffers (idempotent)."""
        ...


def generate_via_stream(
    runtime: DeviceRuntime,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float,
    seed: int,
    on_text: Callable[[str], None] | None,
) -> Generation:
    """``generate`` written once over a backend's ``stream``."""
    stats: dict[str, Any] = {}
    parts = []
    for piece in runtime.stream(
        prompt, max_new_tokens, temperature=temperature, seed=seed, stats=stats
    ):
        parts.append(piece)
        if on_text is not None:
            on_text(piece)
    return Generation(text="".join(parts), **stats)


def fit_request(
    ids: list[int], max_new_tokens: int, *, capacity: int, policy: str
) -> tuple[list[int], int, str | None]:
    """Apply the declared policy to a request that may not fit the cache (THREATS H40).

    Returns the prompt ids to use, the new-token limit and the policy applied (``None``
    when the request fits as it is). ``sliding-window`` keeps the whole prompt: the
    backend re-encodes the newest tokens whenever the cache is full.

    Raises:
        RequestTooLargeError: the request does not fit and the policy is ``refuse``.
    """
    if len(ids) + max_new_tokens <= capacity:
        return ids, max_new_tokens, None
    if policy == "refuse":
        raise RequestTooLargeError(
            f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens needs a "
            f"{len(ids) + max_new_tokens}-token cache; the memory budget allows "
            f"{capacity}; shorten the prompt, lower max_new_tokens, raise the budget "
            "or use policy 'truncate' / 'sliding-window'"
        )
    if policy == "truncate":
        new = min(max_new_tokens, capacity - 1)
        return ids[-(capacity - new) :], new, "truncate"
    return ids, max_new_tokens, "sliding-window"


def runtime_kind_of(base: Path | str) -> RuntimeKind:
    """The backend a base runs on: a ``.gguf`` file → llama.cpp, a directory → NF4.

    Raises:
        ClientInputError: the path is neither.
    """
    path = Path(base)
    if path.is_file() and path.suffix == ".gguf":
        return "llamacpp"
    if path.is_dir():
        return "nf4"
    raise ClientInputError(
        f"base {path} is neither a .gguf file (llama.cpp runtime) nor a pre-quantized "
        "NF4 checkpoint directory; export one with `fedota base-model export`"
    )


_NF4_RUNTIME_MODULES = ("torch", "transformers", "bitsandbytes")


def open_runtime(
    base: Path | str,
    *,
    budget_bytes: int | None = None,
    policy: str = "sliding-window",
    adapter_reserve_bytes: int | None = None,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> DeviceRuntime:
    """Load ``base`` on the backend its form calls for (see :func:`runtime_kind_of`).

    Args:
        base: A ``.gguf`` file or a pre-quantized NF4 checkpoint directory.
        budget_bytes: Memory the runtime may add (``None``: unbounded).
        policy: What to do when a request does not fit the cache (``POLICIES``).
        adapter_reserve_bytes: Budget kept for the adapter (default: a rank-16 LoRA).
        threads: CPU threads for llama.cpp (``None``: its default for this device).
        cache_dir: Where llama.cpp keeps the GGUF LoRAs it materialises.

    Raises:
        ClientInputError: unknown policy, or an unusable base.
        BudgetTooSmallError: the budget cannot hold the base (before loading it).
    """
    if runtime_kind_of(base) == "llamacpp":
        from client.runtime.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime(
            base,
            budget_bytes=budget_bytes,
            policy=policy,
            adapter_reserve_bytes=adapter_reserve_bytes,
            threads=threads,
            cache_dir=cache_dir,
        )
    # The torch-free device install has no NF4 runtime: say so before importing it.
    missing = [m for m in _NF4_RUNTIME_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ClientInputError(
            f"{base} is an NF4 checkpoint, and the NF4 runtime needs the train extra "
            f"({', '.join(missing)} not installed): pip install 'fedota[train]', or export "
            "a GGUF base with `fedota base-model export` and use the llama.cpp runtime"
        )
    from client.runtime.runtime import QuantizedRuntime

    return QuantizedRuntime(
        base,
        budget_bytes=budget_bytes,
        policy=policy,
        adapter_reserve_bytes=adapter_reserve_bytes,
    )
