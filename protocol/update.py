"""The update vocabulary the phone and the OTA server share.

A release is a chain of bundle steps, each :class:`ReleaseKind`; a phone reports what
became of a release as an :class:`EventType` event (ADR 0007 has the outcome table).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["EventType", "ReleaseKind"]


class ReleaseKind(StrEnum):
    """What a bundle (or one step of it) carries."""

    FULL = "full"  # the whole adapter: applies to any state
    DELTA = "delta"  # the change from one version: applies to that version only


class EventType(StrEnum):
    """What a phone reports about a release it was offered."""

    INSTALLED = "installed"  # verified, healthy, committed
    FAILED = "failed"  # refused or rolled back: counts against the rollout
    RETRY = "retry"  # a transient failure (network, disk): the phone tries again later
