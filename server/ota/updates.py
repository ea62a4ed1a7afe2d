"""The update check: which bundle, if any, moves this device to its assigned version.

The decision is pure (:func:`server.ota.domain.select_target`); this module gathers its
inputs. It is the hottest path of the service (every device polls it), so:

* one query authenticates the device, reads its last report, the versions it reported
  as failed, and the ``ota_state.generation`` stamp — compiled once and run on a bare
  pooled DBAPI cursor (:meth:`server.ota.database.Database.hot_rows`);
* active rollouts and the current release's bundles are cached per process as a
  :class:`FleetState` labelled with the generation it was read at, both indexed by
  every base they reach: a bundle under its primary and each compatible base, a
  rollout of ``(b, v)`` under every base that a current bundle of ``v`` for ``b``
  names — so a device on any named base is a dictionary lookup. Every release and
  every rollout transition bumps the generation in its own transaction, so a request
  that sees generation G uses a cache at least as new as G — a pause stops offers on
  every worker from the moment it commits;
* nothing about the device itself is cached: a revoked token fails on the next check;
* only a device whose report differs from the stored one costs a write (and a re-read);
* checks run on a small executor of their own, as many threads as the hot connection
  pool has connections, so a burst queues on the event loop instead of opening
  connections or crowding the interpreter with runnable threads.

The generation is read *before* the state it labels, so a cache can be newer than its
label (harmless: it is reloaded once more) but never older.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.engine import Connection

from server.ota.database import Database
from server.ota.devices import apply_report, check_device_row, hash_token, report_from_columns
from server.ota.domain import BundleTarget, DeviceReport, RolloutState, select_target
from server.ota.inventory import SeenTracker
from server.ota.models import (
    DeviceRow,
    DeviceVersionRow,
    OtaStateRow,
    ReleaseRow,
    RolloutRow,
    TargetBaseRow,
    TargetRow,
)
from server.ota.releases import bundle_of, compatible_bases_query, group_compatible
from server.ota.rollouts import assigned_in

_GENERATION = select(OtaStateRow.generation).where(OtaStateRow.id == 1)
# One row per failed version (at least one row: the outer join keeps a device with none).
_CHECK = (
    select(
        DeviceRow.id,
        DeviceRow.revoked_at,
        DeviceRow.base_fingerprint,
        DeviceRow.installed_version,
        DeviceRow.capabilities,
        DeviceRow.memory_budget_bytes,
        _GENERATION.scalar_subquery().label("generation"),
        DeviceVersionRow.version.label("failed_version"),
    )
    .outerjoin(
        DeviceVersionRow,
        and_(DeviceVersionRow.device_id == DeviceRow.id, DeviceVersionRow.status == "failed"),
    )
    .where(DeviceRow.token_hash == bindparam("token_hash"))
)


_ACTIVE_ROLLOUTS = (
    select(
        RolloutRow.base_fingerprint,
        RolloutRow.to_version,
        RolloutRow.salt,
        RolloutRow.stages,
        RolloutRow.stage_index,
    )
    .where(RolloutRow.state == RolloutState.ACTIVE)
    .order_by(RolloutRow.to_version.desc())
)
_CURRENT_TARGETS = select(TargetRow).where(
    TargetRow.release_version == select(func.max(ReleaseRow.version)).scalar_subquery()
)
# Of the release the targets were read from (written with them, in one transaction).
_COMPATIBLE_OF = compatible_bases_query().where(
    TargetBaseRow.release_version == bindparam("release")
)

Rollout = tuple[int, str, list[int], int]  # to_version, salt, stages, stage_index


class _CheckRow(NamedTuple):
    """One row of ``_CHECK``, named as the columns of :class:`DeviceRow` it carries."""

    id: str
    revoked_at: Any
    base_fingerprint: str
    installed_version: int | None
    capabilities: dict[str, Any]
    memory_budget_bytes: int
    generation: int | None
    failed_version: int | None


@dataclass(frozen=True)
class DeviceView:
    """What one check knows about the device: its stored report, the versions it
    reported failed, and the generation of the fleet state at the same instant."""

    report: DeviceReport
    failed_versions: frozenset[int]
    generation: int


def device_view(rows: list[tuple[Any, ...]], device_id: str) -> DeviceView:
    """Judge the rows ``_CHECK`` returned for a token hash (none: unknown token).

    Raises:
        AuthenticationError: unknown or revoked token.
        PermissionDeniedError: the token belongs to another device.
    """
    first = _CheckRow._make(rows[0]) if rows else None
    check_device_row(first, device_id)
    assert first is not None
    if isinstance(first.capabilities, str):  # SQLite hands JSON columns back as text
        first = first._replace(capabilities=json.loads(first.capabilities))
    return DeviceView(
        report=report_from_columns(first),
        failed_versions=frozenset(v for *_, v in rows if v is not None),
        generation=int(first.generation or 0),
    )


@dataclass(frozen=True)
class FleetState:
    """What every check needs besides the device: active rollouts and current bundles."""

    generation: int
    rollouts: dict[str, tuple[Rollout, ...]]  # any base it reaches -> newest first
    bundles: dict[tuple[str, int], tuple[BundleTarget, ...]]  # (any named base, to_version)


def load_fleet_state(conn: Connection) -> FleetState:
    """Read the generation, then the state it labels (in that order; see module doc)."""
    generation = int(conn.scalar(_GENERATION) or 0)
    rows = conn.execute(_CURRENT_TARGETS).all()
    release = rows[0].release_version if rows else None
    compatible = group_compatible(conn.execute(_COMPATIBLE_OF, {"release": release}))
    bundles: dict[tuple[str, int], list[BundleTarget]] = defaultdict(list)
    for row in rows:
        bundle = bundle_of(row, compatible.get(row.id, ()))  # type: ignore[arg-type]
        for base in bundle.bases:
            bundles[(base, bundle.to_version)].append(bundle)
    rollouts: dict[str, list[Rollout]] = defaultdict(list)
    for base, to_version, salt, stages, stage_index in conn.execute(_ACTIVE_ROLLOUTS):
        reached = dict.fromkeys([base])  # the rollout's base, then every base named with it
        for bundle in bundles.get((base, to_version), ()):
            reached.update(dict.fromkeys(bundle.bases))
        for each in reached:
            rollouts[each].append((to_version, salt, list(stages), stage_index))
    return FleetState(
        generation=generation,
        rollouts={k: tuple(v) for k, v in rollouts.items()},
        bundles={k: tuple(v) for k, v in bundles.items()},
    )


class UpdateChecker:
    """Answers update checks for one process, caching :class:`FleetState`."""

    def __init__(self, db: Database, *, threads: int = 4, seen: SeenTracker | None = None) -> None:
        """``threads``: at most this many checks touch the database at once (match the
        hot pool size; more would wait for a connection). ``seen``: told the id of every
        device that passes authentication (its last-seen time, written in batches)."""
        self._db = db
        self._seen = seen
        self._check = db.compile_hot(_CHECK)
        self._state: FleetState | None = None
        self._reload = threading.Lock()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="fedota-check")

    async def check_async(
        self, token: str, device_id: str, report: DeviceReport
    ) -> BundleTarget | None:
        """:meth:`check` on the checker's own threads (see module doc)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.check, token, device_id, report)

    def check(self, token: str, device_id: str, report: DeviceReport) -> BundleTarget | None:
        """Authenticate the device, record its report, and answer its update check.

        Raises:
            AuthenticationError: unknown or revoked token.
            PermissionDeniedError: the token belongs to another device.
        """
        device = self._device(token, device_id)
        if self._seen is not None:
            self._seen.mark(device_id)
        if device.report != report:
            with self._db.write() as session:  # device-reported state is authoritative
                row = session.get(DeviceRow, device_id)
                assert row is not None
                apply_report(row, report)
            device = self._device(token, device_id)  # re-read: the generation after it
        state = self._fleet_state(device.generation)
        base = report.base_fingerprint
        assigned = assigned_in(state.rollouts.get(base, ()), device_id)
        candidates = state.bundles.get((base, assigned), ()) if assigned is not None else ()
        return select_target(
            report,
            assigned_version=assigned,
            failed_versions=device.failed_versions,
            candidates=list(candidates),
        )

    def _device(self, token: str, device_id: str) -> DeviceView:
        rows = self._db.hot_rows(self._check, {"token_hash": hash_token(token)})
        return device_view(rows, device_id)

    def _fleet_state(self, generation: int) -> FleetState:
        state = self._state
        if state is not None and state.generation >= generation:
            return state
        with self._reload:
            state = self._state
            if state is None or state.generation < generation:
                with self._db.engine.connect() as conn:
                    state = self._state = load_fleet_state(conn)
        return state
