"""The update check: which bundle, if any, moves this device to its assigned version.

The decision is pure (:func:`server.ota.domain.select_target`); this module gathers its
inputs. It is the hottest path of the service (every device polls it), so:

* one query authenticates the device, reads its last report, and reads the
  ``ota_state.generation`` stamp;
* active rollouts and the current release's bundles are cached per process as a
  :class:`FleetState` labelled with the generation it was read at. Every release and
  every rollout transition bumps the generation in its own transaction, so a request
  that sees generation G uses a cache at least as new as G — a pause stops offers on
  every worker from the moment it commits;
* only a device that is due an update costs a second query (its failed versions).

The generation is read *before* the state it labels, so a cache can be newer than its
label (harmless: it is reloaded once more) but never older.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select
from sqlalchemy.engine import Connection

from server.ota.database import Database
from server.ota.devices import apply_report, check_device_row, hash_token, report_from_columns
from server.ota.domain import BundleTarget, DeviceReport, select_target
from server.ota.models import (
    DeviceRow,
    DeviceVersionRow,
    OtaStateRow,
    ReleaseRow,
    RolloutRow,
    TargetRow,
)
from server.ota.releases import bundle_of
from server.ota.rollouts import assigned_in

_GENERATION = select(OtaStateRow.generation).where(OtaStateRow.id == 1)
_DEVICE_BY_TOKEN = select(
    DeviceRow.id,
    DeviceRow.revoked_at,
    DeviceRow.base_fingerprint,
    DeviceRow.installed_version,
    DeviceRow.capabilities,
    DeviceRow.memory_budget_bytes,
    _GENERATION.scalar_subquery().label("generation"),
).where(DeviceRow.token_hash == bindparam("token_hash"))
_ACTIVE_ROLLOUTS = (
    select(
        RolloutRow.base_fingerprint,
        RolloutRow.to_version,
        RolloutRow.salt,
        RolloutRow.stages,
        RolloutRow.stage_index,
    )
    .where(RolloutRow.state == "active")
    .order_by(RolloutRow.to_version.desc())
)
_CURRENT_TARGETS = select(TargetRow).where(
    TargetRow.release_version == select(func.max(ReleaseRow.version)).scalar_subquery()
)
_FAILED_VERSIONS = select(DeviceVersionRow.version).where(
    DeviceVersionRow.device_id == bindparam("device_id"), DeviceVersionRow.status == "failed"
)

Rollout = tuple[int, str, list[int], int]  # to_version, salt, stages, stage_index


@dataclass(frozen=True)
class FleetState:
    """What every check needs besides the device: active rollouts and current bundles."""

    generation: int
    rollouts: dict[str, tuple[Rollout, ...]]  # base fingerprint -> newest first
    bundles: dict[tuple[str, int], tuple[BundleTarget, ...]]  # (base, to_version) -> bundles


def load_fleet_state(conn: Connection) -> FleetState:
    """Read the generation, then the state it labels (in that order; see module doc)."""
    generation = int(conn.scalar(_GENERATION) or 0)
    rollouts: dict[str, list[Rollout]] = defaultdict(list)
    for base, to_version, salt, stages, stage_index in conn.execute(_ACTIVE_ROLLOUTS):
        rollouts[base].append((to_version, salt, list(stages), stage_index))
    bundles: dict[tuple[str, int], list[BundleTarget]] = defaultdict(list)
    for row in conn.execute(_CURRENT_TARGETS):
        bundle = bundle_of(row)  # type: ignore[arg-type]
        bundles[(bundle.base_fingerprint, bundle.to_version)].append(bundle)
    return FleetState(
        generation=generation,
        rollouts={k: tuple(v) for k, v in rollouts.items()},
        bundles={k: tuple(v) for k, v in bundles.items()},
    )


class UpdateChecker:
    """Answers update checks for one process, caching :class:`FleetState`."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._state: FleetState | None = None
        self._reload = threading.Lock()

    def check(self, token: str, device_id: str, report: DeviceReport) -> BundleTarget | None:
        """Authenticate the device, record its report, and answer its update check.

        Raises:
            AuthenticationError: unknown or revoked token.
            PermissionDeniedError: the token belongs to another device.
        """
        with self._db.snapshot_reads() as conn:
            row = conn.execute(_DEVICE_BY_TOKEN, {"token_hash": hash_token(token)}).first()
            check_device_row(row, device_id)
            assert row is not None
            if report_from_columns(row) == report:
                return self._decide(conn, row.generation, device_id, report)
        with self._db.write() as session:  # device-reported state is authoritative
            device = session.get(DeviceRow, device_id)
            assert device is not None
            apply_report(device, report)
        with self._db.snapshot_reads() as conn:
            generation = int(conn.scalar(_GENERATION) or 0)
            return self._decide(conn, generation, device_id, report)

    def _fleet_state(self, conn: Connection, generation: int) -> FleetState:
        state = self._state
        if state is not None and state.generation >= generation:
            return state
        with self._reload:
            state = self._state
            if state is None or state.generation < generation:
                state = self._state = load_fleet_state(conn)
        return state

    def _decide(
        self, conn: Connection, generation: int, device_id: str, report: DeviceReport
    ) -> BundleTarget | None:
        state = self._fleet_state(conn, generation)
        base = report.base_fingerprint
        assigned = assigned_in(state.rollouts.get(base, ()), device_id)
        if assigned is None or (
            report.installed_version is not None and assigned <= report.installed_version
        ):
            return None
        failed = frozenset(conn.scalars(_FAILED_VERSIONS, {"device_id": device_id}))
        return select_target(
            report,
            assigned_version=assigned,
            failed_versions=failed,
            candidates=list(state.bundles.get((base, assigned), ())),
        )
