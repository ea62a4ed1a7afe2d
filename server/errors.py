"""Errors raised by ``server``, grouped by who is at fault.

Every message says what was observed, what was expected and what the user can do.
``exit_code`` is what the ``fedota`` CLI exits with when the error reaches it.
"""

from __future__ import annotations


class ServerError(Exception):
    """Root of every error ``server`` raises on purpose."""

    exit_code = 2


class ServerInputError(ServerError):
    """The caller gave input that cannot be used (a bad path, file or option)."""

    exit_code = 2
