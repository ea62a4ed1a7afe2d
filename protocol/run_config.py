"""The configuration of one federated run, defined once for every side.

The ``ServerApp`` (``server.federation``), the phones' ``ClientApp`` (``client``) and
``fedota simulate`` (``simulation``) all read a run's settings through
:class:`RunConfig`. On the wire it is Flower's run config: flat kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml``, overridden by ``flwr run
--run-config`` or by the simulation). ``tests/test_protocol.py`` checks that the
pyproject table is exactly ``RunConfig().to_flower()``, so the two cannot drift.

Some client defaults depend on the privacy mode (record-level DP-SGD wants full
batches, few steps and a larger learning rate; docs/adr/0005-what-epsilon-means.md,
appendix). Those fields are ``None`` ("the mode's default"; ``0``, ``0.0`` or
``"auto"`` on the wire) until :meth:`RunConfig.resolved` fills them from
:data:`MODE_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "MODE_DEFAULTS",
    "Accountant",
    "Aggregation",
    "ClientSampling",
    "DpMode",
    "ModeDefaults",
    "RunConfig",
    "RunConfigError",
    "StrategyName",
]


class RunConfigError(ValueError):
    """A run-config key is unknown, or its value has the wrong type or range."""


class DpMode(StrEnum):
    """Where differential privacy is applied."""

    NONE = "none"  # no DP
    RECORD = "record"  # DP-SGD on each phone: ε protects one text of one phone
    USER = "user"  # central DP-FedAvg on the server: ε protects a whole phone


class Aggregation(StrEnum):
    """How the server combines the phones' LoRA updates (ADR 0006)."""

    FEDAVG = "fedavg"  # average A and B
    FFA = "ffa"  # FFA-LoRA: A frozen at a shared seeded init, only B trained and averaged


class ClientSampling(StrEnum):
    """How training clients are picked each round (user-level DP always samples Poisson)."""

    BALANCED = "balanced"  # fewest rounds trained first; each phone learns its rounds
    UNIFORM = "uniform"  # independently each round


class StrategyName(StrEnum):
    """How the server applies the aggregated update, or (FedProx) how phones train.

    The server optimizers treat the (possibly noised) aggregated delta as a negative
    pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2).
    """

    FEDAVG = "fedavg"  # global += aggregated delta
    FEDAVGM = "fedavgm"  # server SGD with momentum (Hsu et al. 2019)
    FEDADAM = "fedadam"  # server Adam (Reddi et al. 2021)
    FEDYOGI = "fedyogi"  # server Yogi (Reddi et al. 2021)
    FEDPROX = "fedprox"  # phones add (mu/2)·||w - w_global||² over LoRA (Li et al. 2020)


class Accountant(StrEnum):
    """The record-level privacy accountant of the phones (dp-accounting / Opacus)."""

    PRV = "prv"
    RDP = "rdp"


@dataclass(frozen=True)
class ModeDefaults:
    """The client training settings a privacy mode uses unless the run sets them."""

    local_steps: int
    learning_rate: float
    lora_head: bool
    batch_size: int | None = None  # None: the trainer's own choice
    seq_len: int | None = None


MODE_DEFAULTS: Mapping[DpMode, ModeDefaults] = {
    DpMode.NONE: ModeDefaults(local_steps=10, learning_rate=5e-3, lora_head=False),
    DpMode.USER: ModeDefaults(local_steps=10, learning_rate=5e-3, lora_head=False),
    # Full-batch DP-SGD steps (a logical batch of 1,024 texts, each one 32-token block)
    # at a larger learning rate, with LoRA on the output head too: the record-DP
    # exploration in docs/adr/0005-what-epsilon-means.md (appendix) chose these.
    DpMode.RECORD: ModeDefaults(
        local_steps=8, learning_rate=3e-2, lora_head=True, batch_size=1024, seq_len=32
    ),
}

_AUTO = "auto"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one federated run, with its one default.

    Attributes:
        num_server_rounds: rounds to train.
        clients_per_round: clients sampled per round (expected number under user DP).
        min_clients: fewest accepted updates for a round to change the global adapter.
        aggregation: ``fedavg`` or ``ffa``; ``None``: ``ffa`` under DP, else ``fedavg``.
        dp_mode: ``none``, ``record`` (DP-SGD on each phone) or ``user`` (central).
        target_epsilon: ε the run aims at (record: per phone; user: the whole run).
        delta: δ at which every ε is reported.
        max_grad_norm: per-example clip of record-level DP-SGD.
        accountant: record-level accountant, ``prv`` or ``rdp``.
        user_clip: L2 bound on one client's update under user-level DP.
        user_noise_multiplier: σ for user DP; 0 means "calibrate from target ε".
        max_update_norm: updates with a larger L2 norm are rejected (0 disables).
        local_steps: optimizer steps per client per round (``None``: mode default).
        learning_rate: client learning rate (``None``: mode default).
        lora_rank: LoRA rank every phone trains.
        lora_alpha: LoRA alpha (``None``: twice the rank).
        lora_head: LoRA on the output head too (``None``: mode default).
        batch_size: client logical batch size (``None``: mode default or the trainer's).
        seq_len: tokens per training block (``None``: mode default or the trainer's).
        epsilon_budget: a phone's lifetime record-level ε budget (``None``: none).
        memory_budget_bytes: a phone's training memory budget (``None``: none).
        lora_ranks: the LoRA ranks phones may train, comma-separated (``"4,8,16"``):
            each phone trains the largest one its training memory budget fits, and
            the global adapter has the largest (it replaces ``lora_rank``; ADR 0016).
            ``""``: every phone trains ``lora_rank``.
        client_memory_tiers_mib: simulation: training memory budgets in MiB,
            comma-separated; partition ``i`` gets tier ``i mod k`` (a phone's node
            config ``memory-budget-bytes`` wins). ``""``: ``memory_budget_bytes``.
        seed: seeds sampling, local training and the central noise.
        num_nodes: nodes to wait for before round 0 (0: any).
        round_timeout_s: how long to wait for replies; late replies are dropouts.
        connect_timeout_s: how long to wait for ``num_nodes`` to connect.
        base_model: the base model directory on the phones (or their node config).
        data_dir: simulation: where ``partition-<id>.json`` files are.
        state_dir: where phones keep their privacy ledgers.
        checkpoint_dir: server checkpoints (``""``: none).
        eval_max_clients: training clients evaluated per round (0: all).
        client_sampling: ``balanced`` or ``uniform``.
        strategy: ``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi`` or ``fedprox``.
        server_learning_rate: server step size η of ``fedavgm`` / ``fedadam`` /
            ``fedyogi`` (``None``: 1.0 for ``fedavgm``, 0.01 for the adaptive ones).
        server_momentum: ``fedavgm``'s momentum.
        server_beta1: first-moment decay of ``fedadam`` / ``fedyogi``.
        server_beta2: second-moment decay of ``fedadam`` / ``fedyogi``.
        server_tau: adaptivity τ of ``fedadam`` / ``fedyogi`` (also √v's initial value).
        proximal_mu: ``fedprox``'s μ (0: plain local training, which is ``fedavg``).
        user_clip_quantile: user-level DP: the share γ of updates the clip should
            leave unclipped, adapted each round (Andrew et al. 2021); ``user_clip`` is
            then the initial clip. ``None``: a fixed clip.
        user_clip_lr: the geometric step η_C of the adaptive clip.
        user_clip_count_stddev: σ_b of the noise on the unclipped count (``None``: the
            expected cohort / 20, the paper's choice).
    """

    num_server_rounds: int = 3
    clients_per_round: int = 3
    min_clients: int = 2
    aggregation: Aggregation | None = None
    dp_mode: DpMode = DpMode.RECORD
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Accountant = Accountant.PRV
    user_clip: float = 1.0
    user_noise_multiplier: float = 0.0
    max_update_norm: float = 100.0
    local_steps: int | None = None
    learning_rate: float | None = None
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_head: bool | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    epsilon_budget: float | None = None
    memory_budget_bytes: int | None = None
    lora_ranks: str = ""
    client_memory_tiers_mib: str = ""
    seed: int = 0
    num_nodes: int = 0
    round_timeout_s: float = 600.0
    connect_timeout_s: float = 120.0
    base_model: str = ""
    data_dir: str = ""
    state_dir: str = ""
    checkpoint_dir: str = ""
    eval_max_clients: int = 0
    client_sampling: ClientSampling = ClientSampling.BALANCED
    strategy: StrategyName = StrategyName.FEDAVG
    server_learning_rate: float | None = None
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    proximal_mu: float = 0.01
    user_clip_quantile: float | None = None
    user_clip_lr: float = 0.2
    user_clip_count_stddev: float | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The run-config keys, kebab-case, in declaration order."""
        return tuple(_key(f.name) for f in dataclasses.fields(cls))

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse a Flower run config (kebab-case keys; any subset of :meth:`keys`).

        ``0``, ``0.0``, ``""`` and ``"auto"`` stand for ``None`` ("the default") in the
        optional fields, as Flower's config values cannot be null.

        Raises:
            RunConfigError: an unknown key, or a value of the wrong type.
        """
        unknown = sorted(set(run_config) - set(cls.keys()))
        if unknown:
            raise RunConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; known keys: "
                + ", ".join(cls.keys())
            )
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = _key(f.name)
            if key in run_config:
                values[f.name] = _parse(key, run_config[key], f.type)
        return cls(**values)

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """The Flower run config: every key, ``None`` written as ``0``/``""``/``"auto"``."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[_key(f.name)] = _to_flower(value, f.type)
        return out

    def resolved(self) -> RunConfig:
        """This config with every mode-dependent default filled in.

        ``aggregation``, ``local_steps``, ``learning_rate``, ``lora_alpha`` and
        ``lora_head`` are never ``None`` in the result; ``batch_size`` and ``seq_len``
        stay ``None`` where the mode leaves them to the trainer.
        """
        mode = MODE_DEFAULTS[self.dp_mode]
        return dataclasses.replace(
            self,
            aggregation=self.resolved_aggregation,
            local_steps=_or(self.local_steps, mode.local_steps),
            learning_rate=_or(self.learning_rate, mode.learning_rate),
            lora_rank=self.global_rank,
            lora_alpha=_or(self.lora_alpha, 2.0 * self.global_rank),
            lora_head=_or(self.lora_head, mode.lora_head),
            batch_size=_or(self.batch_size, mode.batch_size),
            seq_len=_or(self.seq_len, mode.seq_len),
        )

    @property
    def allowed_ranks(self) -> tuple[int, ...]:
        """The ranks of ``lora_ranks``, sorted (empty: every phone trains ``lora_rank``).

        Raises:
            RunConfigError: ``lora_ranks`` is not a list of integers >= 1.
        """
        return _int_list("lora-ranks", self.lora_ranks)

    @property
    def global_rank(self) -> int:
        """The rank of the global adapter: the largest allowed rank, else ``lora_rank``."""
        return max(self.allowed_ranks, default=self.lora_rank)

    @property
    def memory_tiers_bytes(self) -> tuple[int, ...]:
        """``client_memory_tiers_mib`` in bytes, in the order given (empty: none).

        Raises:
            RunConfigError: not a list of integers >= 1.
        """
        return tuple(
            t << 20
            for t in _int_list(
                "client-memory-tiers-mib", self.client_memory_tiers_mib, keep_order=True
            )
        )

    @property
    def resolved_aggregation(self) -> Aggregation:
        """The aggregation used: the set one, else ``ffa`` under DP and ``fedavg`` without."""
        if self.aggregation is not None:
            return self.aggregation
        return Aggregation.FEDAVG if self.dp_mode == DpMode.NONE else Aggregation.FFA

    def problems(self) -> list[str]:
        """What is out of range, one phrase per setting (empty when all is well)."""
        out = []
        if self.num_server_rounds < 1:
            out.append(f"num-server-rounds={self.num_server_rounds} (need ≥ 1)")
        if self.clients_per_round < 1:
            out.append(f"clients-per-round={self.clients_per_round} (need ≥ 1)")
        if self.min_clients < 0:
            out.append(f"min-clients={self.min_clients} (need ≥ 0)")
        if self.dp_mode != DpMode.NONE and not (
            self.target_epsilon > 0 and math.isfinite(self.target_epsilon)
        ):
            out.append(f"target-epsilon={self.target_epsilon} (need a finite ε > 0)")
        if not 0 < self.delta < 1:
            out.append(f"delta={self.delta} (need 0 < δ < 1)")
        if self.user_clip <= 0:
            out.append(f"user-clip={self.user_clip} (need > 0)")
        if self.lora_rank < 1:
            out.append(f"lora-rank={self.lora_rank} (need ≥ 1)")
        for check in (lambda: self.allowed_ranks, lambda: self.memory_tiers_bytes):
            try:
                check()
            except RunConfigError as e:
                out.append(str(e))
        return out + self._strategy_problems()

    def _strategy_problems(self) -> list[str]:
        out = []
        lr = self.server_learning_rate
        if lr is not None and not (lr > 0 and math.isfinite(lr)):
            out.append(f"server-learning-rate={lr} (need a finite η > 0)")
        for key, value in (
            ("server-momentum", self.server_momentum),
            ("server-beta1", self.server_beta1),
            ("server-beta2", self.server_beta2),
        ):
            if not 0 <= value < 1:
                out.append(f"{key}={value} (need 0 ≤ value < 1)")
        if not self.server_tau > 0:
            out.append(f"server-tau={self.server_tau} (need > 0)")
        if not self.proximal_mu >= 0:
            out.append(f"proximal-mu={self.proximal_mu} (need ≥ 0)")
        quantile = self.user_clip_quantile
        if quantile is not None:
            if not 0 < quantile < 1:
                out.append(f"user-clip-quantile={quantile} (need 0 < γ < 1)")
            if self.dp_mode != DpMode.USER:
                out.append(f"user-clip-quantile={quantile} (adaptive clipping needs dp-mode user)")
        if not self.user_clip_lr > 0:
            out.append(f"user-clip-lr={self.user_clip_lr} (need > 0)")
        stddev = self.user_clip_count_stddev
        if stddev is not None and not stddev > 0:
            out.append(f"user-clip-count-stddev={stddev} (need > 0)")
        return out


def _key(name: str) -> str:
    return name.replace("_", "-")


def _int_list(key: str, text: str, *, keep_order: bool = False) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = [0]
    if any(v < 1 for v in values):
        raise RunConfigError(f"{key}={text!r} (need comma-separated integers ≥ 1, e.g. 4,8,16)")
    return tuple(values) if keep_order else tuple(sorted(set(values)))


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


_TYPES: dict[str, tuple[Any, bool]] = {}  # annotation text -> (base type, optional)


def _annotation(annotation: Any) -> tuple[Any, bool]:
    """The base type of a field annotation (``from __future__`` keeps them as text)."""
    text = str(annotation)
    if text not in _TYPES:
        parts = [p.strip() for p in text.split("|")]
        optional = "None" in parts
        (name,) = [p for p in parts if p != "None"]
        _TYPES[text] = (_BY_NAME[name], optional)
    return _TYPES[text]


_BY_NAME: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "DpMode": DpMode,
    "Aggregation": Aggregation,
    "ClientSampling": ClientSampling,
    "Accountant": Accountant,
    "StrategyName": StrategyName,
}


def _parse(key: str, raw: Any, annotation: Any) -> Any:
    kind, optional = _annotation(annotation)
    if optional and (raw is None or (raw in (0, "", _AUTO) and not isinstance(raw, bool))):
        return None
    try:
        if kind is bool:
            return _flag(raw)
        if issubclass(kind, StrEnum):
            return kind(str(raw))
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"{raw} is not a whole number")
        if kind in (int, float) and isinstance(raw, bool):
            raise ValueError("a number is needed")
        return kind(raw)
    except (TypeError, ValueError) as e:
        if issubclass(kind, StrEnum):
            choices = ", ".join(m.value for m in kind)
            raise RunConfigError(f"{key}={raw!r} is not one of {choices}") from e
        raise RunConfigError(f"{key}={raw!r} is not a valid {kind.__name__}: {e}") from e


def _flag(value: Any) -> bool:
    """A boolean run-config value (Flower keeps TOML booleans; CLI overrides may be text)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _to_flower(value: Any, annotation: Any) -> bool | int | float | str:
    kind, _optional = _annotation(annotation)
    if value is None:
        if kind is bool or issubclass(kind, StrEnum):
            return _AUTO
        return "" if kind is str else kind(0)
    if isinstance(value, StrEnum):
        return value.value
    return kind(value)
