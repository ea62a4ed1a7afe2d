"""Errors raised by ``client.train``, grouped by who is at fault.

Every message says what was observed, what was expected and what the user can do.
"""

from __future__ import annotations

from client.errors import ClientError, ClientInputError


class TrainError(ClientError):
    """Root of every error the on-device trainer raises on purpose."""


class TrainConfigError(ClientInputError, TrainError):
    """A training, LoRA or DP setting is out of range or inconsistent."""


class AdapterMismatchError(ClientInputError, TrainError):
    """An adapter given to the trainer does not fit the LoRA layout of the base model."""


class MemoryBudgetError(TrainError):
    """Even the smallest training setting does not fit the device's memory budget."""


class LedgerError(TrainError):
    """The privacy ledger file is unreadable, corrupt or inconsistent with the request."""


class PrivacyGuardError(TrainError):
    """A DP-SGD safety check failed (e.g. LoRA weights did not get per-sample gradients).

    Raised instead of silently returning an adapter that was not trained as claimed
    (the Opacus + PEFT pitfall of opacus issue 820).
    """
