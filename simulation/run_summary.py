"""``DIR/summary.json``: the machine-readable result of ``fedota simulate``.

The schema is documented in ``docs/summary-schema.md`` (``schema_version`` 1); the
``fleet``, ``rollouts`` and ``ota_rounds`` parts of a run with a fleet in
``docs/simulate.md``. ``Summary`` is that document as frozen records: its ``to_dict()``
is what ``write_summary`` writes, keys in the records' field order. Built from the
server's per-round history (round 0 = baseline evaluation), so it is the same whether a
run was resumed or not. Record-level and user-level ε are kept apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import atomic_write_text
from simulation.json_form import JsonRecord

if TYPE_CHECKING:
    from simulation.data import PartitionRecord
    from simulation.fleet import FleetOutcome, FleetSummary, OtaRoundSummary, RolloutSummary

__all__ = [
    "SCHEMA_VERSION",
    "EvalPoint",
    "Evaluation",
    "Privacy",
    "RecordLevelPrivacy",
    "RoundEpsilon",
    "RoundSummary",
    "RunConfigSummary",
    "Summary",
    "UserLevelPrivacy",
    "build_summary",
    "write_summary",
]

SCHEMA_VERSION = 1

# One entry of the server's history: {"round", "train", "evaluate", "elapsed_s"}.
HistoryEntry = dict[str, Any]
RunConfig = dict[str, Any]


@dataclass(frozen=True)
class Evaluation(JsonRecord):
    """Next-token metrics of the global adapter on one population (``EVAL_POINT``)."""

    eval_loss: float | None
    eval_accuracy: float | None
    eval_perplexity: float | None
    eval_tokens: int


@dataclass(frozen=True)
class EvalPoint(JsonRecord):
    """``EVAL_POINT``: the training clients' held-out text, and the held-out clients."""

    round: int
    eval_loss: float | None
    eval_accuracy: float | None
    eval_perplexity: float | None
    eval_tokens: int
    heldout_clients: Evaluation


@dataclass(frozen=True)
class RoundEpsilon(JsonRecord):
    """A round's cumulative ε, of the mode that ran (the other is ``None``)."""

    record_level: float | None
    user_level: float | None


@dataclass(frozen=True)
class RoundSummary(EvalPoint):
    """``ROUND``: an ``EVAL_POINT`` plus what the round's training did."""

    train_loss: float | None
    clients_sampled: int
    clients_trained: int
    clients_failed: int
    clients_rejected: int
    clients_dropped: int
    clients_budget_exhausted: int
    applied: bool
    upload_bytes: int
    upload_bytes_per_client: int
    epsilon: RoundEpsilon
    elapsed_s: float


@dataclass(frozen=True)
class RunConfigSummary(JsonRecord):
    """``config``: the settings the run actually used (values as the run config has them)."""

    clients: int
    heldout_clients: int
    clients_per_round: int
    client_sampling: str
    rounds: int
    aggregation: str | None
    dp_mode: str
    target_epsilon: float | None
    local_steps: int
    lora_rank: int
    lora_head: bool
    learning_rate: float | None
    batch_size: int | None
    seq_len: int | None
    seed: int
    base_model: str | None
    partition: PartitionRecord | None = None  # how the clients were made (--partition)


@dataclass(frozen=True)
class RecordLevelPrivacy(JsonRecord):
    """``privacy.record_level``: DP-SGD on the phones; unit: one example of one device."""

    epsilon: float | None
    delta: float
    noise_multiplier: float | None
    clip: float
    accountant: str
    unit: str = "one training example (packed text block) of one device"
    note: str = (
        "largest cumulative ε over devices, from each device's privacy ledger; "
        "noise_multiplier is the largest σ any device used (a device scheduled in fewer "
        "rounds spends its ε over fewer rounds, with a smaller σ)"
    )


@dataclass(frozen=True)
class UserLevelPrivacy(JsonRecord):
    """``privacy.user_level``: central DP-FedAvg; unit: all data of one client."""

    epsilon: float | None
    delta: float
    noise_multiplier: float | None
    clip: float
    sample_rate: float
    accountant: str = "pld (dp-accounting), Poisson-subsampled Gaussian per round"
    unit: str = "all data of one client"


@dataclass(frozen=True)
class Privacy(JsonRecord):
    """``privacy``: the active mode's guarantee, and each level's details (or ``None``)."""

    mode: str
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    clip: float | None
    record_level: RecordLevelPrivacy | None
    user_level: UserLevelPrivacy | None


@dataclass(frozen=True)
class Summary(JsonRecord):
    """``summary.json``; a run with a fleet adds ``fleet``, ``rollouts`` and ``ota_rounds``
    (``None`` otherwise, and then absent from the JSON)."""

    schema_version: int
    config: RunConfigSummary
    baseline: EvalPoint
    final: EvalPoint
    rounds: tuple[RoundSummary, ...]
    privacy: Privacy
    elapsed_s: float
    fleet: FleetSummary | None = None
    rollouts: tuple[RolloutSummary, ...] | None = None
    ota_rounds: tuple[OtaRoundSummary, ...] | None = None
    options: dict[str, Any] | None = None  # the command's options (OUT/config.toml)

    def to_dict(self) -> dict[str, Any]:
        """The document ``write_summary`` writes (the fleet's parts only with a fleet,
        ``options`` only for a run started from the command line)."""
        out = super().to_dict()
        for part in ("fleet", "rollouts", "ota_rounds", "options"):
            if out[part] is None:
                del out[part]
        return out

    def with_fleet(self, outcome: FleetOutcome, ota_rounds: tuple[OtaRoundSummary, ...]) -> Summary:
        """This training summary plus what the OTA half did."""
        return dataclasses.replace(
            self, fleet=outcome.fleet, rollouts=outcome.rollouts, ota_rounds=ota_rounds
        )


def _num(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _evaluation(evaluation: dict[str, Any], prefix: str) -> Evaluation:
    return Evaluation(
        eval_loss=_num(evaluation.get(f"{prefix}-loss")),
        eval_accuracy=_num(evaluation.get(f"{prefix}-accuracy")),
        eval_perplexity=_num(evaluation.get(f"{prefix}-perplexity")),
        eval_tokens=int(evaluation.get(f"{prefix}-tokens", 0)),
    )


def _point(entry: HistoryEntry) -> EvalPoint:
    ev = entry.get("evaluate", {})
    clients = _evaluation(ev, "clients")
    return EvalPoint(
        round=int(entry["round"]),
        eval_loss=clients.eval_loss,
        eval_accuracy=clients.eval_accuracy,
        eval_perplexity=clients.eval_perplexity,
        eval_tokens=clients.eval_tokens,
        heldout_clients=_evaluation(ev, "heldout"),
    )


def _round(entry: HistoryEntry, dp_mode: str) -> RoundSummary:
    tr = entry.get("train", {})
    trained = int(tr.get("clients-trained", 0))
    upload = int(tr.get("upload-bytes", 0))
    point = _point(entry)
    return RoundSummary(
        round=point.round,
        eval_loss=point.eval_loss,
        eval_accuracy=point.eval_accuracy,
        eval_perplexity=point.eval_perplexity,
        eval_tokens=point.eval_tokens,
        heldout_clients=point.heldout_clients,
        train_loss=_num(tr.get("train-loss")),
        clients_sampled=int(tr.get("clients-sampled", 0)),
        clients_trained=trained,
        clients_failed=int(tr.get("clients-failed", 0)),
        clients_rejected=int(tr.get("clients-rejected", 0)),
        clients_dropped=int(tr.get("clients-dropped", 0)),
        clients_budget_exhausted=int(tr.get("clients-budget-exhausted", 0)),
        applied=bool(tr.get("round-applied", 0)),
        upload_bytes=upload,
        upload_bytes_per_client=upload // trained if trained else 0,
        epsilon=RoundEpsilon(
            record_level=_num(tr.get("record-epsilon")) if dp_mode == "record" else None,
            user_level=_num(tr.get("user-epsilon")) if dp_mode == "user" else None,
        ),
        elapsed_s=round(float(entry.get("elapsed_s", 0.0)), 3),
    )


def _record_level(
    rounds: list[RoundSummary], history: list[HistoryEntry], run_config: RunConfig
) -> RecordLevelPrivacy:
    sigmas = (h.get("train", {}).get("client-noise-multiplier", 0.0) for h in history)
    return RecordLevelPrivacy(
        epsilon=rounds[-1].epsilon.record_level if rounds else None,
        delta=float(run_config.get("delta", 1e-5)),
        noise_multiplier=_num(max(sigmas, default=0.0)),
        clip=float(run_config.get("max-grad-norm", 1.0)),
        accountant=str(run_config.get("accountant", "prv")),
    )


def _user_level(
    history: list[HistoryEntry], run_config: RunConfig, num_clients: int
) -> UserLevelPrivacy:
    last_train = history[-1].get("train", {}) if history else {}
    per_round = int(run_config.get("clients-per-round", 1))
    return UserLevelPrivacy(
        epsilon=_num(last_train.get("user-epsilon")),
        delta=float(run_config.get("delta", 1e-5)),
        noise_multiplier=_num(last_train.get("user-noise-multiplier")),
        clip=float(run_config.get("user-clip", 0.0)),
        sample_rate=min(1.0, per_round / max(num_clients, 1)),
    )


def _privacy(
    rounds: list[RoundSummary],
    history: list[HistoryEntry],
    run_config: RunConfig,
    num_clients: int,
) -> Privacy:
    mode = str(run_config.get("dp-mode", "none"))
    record = _record_level(rounds, history, run_config) if mode == "record" else None
    user = _user_level(history, run_config, num_clients) if mode == "user" else None
    active = record or user
    return Privacy(
        mode=mode,
        epsilon=active.epsilon if active else None,
        delta=float(run_config.get("delta", 1e-5)) if active else None,
        noise_multiplier=active.noise_multiplier if active else None,
        clip=active.clip if active else None,
        record_level=record,
        user_level=user,
    )


def _config(
    run_config: RunConfig, num_clients: int, num_heldout_clients: int, num_rounds: int
) -> RunConfigSummary:
    mode = str(run_config.get("dp-mode", "none"))
    return RunConfigSummary(
        clients=num_clients,
        heldout_clients=num_heldout_clients,
        clients_per_round=int(run_config.get("clients-per-round", 0)),
        client_sampling=(
            "poisson" if mode == "user" else run_config.get("client-sampling", "balanced")
        ),
        rounds=int(run_config.get("num-server-rounds", num_rounds)),
        aggregation=run_config.get("aggregation"),
        dp_mode=mode,
        target_epsilon=_num(run_config.get("target-epsilon")) if mode != "none" else None,
        local_steps=int(run_config.get("local-steps", 0)),
        lora_rank=int(run_config.get("lora-rank", 0)),
        lora_head=bool(run_config.get("lora-head", False)),
        learning_rate=_num(run_config.get("learning-rate")),
        batch_size=run_config.get("batch-size"),
        seq_len=run_config.get("seq-len"),
        seed=int(run_config.get("seed", 0)),
        base_model=run_config.get("base-model"),
    )


def build_summary(
    *,
    history: list[HistoryEntry],
    run_config: RunConfig,
    num_clients: int,
    num_heldout_clients: int,
    elapsed_s: float,
    options: dict[str, Any] | None = None,
    partition: PartitionRecord | None = None,
) -> Summary:
    """Turn the server's history into the ``summary.json`` document.

    ``options`` are the command-line options the run was started with (recorded as is).

    Raises:
        ValueError: the history lacks round 0 (the baseline).
    """
    if not history or int(history[0]["round"]) != 0:
        raise ValueError("history must start with round 0 (the baseline evaluation)")
    mode = str(run_config.get("dp-mode", "none"))
    rounds = [_round(h, mode) for h in history[1:]]
    return Summary(
        schema_version=SCHEMA_VERSION,
        config=dataclasses.replace(
            _config(run_config, num_clients, num_heldout_clients, len(rounds)), partition=partition
        ),
        baseline=_point(history[0]),
        final=_point(history[-1]),
        rounds=tuple(rounds),
        privacy=_privacy(rounds, history, run_config, num_clients),
        elapsed_s=round(elapsed_s, 3),
        options=options,
    )


def write_summary(out_dir: Path, summary: Summary) -> Path:
    """Write ``out_dir/summary.json`` atomically (``protocol.files``).

    Raises:
        OSError: the directory cannot be written.
    """
    path = out_dir / "summary.json"
    atomic_write_text(path, json.dumps(summary.to_dict(), indent=2, allow_nan=False) + "\n")
    return path
