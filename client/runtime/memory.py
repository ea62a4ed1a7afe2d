"""Measuring the memory the runtime adds: peak RSS minus RSS before loading.

Linux exposes the process's peak resident set (``VmHWM``) and lets a process reset it
(``/proc/self/clear_refs`` with ``5``), so a peak can be measured per request without
sampling. glibc is asked to return large freed blocks to the kernel (fixed mmap
threshold, ``malloc_trim``) so that RSS reflects what is live, not allocator slack.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MemoryMeter", "process_rss_bytes", "release_free_memory"]

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        try:
            lib = ctypes.CDLL(name)
            lib.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)  # big blocks: mmap, freed eagerly
            lib.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024)
            _libc = lib
        except (OSError, AttributeError):
            return None
    return _libc


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def _read_status(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not found in {_STATUS}")
    return int(match.group(1)) * 1024


def process_rss_bytes() -> int:
    """Current resident set size of this process, in bytes (Linux)."""
    return _read_status("VmRSS")


@dataclass
class MemoryMeter:
    """Peak memory added on top of a baseline taken before the runtime allocates."""

    baseline_bytes: int
    supported: bool = True

    @classmethod
    def start(cls) -> MemoryMeter:
        """Take the baseline now (call before loading the model)."""
        if not _STATUS.is_file():
            logger.warning("no /proc/self/status: memory is planned but not measured")
            return cls(0, supported=False)
        _glibc()
        gc.collect()  # garbage freed later would otherwise dip below the baseline
        release_free_memory()
        meter = cls(process_rss_bytes())
        meter.reset_peak()
        return meter

    def reset_peak(self) -> None:
        """Start a new peak window (``VmHWM`` := current RSS)."""
        if self.supported:
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                self.supported = False

    def peak_added_bytes(self) -> int:
        """Peak RSS since the last reset, minus the baseline (0 when unsupported)."""
        if not self.supported:
            return 0
        return max(0, _read_status("VmHWM") - self.baseline_bytes)

    def current_added_bytes(self) -> int:
        """RSS now, minus the baseline (0 when unsupported)."""
        return max(0, process_rss_bytes() - self.baseline_bytes) if self.supported else 0
