"""Alembic environment: runs migrations on the engine given by ``database.upgrade``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from server.ota.models import Base

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # plain `alembic -x url=...` use, e.g. while writing a revision
    engine = create_engine(context.get_x_argument(as_dictionary=True)["url"])

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
