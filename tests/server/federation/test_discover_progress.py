"""Discovery times out on a stall, not on a slow but steady population.

10,000 simulated nodes on two Ray actors answer the identity query steadily but take
longer in total than ``connect_timeout_s``; discovery must wait for them, and still give
up when replies stop coming. ``DripGrid`` releases the loopback replies one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Message

from server.federation import FederationConfig, rounds
from server.federation.rounds import FederationError, discover
from tests.server.federation.fed_fakes import (
    LoopbackGrid,
    fake_phone_app,
    initial_adapter,
    make_grid,
)

TIMEOUT_S = 0.3
EVERY_S = 0.1  # one reply per 0.1 s: 9 nodes take 0.9 s, three times the timeout


class DripGrid(LoopbackGrid):
    """A loopback grid whose replies become pullable one per ``every_s`` after a push.

    ``stop_after``: replies released per push before the grid goes silent (None: all).
    ``send_and_receive`` bounds the whole exchange, as Flower's grids do.
    """

    def __init__(self, grid: LoopbackGrid, *, every_s: float, stop_after: int | None) -> None:
        super().__init__(grid.apps)
        self.every_s = every_s
        self.stop_after = stop_after
        self._order: list[str] = []
        self._pushed_at = 0.0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._order = list(super().push_messages(messages))
        self._pushed_at = time.monotonic()
        return self._order

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        due = int((time.monotonic() - self._pushed_at) / self.every_s)
        if self.stop_after is not None:
            due = min(due, self.stop_after)
        released = set(self._order[:due])
        return [self._replies.pop(m) for m in message_ids if m in released and m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while ids and time.monotonic() < end:
            got = list(self.pull_messages(ids))
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            replies.extend(got)
            time.sleep(0.01)
        return replies


def drip_grid(*, stop_after: int | None = None) -> DripGrid:
    loopback = make_grid(fake_phone_app(ffa=True), num_train=8, num_heldout=1)
    return DripGrid(loopback, every_s=EVERY_S, stop_after=stop_after)


def cfg(**kw: Any) -> FederationConfig:
    return FederationConfig(dp_mode="none", connect_timeout_s=TIMEOUT_S, **kw)


def test_slow_but_steady_replies_identify_every_node() -> None:
    start = time.monotonic()
    population, adapter = discover(drip_grid(), cfg(num_nodes=9))
    elapsed = time.monotonic() - start
    assert sorted(population.train) == [f"c{i}" for i in range(8)]
    assert sorted(population.heldout) == ["h8"]
    assert adapter.keys() == initial_adapter().keys()
    assert elapsed > 2 * TIMEOUT_S  # the replies really took longer than the timeout


def test_a_grid_that_goes_silent_fails_after_the_timeout_of_no_progress() -> None:
    start = time.monotonic()
    with pytest.raises(FederationError, match=r"discovery stalled: 3 of 9 nodes answered"):
        discover(drip_grid(stop_after=3), cfg())
    elapsed = time.monotonic() - start
    last_reply_s = 3 * EVERY_S
    assert last_reply_s + TIMEOUT_S <= elapsed < last_reply_s + TIMEOUT_S + 1.0


def test_progress_is_logged_while_nodes_answer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(rounds, "_PROGRESS_LOG_INTERVAL_S", 0.25)
    with caplog.at_level(logging.INFO, logger=rounds.__name__):
        discover(drip_grid(), cfg())
    progress = [r.getMessage() for r in caplog.records if "nodes answered" in r.getMessage()]
    assert progress and all(m.startswith("identity: ") for m in progress[:2])
    assert any(m.endswith(" of 9 nodes answered") for m in progress)
