"""Devices, blobs, releases, targets and TUF metadata.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
        sa.Column("base_fingerprint", sa.String(80), nullable=False, index=True),
        sa.Column("installed_version", sa.Integer, nullable=True),
        sa.Column("capabilities", sa.JSON, nullable=False),
        sa.Column("memory_budget_bytes", sa.BigInteger, nullable=False),
        sa.Column("last_event_seq", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("length", sa.BigInteger, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "releases",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("targets_sha256", sa.String(64), nullable=False),
        sa.Column("published_at", TZ, nullable=False),
    )
    op.create_table(
        "targets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("release_version", sa.Integer, sa.ForeignKey("releases.version"), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("url_path", sa.String(640), nullable=False, index=True),
        sa.Column("blob_sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
        sa.Column("length", sa.BigInteger, nullable=False),
        sa.Column("hashes", sa.JSON, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("from_version", sa.Integer, nullable=True),
        sa.Column("to_version", sa.Integer, nullable=False),
        sa.Column("base_fingerprint", sa.String(80), nullable=False),
        sa.Column("release_counter", sa.Integer, nullable=False),
        sa.Column("uncompressed_bytes", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("release_version", "path"),
    )
    op.create_index(
        "ix_targets_lookup", "targets", ["release_version", "base_fingerprint", "to_version"]
    )
    op.create_table(
        "tuf_metadata",
        sa.Column("role", sa.String(16), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
    )


def downgrade() -> None:
    for table in ("tuf_metadata", "targets", "releases", "blobs", "devices"):
        op.drop_table(table)
