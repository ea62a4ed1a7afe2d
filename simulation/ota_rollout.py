"""The OTA half of ``fedota simulate``: after each round, package → publish → roll out →
the fleet downloads, verifies, applies, health-checks, evaluates and reports.

Reads top to bottom:

* ``start_ota`` — keys (created or loaded), the OTA server (embedded ``fedota serve`` on
  127.0.0.1 with SQLite and a local blob store, or a running one), the fleet enrolled;
* ``run_ota_round`` — called from the federation's ``on_round_end``: release the new
  global adapter as a staged rollout and let the fleet poll. In the bad-release round the
  release is corrupted; the server auto-pauses it on the failure reports and the
  orchestrator, as an operator, cancels it and rolls back with a new, higher release
  whose payload is bit-identical to the last good adapter;
* ``finish_rollouts`` — a catch-up sweep (every device online, far-behind ones too), the
  E20 consistency check of every device, and the ``fleet`` and ``rollouts`` parts of
  ``summary.json`` (schema in docs/simulate.md); ``finish`` is the same as JSON.

``run_fleet_demo`` drives the same code with synthetic rounds (random LoRA adapters
drifting a little each round), so the OTA half runs without the training half.
``simulation.pipeline`` ties it to the training half.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from delta_packager import AdapterConfig, PackagePolicy, Provenance
from delta_packager.trust import init_keys
from protocol import PrivacySpend
from simulation.fleet import (
    DeviceFault,
    EmbeddedServer,
    Endpoint,
    Fleet,
    FleetConfig,
    FleetOutcome,
    Operator,
    OtaRoundSummary,
    Publisher,
    RankedPublisher,
    Release,
    ReleaseRole,
    RuntimePool,
    SweepResult,
    corrupt_adapter,
    fleet_outcome,
    planted_devices,
    planted_release,
    prepare_bases,
    write_fleet_report,
)

if TYPE_CHECKING:
    from server.federation import RoundCallback, RoundResult

__all__ = [
    "OtaContext",
    "RoundOta",
    "demo_adapter",
    "finish",
    "finish_rollouts",
    "on_round_end",
    "privacy_spend",
    "round_json",
    "round_metrics",
    "run_fleet_demo",
    "run_ota_round",
    "start_ota",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOta:
    """What the OTA half did after one round (one line of CLI output).

    Attributes:
        round: Training round.
        releases: Versions published this round (bad release and rollback included).
        bundle_bytes: Primary bundle size of the last release this round.
        adoption: Share of healthy devices on the newest good version after the sweep.
        sweeps: The fleet's sweeps, one per release.
        paused: Whether a rollout of this round was paused.
        planted: Versions of this round that are planted bad releases (fault injection).
    """

    round: int
    releases: tuple[int, ...] = ()
    bundle_bytes: int = 0
    adoption: float = 0.0
    sweeps: tuple[SweepResult, ...] = ()
    paused: bool = False
    planted: tuple[int, ...] = ()

    def summary(self) -> OtaRoundSummary:
        """This round in ``summary.json`` (``ota_rounds``): everything but the sweeps."""
        return OtaRoundSummary(
            round=self.round,
            releases=self.releases,
            bundle_bytes=self.bundle_bytes,
            adoption=self.adoption,
            paused=self.paused,
            planted=self.planted,
        )


@dataclass
class OtaContext:
    """Everything the OTA half holds between rounds (see ``start_ota``)."""

    out_dir: Path
    cfg: FleetConfig
    endpoint: Endpoint
    operator: Operator
    publisher: Publisher | RankedPublisher
    fleet: Fleet
    pool: RuntimePool
    server: EmbeddedServer | None
    full_model_bytes: int
    rounds: list[RoundOta] = field(default_factory=list)
    finished: FleetOutcome | None = None

    def close(self) -> None:
        """Stop the embedded server and release runtimes and connections."""
        self.fleet.close()
        self.operator.close()
        self.pool.close()
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> OtaContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_golden(count: int, seed: int) -> list[str]:
    from simulation.data import generate_public_texts

    return list(generate_public_texts(count, seed + 7919))


def _default_heldout(count: int, seed: int) -> Callable[[int], Sequence[str]]:
    from simulation.data import generate_public_texts

    def texts(device: int) -> Sequence[str]:
        return generate_public_texts(count, seed * 1_000_003 + 104_729 + device)

    return texts


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _release_keys(work: Path, keys_dir: Path | None) -> Path:
    """The release keys directory (``work/keys`` by default), created when missing."""
    keys = keys_dir or work / "keys"
    if not (keys / "root.json").is_file():
        init_keys(keys)
    return keys


@dataclass(frozen=True)
class _FleetInputs:
    """What ``start_ota`` provisions the publisher and the phones with."""

    base_dir: Path
    adapter_config: AdapterConfig
    keys: Path
    golden_texts: Sequence[str] | None
    heldout: Callable[[int], Sequence[str]] | None
    policy: PackagePolicy | None


def _enroll_fleet(
    work: Path,
    fleet: FleetConfig,
    server: Endpoint,
    operator: Operator,
    pool: RuntimePool,
    inputs: _FleetInputs,
) -> tuple[Publisher | RankedPublisher, Fleet]:
    """Prepare the bases, the publisher and the phones, and enroll every phone.

    With tiers of several LoRA ranks, one release per round carries a bundle set per
    rank and each rank gets its own rollout (``RankedPublisher``, ADR 0016).
    """
    bases = prepare_bases(
        inputs.base_dir, work, runtimes=fleet.runtimes, gguf_quant=fleet.gguf_quant
    )
    golden = list(inputs.golden_texts or _default_golden(fleet.golden_prompts, fleet.seed))
    common: dict[str, Any] = dict(
        work_dir=work,
        keys_dir=inputs.keys,
        operator=operator,
        base_dir=inputs.base_dir,
        base_fingerprint=bases.fleet["nf4"].fingerprint,
        compatible_bases=bases.compatible,
        adapter_config=inputs.adapter_config,
        golden_texts=golden,
        pool=pool,
        rollout=fleet.rollout,
        min_reports=fleet.rollout.reports_needed(fleet.devices),
        policy=inputs.policy,
    )
    publisher: Publisher | RankedPublisher = (
        RankedPublisher(ranks=fleet.lora_ranks, **common)
        if fleet.lora_ranks
        else Publisher(**common)
    )
    sim = Fleet(
        fleet,
        work_dir=work,
        endpoint=server,
        bases=bases,
        trusted_root=(inputs.keys / "1.root.json").read_bytes(),
        golden=golden,
        heldout=inputs.heldout or _default_heldout(fleet.heldout_texts, fleet.seed),
        pool=pool,
    )
    sim.digests = publisher.digests  # shared: every release is known to the checks
    sim.full_bytes = publisher.full_sizes
    if isinstance(publisher, RankedPublisher):
        sim.rank_digests = {r: p.digests for r, p in publisher.publishers.items()}
        sim.rank_full_bytes = {r: p.full_sizes for r, p in publisher.publishers.items()}
    sim.enroll_all()
    planted = planted_devices(Counter(p.fault for p in sim.profiles))
    if planted:
        logger.warning("%s; the warnings these phones cause are expected", planted)
    return publisher, sim


def start_ota(
    out_dir: Path,
    *,
    base_dir: Path,
    adapter_config: AdapterConfig,
    fleet: FleetConfig,
    server: Endpoint | None = None,
    keys_dir: Path | None = None,
    golden_texts: Sequence[str] | None = None,
    heldout: Callable[[int], Sequence[str]] | None = None,
    policy: PackagePolicy | None = None,
) -> OtaContext:
    """Create or load keys, start (or join) the OTA server and enroll the fleet.

    Args:
        out_dir: Work directory (``ota/`` below it holds keys, server, bundles, devices).
        base_dir: The pre-quantized NF4 base checkpoint (``<base>/nf4``).
        adapter_config: LoRA config of the global adapters.
        fleet: Fleet configuration.
        server: A running server (``--server URL``) whose trusted root is
            ``keys_dir/root.json``; ``None`` starts an embedded one.
        keys_dir: Release pipeline keys (created when missing; default
            ``out_dir/ota/keys``).
        golden_texts: Golden prompts provisioned on every device.
        heldout: Device index -> its held-out texts (default: synthetic per device).
        policy: Packaging policy.

    Returns:
        The context to pass to ``run_ota_round`` and ``finish_rollouts`` (close it at
        the end).

    Raises:
        ServerStartError: the embedded server did not start.
        KeysError: the keys directory is incomplete.
        UpdateRejectedError: the server refused the enrollment secret.
    """
    work = out_dir / "ota"
    keys = _release_keys(work, keys_dir)
    embedded = None
    if server is None:
        embedded = EmbeddedServer(work / "server", keys, seed=fleet.seed)
        server = embedded.start()
    pool = RuntimePool(lightweight=fleet.lightweight)
    operator = Operator(server)
    inputs = _FleetInputs(base_dir, adapter_config, keys, golden_texts, heldout, policy)
    try:
        publisher, sim = _enroll_fleet(work, fleet, server, operator, pool, inputs)
    except BaseException:
        operator.close()
        if embedded is not None:
            embedded.stop()
        raise
    full = _dir_bytes(base_dir)
    return OtaContext(out_dir, fleet, server, operator, publisher, sim, pool, embedded, full)


def privacy_spend(dp_mode: str, delta: float, metrics: Mapping[str, float]) -> PrivacySpend | None:
    """The round's privacy spend by unit (ADR 0005), as the release's signed provenance
    records it for the release gates (ADR 0014); ``None`` without DP."""
    if dp_mode == "record" and metrics.get("record-epsilon") is not None:
        return PrivacySpend(record_epsilon=float(metrics["record-epsilon"]), record_delta=delta)
    if dp_mode == "user" and metrics.get("user-epsilon") is not None:
        return PrivacySpend(user_epsilon=float(metrics["user-epsilon"]), user_delta=delta)
    return None


def _provenance(
    round: int, metrics: Mapping[str, float] | None, privacy: PrivacySpend | None = None
) -> Provenance:
    numbers = {
        str(k)[:64]: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }
    spend = privacy or PrivacySpend()
    return Provenance(
        round=round,
        epsilon=numbers.get("epsilon"),
        eval_metrics=dict(list(numbers.items())[:200]),
        record_epsilon=spend.record_epsilon,
        record_delta=spend.record_delta,
        user_epsilon=spend.user_epsilon,
        user_delta=spend.user_delta,
    )


def _release_and_sweep(
    ctx: OtaContext,
    tensors: Mapping[str, np.ndarray],
    round: int,
    provenance: Provenance,
) -> tuple[Release, SweepResult]:
    """Publish one release and let the fleet poll until its rollouts settle."""
    rel = ctx.publisher.release(tensors, round=round, provenance=provenance)
    return rel, ctx.fleet.sweep(ctx.operator, rel.rollout_ids, round=round)


def _rollback_and_sweep(
    ctx: OtaContext, round: int, provenance: Provenance
) -> tuple[Release, SweepResult]:
    """Release the last good adapter again as a new version and let the fleet poll."""
    rel = ctx.publisher.rollback(round=round, provenance=provenance)
    return rel, ctx.fleet.sweep(ctx.operator, rel.rollout_ids, round=round)


def _bad_release_and_rollback(
    ctx: OtaContext, global_adapter: Mapping[str, np.ndarray], round: int, provenance: Provenance
) -> list[tuple[Release, SweepResult]]:
    """The planted bad release, stopped by the fleet's reports, then the rollback."""
    pub, operator = ctx.publisher, ctx.operator
    corrupted = corrupt_adapter(dict(global_adapter), seed=ctx.cfg.seed + round)
    bad = pub.release(corrupted, round=round, provenance=provenance, kind=ReleaseRole.BAD)
    logger.warning(
        "%s: phones are expected to fail its health check and roll back, then the last "
        "good adapter is released again",
        planted_release(bad.version),
    )
    bad_sweep = ctx.fleet.sweep(operator, bad.rollout_ids, round=round)
    for rollout_id in bad.rollout_ids:
        if operator.rollout(rollout_id)["state"] == "active":  # too few reports to trip it
            logger.warning(
                "bad release v%d (rollout %d) was not auto-paused; pausing it",
                bad.version,
                rollout_id,
            )
            operator.action(rollout_id, "pause")
        operator.action(rollout_id, "cancel")
    return [(bad, bad_sweep), _rollback_and_sweep(ctx, round, provenance)]


def run_ota_round(
    ctx: OtaContext,
    round: int,
    global_adapter: Mapping[str, np.ndarray],
    metrics: Mapping[str, float] | None = None,
    *,
    privacy: PrivacySpend | None = None,
) -> RoundOta:
    """Release the round's global adapter to the fleet (every ``publish_every`` rounds).

    Args:
        ctx: From ``start_ota``.
        round: Training round (>= 1; round 0, the baseline, is not published).
        global_adapter: PEFT state-dict names -> float arrays.
        metrics: The round's metrics (recorded in the provenance; ``epsilon`` too).
        privacy: The privacy spend by unit, signed with the release (``privacy_spend``).

    Returns:
        What was published and how far it got.

    Raises:
        PackagerInputError: the adapter is empty, non-finite or mis-shaped.
        RemoteRejectedError: the server refused a release or a rollout call.
    """
    if round < 1 or round % ctx.cfg.publish_every:
        return RoundOta(round)
    provenance = _provenance(round, metrics, privacy)
    if ctx.cfg.faults.bad_release_round == round and ctx.publisher.last_good is not None:
        published = _bad_release_and_rollback(ctx, global_adapter, round, provenance)
    else:
        published = [_release_and_sweep(ctx, dict(global_adapter), round, provenance)]
    releases = [rel for rel, _ in published]
    sweeps = tuple(sweep for _, sweep in published)
    result = RoundOta(
        round=round,
        releases=tuple(r.version for r in releases),
        bundle_bytes=releases[-1].primary_bytes,
        adoption=_adoption(ctx),
        sweeps=sweeps,
        paused=any(s.paused for s in sweeps),
        planted=tuple(r.version for r in releases if r.kind == ReleaseRole.BAD),
    )
    ctx.rounds.append(result)
    return result


def _adoption(ctx: OtaContext) -> float:
    good = ctx.publisher.last_good
    profiles = ctx.fleet.profiles
    healthy = [i for i, p in enumerate(profiles) if p.fault != DeviceFault.OTHER_BASE]
    if good is None or not healthy:
        return 0.0
    return sum(ctx.fleet.versions[i] == good.version for i in healthy) / len(healthy)


def round_metrics(result: RoundResult) -> dict[str, float]:
    """A round's train and evaluation metrics in one mapping (what the provenance holds)."""
    return {**result.train, **result.evaluate}


def on_round_end(ctx: OtaContext) -> RoundCallback:
    """An ``on_round_end`` callback for ``run_federated``: each round's adapter, released."""

    def callback(result: RoundResult) -> None:
        run_ota_round(ctx, int(result.round), result.global_adapter, round_metrics(result))

    return callback


def finish_rollouts(ctx: OtaContext) -> FleetOutcome:
    """Catch-up sweep, consistency check, and the ``fleet`` and ``rollouts`` summary.

    Once per context: a second call returns the first call's outcome.

    Raises:
        RemoteRejectedError: the server refused an operator call.
    """
    if ctx.finished is not None:
        return ctx.finished
    last = ctx.publisher.releases[-1] if ctx.publisher.releases else None
    if last is not None and ctx.cfg.catch_up:
        ctx.fleet.sweep(ctx.operator, last.rollout_ids, round=last.round, final=True)
    ctx.finished = fleet_outcome(
        ctx.fleet, ctx.publisher, ctx.operator, full_model_bytes=ctx.full_model_bytes
    )
    return ctx.finished


def finish(ctx: OtaContext) -> dict[str, Any]:
    """``finish_rollouts`` as JSON values.

    Returns:
        ``{"fleet": {...}, "rollouts": [...]}`` as documented in docs/simulate.md.

    Raises:
        RemoteRejectedError: the server refused an operator call.
    """
    return finish_rollouts(ctx).to_dict()


def demo_adapter(
    base_dir: Path, config: AdapterConfig, *, seed: int, round: int
) -> dict[str, np.ndarray]:
    """A LoRA adapter for the base's attention projections that drifts a little per round.

    Raises:
        OSError: the base's ``config.json`` is unreadable.
    """
    import json

    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"]))
    widths = {"q_proj": hidden, "v_proj": int(cfg["num_key_value_heads"]) * head_dim}
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(layers):
        for module in config.target_modules or widths:
            stem = f"base_model.model.model.layers.{i}.self_attn.{module}"
            a = rng.normal(size=(config.rank, hidden)) / math.sqrt(hidden)
            b = rng.normal(size=(widths[module], config.rank)) * 0.002
            drift = np.random.default_rng([seed, round, i]).normal(size=b.shape) * 0.0005
            out[f"{stem}.lora_A.weight"] = a.astype(np.float32)
            out[f"{stem}.lora_B.weight"] = (b + drift * round).astype(np.float32)
    return out


def run_fleet_demo(
    out_dir: Path,
    *,
    base_dir: Path,
    fleet: FleetConfig,
    rounds: int = 4,
    on_round: Callable[[RoundOta], None] | None = None,
) -> dict[str, Any]:
    """The OTA half on synthetic rounds: start, ``rounds`` releases, finish, report.

    Args:
        out_dir: Work directory (``fleet.md`` and the fleet's plots go there too).
        base_dir: The NF4 base checkpoint.
        fleet: Fleet configuration.
        rounds: Synthetic rounds (one release each, plus the rollback).
        on_round: Called with each round's result (progress display).

    Returns:
        ``{"fleet": ..., "rollouts": ..., "rounds": [...]}`` as JSON values.

    Raises:
        ServerStartError: the embedded server did not start.
    """
    config = AdapterConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    with start_ota(out_dir, base_dir=base_dir, adapter_config=config, fleet=fleet) as ctx:
        for r in range(1, rounds + 1):
            adapter = demo_adapter(base_dir, config, seed=fleet.seed, round=r)
            result = run_ota_round(ctx, r, adapter, {"round": float(r)})
            if on_round is not None:
                on_round(result)
        outcome = finish_rollouts(ctx)
        write_fleet_report(out_dir, ctx.fleet, outcome)
    return {**outcome.to_dict(), "rounds": [round_json(r) for r in ctx.rounds]}


def round_json(r: RoundOta) -> dict[str, Any]:
    """One round of the OTA half as JSON (``summary.json`` ``ota_rounds``)."""
    return r.summary().to_dict()
