"""Rollouts, rollout audit events, per-device outcomes and idempotent telemetry.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("base_fingerprint", sa.String(80), nullable=False, index=True),
        sa.Column("to_version", sa.Integer, nullable=False),
        sa.Column("salt", sa.String(32), nullable=False),
        sa.Column("stages", sa.JSON, nullable=False),
        sa.Column("max_failure_rate", sa.Float, nullable=False),
        sa.Column("min_reports", sa.Integer, nullable=False),
        sa.Column("stage_index", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("pause_reason", sa.String(16), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id"), nullable=False, index=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("stage_index", sa.Integer, nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "rollout_reports",
        sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("stage_index", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_rollout_reports_stage", "rollout_reports", ["rollout_id", "stage_index", "outcome"]
    )
    op.create_table(
        "device_versions",
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_table(
        "telemetry_events",
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("type", sa.String(24), nullable=False),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("installed_version", sa.Integer, nullable=True),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.Column("received_at", TZ, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "telemetry_events",
        "device_versions",
        "rollout_reports",
        "rollout_events",
        "rollouts",
    ):
        op.drop_table(table)
