"""``fedota simulate`` end to end: the training half feeding the OTA half, round by round.

Reads top to bottom:

1. resolve the base (the cached tiny base, or ``--base-model``) and its pre-quantized NF4
   checkpoint — the one the phones run;
2. start the OTA half (``simulation.ota_rollout.start_ota``): keys, an embedded server
   or a running one, the fleet enrolled;
3. run the federated rounds (``simulation.federated.run_federated``); after each round
   the exchanged global adapter is made whole (FFA-LoRA exchanges only B; the frozen,
   seeded A is rebuilt exactly as every phone rebuilds it) and released to the fleet;
4. the catch-up sweep and consistency check (``simulation.ota_rollout.finish_rollouts``),
   then ``summary.json`` gains ``fleet``, ``rollouts`` and ``ota_rounds``
   (``simulation.run_summary.Summary``) and the report is written
   (``simulation.report``).

Without a fleet (``fleet=None``, ``fedota simulate --no-ota``) only step 3 runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from simulation.errors import SimulationInputError
from simulation.federated import (
    CHECKPOINTS,
    FederatedConfig,
    FederatedSummary,
    load_data,
    run_federated,
)

if TYPE_CHECKING:
    from delta_packager import AdapterConfig
    from server.federation import RoundCallback, RoundResult
    from simulation.fleet import Endpoint, FleetConfig
    from simulation.ota_rollout import OtaContext, RoundOta

__all__ = [
    "EndToEndResult",
    "GlobalAdapterExpander",
    "RoundListener",
    "nf4_checkpoint",
    "simulate_end_to_end",
]

logger = logging.getLogger(__name__)

# Called after each round with its result and what the OTA half did with it (``None``
# for round 0, the baseline, and without a fleet).
RoundListener: TypeAlias = "Callable[[RoundResult, RoundOta | None], None]"


@dataclass(frozen=True)
class EndToEndResult:
    """What ``simulate_end_to_end`` produced.

    Attributes:
        summary: ``summary.json`` (training, plus ``fleet``, ``rollouts`` and
            ``ota_rounds`` with a fleet) and where it was written.
        report: ``OUT/report.md`` (``None`` without a fleet: the summary is the report).
    """

    summary: FederatedSummary
    report: Path | None


def nf4_checkpoint(base: Path, work_dir: Path) -> Path:
    """The pre-quantized NF4 checkpoint of ``base`` the phones run.

    ``fedota base-model init`` writes it to ``base/nf4``; a base that is already
    pre-quantized is used as is; any other Hugging Face causal LM is quantized once into
    ``work_dir/base-nf4`` (NF4 quantization is deterministic, so it equals what the
    trainer quantizes on load).

    Raises:
        ModelLoadError: ``base`` is not a causal LM checkpoint.
    """
    from client.runtime import is_prequantized, quantize_checkpoint
    from simulation.base_model import NF4_SUBDIR

    if (base / NF4_SUBDIR).is_dir() and is_prequantized(base / NF4_SUBDIR):
        return base / NF4_SUBDIR
    if is_prequantized(base):
        return base
    out = work_dir / "base-nf4"
    if not is_prequantized(out):
        logger.info("quantizing %s to NF4 for the fleet (once) into %s", base, out)
        quantize_checkpoint(base, out)
    return out


class GlobalAdapterExpander:
    """Exchanged global adapter → every LoRA tensor a phone's runtime needs (A and B).

    Uses the same ``LoraSettings`` as the ``ClientApp`` (rank, alpha, head, FFA, the run
    seed as the shared init seed), so the rebuilt A is bit-identical to the phones'.
    """

    def __init__(self, base: Path, hyper: dict[str, Any], *, ffa: bool, seed: int) -> None:
        from client.train import LocalTrainer, LoraSettings

        self.rank = int(hyper["lora-rank"])
        self.alpha = float(hyper["lora-alpha"])
        lora = LoraSettings(
            rank=self.rank,
            alpha=self.alpha,
            adapt_head=bool(hyper.get("lora-head", False)),
            ffa=ffa,
            init_seed=seed,
        )
        self._trainer = LocalTrainer(base, lora)

    def target_modules(self) -> tuple[str, ...]:
        """The module names the adapter covers (``q_proj``, ``up_proj``, ...)."""
        names = self._trainer.full_adapter(None)
        return tuple(sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}))

    def __call__(self, exchanged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raises: AdapterMismatchError: the tensors do not fit this base and layout."""
        import torch

        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in exchanged.items()}
        full = self._trainer.full_adapter(tensors)
        return {k: v.numpy().astype(np.float32, copy=False) for k, v in full.items()}


def _refuse_existing_run(cfg: FederatedConfig, with_fleet: bool) -> None:
    has_run = (cfg.out_dir / CHECKPOINTS / "LATEST").exists()
    if has_run and not cfg.resume:
        raise SimulationInputError(
            f"{cfg.out_dir} already holds a federated run; pass --resume to continue it "
            "or choose a new --out"
        )
    if cfg.resume and with_fleet:
        raise SimulationInputError(
            "--resume continues the training half only: the fleet's state of the "
            f"interrupted run stays in {cfg.out_dir / 'ota'}; add --no-ota"
        )


def _ota_inputs(cfg: FederatedConfig) -> tuple[FederatedConfig, Path, GlobalAdapterExpander]:
    """Step 1: the run with its base resolved, the NF4 checkpoint the phones run, and
    the expander that makes each round's exchanged adapter whole."""
    from simulation.base_model import ensure_base_model

    base = Path(cfg.base_model or ensure_base_model(cfg.cache_dir, preset="tiny", seed=cfg.seed))
    cfg = replace(cfg, base_model=base)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    nf4 = nf4_checkpoint(base, cfg.out_dir / "ota")
    expand = GlobalAdapterExpander(
        nf4, cfg.client_hyperparameters(), ffa=cfg.resolved_aggregation == "ffa", seed=cfg.seed
    )
    return cfg, nf4, expand


def _adapter_config(expand: GlobalAdapterExpander) -> AdapterConfig:
    from delta_packager import AdapterConfig

    return AdapterConfig(
        rank=expand.rank, alpha=expand.alpha, target_modules=expand.target_modules()
    )


def _fleet_ranks(cfg: FederatedConfig, fleet: FleetConfig) -> FleetConfig:
    """With several allowed LoRA ranks (``--lora-ranks``), the fleet's phones too run
    the rank their memory allows, each tier one (``with_lora_ranks``, ADR 0016)."""
    from simulation.fleet import with_lora_ranks

    ranks = cfg.run_config().allowed_ranks
    if len(ranks) < 2 or fleet.lora_ranks:
        return fleet
    return replace(fleet, tiers=with_lora_ranks(fleet.tiers, ranks))


def _release_each_round(
    ota: OtaContext,
    expand: GlobalAdapterExpander,
    notify: RoundListener,
    *,
    dp_mode: str = "none",
    delta: float = 0.0,
) -> RoundCallback:
    """Step 3's ``on_round_end``: every trained round's adapter, made whole, released
    with the round's privacy spend in its signed provenance."""
    from simulation.ota_rollout import privacy_spend, round_metrics, run_ota_round

    def after_round(result: RoundResult) -> None:
        ota_round = None
        if result.round >= 1:
            metrics = round_metrics(result)
            eps = metrics.get("record-epsilon", metrics.get("user-epsilon"))
            if eps is not None:
                metrics["epsilon"] = eps
            adapter = expand(result.global_adapter)
            spend = privacy_spend(dp_mode, delta, metrics)
            ota_round = run_ota_round(ota, int(result.round), adapter, metrics, privacy=spend)
        notify(result, ota_round)

    return after_round


def simulate_end_to_end(
    cfg: FederatedConfig,
    fleet: FleetConfig | None,
    *,
    server: Endpoint | None = None,
    keys_dir: Path | None = None,
    on_round: RoundListener | None = None,
) -> EndToEndResult:
    """Train, and after each (``publish_every``-th) round ship the result to the fleet.

    Args:
        cfg: The federated run.
        fleet: The fleet; ``None`` runs the training half only.
        server: A running OTA server; ``None`` starts an embedded one on 127.0.0.1.
        keys_dir: Release keys (created when missing; default ``OUT/ota/keys``).
        on_round: Called after each round with its ``RoundResult`` and what the OTA half
            did (``RoundOta``, or ``None`` for round 0 and without a fleet).

    Returns:
        The summary (written to ``OUT/summary.json``) and the report path.

    Raises:
        SimulationInputError: bad options, an existing run, an unusable base or data.
        NothingTrainedError: no round changed the model (nothing is reported).
        ServerStartError: the embedded OTA server did not start.
        RemoteRejectedError: the OTA server refused a release or rollout call.
        RuntimeError: the federated simulation failed.
    """
    _refuse_existing_run(cfg, fleet is not None)
    if cfg.data_file is not None or cfg.partition is not None:
        load_data(cfg, quiet=True)  # bad --data is refused before anything is written

    def notify(result: RoundResult, ota_round: RoundOta | None = None) -> None:
        if on_round is not None:
            on_round(result, ota_round)

    if fleet is None:
        return EndToEndResult(run_federated(cfg, on_round_end=notify), None)

    from simulation.fleet import write_fleet_report
    from simulation.ota_rollout import finish_rollouts, start_ota
    from simulation.report import write_run_report
    from simulation.run_summary import write_summary
    from simulation.tracking import OtaTracker

    cfg, nf4, expand = _ota_inputs(cfg)
    fleet = _fleet_ranks(cfg, fleet)
    with (
        start_ota(
            cfg.out_dir,
            base_dir=nf4,
            adapter_config=_adapter_config(expand),
            fleet=fleet,
            server=server,
            keys_dir=keys_dir,
        ) as ota,
        OtaTracker(cfg.out_dir) as ota_events,
    ):

        def track(result: RoundResult, ota_round: RoundOta | None = None) -> None:
            if ota_round is not None:
                ota_events.log_round(ota_round)
            notify(result, ota_round)

        release = _release_each_round(ota, expand, track, dp_mode=cfg.dp_mode, delta=cfg.delta)
        trained = run_federated(cfg, on_round_end=release)
        outcome = finish_rollouts(ota)
        write_fleet_report(cfg.out_dir, ota.fleet, outcome)
        ota_rounds = tuple(r.summary() for r in ota.rounds)
    summary = trained.data.with_fleet(outcome, ota_rounds)
    path = write_summary(cfg.out_dir, summary)
    report = write_run_report(cfg.out_dir, summary.to_dict())
    return EndToEndResult(FederatedSummary(data=summary, path=path), report)
