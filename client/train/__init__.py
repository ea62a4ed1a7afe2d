"""① train: on-device LoRA fine-tuning of the NF4 base, with Opacus DP-SGD.

Public API (the Flower ``ClientApp`` builds on exactly this):

* :class:`LocalTrainer` loads the quantized base once and trains / evaluates adapters.
* :class:`LoraSettings`, :class:`DPSettings`, :class:`TrainSettings` configure it.
* :class:`TrainResult`, :class:`EvalResult` are what it returns.
* :class:`PrivacyLedger` is the device's persistent record-level epsilon ledger.
* :func:`compute_epsilon` / :func:`noise_multiplier_for` expose the accountant.
* :func:`seeded_lora_init` rebuilds the shared initial adapter (FFA-LoRA's frozen A).
* :func:`canary_exposure` is the memorisation audit (THREATS G36).

Adapter tensors are named as ``peft.get_peft_model_state_dict`` names them.
"""

from client.train._model import seeded_lora_init
from client.train.accounting import DPRound, compute_epsilon, noise_multiplier_for
from client.train.audit import canary_exposure
from client.train.data import Blocks, pack_texts
from client.train.errors import (
    AdapterMismatchError,
    LedgerError,
    MemoryBudgetError,
    PrivacyGuardError,
    TrainConfigError,
    TrainError,
)
from client.train.ledger import LEDGER_FILE, PrivacyLedger
from client.train.memory import ModelFootprint, TrainPlan, estimate_peak_bytes, plan_training
from client.train.settings import DPSettings, EvalResult, LoraSettings, TrainResult, TrainSettings
from client.train.trainer import LocalTrainer

__all__ = [
    "LEDGER_FILE",
    "AdapterMismatchError",
    "Blocks",
    "DPRound",
    "DPSettings",
    "EvalResult",
    "LedgerError",
    "LocalTrainer",
    "LoraSettings",
    "MemoryBudgetError",
    "ModelFootprint",
    "PrivacyGuardError",
    "PrivacyLedger",
    "TrainConfigError",
    "TrainError",
    "TrainPlan",
    "TrainResult",
    "TrainSettings",
    "canary_exposure",
    "compute_epsilon",
    "estimate_peak_bytes",
    "noise_multiplier_for",
    "pack_texts",
    "plan_training",
    "seeded_lora_init",
]
