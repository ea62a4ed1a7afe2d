"""④ publish: the operator console, server-rendered pages inside ``fedota serve``.

Jinja2 templates and one vendored script, no build step and nothing fetched at run
time. Pages read through the same service functions as the HTTP API, behind operator
sign-in with a signed, expiring session cookie and a CSRF token on every form
(DESIGN decision 14). Mounted by :func:`server.ota.app.create_app` at ``/console``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from server.ota.console.routes import router

STATIC_DIR = Path(__file__).parent / "static"

__all__ = ["mount_console"]


def mount_console(app: FastAPI) -> None:
    """Add the console's pages and static files to ``app``."""
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")
