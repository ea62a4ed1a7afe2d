"""⑦ apply, gate: the health check a staged adapter must pass before it is committed.

The agent depends only on the ``HealthChecker`` Protocol; the runtime-backed checker
(golden prompts under the device's memory budget) is plugged in by
``default_checker``. ``GoldenLossChecker`` holds the decision rule:

* structural checks first (every tensor finite, layout equal to the manifest's);
* then the runtime measures the golden-prompt loss and peak added memory; the check
  passes only if ``loss <= expected * (1 + rel_tol) + abs_tol`` and
  ``peak_bytes <= budget_bytes``, where ``expected`` is the manifest's
  ``provenance.eval_metrics["loss"]`` (or ``"eval_loss"``).

Fail closed: without a measurement (no golden prompts provisioned), or without an
expected loss, the check fails and the update rolls back (THREATS E22) — no checker
here ever passes by default. ``runtime_measure`` is the measurement backed by the
device's runtime backend (llama.cpp or NF4, ``client.runtime.open_runtime``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from client.update.errors import DeviceStateError
from client.update.state import DeviceState
from delta_packager import AdapterState, Manifest

__all__ = [
    "GOLDEN_FILE",
    "GoldenLossChecker",
    "HealthChecker",
    "HealthReport",
    "Measurement",
    "default_checker",
    "expected_loss",
    "read_golden",
    "runtime_measure",
    "structural_problem",
]

logger = logging.getLogger(__name__)
GOLDEN_FILE = "golden_prompts.json"


@dataclass(frozen=True)
class HealthReport:
    """Outcome of a health check, with the values measured (reported on rollback)."""

    ok: bool
    measured_loss: float | None
    expected_loss: float | None
    peak_bytes: int | None
    reason: str


@dataclass(frozen=True)
class Measurement:
    """What the runtime measured with the staged adapter attached."""

    loss: float
    peak_bytes: int


class HealthChecker(Protocol):
    """Decides whether a staged adapter may be committed."""

    def check(self, adapter: AdapterState, manifest: Manifest) -> HealthReport:
        """Run the check; never raise for a failing adapter, return ``ok=False``."""
        ...


def expected_loss(manifest: Manifest) -> float | None:
    """The golden-prompt loss the release declares, if any."""
    metrics = manifest.provenance.eval_metrics
    for key in ("loss", "eval_loss", "golden_loss"):
        value = metrics.get(key)
        if value is not None and math.isfinite(value):
            return float(value)
    return None


def structural_problem(adapter: AdapterState, manifest: Manifest) -> str | None:
    """Why the adapter cannot even be loaded, or ``None``."""
    if set(adapter.tensors) != set(manifest.shapes):
        return "adapter tensors differ from the manifest's layout"
    for name, array in adapter.tensors.items():
        if tuple(array.shape) != tuple(manifest.shapes[name]):
            want = list(manifest.shapes[name])
            return f"tensor {name} has shape {list(array.shape)}, manifest {want}"
        if array.size and not np.isfinite(array).all():
            return f"tensor {name} has NaN or Inf values"
    return None


@dataclass(frozen=True)
class GoldenLossChecker:
    """Golden-prompt loss within tolerance of the manifest's, under the memory budget.

    Attributes:
        measure: Runs the golden prompts with the adapter attached; ``None`` when no
            runtime is available (then every check fails closed).
        budget_bytes: The device's memory budget for the runtime.
        rel_tol: Relative tolerance on the loss.
        abs_tol: Absolute tolerance on the loss.
    """

    measure: Callable[[AdapterState, Manifest], Measurement] | None
    budget_bytes: int
    rel_tol: float = 0.05
    abs_tol: float = 0.05

    def check(self, adapter: AdapterState, manifest: Manifest) -> HealthReport:
        """See the module docstring."""
        expected = expected_loss(manifest)
        problem = structural_problem(adapter, manifest)
        if problem is not None:
            return HealthReport(False, None, expected, None, f"unloadable: {problem}")
        if self.measure is None:
            return HealthReport(
                False,
                None,
                expected,
                None,
                "no golden prompts provisioned for the runtime health check (enroll "
                "with --golden FILE); failing closed",
            )
        if expected is None:
            return HealthReport(
                False,
                None,
                None,
                None,
                "release manifest declares no eval loss to compare against; failing closed",
            )
        try:
            got = self.measure(adapter, manifest)
        except Exception as e:  # a runtime crash on load is a failed check, not our crash
            logger.warning("health measurement raised %s", e, exc_info=True)
            return HealthReport(
                False, None, expected, None, f"runtime failed: {type(e).__name__}: {e}"
            )
        limit = expected * (1 + self.rel_tol) + self.abs_tol
        if not math.isfinite(got.loss) or got.loss > limit:
            reason = f"golden loss {got.loss:.4f} above {limit:.4f} (expected {expected:.4f})"
            return HealthReport(False, got.loss, expected, got.peak_bytes, reason)
        if got.peak_bytes > self.budget_bytes:
            reason = f"peak {got.peak_bytes} bytes above the budget of {self.budget_bytes}"
            return HealthReport(False, got.loss, expected, got.peak_bytes, reason)
        return HealthReport(True, got.loss, expected, got.peak_bytes, "ok")


def runtime_measure(
    base: Path,
    *,
    budget_bytes: int,
    texts: Sequence[str],
    cache_dir: Path | None = None,
) -> Callable[[AdapterState, Manifest], Measurement]:
    """A ``measure`` backed by the device's runtime (``client.runtime.open_runtime``):
    load the base under ``budget_bytes`` — a ``.gguf`` file on llama.cpp, an NF4
    directory on the NF4 runtime — attach the staged adapter, and take the mean
    next-token loss over the golden ``texts`` and the peak memory the runtime added."""

    def measure(adapter: AdapterState, manifest: Manifest) -> Measurement:
        from client.runtime import open_runtime

        spec = manifest.adapter_config.as_shape()
        adapter_bytes = sum(int(a.nbytes) for a in adapter.tensors.values())
        runtime = open_runtime(
            base,
            budget_bytes=budget_bytes,
            adapter_reserve_bytes=adapter_bytes,
            cache_dir=cache_dir,
        )
        try:
            runtime.set_adapter(dict(adapter.tensors), spec, version=adapter.version)
            stats = runtime.evaluate(list(texts))
            peak = max(runtime.load_peak_added_bytes, runtime.meter.peak_added_bytes())
        finally:
            runtime.close()
        return Measurement(loss=stats.loss, peak_bytes=int(peak))

    return measure


def read_golden(state: DeviceState) -> list[str] | None:
    """The golden prompts provisioned at enrollment (``STATE/golden_prompts.json``).

    Raises:
        DeviceStateError: the file exists but is not a JSON list of strings.
    """
    path = state.root / GOLDEN_FILE
    if not path.exists():
        return None
    try:
        texts = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DeviceStateError(f"{path} is unreadable: {e}") from e
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise DeviceStateError(f"{path} must be a non-empty JSON list of strings")
    return texts


def default_checker(state: DeviceState) -> HealthChecker:
    """The checker ``fedota device update`` uses.

    Golden prompts provisioned at enrollment (``--golden``) are run by the device's
    runtime (llama.cpp for a GGUF base, NF4 otherwise) under the device's budget.
    Without them the checker still runs the structural checks and fails closed.

    Raises:
        DeviceStateError: the device is not enrolled, or its golden prompts are malformed.
    """
    config = state.read_config()
    texts = read_golden(state)
    measure = None
    if texts is not None:
        measure = runtime_measure(
            Path(config.base_dir),
            budget_bytes=config.memory_budget_bytes,
            texts=texts,
            cache_dir=state.runtime_cache_dir,
        )
    return GoldenLossChecker(measure=measure, budget_bytes=config.memory_budget_bytes)
