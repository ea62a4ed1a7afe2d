"""⑧ infer: the one small interface every device runtime backend implements.

Two backends answer it (DESIGN decision 11):

* ``llamacpp`` — llama.cpp over a GGUF base (``client.runtime.llamacpp``): what phones
  run; torch-free.
* ``nf4`` — transformers + bitsandbytes NF4 + PEFT (``client.runtime.runtime``): the
  reference, shared with on-device training.

The update agent's health check, the fleet simulation and ``fedota device infer`` only
use what :class:`DeviceRuntime` names, and pick a backend with
``client.runtime.open_runtime`` (``client.runtime.backend``, which imports both backends:
this module imports neither, so that they can import it).

This module imports nothing heavy: neither torch nor llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

from client.errors import ClientError
from client.runtime.budget import MemoryPlan
from client.runtime.memory import MemoryMeter
from protocol import LoraShape

__all__ = [
    "POLICIES",
    "RUNTIME_KINDS",
    "DeviceRuntime",
    "EvalStats",
    "Generation",
    "RequestTooLargeError",
    "RuntimeKind",
    "fit_request",
]

POLICIES = ("sliding-window", "truncate", "refuse")
RuntimeKind = Literal["llamacpp", "nf4"]
RUNTIME_KINDS: tuple[RuntimeKind, ...] = get_args(RuntimeKind)


class RequestTooLargeError(ClientError):
    """A request does not fit the KV cache and the policy is ``refuse``."""

    exit_code = 3


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
        spec: LoraShape | None = None,
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
