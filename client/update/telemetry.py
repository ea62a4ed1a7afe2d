"""⑨ report: telemetry events with idempotent ids, queued on disk while offline.

Each event is one JSON file in ``STATE/telemetry/`` written atomically *before* any
attempt to post it, so a crash or a network outage never loses it; it is deleted only
after the server acknowledged it. ``event_id`` is random and fixed at enqueue time, so
re-posting after a lost answer is stored once by the server (THREATS F27). The server
accepts ``installed`` and ``failed``; the step timeline (downloaded / verified /
applied bytes and timings, reason code) travels in ``detail`` as compact JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.update.errors import UpdateTransientError
from protocol import atomic_write_json, read_json

__all__ = ["TelemetryQueue"]

logger = logging.getLogger(__name__)
_MAX_DETAIL = 500


class TelemetryQueue:
    """Persistent FIFO of events for one device."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def enqueue(
        self,
        kind: str,
        *,
        version: int,
        installed_version: int | None,
        detail: dict[str, Any],
        event_id: str | None = None,
        quality: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Persist a new event and return it.

        ``event_id`` (default: random) lets a step that may run twice across a crash
        report once: the server stores one event per id. ``quality`` (the golden-prompt
        losses of the new and the previous adapter, ``golden_loss`` and
        ``previous_golden_loss``) travels as top-level fields the rollout's quality gate
        reads (ADR 0014).

        Raises:
            OSError: the event could not be written.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        counter = read_json(self.directory / "seq.json") or {"next": 0}
        seq = int(counter["next"])
        atomic_write_json(self.directory / "seq.json", {"next": seq + 1})
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"))
        event = {
            "event_id": event_id or uuid.uuid4().hex,
            "seq": seq,
            "type": kind,
            "version": version,
            "installed_version": installed_version,
            "detail": text[:_MAX_DETAIL],
            **(quality or {}),
        }
        atomic_write_json(self.directory / f"event-{seq:012d}.json", event)
        logger.info("queued %s event for version %d: %s", kind, version, text[:200])
        return event

    def pending(self) -> list[dict[str, Any]]:
        """Queued events, oldest first."""
        events = []
        for path in sorted(self.directory.glob("event-*.json")):
            with contextlib.suppress(ValueError, OSError):
                events.append(read_json(path))
        return events

    def flush(self, post: Callable[[dict[str, Any]], bool]) -> int:
        """Post queued events in order; stop at the first transient failure.

        Args:
            post: Posts one event; ``True`` if acknowledged, ``False`` if refused for
                good; raises ``UpdateTransientError`` when offline.

        Returns:
            How many events left the queue.
        """
        sent = 0
        for path in sorted(self.directory.glob("event-*.json")):
            try:
                event = read_json(path)
            except (ValueError, OSError):
                path.unlink()
                continue
            try:
                post(event)
            except UpdateTransientError as e:
                logger.info("telemetry stays queued (%d pending): %s", len(self.pending()), e)
                break
            path.unlink()
            sent += 1
        return sent
