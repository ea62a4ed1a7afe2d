"""⑧ infer: which backend runs a base, and opening it there.

:func:`runtime_kind_of` reads the base's form (a ``.gguf`` file → llama.cpp, a
pre-quantized checkpoint directory → NF4) and :func:`open_runtime` loads it on that
backend. This module sits above both backends (``llamacpp``, ``runtime``) and the
interface they implement (``interface``), which import neither it nor each other, so
none of them takes part in an import cycle. Public names: ``client.runtime``.

Importing this module loads neither torch nor llama.cpp: each backend is imported when
a base is opened on it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from client.errors import ClientInputError
from client.runtime.interface import DeviceRuntime, RuntimeKind

__all__ = ["open_runtime", "runtime_kind_of"]


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
