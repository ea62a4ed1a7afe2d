"""④ publish: the OTA update service (FastAPI + SQLAlchemy + TUF repository). No torch.

Entry points: :func:`create_app` (an ASGI app from :class:`OtaSettings`), the
``fedota serve|db|publish|rollout`` commands in :mod:`server.cli`, and
:func:`upgrade` for the shipped Alembic migrations; :class:`OtaRemote` is the operator's
HTTP client of a running server. See docs/adr/0004-ota-server.md.

Import the names below from here: they are what code outside this package uses.
Importing any part of this package loads FastAPI and SQLAlchemy (``app``, here), so
callers that must start without them (``server.cli``, ``fedota --help``) import it
inside the functions that need it.
"""

from server.ota.app import create_app, freeze_startup_heap
from server.ota.database import Database, current_revision, make_engine, upgrade
from server.ota.devices import hash_token
from server.ota.errors import DatabaseNotMigratedError, RemoteRejectedError, ServerUnreachableError
from server.ota.inventory import DeviceFilter, DeviceState, page_query
from server.ota.models import DeviceRow
from server.ota.observability import (
    configure_json_logging,
    prepare_multiprocess_dir,
    remove_multiprocess_dir,
)
from server.ota.remote import OtaRemote, wait_until_ready
from server.ota.settings import OtaSettings

__all__ = [
    "Database",
    "DatabaseNotMigratedError",
    "DeviceFilter",
    "DeviceRow",
    "DeviceState",
    "OtaRemote",
    "OtaSettings",
    "RemoteRejectedError",
    "ServerUnreachableError",
    "configure_json_logging",
    "create_app",
    "current_revision",
    "freeze_startup_heap",
    "hash_token",
    "make_engine",
    "page_query",
    "prepare_multiprocess_dir",
    "remove_multiprocess_dir",
    "upgrade",
    "wait_until_ready",
]
