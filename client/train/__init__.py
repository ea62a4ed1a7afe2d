"""① train: on-device LoRA fine-tuning of the NF4 base, with Opacus DP-SGD.

Public API (the Flower ``ClientApp`` builds on exactly this):

* :class:`LocalTrainer` loads the quantized base once and trains / evaluates adapters;
  its ``train`` and ``evaluate`` return ``settings.TrainResult`` / ``settings.EvalResult``.
* :class:`LoraSettings`, :class:`DPSettings`, :class:`TrainSettings` configure it.
* :class:`PrivacyLedger` is the device's persistent record-level epsilon ledger.
* :func:`compute_epsilon` / :func:`noise_multiplier_for` expose the accountant.
* :func:`plan_training` / :func:`estimate_peak_bytes` fit training into a memory budget.
* :func:`choose_rank` / :func:`rank_for_trainer` pick the largest allowed LoRA rank
  that budget fits, :func:`scaled_alpha` its alpha (heterogeneous ranks, ADR 0016).
* :func:`pack_texts` turns texts into training blocks.
* :func:`canary_exposure` is the memorisation audit (THREATS G36).

These are what code outside this package imports; import them from here. Importing this
package loads torch (the trainer needs it at module level): the device install does
not hold it.

Adapter tensors are named as ``peft.get_peft_model_state_dict`` names them.
"""

from client.train.accounting import DPRound, compute_epsilon, noise_multiplier_for
from client.train.audit import canary_exposure
from client.train.data import pack_texts
from client.train.errors import (
    AdapterMismatchError,
    LedgerError,
    MemoryBudgetError,
    PrivacyGuardError,
    TrainConfigError,
)
from client.train.ledger import LEDGER_FILE, PrivacyLedger
from client.train.memory import ModelFootprint, estimate_peak_bytes, plan_training
from client.train.rank import choose_rank, rank_for_trainer, scaled_alpha
from client.train.settings import DPSettings, LoraSettings, TrainSettings
from client.train.trainer import LocalTrainer

__all__ = [
    "LEDGER_FILE",
    "AdapterMismatchError",
    "DPRound",
    "DPSettings",
    "LedgerError",
    "LocalTrainer",
    "LoraSettings",
    "MemoryBudgetError",
    "ModelFootprint",
    "PrivacyGuardError",
    "PrivacyLedger",
    "TrainConfigError",
    "TrainSettings",
    "canary_exposure",
    "choose_rank",
    "compute_epsilon",
    "estimate_peak_bytes",
    "noise_multiplier_for",
    "pack_texts",
    "plan_training",
    "rank_for_trainer",
    "scaled_alpha",
]
