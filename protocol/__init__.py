"""The contracts every part of fedota shares, defined once: a leaf package.

* :class:`RunConfig` — the settings of a federated run and their one set of defaults
  (``protocol.run_config``).
* :class:`LoraShape` — the shape of a LoRA adapter (``protocol.lora``).
* :class:`ReleaseKind`, :class:`EventType` — the update vocabulary of the phone and
  the OTA server (``protocol.update``).
* :class:`PrivacySpend`, :class:`PrivacyPolicy` — the privacy release gate the server
  and the phone both enforce (``protocol.privacy``).
* Crash-safe writes — ``atomic_write`` and friends (``protocol.files``).

Import the names below from here: they are what code outside this package uses. The
Flower record codecs both apps use, ``protocol.records``, are not re-exported: they
need flwr, which a device install does not hold; import that module directly.

Everyone may import ``protocol``; it imports nothing of fedota, nor torch
(import-linter, ``pyproject.toml``).
"""

from protocol.files import (
    TMP_SUFFIX,
    atomic_dir,
    atomic_file,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    read_json,
    relaxed_durability,
    replace_file,
)
from protocol.lora import LoraShape, LoraShapeError, lora_rank_axis, truncate_to_rank
from protocol.privacy import PRIVACY_KEYS, PrivacyPolicy, PrivacySpend, privacy_violation
from protocol.run_config import (
    MODE_DEFAULTS,
    Aggregation,
    ClientSampling,
    DpMode,
    RunConfig,
    RunConfigError,
    StrategyName,
)
from protocol.update import EventType, ReleaseKind

__all__ = [
    "MODE_DEFAULTS",
    "PRIVACY_KEYS",
    "TMP_SUFFIX",
    "Aggregation",
    "ClientSampling",
    "DpMode",
    "EventType",
    "LoraShape",
    "LoraShapeError",
    "PrivacyPolicy",
    "PrivacySpend",
    "ReleaseKind",
    "RunConfig",
    "RunConfigError",
    "StrategyName",
    "atomic_dir",
    "atomic_file",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "lora_rank_axis",
    "privacy_violation",
    "read_json",
    "relaxed_durability",
    "replace_file",
    "truncate_to_rank",
]
