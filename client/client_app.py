"""The Flower ``ClientApp`` of fedota (``[tool.flwr.app.components] clientapp``).

Stage ① train as seen from the federation: each phone answers three messages —

* ``query``: who am I (``client-id``, ``role``), or the seeded initial adapter;
* ``train``: fine-tune the received global adapter on local data (LoRA, optionally
  DP-SGD with a persistent privacy ledger) and return only the exchanged tensors;
* ``evaluate``: held-out loss / accuracy of the received adapter — a training client
  on its held-out split, a held-out client (``role = "heldout"``) on all of its text.

Settings come from the run config (``protocol.RunConfig``, ``[tool.flwr.app.config]``),
overlaid by the node config (``data-file``, ``state-dir`` on a real phone;
``partition-id`` in simulation). Records are built with ``protocol.records``, the codec
the server decodes with. The ``LocalTrainer`` (which holds the NF4 base) is cached per process so
simulation actors load the base once, not every round; nothing else is kept between
rounds except the privacy ledger on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.errors import ClientInputError
from protocol import (
    Aggregation,
    DpMode,
    LoraShape,
    RunConfig,
    RunConfigError,
    StrategyName,
    truncate_to_rank,
)
from protocol.records import (
    ARRAYS,
    CONFIG,
    LORA_RANK,
    METRICS,
    STATUS,
    ReplyStatus,
    Role,
    eval_metrics,
    numpy_to_arrays,
    status_record,
    train_metrics,
)

__all__ = ["ClientSettings", "app", "make_client_app"]

logger = logging.getLogger(__name__)

_TRAINERS: dict[tuple[Any, ...], Any] = {}


@dataclass(frozen=True)
class ClientSettings:
    """The phone-side settings of one federated run, validated once per message.

    Attributes:
        base_model: the base model directory (node config ``base-model`` or run config).
        data_file: this phone's partition file (node config ``data-file``, or
            ``data-dir/partition-<partition-id>.json`` in simulation).
        state_dir: where this phone keeps its privacy ledger (``None``: in memory).
        run: the run's configuration, with the privacy mode's defaults filled in.
        memory_budget_bytes: this phone's training memory budget: node config
            ``memory-budget-bytes``, else in simulation the tier of its partition
            (``client-memory-tiers-mib``, partition ``i`` → tier ``i mod k``), else the
            run's ``memory-budget-bytes``.
    """

    base_model: Path
    data_file: Path
    state_dir: Path | None
    run: RunConfig
    memory_budget_bytes: int | None = None

    @classmethod
    def from_context(cls, context: Context, overrides: Mapping[str, Any]) -> ClientSettings:
        """Merge run config, ``overrides`` and node config into settings.

        Raises:
            ClientInputError: no base model or data file, or a value of the wrong type.
        """
        try:
            run = RunConfig.from_flower({**context.run_config, **overrides}).resolved()
        except RunConfigError as e:
            raise ClientInputError(f"invalid client setting in the run config: {e}") from e
        node = dict(context.node_config)
        base = str(node.get("base-model") or run.base_model)
        data = str(node.get("data-file") or "")
        if not data and run.data_dir and "partition-id" in node:
            data = str(Path(run.data_dir) / f"partition-{int(node['partition-id'])}.json")
        state = str(node.get("state-dir") or run.state_dir)
        if not base or not data:
            raise ClientInputError(
                f"client needs a base model and a data file, got base-model={base!r}, "
                f"data-file={data!r}; set base-model/data-dir in the run config or "
                "base-model/data-file in --node-config"
            )
        return cls(
            base_model=Path(base),
            data_file=Path(data),
            state_dir=Path(state) if state else None,
            run=run,
            memory_budget_bytes=_memory_budget(run, node),
        )

    @property
    def lora(self) -> LoraShape:
        """The LoRA shape every phone of this run trains (A seeded by the run's seed)."""
        assert self.run.lora_alpha is not None and self.run.lora_head is not None
        return LoraShape(
            rank=self.run.lora_rank,
            alpha=self.run.lora_alpha,
            adapt_head=self.run.lora_head,
            ffa=self.run.resolved_aggregation == Aggregation.FFA,
            init_seed=self.run.seed,
        )


def _memory_budget(run: RunConfig, node: Mapping[str, Any]) -> int | None:
    try:
        if node.get("memory-budget-bytes"):
            return int(node["memory-budget-bytes"])
        tiers = run.memory_tiers_bytes
    except (RunConfigError, TypeError, ValueError) as e:
        raise ClientInputError(f"invalid memory budget in the node or run config: {e}") from e
    if tiers and "partition-id" in node:
        return tiers[int(node["partition-id"]) % len(tiers)]
    return run.memory_budget_bytes


@dataclass(frozen=True)
class Partition:
    """This phone's local data, as written by ``simulation.data.write_partitions``."""

    client_id: str
    role: Role
    train: tuple[str, ...]
    heldout: tuple[str, ...]


def load_partition(path: Path) -> Partition:
    """Read a partition file (``{"client_id", "role", "train", "heldout"}``).

    Raises:
        ClientInputError: the file is missing or not a partition.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Partition(
            client_id=str(raw["client_id"]),
            role=Role.HELDOUT if raw.get("role") == Role.HELDOUT else Role.TRAIN,
            train=tuple(str(t) for t in raw.get("train", ())),
            heldout=tuple(str(t) for t in raw.get("heldout", ())),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ClientInputError(
            f"cannot read the local data file {path}: {e}; expected a JSON partition "
            'with "client_id", "role", "train" and "heldout"'
        ) from e


def _trainer(s: ClientSettings, rank: int | None = None) -> Any:
    """The process-wide ``LocalTrainer`` for this base and LoRA layout, at ``rank``
    (``None``: the run's global rank). A lower rank keeps the global LoRA scale and
    the first ``rank`` slices of the global seeded init (ADR 0016)."""
    from client.train import LocalTrainer, LoraSettings, scaled_alpha

    lora, init_rank = s.lora, None
    if rank is not None and rank != lora.rank:
        alpha = scaled_alpha(lora.alpha, rank, lora.rank)
        lora, init_rank = dataclasses.replace(lora, rank=rank, alpha=alpha), s.lora.rank
    base = str(s.base_model.resolve())
    key = (base, lora, init_rank)
    if key not in _TRAINERS:
        if any(k[0] != base for k in _TRAINERS):
            _TRAINERS.clear()  # one base per process: a phone holds one model
        settings = LoraSettings.of(lora, init_rank=init_rank)
        _TRAINERS[key] = LocalTrainer(s.base_model, settings, device="cpu")
    return _TRAINERS[key]


def _phone_rank(s: ClientSettings) -> int | None:
    """The LoRA rank this phone trains when the run allows several (``None``: the run's
    one rank): the largest its training memory budget fits (``client.train.rank``)."""
    from client.train import DPSettings, TrainSettings, rank_for_trainer

    allowed = s.run.allowed_ranks
    if not allowed:
        return None
    settings = TrainSettings(
        batch_size=s.run.batch_size,
        seq_len=s.run.seq_len,
        memory_budget_bytes=s.memory_budget_bytes,
    )
    record = s.run.dp_mode == DpMode.RECORD
    dp = DPSettings(enabled=record, target_epsilon=s.run.target_epsilon if record else None)
    choice = rank_for_trainer(_trainer(s), allowed=allowed, settings=settings, dp=dp)
    return int(choice.rank)


def _round_seed(seed: int, server_round: int, client_id: str) -> int:
    digest = hashlib.sha256(f"{seed}/{server_round}/{client_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _to_arrays(adapter: Mapping[str, Any]) -> ArrayRecord:
    return numpy_to_arrays({k: v.detach().cpu().numpy() for k, v in adapter.items()})


def _from_arrays(record: ArrayRecord | None) -> dict[str, Any] | None:
    import torch

    if record is None or not len(record):
        return None
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def _status(part: Partition, status: str = ReplyStatus.OK, message: str = "") -> ConfigRecord:
    return status_record(part.client_id, part.role, status, message)


def handle_query(msg: Message, s: ClientSettings) -> RecordDict:
    """Identity (client id and role) or the seeded initial adapter.

    The initial adapter holds the exchanged tensors only (``ffa``: ``lora_B`` = 0; the
    frozen ``A`` is rebuilt on every phone from the shared ``init_seed``).
    """
    part = load_partition(s.data_file)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    status = _status(part)
    rank = _phone_rank(s) if config.get("want") == "identity" else None
    if rank is not None:
        status[LORA_RANK] = rank
    content = RecordDict({STATUS: status})
    if config.get("want") == "initial-adapter":
        content[ARRAYS] = _to_arrays(_trainer(s).initial_adapter())
    return content


def handle_train(msg: Message, s: ClientSettings) -> RecordDict:
    """Train the global adapter on local data; reply with the exchanged tensors."""
    from client.train import DPSettings, PrivacyLedger, TrainSettings

    run = s.run
    assert run.local_steps is not None and run.learning_rate is not None  # resolved
    part = load_partition(s.data_file)
    if part.role == Role.HELDOUT:
        return RecordDict(
            {STATUS: _status(part, ReplyStatus.NO_DATA, "held-out clients never train")}
        )
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    # The rounds this phone is scheduled to train in (the server's balanced schedule),
    # else every round: record-level DP spreads the phone's ε over them.
    planned = int(
        config.get("planned-rounds", config.get("num-server-rounds", run.num_server_rounds))  # type: ignore[arg-type]
    )
    settings = TrainSettings(
        local_steps=run.local_steps,
        learning_rate=run.learning_rate,
        batch_size=run.batch_size,
        seq_len=run.seq_len,
        memory_budget_bytes=s.memory_budget_bytes,
        seed=_round_seed(run.seed, server_round, part.client_id),
        planned_rounds=planned,
        proximal_mu=run.proximal_mu if run.strategy == StrategyName.FEDPROX else 0.0,
    )
    dp = DPSettings(enabled=False)
    ledger = None
    if run.dp_mode == DpMode.RECORD:
        dp = DPSettings(
            enabled=True,
            target_epsilon=run.target_epsilon,
            delta=run.delta,
            max_grad_norm=run.max_grad_norm,
            accountant=run.accountant,
            epsilon_budget=run.epsilon_budget,
        )
        if s.state_dir is not None:
            ledger_dir = s.state_dir / part.client_id
            ledger_dir.mkdir(parents=True, exist_ok=True)
            ledger = PrivacyLedger(
                ledger_dir,
                delta=run.delta,
                accountant=run.accountant,
                epsilon_budget=run.epsilon_budget,
            )
    trainer = _trainer(s, _phone_rank(s))  # the server sent the adapter at this rank
    result = trainer.train(
        _from_arrays(msg.content.array_records.get(ARRAYS)), list(part.train), settings, dp, ledger
    )
    content = RecordDict({STATUS: _status(part, result.status, result.message)})
    content[METRICS] = train_metrics(
        num_examples=result.num_examples,
        train_loss=result.train_loss,
        steps=result.steps,
        epsilon=result.epsilon or 0.0,
        noise_multiplier=result.noise_multiplier or 0.0,
    )
    if result.status == ReplyStatus.OK:
        content[ARRAYS] = _to_arrays(result.adapter)
    logger.info("client %s round %d: %s", part.client_id, server_round, result.status)
    return content


def handle_evaluate(msg: Message, s: ClientSettings) -> RecordDict:
    """Held-out next-token metrics of the received adapter on local text."""
    part = load_partition(s.data_file)
    texts = [*part.train, *part.heldout] if part.role == Role.HELDOUT else list(part.heldout)
    if not texts:
        return RecordDict({STATUS: _status(part, ReplyStatus.NO_DATA, "no held-out text")})
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    # Evaluation blocks have the trainer's fixed length whatever seq-len training used,
    # so runs with different training settings are measured on the same scale.
    # A phone evaluates what it would run: the global adapter truncated to its rank.
    rank = _phone_rank(s)
    adapter = _from_arrays(msg.content.array_records.get(ARRAYS))
    if rank is not None and adapter is not None:
        adapter = truncate_to_rank(adapter, rank)
    result = _trainer(s, rank).evaluate(adapter, texts)
    metrics = eval_metrics(
        loss=result.loss,
        accuracy=result.accuracy,
        num_tokens=result.num_tokens,
        server_round=int(config.get("server-round", 0)),  # type: ignore[arg-type]
    )
    return RecordDict({STATUS: _status(part), METRICS: metrics})


def make_client_app(
    overrides: Mapping[str, Any] | None = None, *, mods: list[Mod] | None = None
) -> ClientApp:
    """A ``ClientApp`` whose run config is overlaid with ``overrides``.

    Args:
        overrides: run-config keys that win over the Flower run config (simulation).
        mods: Flower mods wrapped around every handler (e.g. fault injection in tests).
    """
    client_app = ClientApp(mods=mods or [])
    extra = dict(overrides or {})

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(handle_query(msg, ClientSettings.from_context(context, extra)), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(handle_train(msg, ClientSettings.from_context(context, extra)), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings = ClientSettings.from_context(context, extra)
        return Message(handle_evaluate(msg, settings), reply_to=msg)

    return client_app


app = make_client_app()
