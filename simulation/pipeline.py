"""``fedota simulate`` end to end: the training half feeding the OTA half, round by round.

Reads top to bottom:

1. resolve the base (the cached tiny base, or ``--base-model``) and its pre-quantized NF4
   checkpoint — the one the phones run;
2. start the OTA half (``simulation.e2e.start_ota``): keys, an embedded server or a
   running one, the fleet enrolled;
3. run the federated rounds (``simulation.federated.run_federated``); after each round
   the exchanged global adapter is made whole (FFA-LoRA exchanges only B; the frozen,
   seeded A is rebuilt exactly as every phone rebuilds it) and released to the fleet;
4. the catch-up sweep and consistency check (``simulation.e2e.finish``), then
   ``summary.json`` gains ``fleet`` and ``rollouts`` and the report is written.

Without a fleet (``fleet=None``, ``fedota simulate --no-ota``) only step 3 runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from simulation.errors import SimulationInputError
from simulation.federated import (
    CHECKPOINTS,
    FederatedConfig,
    FederatedSummary,
    load_data,
    run_federated,
)

__all__ = ["EndToEndResult", "GlobalAdapterExpander", "nf4_checkpoint", "simulate_end_to_end"]

logger = logging.getLogger(__name__)

RoundListener = Callable[[Any, Any], None]  # (RoundResult, RoundOta | None)


@dataclass(frozen=True)
class EndToEndResult:
    """What ``simulate_end_to_end`` produced.

    Attributes:
        summary: ``summary.json`` (training, plus ``fleet`` and ``rollouts`` with a fleet).
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
    from client.runtime import quantize_checkpoint
    from client.runtime.quantized import is_prequantized
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


def simulate_end_to_end(
    cfg: FederatedConfig,
    fleet: Any | None,
    *,
    server: Any | None = None,
    keys_dir: Path | None = None,
    on_round: RoundListener | None = None,
) -> EndToEndResult:
    """Train, and after each (``publish_every``-th) round ship the result to the fleet.

    Args:
        cfg: The federated run.
        fleet: A ``simulation.fleet.FleetConfig``; ``None`` runs the training half only.
        server: A running OTA server (``simulation.fleet.server.Endpoint``); ``None``
            starts an embedded one on 127.0.0.1.
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
    if cfg.data_file is not None:
        load_data(cfg, quiet=True)  # bad --data is refused before anything is written

    def notify(result: Any, ota_round: Any | None = None) -> None:
        if on_round is not None:
            on_round(result, ota_round)

    if fleet is None:
        return EndToEndResult(run_federated(cfg, on_round_end=notify), None)

    from simulation.base_model import ensure_base_model
    from simulation.e2e import finish, round_json, run_ota_round, start_ota
    from simulation.fleet.report import write_fleet_report
    from simulation.report import write_summary
    from simulation.run_report import write_run_report

    base = Path(cfg.base_model or ensure_base_model(cfg.cache_dir, preset="tiny", seed=cfg.seed))
    cfg = replace(cfg, base_model=base)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    nf4 = nf4_checkpoint(base, cfg.out_dir / "ota")
    expand = GlobalAdapterExpander(
        nf4, cfg.client_hyperparameters(), ffa=cfg.resolved_aggregation == "ffa", seed=cfg.seed
    )
    from delta_packager.manifest import AdapterConfig

    adapter_config = AdapterConfig(
        rank=expand.rank, alpha=expand.alpha, target_modules=expand.target_modules()
    )
    with start_ota(
        cfg.out_dir,
        base_dir=nf4,
        adapter_config=adapter_config,
        fleet=fleet,
        server=server,
        keys_dir=keys_dir,
    ) as ota:

        def after_round(result: Any) -> None:
            ota_round = None
            if result.round >= 1:
                metrics = {**result.train, **result.evaluate}
                eps = metrics.get("record-epsilon", metrics.get("user-epsilon"))
                if eps is not None:
                    metrics["epsilon"] = eps
                adapter = expand(result.global_adapter)
                ota_round = run_ota_round(ota, int(result.round), adapter, metrics)
            notify(result, ota_round)

        trained = run_federated(cfg, on_round_end=after_round)
        parts = finish(ota)
        write_fleet_report(cfg.out_dir, ota)
        data = {**trained.data, **parts}
        data["ota_rounds"] = [round_json(r) for r in ota.rounds]
    summary = FederatedSummary(data=data, path=write_summary(cfg.out_dir, data))
    return EndToEndResult(summary, write_run_report(cfg.out_dir, data))
