"""Internal: the local training loops, plain and DP-SGD (Opacus).

DP-SGD invariants (Abadi et al. 2016, as implemented by Opacus):
* Poisson sampling at rate q = 1 / ceil(N / B) (Opacus' ``DPDataLoader``), exactly
  ``local_steps`` noisy steps, per-sample clipping to C, Gaussian noise sigma * C.
* Only LoRA ``nn.Linear`` modules carry trainable parameters, so Opacus' per-sample
  gradient hooks never touch bitsandbytes ``Linear4bit`` layers (unsupported).
* Guard against opacus issue 820 (LoRA weights silently not trained privately): a
  step is refused unless every trainable tensor got a per-sample gradient for every
  sample of the batch, and the Opacus accountant's history must equal the
  mechanism the ledger records.
* An empty Poisson batch still takes a noise-only step (skipping it would leak that
  no record was sampled).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from client.train._model import AdapterSlots
from client.train.data import IGNORE_INDEX, Blocks
from client.train.errors import PrivacyGuardError
from client.train.settings import DPSettings, TrainSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopOutcome:
    """What a loop did: optimizer steps taken and the mean per-sample training loss."""

    steps: int
    mean_loss: float
    accountant_history: tuple[tuple[float, float, int], ...] = ()


def per_sample_loss(
    module: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample: shape [batch].

    Each sample's loss depends on that sample alone (no batch-wide token average),
    which per-sample clipping requires.
    """
    logits = module(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return ce.sum(dim=1) / counts


def add_proximal_term(optimizer: torch.optim.Optimizer, mu: float) -> None:
    """FedProx (Li et al. 2020): optimize ``loss + μ/2·‖w − w₀‖²`` over ``optimizer``'s
    parameters, ``w₀`` their values now (the global adapter the round started from).

    The term's gradient ``μ·(w − w₀)`` is added to each ``p.grad`` by a step pre-hook
    of ``optimizer`` itself. Under DP-SGD that optimizer is the one Opacus wraps, and
    Opacus calls its ``step`` only after clipping and noising: the term depends on no
    record, so adding it after the noise is post-processing and costs no ε, and it is
    never clipped with the per-sample gradients. ``mu = 0`` registers nothing.
    """
    if mu <= 0:
        return
    anchors = [(p, p.detach().clone()) for group in optimizer.param_groups for p in group["params"]]

    def pull_toward_global(*_: Any) -> None:
        with torch.no_grad():
            for p, anchor in anchors:
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=mu)

    optimizer.register_step_pre_hook(pull_toward_global)


def train_plain(
    slots: AdapterSlots,
    model: Any,
    blocks: Blocks,
    *,
    settings: TrainSettings,
    logical_batch: int,
    physical_batch: int,
) -> LoopOutcome:
    """Non-private local training: shuffled batches, gradient accumulation, AdamW."""
    gen = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(slots.trainable(), lr=settings.learning_rate, weight_decay=0.0)
    add_proximal_term(optimizer, settings.proximal_mu)
    n = len(blocks)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    losses: list[float] = []
    for _ in range(settings.local_steps):
        if cursor + logical_batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + logical_batch]
        cursor += logical_batch
        optimizer.zero_grad(set_to_none=True)
        for micro in idx.split(physical_batch):
            loss = per_sample_loss(
                model, blocks.input_ids[micro], blocks.attention_mask[micro], blocks.labels[micro]
            )
            (loss.sum() / len(idx)).backward()
            losses.extend(loss.detach().tolist())
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return LoopOutcome(steps=settings.local_steps, mean_loss=_mean(losses))


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _check_per_sample_grads(params: list[torch.nn.Parameter], batch: int) -> None:
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None or gs.shape[0] != batch:
            raise PrivacyGuardError(
                f"a LoRA tensor of shape {tuple(p.shape)} got "
                f"{'no' if gs is None else gs.shape[0]} per-sample gradients for a batch of "
                f"{batch}: Opacus hooks are not attached to it (cf. opacus issue 820), so the "
                "step would not be private. Check the PEFT/Opacus versions"
            )


def _check_ghost_norms(gsm: Any, params: list[torch.nn.Parameter], batch: int) -> None:
    norms = gsm._per_sample_gradient_norms
    if norms is None or norms.shape[0] != batch or any(p.grad is None for p in params):
        raise PrivacyGuardError(
            f"ghost clipping computed no per-sample norms for a batch of {batch}: Opacus "
            "hooks are not attached to the LoRA layers, so the step would not be private"
        )


def _empty_step(params: list[torch.nn.Parameter], ghost: bool) -> None:
    """Make an empty Poisson batch a noise-only step (its sum of clipped grads is 0)."""
    for p in params:
        if ghost:  # DPOptimizerFastGradientClipping accumulates p.grad
            p.grad = torch.zeros_like(p)
        else:  # DPOptimizer clips p.grad_sample; an empty one sums to zero
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]


def train_dp(
    slots: AdapterSlots,
    model: Any,
    blocks: Blocks,
    *,
    settings: TrainSettings,
    dp: DPSettings,
    noise_multiplier: float,
    logical_batch: int,
    physical_batch: int,
) -> LoopOutcome:
    """DP-SGD local training through Opacus' PrivacyEngine and BatchMemoryManager.

    Raises:
        PrivacyGuardError: per-sample gradients missing, or the steps Opacus accounted
            differ from the steps taken.
    """
    from opacus import PrivacyEngine

    params = slots.trainable()
    dataset = TensorDataset(blocks.input_ids, blocks.attention_mask, blocks.labels)
    loader = DataLoader(
        dataset,
        batch_size=logical_batch,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    add_proximal_term(optimizer, settings.proximal_mu)  # after the noise (post-processing)
    engine = PrivacyEngine(accountant=dp.accountant)
    ghost = dp.grad_sample_mode == "ghost"
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=dp.grad_sample_mode,
        noise_generator=torch.Generator().manual_seed(settings.seed + 1),
        loss_reduction="mean",
    )
    gsm, dp_opt, dp_loader = made[0], made[1], made[-1]
    try:
        losses = _dp_steps(gsm, dp_opt, dp_loader, params, settings, physical_batch, ghost)
    finally:
        gsm.cleanup()
    history = tuple((float(s), float(q), int(k)) for s, q, k in engine.accountant.history)
    taken = sum(k for _, _, k in history)
    if taken != settings.local_steps:
        raise PrivacyGuardError(
            f"Opacus accounted {taken} noisy steps but {settings.local_steps} were planned; "
            "refusing to report an epsilon that does not match the training"
        )
    return LoopOutcome(settings.local_steps, _mean(losses), accountant_history=history)


def _dp_steps(
    gsm: Any,
    dp_opt: Any,
    dp_loader: Any,
    params: list[torch.nn.Parameter],
    settings: TrainSettings,
    physical_batch: int,
    ghost: bool,
) -> list[float]:
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    losses: list[float] = []
    steps = 0
    with BatchMemoryManager(
        data_loader=dp_loader, max_physical_batch_size=physical_batch, optimizer=dp_opt
    ) as loader:
        while steps < settings.local_steps:
            for input_ids, attention_mask, labels in loader:
                batch = int(input_ids.shape[0])
                if batch == 0:
                    _empty_step(params, ghost)
                else:
                    loss = per_sample_loss(gsm, input_ids, attention_mask, labels)
                    losses.extend(loss.detach().tolist())
                    if ghost:
                        gsm._per_sample_gradient_norms = None  # no stale norms in the check
                        DPTensorFastGradientClipping(gsm, dp_opt, loss, "mean").backward()
                        _check_ghost_norms(gsm, params, batch)
                    else:
                        loss.mean().backward()
                        _check_per_sample_grads(params, batch)
                dp_opt.step()
                dp_opt.zero_grad()
                if not dp_opt._is_last_step_skipped:
                    steps += 1
                    if steps == settings.local_steps:
                        break
    return losses
