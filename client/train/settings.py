"""Typed, validated settings and results of stage ① train (on-device LoRA + DP-SGD).

Invariants: every settings object is frozen and validated in ``__post_init__``, so a
trainer never sees an out-of-range value; units are in the names (``_bytes``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from client.train.errors import TrainConfigError
from protocol import LoraShape, LoraShapeError

__all__ = ["DPSettings", "EvalResult", "LoraSettings", "TrainResult", "TrainSettings"]

ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "ghost")
TRAIN_STATUSES = ("ok", "budget_exhausted", "no_data")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TrainConfigError(message)


@dataclass(frozen=True)
class LoraSettings(LoraShape):
    """The trainer's LoRA: the federation's shared :class:`protocol.LoraShape` plus the
    one setting that is the trainer's alone.

    Attributes:
        dropout: dropout on the LoRA input; keep 0.0 under DP (it is per-sample noise
            that Opacus does not account for, and it slows memorisation audits).
        init_rank: the rank the seeded init is drawn at, then truncated to ``rank``
            (heterogeneous ranks, ADR 0016: a rank-r phone's A is the first r rows of
            the global rank's A); ``None``: ``rank``.

    ``adapt_head`` finds the output head through ``get_output_embeddings()``, so any
    causal-LM family works; it costs r x vocabulary more in B (ADR 0006).
    """

    dropout: float = field(default=0.0, kw_only=True)
    init_rank: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except LoraShapeError as e:
            raise TrainConfigError(str(e)) from e
        _require(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1), got {self.dropout}")
        _require(
            self.init_rank is None or self.init_rank >= self.rank,
            f"LoRA init_rank must be >= rank {self.rank}, got {self.init_rank}",
        )

    @classmethod
    def of(
        cls, shape: LoraShape, *, dropout: float = 0.0, init_rank: int | None = None
    ) -> LoraSettings:
        """The trainer settings for ``shape``."""
        fields_ = {f.name: getattr(shape, f.name) for f in dataclasses.fields(LoraShape)}
        return cls(**fields_, dropout=dropout, init_rank=init_rank)


@dataclass(frozen=True)
class DPSettings:
    """Record-level DP-SGD (Opacus) settings for one device.

    Attributes:
        enabled: train with DP-SGD (Poisson sampling, per-sample clipping, noise).
        noise_multiplier: sigma; if None it is derived from ``target_epsilon``.
        target_epsilon: total epsilon that ``TrainSettings.planned_rounds`` identical
            rounds should reach; used only when ``noise_multiplier`` is None.
        delta: the delta of every epsilon reported.
        max_grad_norm: per-sample clipping bound C.
        accountant: ``"prv"`` (tight) or ``"rdp"``.
        epsilon_budget: the device's cap on epsilon over all rounds (privacy ledger).
        grad_sample_mode: ``"hooks"`` (per-sample gradients) or ``"ghost"`` (Opacus
            fast gradient clipping: per-sample norms only, two backward passes).
    """

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    epsilon_budget: float | None = None
    grad_sample_mode: str = "hooks"

    def __post_init__(self) -> None:
        _require(self.accountant in ACCOUNTANTS, f"accountant must be one of {ACCOUNTANTS}")
        _require(
            self.grad_sample_mode in GRAD_SAMPLE_MODES,
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}",
        )
        _require(0.0 < self.delta < 1.0, f"delta must be in (0, 1), got {self.delta}")
        _require(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("noise_multiplier", "target_epsilon", "epsilon_budget"):
            value = getattr(self, name)
            _require(
                value is None or (math.isfinite(value) and value > 0),
                f"{name} must be a positive finite number or None, got {value}",
            )
        _require(
            not self.enabled or (self.noise_multiplier is None) != (self.target_epsilon is None),
            "with DP enabled give exactly one of noise_multiplier or target_epsilon",
        )


@dataclass(frozen=True)
class TrainSettings:
    """One local training round.

    Attributes:
        local_steps: optimizer steps (logical batches) per round.
        learning_rate: AdamW learning rate of the LoRA parameters.
        batch_size: logical batch size (expected batch size under Poisson sampling);
            None lets the trainer choose (8, at most the number of blocks).
        seq_len: tokens per packed block; None lets the memory planner choose.
        memory_budget_bytes: training memory the device grants on top of the
            interpreter; None means unbounded.
        seed: seed of sampling, shuffling and DP noise.
        planned_rounds: rounds this device expects to train; spreads
            ``DPSettings.target_epsilon`` over them.
        proximal_mu: FedProx's μ (Li et al. 2020): the loss gains
            ``μ/2·‖w − w_global‖²`` over the trained LoRA tensors; 0 turns it off.
    """

    local_steps: int = 10
    learning_rate: float = 5e-3
    batch_size: int | None = None
    seq_len: int | None = None
    memory_budget_bytes: int | None = None
    seed: int = 0
    planned_rounds: int = 1
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}")
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"learning_rate must be > 0, got {self.learning_rate}",
        )
        _require(self.batch_size is None or self.batch_size >= 1, "batch_size must be >= 1")
        _require(self.seq_len is None or self.seq_len >= 2, "seq_len must be >= 2")
        _require(
            self.memory_budget_bytes is None or self.memory_budget_bytes > 0,
            "memory_budget_bytes must be > 0",
        )
        _require(self.planned_rounds >= 1, "planned_rounds must be >= 1")
        _require(
            math.isfinite(self.proximal_mu) and self.proximal_mu >= 0,
            f"proximal_mu must be >= 0, got {self.proximal_mu}",
        )


@dataclass(frozen=True)
class TrainResult:
    """What one call of :meth:`LocalTrainer.train` produced.

    ``epsilon`` is the ledger's total after this round (None without DP);
    ``adapter`` holds only the exchanged tensors (see ``trainable_names``).
    """

    status: str
    adapter: dict[str, torch.Tensor]
    num_examples: int
    steps: int
    train_loss: float
    epsilon: float | None
    noise_multiplier: float | None
    batch_size: int
    seq_len: int
    message: str = ""
    delta: float | None = None
    sample_rate: float | None = None
    max_grad_norm: float | None = None
    physical_batch_size: int = 0
    estimated_peak_bytes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in TRAIN_STATUSES:
            raise TrainConfigError(f"status must be one of {TRAIN_STATUSES}, got {self.status}")


@dataclass(frozen=True)
class EvalResult:
    """Held-out next-token metrics: mean loss (nats/token), perplexity, top-1 accuracy."""

    loss: float
    perplexity: float
    accuracy: float
    num_tokens: int
