"""Run a whole federated fine-tuning on Flower's simulation engine (Ray) on one machine.

Reads top to bottom: data → partitions on disk → base model → apps → simulate →
``DIR/summary.json``. The same ``ServerApp`` / ``ClientApp`` run under ``flwr run``
against a SuperLink; here they get their run config as overrides, because
``run_simulation`` does not read ``pyproject.toml``.

Invariants:
* Deterministic for a seed: client sampling and central noise depend on
  ``(seed, round)``, each client's local seed on ``(seed, round, client id)``, every
  Ray actor runs torch with one thread, and aggregation sums in client-id order.
* ``DIR/checkpoints`` holds the server's checkpoints; ``resume=True`` continues from
  the last completed round. The summary is rebuilt from the checkpointed history, so a
  resumed run reports every round.
* ``on_round_end`` (e.g. the OTA publisher of a later stage) is called once per
  completed round, never again for a round a resumed run skips.
* A private Ray instance keeps its files in a temporary directory of its own and its
  processes die with this one, SIGKILL included (``simulation.ray_reaper``).
* The phones' privacy ledgers (``DIR/devices``) are not rolled back on resume: a round
  that was in flight when the server died is charged again when it is repeated. The
  reported record-level ε can therefore exceed an uninterrupted run's — never the
  reverse — while adapters and metrics match it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import Aggregation, DpMode, RunConfig, RunConfigError
from simulation.errors import SimulationInputError
from simulation.guards import require_training, user_dp_cohort_problem

if TYPE_CHECKING:
    from server.federation import RoundCallback
    from simulation.data import FederatedData, PartitionRecord, PartitionSpec
    from simulation.run_summary import Summary

__all__ = [
    "FederatedConfig",
    "FederatedSummary",
    "describe_resume",
    "load_data",
    "run_federated",
]

logger = logging.getLogger(__name__)

_RUN = RunConfig()  # the one set of run defaults
CHECKPOINTS = "checkpoints"
PARTITIONS = "partitions"
DEVICES = "devices"


@dataclass(frozen=True)
class FederatedConfig:
    """Everything one federated simulation needs; validated on construction.

    Attributes:
        out_dir: where partitions, device state, checkpoints and ``summary.json`` go.
        num_clients: training clients (synthetic data) — a data file brings its own,
            unless ``partition`` is a scheme other than natural (it makes this many).
        clients_per_round: clients per round (expected number under user-level DP).
        rounds: federated rounds.
        dp_mode: ``none``, ``record`` (Opacus on each phone) or ``user`` (central).
        target_epsilon: ε target (record: per phone over all rounds; user: the run).
        aggregation: ``fedavg`` or ``ffa``; ``None`` = ``ffa`` with DP, else ``fedavg``.
        data_file: JSONL with ``client_id`` and ``text``, or another format
            ``simulation.data.load_data_file`` reads; ``None`` = synthetic data.
        strict_data: refuse ``data_file`` records whose text is empty (default: skip
            them, counted per client in the log).
        partition: how records become clients (``--partition``); ``None`` = natural,
            one client per ``client_id`` or synthetic user. Other schemes make
            ``num_clients`` clients.
        base_model: a Hugging Face causal-LM directory; ``None`` = the cached tiny base.
        cache_dir: where the generated base model is cached.
        seed: seeds data, base, sampling, training and noise.
        num_heldout_clients: synthetic clients that only ever evaluate.
        min_clients: fewest usable updates for a round to count.
        local_steps: optimizer steps per client per round (``None``: mode default).
        learning_rate: client learning rate (``None``: mode default).
        lora_rank: LoRA rank (``None``: mode default).
        lora_head: also adapt the output head (``None``: mode default, on under
            record-level DP).
        batch_size: client logical batch size (``None``: mode default or the trainer's).
        seq_len: tokens per training block (``None``: mode default or the trainer's);
            evaluation always uses the trainer's fixed block length, so runs compare.
        delta: δ of every ε reported.
        max_grad_norm: per-example clip of record-level DP-SGD.
        user_clip: per-client update clip of user-level DP.
        max_update_norm: updates above this L2 norm are rejected.
        num_cpus: CPUs Ray may use; one client runs per CPU (a private Ray instance).
        ray_address: an existing Ray cluster to run the clients on (the address
            ``ray start --head`` printed, or ``auto``); ``None`` starts a private,
            single-machine Ray instance with ``num_cpus`` CPUs.
        resume: continue from ``out_dir/checkpoints`` instead of refusing to overwrite.
        extra: further run-config keys passed to both apps verbatim.
        options: the command-line options the run was started with, as resolved
            (``simulation.config_file.recorded_options``): written to
            ``out_dir/config.toml`` and ``summary.json``; empty: not recorded.
    """

    out_dir: Path
    num_clients: int = 6
    clients_per_round: int = _RUN.clients_per_round
    rounds: int = _RUN.num_server_rounds
    dp_mode: str = _RUN.dp_mode
    target_epsilon: float = _RUN.target_epsilon
    aggregation: str | None = None
    data_file: Path | None = None
    strict_data: bool = False
    partition: PartitionSpec | None = None
    base_model: Path | None = None
    cache_dir: Path = Path(".cache/fedota")
    seed: int = _RUN.seed
    num_heldout_clients: int = 2
    min_clients: int = _RUN.min_clients
    local_steps: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    lora_head: bool | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    delta: float = _RUN.delta
    max_grad_norm: float = _RUN.max_grad_norm
    user_clip: float = _RUN.user_clip
    max_update_norm: float = _RUN.max_update_norm
    num_cpus: int = 2
    ray_address: str | None = None
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.num_clients < 1 or self.rounds < 1 or self.clients_per_round < 1:
            problems.append("--clients, --rounds and --clients-per-round must be ≥ 1")
        if self.dp_mode not in ("none", "record", "user"):
            problems.append(f"--dp-mode {self.dp_mode!r} is not one of record, user")
        if self.aggregation not in (None, "fedavg", "ffa"):
            problems.append(f"--aggregation {self.aggregation!r} is not fedavg or ffa")
        if self.dp_mode != "none" and not self.target_epsilon > 0:
            problems.append(f"--target-epsilon {self.target_epsilon} must be > 0")
        if self.data_file is not None and not Path(self.data_file).exists():
            problems.append(f"--data {self.data_file} does not exist")
        if self.base_model is not None and not Path(self.base_model).is_dir():
            problems.append(f"--base-model {self.base_model} is not a directory")
        if self.dp_mode != "user" and 1 <= self.clients_per_round < self.min_clients:
            problems.append(
                f"--clients-per-round {self.clients_per_round} is below the "
                f"{self.min_clients} clients a round needs to change the model; raise it"
            )
        if self.dp_mode == "user" and self.data_file is None and not problems:
            # JSONL data brings its own population: checked once it is loaded.
            cohort = user_dp_cohort_problem(
                self.num_clients, self.clients_per_round, self.min_clients
            )
            problems += [cohort] if cohort else []
        if problems:
            raise SimulationInputError("; ".join(problems))

    def run_config(
        self, *, base_model: Path | None = None, data_dir: Path | None = None, num_nodes: int = 0
    ) -> RunConfig:
        """The run's ``protocol.RunConfig``, the privacy mode's defaults filled in.

        Client settings left ``None`` here take the defaults of the DP mode
        (``protocol.run_config.MODE_DEFAULTS``); ``extra`` keys are applied last.

        Raises:
            SimulationInputError: an ``extra`` key is unknown or has a bad value.
        """
        run = RunConfig(
            num_server_rounds=self.rounds,
            clients_per_round=self.clients_per_round,
            min_clients=self.min_clients,
            aggregation=None if self.aggregation is None else Aggregation(self.aggregation),
            dp_mode=DpMode(self.dp_mode),
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            user_clip=self.user_clip,
            max_update_norm=self.max_update_norm,
            local_steps=self.local_steps,
            learning_rate=self.learning_rate,
            lora_rank=self.lora_rank or _RUN.lora_rank,
            lora_head=self.lora_head,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            seed=self.seed,
            num_nodes=num_nodes,
            base_model=str(base_model or ""),
            data_dir=str(data_dir or ""),
            state_dir=str(self.out_dir / DEVICES),
            checkpoint_dir=str(self.out_dir / CHECKPOINTS),
        )
        try:
            return RunConfig.from_flower({**run.to_flower(), **self.extra}).resolved()
        except RunConfigError as e:
            raise SimulationInputError(f"run config {e}") from e

    def client_hyperparameters(self) -> dict[str, Any]:
        """The client training settings of :meth:`run_config`, as run-config keys
        (``batch-size`` and ``seq-len`` only where the mode or the caller sets them)."""
        run = self.run_config()
        out: dict[str, Any] = {
            "local-steps": run.local_steps,
            "learning-rate": run.learning_rate,
            "lora-rank": run.lora_rank,
            "lora-head": run.lora_head,
            "batch-size": run.batch_size,
            "seq-len": run.seq_len,
            "lora-alpha": run.lora_alpha,
        }
        return {k: v for k, v in out.items() if v is not None}

    @property
    def resolved_aggregation(self) -> str:
        """The aggregation actually used (``ffa`` is the default under DP)."""
        return self.run_config().resolved_aggregation


@dataclass(frozen=True)
class FederatedSummary:
    """The machine-readable result of a run: ``summary.json`` and where it was written."""

    data: Summary
    path: Path


def load_data(cfg: FederatedConfig, *, quiet: bool = False) -> FederatedData:
    """The run's ``FederatedData``: ``cfg.data_file`` loaded and checked, or synthetic;
    its records split over clients as ``cfg.partition`` says.

    Cheap next to training, so callers may load once early to refuse bad data before
    slow work (``quiet`` then keeps the skipped-records warning for the real load).

    Raises:
        DataFormatError: a malformed line (with ``strict_data``, an empty text too).
        PartitionError: the records cannot be split as ``cfg.partition`` asks.
        SimulationInputError: too few clients for user-level DP's sampling.
    """
    from simulation.data import (
        NATURAL,
        JsonlOptions,
        SyntheticConfig,
        describe_skipped,
        load_data_file,
        load_synthetic,
    )

    partition = cfg.partition or NATURAL
    if cfg.data_file is None:
        data = load_synthetic(
            SyntheticConfig(
                num_clients=cfg.num_clients,
                num_heldout_clients=cfg.num_heldout_clients,
                seed=cfg.seed,
            ),
            partition,
        )
    else:
        data = load_data_file(
            cfg.data_file,
            JsonlOptions(strict=cfg.strict_data, seed=cfg.seed),
            partition=partition,
            num_clients=cfg.num_clients,
        )
        skipped = describe_skipped(cfg.data_file, data.meta.get("skipped_empty_texts", {}))
        if skipped and not quiet:
            logger.warning("%s", skipped)
    if cfg.dp_mode == "user":  # the clients the data and --partition actually made
        where = f"in {cfg.data_file}" if cfg.data_file else f"of --partition {partition}"
        cohort = user_dp_cohort_problem(
            len(data.clients),
            cfg.clients_per_round,
            cfg.min_clients,
            clients_from=f"training clients {where}",
        )
        if cohort:
            raise SimulationInputError(cohort)
    return data


def _prepare_data(cfg: FederatedConfig) -> tuple[Path, int, int, PartitionRecord | None]:
    from simulation.data import write_partitions

    data = load_data(cfg)
    out = write_partitions(data, cfg.out_dir / PARTITIONS)
    return out, len(data.clients), len(data.heldout_clients), data.partition


def _backend_config(cfg: FederatedConfig, ray_temp_dir: Path | None = None) -> dict[str, Any]:
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if cfg.ray_address:
        # An existing cluster: its nodes declared their CPUs and object store at
        # `ray start`, and ray.init refuses num_cpus / object_store_memory when attaching.
        # No node IP is passed: the driver must run on a node of the cluster and takes
        # the IP that node's `ray start --node-ip-address` registered (the head's, if
        # it is one). Ray rewrites the literal hosts 127.0.0.1 / localhost / ::1 in the
        # address (and in any `_node_ip_address`) to the host's routable address, so a
        # cluster kept on loopback is given another 127.x address (docs/deployment.md).
        init_args: dict[str, Any] = {"address": cfg.ray_address, **quiet}
    else:
        # A 2-core box: one client per CPU, a small object store, no dashboard.
        init_args = {
            "num_cpus": max(1, cfg.num_cpus),
            "num_gpus": 0,
            "object_store_memory": 100 * 2**20,
            "include_dashboard": False,
            **quiet,
        }
        if ray_temp_dir is not None:
            # Ray's sessions, logs and sockets in a directory of this run alone, so the
            # watchdog of simulation.ray_reaper can tell this instance's processes from
            # any other Ray on the host and reap them when the driver dies.
            init_args["_temp_dir"] = str(ray_temp_dir)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def describe_resume(cfg: FederatedConfig) -> str | None:
    """The line a ``resume`` run opens with: the round it continues from, and where.

    Returns:
        ``None`` unless ``cfg.resume``; else which completed round the run resumes
        from (of ``cfg.rounds``) and the checkpoint directory, or that there is no
        checkpoint and the run starts afresh.

    Raises:
        ServerInputError: the checkpoint that ``LATEST`` names is missing or unreadable.
    """
    from server.federation import load_latest

    if not cfg.resume:
        return None
    ckpt_dir = cfg.out_dir / CHECKPOINTS
    ckpt = load_latest(ckpt_dir)
    if ckpt is None:
        return f"nothing to resume in {cfg.out_dir} (no checkpoint): starting at round 0"
    line = f"resuming from round {ckpt.round} of {cfg.rounds} (checkpoint {ckpt.path})"
    if ckpt.round >= cfg.rounds:
        return line + ": no round left to train (raise --rounds to train further)"
    return line + f": next is round {ckpt.round + 1}"


def _single_threaded() -> None:
    # Ray actors inherit the environment: one BLAS/torch thread per client keeps
    # results bit-reproducible and stops 2 cores being oversubscribed.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def run_federated(
    cfg: FederatedConfig, *, on_round_end: RoundCallback | None = None
) -> FederatedSummary:
    """Simulate the federation described by ``cfg`` and write ``summary.json``.

    Args:
        cfg: the run's settings.
        on_round_end: called with each completed round's
            :class:`~server.federation.rounds.RoundResult` (round 0 = baseline).

    Returns:
        The summary, also written to ``cfg.out_dir / "summary.json"``.

    Raises:
        SimulationInputError: ``out_dir`` already holds a run and ``resume`` is off,
            or the data or base model cannot be used (too few clients for user-level
            DP's sampling included).
        NothingTrainedError: the run finished but no round changed the model.
        RuntimeError: the simulation itself failed (the cause is chained).
    """
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.federation import load_latest, make_server_app
    from simulation.base_model import ensure_base_model
    from simulation.config_file import options_toml, write_config_file
    from simulation.ray_reaper import ray_process_guard
    from simulation.run_summary import build_summary, write_summary
    from simulation.tracking import RunTracker

    ckpt_dir = cfg.out_dir / CHECKPOINTS
    if (ckpt_dir / "LATEST").exists() and not cfg.resume:
        raise SimulationInputError(
            f"{cfg.out_dir} already holds a federated run; pass --resume to continue it "
            "or choose a new --out"
        )
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.options:  # OUT/config.toml: `fedota simulate --config` of it reruns this run
        write_config_file(cfg.out_dir, cfg.options, "simulate")
    started = time.monotonic()
    parts, num_train, num_heldout, partition = _prepare_data(cfg)
    base = cfg.base_model or ensure_base_model(cfg.cache_dir, preset="tiny", seed=cfg.seed)
    run_config = cfg.run_config(
        base_model=Path(base), data_dir=parts, num_nodes=num_train + num_heldout
    ).to_flower()
    _single_threaded()
    logger.info(
        "simulating %d clients (+%d held out) for %d rounds", num_train, num_heldout, cfg.rounds
    )
    # A private Ray instance dies with this process, SIGKILL included (simulation.ray_reaper
    # says why Ray's own fate-sharing is not enough); an existing cluster is not ours.
    guard = ray_process_guard() if cfg.ray_address is None else contextlib.nullcontext(None)
    resumed = load_latest(ckpt_dir) if cfg.resume else None
    tracker = RunTracker(  # OUT/tensorboard: the resumed history, then each new round
        cfg.out_dir,
        dp_mode=cfg.dp_mode,
        history=resumed.state["history"] if resumed else (),
        config_toml=options_toml(cfg.options, "simulate") if cfg.options else None,
    )
    with guard as ray_temp_dir, tracker:
        run_simulation(
            server_app=make_server_app(run_config, on_round_end=tracker.after_round(on_round_end)),
            client_app=make_client_app(run_config),
            num_supernodes=num_train + num_heldout,
            backend_config=_backend_config(cfg, ray_temp_dir),  # type: ignore[arg-type]
        )
    ckpt = load_latest(ckpt_dir)
    if ckpt is None or ckpt.round < cfg.rounds:
        done = -1 if ckpt is None else ckpt.round
        raise RuntimeError(
            f"the simulation stopped after round {done} of {cfg.rounds}; see the log above, "
            "then rerun with --resume to continue"
        )
    require_training(ckpt.state["history"])
    data = build_summary(
        history=ckpt.state["history"],
        run_config=run_config,
        num_clients=num_train,
        num_heldout_clients=num_heldout,
        elapsed_s=time.monotonic() - started,
        options=cfg.options or None,
        partition=partition,
    )
    return FederatedSummary(data=data, path=write_summary(cfg.out_dir, data))
