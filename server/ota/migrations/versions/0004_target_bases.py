"""Every base a bundle applies to: its primary fingerprint and its compatible ones.

One row per (target, base). Existing targets get their primary base, so every target
has at least one row and the lookup never needs the ``targets`` column as well.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "target_bases",
        sa.Column("target_id", sa.Integer, sa.ForeignKey("targets.id"), primary_key=True),
        sa.Column("base_fingerprint", sa.String(80), primary_key=True),
        sa.Column("release_version", sa.Integer, nullable=False),
        sa.Column("to_version", sa.Integer, nullable=False),
    )
    op.create_index(
        "ix_target_bases_lookup",
        "target_bases",
        ["release_version", "base_fingerprint", "to_version"],
    )
    op.execute(
        "INSERT INTO target_bases (target_id, base_fingerprint, release_version, to_version) "
        "SELECT id, base_fingerprint, release_version, to_version FROM targets"
    )


def downgrade() -> None:
    op.drop_index("ix_target_bases_lookup", table_name="target_bases")
    op.drop_table("target_bases")
