"""① train: the on-device LoRA trainer over the NF4 base, plain or DP-SGD.

``LocalTrainer.train`` reads top to bottom: load the incoming adapter, pack the
device's texts, plan memory, derive sigma, check the privacy ledger, train, record
the round in the ledger, return only the exchanged adapter tensors.

Invariants: the quantized base is loaded once and never changes (only LoRA tensors
require grad; see ``base_digest``); every call starts from the adapter it is given,
so one trainer can serve many simulated clients; an adapter leaves ``train`` only
after its privacy cost is persisted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from client.train import _loops
from client.train._model import (
    AdapterSlots,
    attach_lora,
    base_digest,
    check_only_lora_trainable,
    resolve_model_dir,
)
from client.train.accounting import DPRound, compute_epsilon, noise_multiplier_for
from client.train.data import Blocks, pack_texts
from client.train.errors import PrivacyGuardError, TrainConfigError
from client.train.evaluate import evaluate_blocks, score_texts
from client.train.ledger import PrivacyLedger
from client.train.memory import TrainPlan, footprint, plan_training
from client.train.settings import DPSettings, EvalResult, LoraSettings, TrainResult, TrainSettings

__all__ = ["LocalTrainer"]

logger = logging.getLogger(__name__)

DEFAULT_LOGICAL_BATCH = 8
EVAL_SEQ_LEN = 64  # evaluation block length, whatever length training used


def planned_batch(settings: TrainSettings, dp: DPSettings) -> int:
    """The batch a memory plan must hold: the logical batch, plus under DP a headroom."""
    logical = settings.batch_size or DEFAULT_LOGICAL_BATCH
    if dp.enabled:
        # Poisson batches vary around B; headroom of 3 sigma (sqrt(B)) avoids
        # splitting most of them into an extra physical pass when memory allows.
        logical += math.ceil(3 * math.sqrt(logical))
    return logical


class LocalTrainer:
    """Loads the NF4 base once, attaches LoRA, and trains/evaluates adapters on it.

    Args:
        base_dir: local Hugging Face causal-LM directory (float, or with a
            pre-quantized ``nf4/`` copy which is then loaded as is); its tokenizer is
            used for every text.
        lora: the adapter layout shared by the federation.
        device: torch device (``"cpu"`` or CUDA).
        quantized: load NF4 (the default, what phones run); False loads the float
            checkpoint in fp32, for the benchmark's fp32+LoRA baseline only.

    Raises:
        QuantizedModelError: the base directory is not a loadable causal LM.
        AdapterMismatchError: ``target_modules`` matched no linear module.
    """

    def __init__(
        self, base_dir: Path, lora: LoraSettings, *, device: str = "cpu", quantized: bool = True
    ) -> None:
        from transformers import AutoTokenizer

        self.base_dir = Path(base_dir)
        self.lora = lora
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir, local_files_only=True)
        base = _load_base(self.base_dir, device=device, quantized=quantized)
        self.model = attach_lora(base, lora)
        self.slots = AdapterSlots(self.model, lora)
        check_only_lora_trainable(self.model, self.slots)
        self.footprint = footprint(self.model)
        self.model.eval()
        logger.info(
            "trainer ready: %d exchanged LoRA tensors, %d trainable parameters, %.1f MiB weights",
            len(self.slots.exchanged),
            self.footprint.trainable_params,
            self.footprint.weights_bytes / 2**20,
        )

    def trainable_names(self) -> list[str]:
        """Names of the adapter tensors exchanged with the server (FFA: only lora_B)."""
        return list(self.slots.exchanged)

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """The seeded initial adapter (A from ``init_seed``, B zero), exchanged tensors only."""
        self.slots.load(None)
        return self.slots.export()

    def full_adapter(self, adapter: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Every LoRA tensor a device needs for an exchanged adapter (A and B).

        Under FFA-LoRA only B is exchanged; the frozen A is the shared seeded init, which
        this rebuilds, so the result can be packaged and run by the inference runtime.

        Raises:
            AdapterMismatchError: the adapter does not match this base/LoRA layout.
        """
        self.slots.load(adapter)
        return {n: p.detach().to("cpu").clone() for n, p in self.slots.params.items()}

    def base_digest(self) -> str:
        """SHA-256 of the quantized base (everything but LoRA); constant for the trainer's life."""
        return base_digest(self.model)

    def plan(self, settings: TrainSettings, dp: DPSettings) -> TrainPlan:
        """The memory plan ``train`` would use (seq_len, physical batch, estimate).

        Raises:
            MemoryBudgetError: even the smallest setting does not fit the budget.
        """
        return plan_training(
            self.footprint,
            budget_bytes=settings.memory_budget_bytes,
            logical_batch_size=planned_batch(settings, dp),
            seq_len=settings.seq_len,
            dp=dp.enabled,
            ghost=dp.enabled and dp.grad_sample_mode == "ghost",
        )

    def train(
        self,
        adapter: Mapping[str, torch.Tensor] | None,
        texts: Sequence[str],
        settings: TrainSettings,
        dp: DPSettings,
        ledger: PrivacyLedger | None = None,
    ) -> TrainResult:
        """Train the adapter on ``texts`` for ``settings.local_steps`` steps.

        Args:
            adapter: the incoming global adapter (``trainable_names()``), or None for
                the seeded initial adapter.
            texts: the device's raw training texts.
            settings: steps, learning rate, batch, sequence length, memory budget.
            dp: DP-SGD settings; ignored (plain training) when ``dp.enabled`` is False.
            ledger: the device's persistent privacy ledger; without one the epsilon
                reported covers this round only.

        Returns:
            ``status="ok"`` with the trained adapter; ``"no_data"`` or
            ``"budget_exhausted"`` (untrained incoming adapter, reason in ``message``).

        Raises:
            AdapterMismatchError: ``adapter`` does not fit this base and LoRA layout.
            MemoryBudgetError: training cannot fit ``settings.memory_budget_bytes``.
            TrainConfigError: inconsistent DP settings (e.g. ledger delta differs).
            LedgerError: the ledger is corrupt.
            PrivacyGuardError: a DP safety check failed; nothing was released.
        """
        self.slots.load(adapter)
        plan = self.plan(settings, dp)
        # Under DP each text is its own block: the record the epsilon protects.
        blocks = pack_texts(self.tokenizer, texts, plan.seq_len, pack=not dp.enabled)
        blocks = blocks.trimmed().to(self.device)
        if len(blocks) == 0:
            return self._untrained("no_data", plan, 0, "no training text on this device")
        if blocks.split_texts:
            logger.warning(
                "%d texts are longer than seq_len=%d and span several blocks (DP unit is "
                "a block: such texts are protected at group level)",
                blocks.split_texts,
                plan.seq_len,
            )
        logical = min(settings.batch_size or DEFAULT_LOGICAL_BATCH, len(blocks))
        physical = min(plan.physical_batch_size, len(blocks))
        torch.manual_seed(settings.seed)
        if not dp.enabled:
            outcome = self._run(blocks, settings, dp, None, logical, physical)
            return self._result("ok", plan, blocks, outcome, logical, physical, dp, None, None)
        mech = self._mechanism(len(blocks), logical, settings, dp)
        refusal = self._budget_refusal(mech, dp, ledger)
        if refusal is not None:
            return self._untrained("budget_exhausted", plan, len(blocks), refusal, mech, dp)
        outcome = self._run(blocks, settings, dp, mech, logical, physical)
        ran = [DPRound(*entry) for entry in outcome.accountant_history]
        if ran != [mech]:
            raise PrivacyGuardError(f"Opacus accounted {ran}, but {mech} was planned")
        epsilon = (
            ledger.record(mech)
            if ledger is not None
            else compute_epsilon([mech], delta=dp.delta, accountant=dp.accountant)
        )
        return self._result("ok", plan, blocks, outcome, logical, physical, dp, mech, epsilon)

    def _mechanism(
        self, num_blocks: int, logical: int, settings: TrainSettings, dp: DPSettings
    ) -> DPRound:
        # Opacus' DPDataLoader samples at q = 1 / len(loader) = 1 / ceil(N / B).
        q = 1.0 / math.ceil(num_blocks / logical)
        sigma = dp.noise_multiplier
        if sigma is None:
            assert dp.target_epsilon is not None  # validated by DPSettings
            sigma = noise_multiplier_for(
                dp.target_epsilon,
                delta=dp.delta,
                sample_rate=q,
                steps=settings.local_steps * settings.planned_rounds,
                accountant=dp.accountant,
            )
        return DPRound(noise_multiplier=sigma, sample_rate=q, steps=settings.local_steps)

    def _budget_refusal(
        self, mech: DPRound, dp: DPSettings, ledger: PrivacyLedger | None
    ) -> str | None:
        """Why the round must not run (its epsilon would exceed a budget), or None."""
        if ledger is None:
            after = compute_epsilon([mech], delta=dp.delta, accountant=dp.accountant)
            if dp.epsilon_budget is not None and after > dp.epsilon_budget:
                return (
                    f"one round needs epsilon={after:.3f} > budget {dp.epsilon_budget}; "
                    "raise the budget, the noise or lower local_steps"
                )
            return None
        if ledger.delta != dp.delta:
            raise TrainConfigError(
                f"the privacy ledger accounts at delta={ledger.delta} but DP settings say "
                f"delta={dp.delta}; use one delta for the device's whole life"
            )
        spent = ledger.spent_epsilon()
        if not ledger.can_train(mech, epsilon_budget=dp.epsilon_budget):
            caps = [c for c in (ledger.epsilon_budget, dp.epsilon_budget) if c is not None]
            return (
                f"privacy budget exhausted: spent epsilon={spent:.3f} (delta={dp.delta}) over "
                f"{len(ledger.rounds)} rounds; the next round would reach "
                f"{ledger.epsilon_after(mech):.3f} > budget {min(caps)}. This device stops "
                "training; its ledger is at " + str(ledger.path)
            )
        return None

    def _run(
        self,
        blocks: Blocks,
        settings: TrainSettings,
        dp: DPSettings,
        mech: DPRound | None,
        logical: int,
        physical: int,
    ) -> _loops.LoopOutcome:
        before = {n: p.detach().clone() for n, p in self.slots.params.items()}
        check_only_lora_trainable(self.model, self.slots)
        self.model.train()
        try:
            if mech is None:
                outcome = _loops.train_plain(
                    self.slots, self.model, blocks, settings=settings,
                    logical_batch=logical, physical_batch=physical,
                )  # fmt: skip
            else:
                outcome = _loops.train_dp(
                    self.slots, self.model, blocks, settings=settings, dp=dp,
                    noise_multiplier=mech.noise_multiplier,
                    logical_batch=logical, physical_batch=physical,
                )  # fmt: skip
        finally:
            self.model.eval()
            for p in self.model.parameters():
                p.grad = None
        moved = [
            n for n in self.slots.exchanged if not torch.equal(before[n], self.slots.params[n])
        ]
        if not moved:
            raise PrivacyGuardError(
                "no LoRA tensor changed during training (cf. opacus issue 820); the "
                "adapter would be returned untrained"
            )
        return outcome

    def _untrained(
        self,
        status: str,
        plan: TrainPlan,
        num_examples: int,
        message: str,
        mech: DPRound | None = None,
        dp: DPSettings | None = None,
    ) -> TrainResult:
        logger.info("not training: %s", message)
        return TrainResult(
            status=status,
            adapter=self.slots.export(),
            num_examples=num_examples,
            steps=0,
            train_loss=math.nan,
            epsilon=None,
            noise_multiplier=mech.noise_multiplier if mech else None,
            batch_size=0,
            seq_len=plan.seq_len,
            message=message,
            delta=dp.delta if dp else None,
            sample_rate=mech.sample_rate if mech else None,
            estimated_peak_bytes=plan.estimated_peak_bytes,
        )

    def _result(
        self,
        status: str,
        plan: TrainPlan,
        blocks: Blocks,
        outcome: _loops.LoopOutcome,
        logical: int,
        physical: int,
        dp: DPSettings,
        mech: DPRound | None,
        epsilon: float | None,
    ) -> TrainResult:
        return TrainResult(
            status=status,
            adapter=self.slots.export(),
            num_examples=len(blocks),
            steps=outcome.steps,
            train_loss=outcome.mean_loss,
            epsilon=epsilon,
            noise_multiplier=mech.noise_multiplier if mech else None,
            batch_size=logical,
            seq_len=plan.seq_len,
            message=f"trained {outcome.steps} steps on {len(blocks)} blocks",
            delta=dp.delta if mech else None,
            sample_rate=mech.sample_rate if mech else None,
            max_grad_norm=dp.max_grad_norm if mech else None,
            physical_batch_size=physical,
            estimated_peak_bytes=plan.estimated_peak_bytes,
        )

    def evaluate(
        self,
        adapter: Mapping[str, torch.Tensor] | None,
        texts: Sequence[str],
        *,
        seq_len: int | None = None,
    ) -> EvalResult:
        """Next-token loss (nats/token), perplexity and top-1 accuracy on ``texts``.

        With no text, ``num_tokens`` is 0 and loss/perplexity are NaN: weight by
        ``num_tokens`` when aggregating.

        Raises:
            AdapterMismatchError: ``adapter`` does not fit this base and LoRA layout.
        """
        self.slots.load(adapter)
        length = seq_len or min(EVAL_SEQ_LEN, self.footprint.max_positions)
        blocks = pack_texts(self.tokenizer, texts, length).to(self.device)
        return evaluate_blocks(self.model, blocks)

    def score(
        self, adapter: Mapping[str, torch.Tensor] | None, texts: Sequence[str]
    ) -> list[float]:
        """Total negative log-likelihood (nats) of each text.

        Used by memorisation audits (canary exposure, THREATS G36).

        Raises:
            AdapterMismatchError: ``adapter`` does not fit this base and LoRA layout.
        """
        self.slots.load(adapter)
        return score_texts(self.model, self.tokenizer, texts, device=self.device)


def _load_base(base_dir: Path, *, device: str, quantized: bool) -> Any:
    from client.runtime import load_quantized

    if quantized:
        return load_quantized(resolve_model_dir(base_dir), device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, device_map=device, local_files_only=True
    )
    model.eval()
    return model
