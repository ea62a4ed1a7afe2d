"""Errors raised by ``client``, grouped by who is at fault.

Every message says what was observed, what was expected and what the user can do.
``exit_code`` is what the ``fedota`` CLI exits with when the error reaches it.
"""

from __future__ import annotations


class ClientError(Exception):
    """Root of every error ``client`` raises on purpose."""

    exit_code = 2


class ClientInputError(ClientError):
    """The caller gave input that cannot be used (a bad path, file or option)."""

    exit_code = 2
