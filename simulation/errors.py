"""Errors raised by ``simulation``, grouped by who is at fault.

Every message says what was observed, what was expected and what the user can do.
``exit_code`` is what the ``fedota`` CLI exits with when the error reaches it.
"""

from __future__ import annotations


class SimulationError(Exception):
    """Root of every error ``simulation`` raises on purpose."""

    exit_code = 2


class SimulationInputError(SimulationError):
    """The caller gave input that cannot be used (a bad path, file or option)."""

    exit_code = 2


class NothingTrainedError(SimulationError):
    """A run finished but no round changed the model (no client sampled, or every
    client failed or was rejected): the result is the base model, never a success."""

    exit_code = 2
