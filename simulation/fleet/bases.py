"""The bases the fleet's phones hold, one per runtime, and the foreign one (fault).

A phone on the NF4 runtime holds the pre-quantized checkpoint the clients train on; a
phone on llama.cpp holds a GGUF export of it (made from the dequantized NF4 weights,
ADR 0011). Each form has its own fingerprint, and every release names both (DESIGN
decision 2: a bundle is bound to the bases it was made for, and only to them).

The ``other_base`` fault needs a base with another fingerprint on each runtime: the
NF4 copy with a changed tokenizer config (``faults.other_base``), and for llama.cpp
the same checkpoint exported at another quantization, which is what a phone holding
a different GGUF of the same model looks like. Neither may ever be offered a bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from delta_packager import fingerprint_checkpoint, fingerprint_gguf
from simulation.fleet.faults import other_base

__all__ = ["BaseCopy", "FleetBases", "prepare_bases"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseCopy:
    """One base on disk and the fingerprint bundles bind to."""

    path: Path
    fingerprint: str


@dataclass(frozen=True)
class FleetBases:
    """The fleet's base and the foreign one, per runtime (``nf4``, ``llamacpp``).

    Attributes:
        fleet: Runtime -> the base every healthy phone on that runtime holds.
        other: Runtime -> the base of the ``other_base`` fault on that runtime.
    """

    fleet: dict[str, BaseCopy]
    other: dict[str, BaseCopy]

    def held_by(self, runtime: str, *, other: bool = False) -> BaseCopy:
        """The base a phone on ``runtime`` holds (``other``: the foreign one)."""
        return (self.other if other else self.fleet)[runtime]

    @property
    def compatible(self) -> tuple[str, ...]:
        """Fingerprints every release names besides the NF4 checkpoint's."""
        primary = self.fleet["nf4"].fingerprint
        return tuple(sorted({b.fingerprint for b in self.fleet.values()} - {primary}))


def _other_quant(quant: str) -> str:
    return "q4_0" if quant != "q4_0" else "q8_0"


def _gguf(base_dir: Path, out_dir: Path, quant: str, stage: Callable[[str], None]) -> BaseCopy:
    """The GGUF export of ``base_dir`` at ``quant``, made once per base and reused."""
    from client.runtime import export_gguf

    key = fingerprint_checkpoint(base_dir).removeprefix("sha256:")[:16]
    path = out_dir / f"base-{key}-{quant}.gguf"
    if path.is_file():  # written atomically, so a file that exists is whole
        return BaseCopy(path, fingerprint_gguf(path))
    stage(f"exporting the base to GGUF ({quant}) for the llama.cpp phones")
    info = export_gguf(base_dir, path, quant=quant, source="nf4", threads=1)
    return BaseCopy(path, info.fingerprint)


def prepare_bases(
    base_dir: Path,
    work_dir: Path,
    *,
    runtimes: Sequence[str],
    gguf_quant: str = "q8_0",
    on_stage: Callable[[str], None] | None = None,
) -> FleetBases:
    """Make (or reuse) every base the fleet's runtimes need under ``work_dir``.

    Args:
        base_dir: The pre-quantized NF4 checkpoint the clients train on.
        work_dir: Where the foreign NF4 copy and the GGUF exports are kept.
        runtimes: The runtimes the fleet's tiers use.
        gguf_quant: Quantization of the llama.cpp phones' GGUF.
        on_stage: Progress callback (one short line per export).

    Raises:
        ClientInputError: the base cannot be exported to GGUF (unsupported family).
        LlamaCppError: llama.cpp could not quantize or load the export.
    """
    stage = on_stage or (lambda text: logger.info("%s", text))
    alt = other_base(base_dir, work_dir / "other-base")
    fleet = {"nf4": BaseCopy(base_dir, fingerprint_checkpoint(base_dir))}
    other = {"nf4": BaseCopy(alt, fingerprint_checkpoint(alt))}
    if "llamacpp" in runtimes:
        gguf_dir = work_dir / "gguf"
        fleet["llamacpp"] = _gguf(base_dir, gguf_dir, gguf_quant, stage)
        other["llamacpp"] = _gguf(base_dir, gguf_dir, _other_quant(gguf_quant), stage)
    return FleetBases(fleet, other)
