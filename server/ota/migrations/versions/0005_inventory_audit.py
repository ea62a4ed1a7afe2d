"""The fleet inventory, the audit log and stage-sized report thresholds.

``devices`` gains the columns the inventory filters on (``runtime``, ``last_seen_at``,
the last outcome and its reason) with one ``(column, id)`` index per filter, so a
keyset page is one index range scan; existing devices are back-filled from their
capabilities and telemetry. ``rollout_events`` gains its actor, ``rollouts`` the
``min_reports_fraction``, and ``audit_log`` records every operator action.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
_LAST_EVENT = (
    "(SELECT t.{column} FROM telemetry_events t WHERE t.device_id = devices.id "
    "AND t.seq = devices.last_event_seq AND devices.last_event_seq > 0 "
    "ORDER BY t.received_at DESC LIMIT 1)"
)
_DEVICE_INDEXES = {
    "ix_devices_base_id": ["base_fingerprint", "id"],
    "ix_devices_installed_id": ["installed_version", "id"],
    "ix_devices_runtime_id": ["runtime", "id"],
    "ix_devices_outcome_id": ["last_outcome", "id"],
    "ix_devices_last_seen": ["last_seen_at"],
}


def upgrade() -> None:
    _devices()
    op.add_column(
        "rollouts",
        sa.Column("min_reports_fraction", sa.Float, nullable=False, server_default="1.0"),
    )
    op.add_column(
        "rollout_events", sa.Column("actor", sa.String(80), nullable=False, server_default="")
    )
    op.create_index("ix_telemetry_events_history", "telemetry_events", ["device_id", "seq"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(80), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_audit_log_action_id", "audit_log", ["action", "id"])
    op.create_index("ix_audit_log_actor_id", "audit_log", ["actor", "id"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def _devices() -> None:
    # Plain ALTER TABLE ADD/DROP COLUMN, never a batch "move and copy": rebuilding
    # ``devices`` on SQLite fails while telemetry and reports point at it (foreign keys).
    for column in (
        sa.Column("runtime", sa.String(64), nullable=False, server_default=""),
        sa.Column("last_seen_at", TZ, nullable=True),
        sa.Column("last_outcome", sa.String(24), nullable=True),
        sa.Column("last_outcome_version", sa.Integer, nullable=True),
        sa.Column("last_outcome_detail", sa.String(500), nullable=False, server_default=""),
        sa.Column("last_outcome_at", TZ, nullable=True),
    ):
        op.add_column("devices", column)
    postgres = op.get_bind().dialect.name == "postgresql"
    runtime = "capabilities->>'runtime'" if postgres else "json_extract(capabilities, '$.runtime')"
    op.execute(
        f"UPDATE devices SET runtime = COALESCE({runtime}, ''), "
        "last_seen_at = COALESCE((SELECT max(t.received_at) FROM telemetry_events t "
        "WHERE t.device_id = devices.id), created_at), "
        f"last_outcome = {_LAST_EVENT.format(column='type')}, "
        f"last_outcome_version = {_LAST_EVENT.format(column='version')}, "
        f"last_outcome_detail = COALESCE({_LAST_EVENT.format(column='detail')}, ''), "
        f"last_outcome_at = {_LAST_EVENT.format(column='received_at')}"
    )
    if postgres:  # SQLite cannot make it NOT NULL without the rebuild; the app always sets it
        op.alter_column(
            "devices",
            "last_seen_at",
            existing_type=TZ,
            nullable=False,
            server_default=sa.text("CURRENT_TIMESTAMP"),  # rows written by other tools
        )
    for name, columns in _DEVICE_INDEXES.items():
        op.create_index(name, "devices", columns)


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_index("ix_telemetry_events_history", table_name="telemetry_events")
    op.drop_column("rollout_events", "actor")
    op.drop_column("rollouts", "min_reports_fraction")
    for name in _DEVICE_INDEXES:
        op.drop_index(name, table_name="devices")
    for column in (
        "last_outcome_at",
        "last_outcome_detail",
        "last_outcome_version",
        "last_outcome",
        "last_seen_at",
        "runtime",
    ):
        op.drop_column("devices", column)
