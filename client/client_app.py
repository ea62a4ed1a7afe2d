"""The Flower ``ClientApp`` of fedota (``[tool.flwr.app.components] clientapp``).

Stage ① train as seen from the federation: each phone answers three messages —

* ``query``: who am I (``client-id``, ``role``), or the seeded initial adapter;
* ``train``: fine-tune the received global adapter on local data (LoRA, optionally
  DP-SGD with a persistent privacy ledger) and return only the exchanged tensors;
* ``evaluate``: held-out loss / accuracy of the received adapter — a training client
  on its held-out split, a held-out client (``role = "heldout"``) on all of its text.

Settings come from the run config (``[tool.flwr.app.config]``), overlaid by the node
config (``data-file``, ``state-dir`` on a real phone; ``partition-id`` in simulation).
The record names mirror ``server/federation/records.py`` (the phone cannot import
server code). The ``LocalTrainer`` (which holds the NF4 base) is cached per process so
simulation actors load the base once, not every round; nothing else is kept between
rounds except the privacy ledger on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.errors import ClientInputError

__all__ = ["ClientSettings", "app", "make_client_app"]

logger = logging.getLogger(__name__)

ARRAYS, CONFIG, METRICS, STATUS = "arrays", "config", "metrics", "status"
_TRAINERS: dict[tuple[Any, ...], Any] = {}


@dataclass(frozen=True)
class ClientSettings:
    """The phone-side settings of one federated run, validated once per message."""

    base_model: Path
    data_file: Path
    state_dir: Path | None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_head: bool = False
    ffa: bool = True
    dp_record: bool = False
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    epsilon_budget: float | None = None
    local_steps: int = 10
    learning_rate: float = 5e-3
    batch_size: int | None = None
    seq_len: int | None = None
    memory_budget_bytes: int | None = None
    planned_rounds: int = 3
    seed: int = 0

    @classmethod
    def from_context(cls, context: Context, overrides: Mapping[str, Any]) -> ClientSettings:
        """Merge run config, ``overrides`` and node config into settings.

        Raises:
            ClientInputError: no base model or data file, or a value of the wrong type.
        """
        cfg: dict[str, Any] = {**context.run_config, **overrides}
        node = dict(context.node_config)
        base = str(node.get("base-model") or cfg.get("base-model") or "")
        data = str(node.get("data-file") or "")
        if not data and cfg.get("data-dir") and "partition-id" in node:
            data = str(Path(str(cfg["data-dir"])) / f"partition-{int(node['partition-id'])}.json")
        state = str(node.get("state-dir") or cfg.get("state-dir") or "")
        if not base or not data:
            raise ClientInputError(
                f"client needs a base model and a data file, got base-model={base!r}, "
                f"data-file={data!r}; set base-model/data-dir in the run config or "
                "base-model/data-file in --node-config"
            )

        def opt(key: str, kind: type) -> Any:
            value = cfg.get(key)
            return None if value in (None, "", 0) else kind(value)

        try:
            return cls(
                base_model=Path(base),
                data_file=Path(data),
                state_dir=Path(state) if state else None,
                lora_rank=int(cfg.get("lora-rank", 8)),
                lora_alpha=float(cfg.get("lora-alpha", 2 * int(cfg.get("lora-rank", 8)))),
                lora_head=_flag(cfg.get("lora-head", False)),
                ffa=str(cfg.get("aggregation", "ffa")) == "ffa",
                dp_record=str(cfg.get("dp-mode", "record")) == "record",
                target_epsilon=float(cfg.get("target-epsilon", 8.0)),
                delta=float(cfg.get("delta", 1e-5)),
                max_grad_norm=float(cfg.get("max-grad-norm", 1.0)),
                accountant=str(cfg.get("accountant", "prv")),
                epsilon_budget=opt("epsilon-budget", float),
                local_steps=int(cfg.get("local-steps", 10)),
                learning_rate=float(cfg.get("learning-rate", 5e-3)),
                batch_size=opt("batch-size", int),
                seq_len=opt("seq-len", int),
                memory_budget_bytes=opt("memory-budget-bytes", int),
                planned_rounds=int(cfg.get("num-server-rounds", 3)),
                seed=int(cfg.get("seed", 0)),
            )
        except (TypeError, ValueError) as e:
            raise ClientInputError(f"invalid client setting in the run config: {e}") from e


def _flag(value: Any) -> bool:
    """A boolean run-config value (Flower keeps TOML booleans; CLI overrides may be text)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class Partition:
    """This phone's local data, as written by ``simulation.data.write_partitions``."""

    client_id: str
    role: str
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
            role="heldout" if raw.get("role") == "heldout" else "train",
            train=tuple(str(t) for t in raw.get("train", ())),
            heldout=tuple(str(t) for t in raw.get("heldout", ())),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ClientInputError(
            f"cannot read the local data file {path}: {e}; expected a JSON partition "
            'with "client_id", "role", "train" and "heldout"'
        ) from e


def _lora(s: ClientSettings) -> Any:
    from client.train import LoraSettings

    return LoraSettings(
        rank=s.lora_rank, alpha=s.lora_alpha, adapt_head=s.lora_head, ffa=s.ffa, init_seed=s.seed
    )


def _trainer(s: ClientSettings) -> Any:
    """The process-wide ``LocalTrainer`` for this base and LoRA layout."""
    from client.train import LocalTrainer

    key = (str(s.base_model.resolve()), s.lora_rank, s.lora_alpha, s.lora_head, s.ffa, s.seed)
    if key not in _TRAINERS:
        _TRAINERS.clear()  # one base per process: a phone holds one model
        _TRAINERS[key] = LocalTrainer(s.base_model, _lora(s), device="cpu")
    return _TRAINERS[key]


def _round_seed(seed: int, server_round: int, client_id: str) -> int:
    digest = hashlib.sha256(f"{seed}/{server_round}/{client_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _to_arrays(adapter: Mapping[str, Any]) -> ArrayRecord:
    out = {}
    for k in sorted(adapter):
        out[k] = Array(np.ascontiguousarray(adapter[k].detach().cpu().numpy()))
    return ArrayRecord(array_dict=out)


def _from_arrays(record: ArrayRecord | None) -> dict[str, Any] | None:
    import torch

    if record is None or not len(record):
        return None
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def _status(part: Partition, status: str = "ok", message: str = "") -> ConfigRecord:
    return ConfigRecord(
        {"client-id": part.client_id, "role": part.role, "status": status, "message": message}
    )


def handle_query(msg: Message, s: ClientSettings) -> RecordDict:
    """Identity (client id and role) or the seeded initial adapter.

    The initial adapter holds the exchanged tensors only (``ffa``: ``lora_B`` = 0; the
    frozen ``A`` is rebuilt on every phone from the shared ``init_seed``).
    """
    part = load_partition(s.data_file)
    content = RecordDict({STATUS: _status(part)})
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    if config.get("want") == "initial-adapter":
        content[ARRAYS] = _to_arrays(_trainer(s).initial_adapter())
    return content


def handle_train(msg: Message, s: ClientSettings) -> RecordDict:
    """Train the global adapter on local data; reply with the exchanged tensors."""
    from client.train import DPSettings, PrivacyLedger, TrainSettings

    part = load_partition(s.data_file)
    if part.role == "heldout":
        return RecordDict({STATUS: _status(part, "no_data", "held-out clients never train")})
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    # The rounds this phone is scheduled to train in (the server's balanced schedule),
    # else every round: record-level DP spreads the phone's ε over them.
    planned = int(
        config.get("planned-rounds", config.get("num-server-rounds", s.planned_rounds))  # type: ignore[arg-type]
    )
    settings = TrainSettings(
        local_steps=s.local_steps,
        learning_rate=s.learning_rate,
        batch_size=s.batch_size,
        seq_len=s.seq_len,
        memory_budget_bytes=s.memory_budget_bytes,
        seed=_round_seed(s.seed, server_round, part.client_id),
        planned_rounds=planned,
    )
    dp = DPSettings(enabled=False)
    ledger = None
    if s.dp_record:
        dp = DPSettings(
            enabled=True,
            target_epsilon=s.target_epsilon,
            delta=s.delta,
            max_grad_norm=s.max_grad_norm,
            accountant=s.accountant,
            epsilon_budget=s.epsilon_budget,
        )
        if s.state_dir is not None:
            ledger_dir = s.state_dir / part.client_id
            ledger_dir.mkdir(parents=True, exist_ok=True)
            ledger = PrivacyLedger(
                ledger_dir, delta=s.delta, accountant=s.accountant, epsilon_budget=s.epsilon_budget
            )
    trainer = _trainer(s)
    result = trainer.train(
        _from_arrays(msg.content.array_records.get(ARRAYS)), list(part.train), settings, dp, ledger
    )
    content = RecordDict({STATUS: _status(part, result.status, result.message)})
    content[METRICS] = MetricRecord(
        {
            "num-examples": int(result.num_examples),
            "train-loss": float(result.train_loss),
            "steps": int(result.steps),
            "epsilon": float(result.epsilon or 0.0),
            "noise-multiplier": float(result.noise_multiplier or 0.0),
        }
    )
    if result.status == "ok":
        content[ARRAYS] = _to_arrays(result.adapter)
    logger.info("client %s round %d: %s", part.client_id, server_round, result.status)
    return content


def handle_evaluate(msg: Message, s: ClientSettings) -> RecordDict:
    """Held-out next-token metrics of the received adapter on local text."""
    part = load_partition(s.data_file)
    texts = [*part.train, *part.heldout] if part.role == "heldout" else list(part.heldout)
    if not texts:
        return RecordDict({STATUS: _status(part, "no_data", "no held-out text")})
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    # Evaluation blocks have the trainer's fixed length whatever seq-len training used,
    # so runs with different training settings are measured on the same scale.
    result = _trainer(s).evaluate(_from_arrays(msg.content.array_records.get(ARRAYS)), texts)
    metrics = MetricRecord(
        {
            "eval-loss": float(result.loss),
            "eval-accuracy": float(result.accuracy),
            "num-tokens": int(result.num_tokens),
            "server-round": int(config.get("server-round", 0)),  # type: ignore[arg-type]
        }
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
