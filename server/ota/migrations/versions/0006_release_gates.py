"""Release gates (ADR 0014): the signed privacy spend of each target, the quality
tolerance of a rollout, and the golden-prompt losses each rollout report carries.

All columns are nullable: targets published before this revision record no privacy
spend (unbounded under a policy), rollouts created before it have no quality gate, and
reports sent before it carry no losses.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("targets") as batch:
        batch.add_column(sa.Column("privacy", sa.JSON, nullable=True))
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("quality_tolerance", sa.Float, nullable=True))
    with op.batch_alter_table("rollout_reports") as batch:
        batch.add_column(sa.Column("golden_loss", sa.Float, nullable=True))
        batch.add_column(sa.Column("previous_golden_loss", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout_reports") as batch:
        batch.drop_column("previous_golden_loss")
        batch.drop_column("golden_loss")
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("quality_tolerance")
    with op.batch_alter_table("targets") as batch:
        batch.drop_column("privacy")
