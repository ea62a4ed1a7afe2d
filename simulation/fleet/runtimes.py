"""⑧ infer, shared: one device runtime per (base, memory budget), not per device.

A simulated phone owns no model: every device of a tier on one base uses the same
runtime and hot-swaps its adapter in, as a phone switching adapters does: the NF4
runtime copies LoRA tensors into PEFT's layers, the llama.cpp runtime loads a GGUF LoRA
next to the base once and switches to it with ``llama_set_adapters_lora``. The base
decides the runtime (``client.runtime.open_runtime``: a ``.gguf`` file runs on
llama.cpp, a checkpoint directory on NF4). Memory therefore grows with the number
of tiers and bases, never with the number of devices.

Peak memory is attributed per runtime, not per process: the runtime's resident bytes
(measured right after it loaded, against its own meter's baseline), plus the adapter's
bytes, plus the transient peak of the request (``VmHWM`` since the request began minus the RSS when
it began). Other runtimes living in the same process therefore never count against a
device's budget, and nothing a device does is hidden from it.

``lightweight`` pools memoise golden-prompt measurements per (base, budget, adapter
digest): the result of a deterministic computation is shared, so a large fleet runs the
update protocol with one inference per release and tier instead of one per device.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.runtime import open_runtime, runtime_kind_of
from client.update import Measurement
from delta_packager import AdapterState, Manifest
from protocol import LoraShape

__all__ = ["EvalResult", "RuntimePool", "adapter_digest"]

logger = logging.getLogger(__name__)


def adapter_digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes and float32 bytes of an adapter (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype=np.float32)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy over some texts, with the peak memory the runtime added."""

    loss: float
    accuracy: float
    peak_bytes: int
    tokens: int


class _Shared:
    """One loaded runtime and its resident footprint."""

    def __init__(
        self, base: Path, budget_bytes: int | None, reserve_bytes: int, threads: int | None
    ) -> None:
        self.runtime = open_runtime(
            base, budget_bytes=budget_bytes, adapter_reserve_bytes=reserve_bytes, threads=threads
        )
        # The meter's baseline is taken after the libraries are imported, before loading.
        self.resident_bytes = int(self.runtime.meter.current_added_bytes())
        self.load_peak_bytes = int(self.runtime.load_peak_added_bytes)


class RuntimePool:
    """Shared runtimes keyed by (base, budget); the base is a GGUF file or NF4 directory.

    Args:
        adapter_reserve_bytes: Budget each runtime keeps for the adapter.
        lightweight: Memoise golden measurements per (base, budget, adapter digest).
        threads: Threads for torch's intra-op pool and for llama.cpp (``None``:
            leave as is). Many tiny evaluations run fastest on one thread, and a phone
            has few cores anyway.
    """

    def __init__(
        self,
        *,
        adapter_reserve_bytes: int = 4 * 2**20,
        lightweight: bool = False,
        threads: int | None = 1,
    ) -> None:
        self.threads = threads
        self.adapter_reserve_bytes = adapter_reserve_bytes
        self.lightweight = lightweight
        self._runtimes: dict[tuple[str, int | None], _Shared] = {}
        self._memo: dict[tuple[str, int | None, str], EvalResult] = {}
        self.inferences = 0

    def _get(self, base_dir: Path, budget_bytes: int | None) -> _Shared:
        key = (str(base_dir), budget_bytes)
        shared = self._runtimes.get(key)
        if shared is None:
            if self.threads is not None and runtime_kind_of(base_dir) == "nf4":
                import torch

                torch.set_num_threads(self.threads)
            logger.info("loading a shared runtime for %s under budget %s", base_dir, budget_bytes)
            shared = self._runtimes[key] = _Shared(
                base_dir, budget_bytes, self.adapter_reserve_bytes, self.threads
            )
        return shared

    def evaluate(
        self,
        base_dir: Path,
        budget_bytes: int | None,
        adapter: dict[str, np.ndarray] | None,
        config: LoraShape | None,
        texts: Sequence[str],
        *,
        version: int | None = None,
    ) -> EvalResult:
        """Attach ``adapter`` (``None``: bare base) and evaluate ``texts`` under the budget.

        Raises:
            BudgetTooSmallError: the budget cannot hold the base and the adapter.
            ClientInputError: the adapter does not fit the base's layers.
        """
        from client.runtime import process_rss_bytes

        shared = self._get(base_dir, budget_bytes)
        runtime = shared.runtime
        if adapter is None or config is None:
            runtime.set_adapter(None)
        else:
            runtime.set_adapter(dict(adapter), config.as_shape(), version=version)
        start_rss = process_rss_bytes()
        stats = runtime.evaluate(list(texts))  # resets VmHWM before it starts
        meter = runtime.meter
        transient = max(0, meter.peak_added_bytes() + meter.baseline_bytes - start_rss)
        self.inferences += 1
        adapter_bytes = sum(int(np.asarray(a).nbytes) for a in (adapter or {}).values())
        peak = max(shared.load_peak_bytes, shared.resident_bytes + adapter_bytes + transient)
        return EvalResult(stats.loss, stats.accuracy, int(peak), stats.num_tokens)

    def golden(
        self,
        base_dir: Path,
        budget_bytes: int | None,
        adapter: dict[str, np.ndarray],
        config: LoraShape,
        texts: Sequence[str],
    ) -> EvalResult:
        """Golden-prompt evaluation, memoised per adapter digest in lightweight pools.

        Raises:
            BudgetTooSmallError: the budget cannot hold the base and the adapter.
        """
        if not self.lightweight:
            return self.evaluate(base_dir, budget_bytes, adapter, config, texts)
        key = (str(base_dir), budget_bytes, adapter_digest(adapter))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self.evaluate(base_dir, budget_bytes, adapter, config, texts)
        return hit

    def measure_fn(
        self, base_dir: Path, budget_bytes: int, texts: Sequence[str]
    ) -> Callable[[AdapterState, Manifest], Measurement]:
        """A ``GoldenLossChecker.measure`` running on this pool's shared runtime."""

        def measure(adapter: AdapterState, manifest: Manifest) -> Measurement:
            got = self.golden(
                base_dir, budget_bytes, dict(adapter.tensors), manifest.adapter_config, texts
            )
            loss = got.loss if math.isfinite(got.loss) else math.inf
            return Measurement(loss=loss, peak_bytes=got.peak_bytes)

        return measure

    def stats(self) -> dict[str, Any]:
        """How many runtimes are loaded and how many evaluations ran."""
        return {"runtimes": len(self._runtimes), "inferences": self.inferences}

    def close(self) -> None:
        """Close every runtime (llama.cpp frees its model, context and LoRA files)."""
        for shared in self._runtimes.values():
            shared.runtime.close()
        self._runtimes.clear()
        self._memo.clear()
