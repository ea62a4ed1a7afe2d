"""⑤ download · ⑥ verify · ⑦ apply · report: the on-device update agent.

``check_and_update`` is the one entry point (see ``client.update.agent``). The state
directory layout and its crash-safety invariants are in ``client.update.state``.
"""

from client.update.agent import CRASH_LOOP_LIMIT, UpdateOutcome, check_and_update
from client.update.errors import (
    DeviceStateError,
    UpdateBusyError,
    UpdateError,
    UpdateRejectedError,
    UpdateRetryError,
    UpdateTransientError,
)
from client.update.health import (
    GoldenLossChecker,
    HealthChecker,
    HealthReport,
    Measurement,
    default_checker,
)
from client.update.state import ActivePointer, DeviceConfig, DeviceState
from client.update.transport import Clock, Retrier, RetryPolicy
from client.update.verify import VerifiedBundle

__all__ = [
    "CRASH_LOOP_LIMIT",
    "ActivePointer",
    "Clock",
    "DeviceConfig",
    "DeviceState",
    "DeviceStateError",
    "GoldenLossChecker",
    "HealthChecker",
    "HealthReport",
    "Measurement",
    "Retrier",
    "RetryPolicy",
    "UpdateBusyError",
    "UpdateError",
    "UpdateOutcome",
    "UpdateRejectedError",
    "UpdateRetryError",
    "UpdateTransientError",
    "VerifiedBundle",
    "check_and_update",
    "default_checker",
]
