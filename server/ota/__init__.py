"""④ publish: the OTA update service (FastAPI + SQLAlchemy + TUF repository). No torch.

Entry points: :func:`create_app` (an ASGI app from :class:`OtaSettings`), the
``fedota serve|db|publish|rollout`` commands in :mod:`server.cli`, and
:func:`upgrade` for the shipped Alembic migrations. See docs/adr/0004-ota-server.md.
"""

from server.ota.app import create_app
from server.ota.database import upgrade
from server.ota.errors import DatabaseNotMigratedError, OtaConfigError, OtaError
from server.ota.settings import OtaSettings

__all__ = [
    "DatabaseNotMigratedError",
    "OtaConfigError",
    "OtaError",
    "OtaSettings",
    "create_app",
    "upgrade",
]
