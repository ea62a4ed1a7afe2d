"""⑤ download · ⑥ verify · ⑦ apply · report: the on-device update agent.

``check_and_update`` is the one entry point (see ``client.update.agent``). The state
directory layout and its crash-safety invariants are in ``client.update.state``.

Import the names below from here: they are what code outside this package uses. Two
submodules are imported directly instead: ``client.update.api`` (the OTA server's device
API) is used as a namespace, ``api.enroll(...)``, so that one patch of it reaches every
caller; ``client.update.download`` shares its name with its function ``download``,
which this package does not re-export so as not to hide the submodule.
"""

from client.update.agent import UpdateOutcome, UpdateStatus, check_and_update
from client.update.errors import (
    DeviceStateError,
    UpdateBusyError,
    UpdateError,
    UpdateRejectedError,
    UpdateRetryError,
    UpdateTransientError,
)
from client.update.health import (
    GOLDEN_FILE,
    GoldenLossChecker,
    HealthChecker,
    HealthReport,
    Measurement,
    default_checker,
    read_golden,
)
from client.update.state import SLOTS, ActivePointer, DeviceConfig, DeviceState
from client.update.telemetry import TelemetryQueue
from client.update.transport import Retrier, RetryPolicy
from client.update.verify import VerifiedBundle

__all__ = [
    "GOLDEN_FILE",
    "SLOTS",
    "ActivePointer",
    "DeviceConfig",
    "DeviceState",
    "DeviceStateError",
    "GoldenLossChecker",
    "HealthChecker",
    "HealthReport",
    "Measurement",
    "Retrier",
    "RetryPolicy",
    "TelemetryQueue",
    "UpdateBusyError",
    "UpdateError",
    "UpdateOutcome",
    "UpdateRejectedError",
    "UpdateRetryError",
    "UpdateStatus",
    "UpdateTransientError",
    "VerifiedBundle",
    "check_and_update",
    "default_checker",
    "read_golden",
]
