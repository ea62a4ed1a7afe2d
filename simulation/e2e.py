"""The end-to-end scenario, OTA half: after each round, package → publish → roll out →
the fleet downloads, verifies, applies, health-checks, evaluates and reports.

Reads top to bottom:

* ``start_ota`` — keys (created or loaded), the OTA server (embedded ``fedota serve`` on
  127.0.0.1 with SQLite and a local blob store, or a running one), the fleet enrolled;
* ``run_ota_round`` — called from the federation's ``on_round_end``: release the new
  global adapter as a staged rollout and let the fleet poll. In the bad-release round the
  release is corrupted; the server auto-pauses it on the failure reports and the
  orchestrator, as an operator, cancels it and rolls back with a new, higher release
  whose payload is bit-identical to the last good adapter;
* ``finish`` — a catch-up sweep (every device online, far-behind ones too), the E20
  consistency check of every device, and the ``fleet`` and ``rollouts`` parts of
  ``summary.json`` (schema in docs/simulate.md).

``run_fleet_demo`` drives the same code with synthetic rounds (random LoRA adapters
drifting a little each round), so the OTA half runs without the training half.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from delta_packager.manifest import AdapterConfig, Provenance
from delta_packager.package import PackagePolicy
from delta_packager.trust import init_keys
from simulation.fleet.bases import prepare_bases
from simulation.fleet.config import FleetConfig
from simulation.fleet.faults import corrupt_adapter, planted_devices, planted_release
from simulation.fleet.fleet import Fleet, SweepResult
from simulation.fleet.publisher import Publisher, Release
from simulation.fleet.runtimes import RuntimePool
from simulation.fleet.server import EmbeddedServer, Endpoint, Operator
from simulation.fleet.summary import fleet_summary, rollouts_summary

__all__ = [
    "OtaContext",
    "RoundOta",
    "finish",
    "on_round_end",
    "round_json",
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


@dataclass
class OtaContext:
    """Everything the OTA half holds between rounds (see ``start_ota``)."""

    out_dir: Path
    cfg: FleetConfig
    endpoint: Endpoint
    operator: Operator
    publisher: Publisher
    fleet: Fleet
    pool: RuntimePool
    server: EmbeddedServer | None
    full_model_bytes: int
    rounds: list[RoundOta] = field(default_factory=list)
    finished: dict[str, Any] | None = None

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
        The context to pass to ``run_ota_round`` and ``finish`` (close it at the end).

    Raises:
        ServerStartError: the embedded server did not start.
        KeysError: the keys directory is incomplete.
        UpdateRejectedError: the server refused the enrollment secret.
    """
    work = out_dir / "ota"
    keys = keys_dir or work / "keys"
    if not (keys / "root.json").is_file():
        init_keys(keys)
    embedded = None
    if server is None:
        embedded = EmbeddedServer(work / "server", keys)
        server = embedded.start()
    pool = RuntimePool(lightweight=fleet.lightweight)
    operator = Operator(server)
    try:
        bases = prepare_bases(base_dir, work, runtimes=fleet.runtimes, gguf_quant=fleet.gguf_quant)
        golden = list(golden_texts or _default_golden(fleet.golden_prompts, fleet.seed))
        publisher = Publisher(
            work_dir=work,
            keys_dir=keys,
            operator=operator,
            base_dir=base_dir,
            base_fingerprint=bases.fleet["nf4"].fingerprint,
            compatible_bases=bases.compatible,
            adapter_config=adapter_config,
            golden_texts=golden,
            pool=pool,
            rollout=fleet.rollout,
            min_reports=fleet.rollout.reports_needed(fleet.devices),
            policy=policy,
        )
        sim = Fleet(
            fleet,
            work_dir=work,
            endpoint=server,
            bases=bases,
            trusted_root=(keys / "1.root.json").read_bytes(),
            golden=golden,
            heldout=heldout or _default_heldout(fleet.heldout_texts, fleet.seed),
            pool=pool,
        )
        sim.digests = publisher.digests  # shared: every release is known to the checks
        sim.full_bytes = publisher.full_sizes
        sim.enroll_all()
        planted = planted_devices(Counter(p.fault for p in sim.profiles))
        if planted:
            logger.warning("%s; the warnings these phones cause are expected", planted)
    except BaseException:
        operator.close()
        if embedded is not None:
            embedded.stop()
        raise
    full = _dir_bytes(base_dir)
    return OtaContext(out_dir, fleet, server, operator, publisher, sim, pool, embedded, full)


def _provenance(round: int, metrics: Mapping[str, Any] | None) -> Provenance:
    numbers = {
        str(k)[:64]: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }
    return Provenance(
        round=round,
        epsilon=numbers.get("epsilon"),
        eval_metrics=dict(list(numbers.items())[:200]),
    )


def run_ota_round(
    ctx: OtaContext,
    round: int,
    global_adapter: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any] | None = None,
) -> RoundOta:
    """Release the round's global adapter to the fleet (every ``publish_every`` rounds).

    Args:
        ctx: From ``start_ota``.
        round: Training round (>= 1; round 0, the baseline, is not published).
        global_adapter: PEFT state-dict names -> float arrays.
        metrics: The round's metrics (recorded in the provenance; ``epsilon`` too).

    Returns:
        What was published and how far it got.

    Raises:
        PackagerInputError: the adapter is empty, non-finite or mis-shaped.
        RemoteRejectedError: the server refused a release or a rollout call.
    """
    if round < 1 or round % ctx.cfg.publish_every:
        return RoundOta(round)
    pub, fleet = ctx.publisher, ctx.fleet
    provenance = _provenance(round, metrics)
    sweeps: list[SweepResult] = []
    releases: list[Release] = []
    if ctx.cfg.faults.bad_release_round == round and pub.last_good is not None:
        seed = ctx.cfg.seed + round
        bad = pub.release(
            corrupt_adapter(dict(global_adapter), seed=seed),
            round=round,
            provenance=provenance,
            kind="bad",
        )
        logger.warning(
            "%s: phones are expected to fail its health check and roll back, then the last "
            "good adapter is released again",
            planted_release(bad.version),
        )
        releases.append(bad)
        sweeps.append(fleet.sweep(ctx.operator, bad.rollout_id, round=round))
        view = ctx.operator.rollout(bad.rollout_id)
        if view["state"] == "active":  # not enough reports to trip the threshold
            logger.warning("bad release v%d was not auto-paused; pausing it", bad.version)
            ctx.operator.action(bad.rollout_id, "pause")
        ctx.operator.action(bad.rollout_id, "cancel")
        assert pub.good_tensors is not None
        rollback = pub.release(
            pub.good_tensors, round=round, provenance=provenance, kind="rollback"
        )
        releases.append(rollback)
        sweeps.append(fleet.sweep(ctx.operator, rollback.rollout_id, round=round))
    else:
        rel = pub.release(dict(global_adapter), round=round, provenance=provenance)
        releases.append(rel)
        sweeps.append(fleet.sweep(ctx.operator, rel.rollout_id, round=round))
    result = RoundOta(
        round=round,
        releases=tuple(r.version for r in releases),
        bundle_bytes=releases[-1].primary_bytes,
        adoption=_adoption(ctx),
        sweeps=tuple(sweeps),
        paused=any(s.paused for s in sweeps),
        planted=tuple(r.version for r in releases if r.kind == "bad"),
    )
    ctx.rounds.append(result)
    return result


def _adoption(ctx: OtaContext) -> float:
    good = ctx.publisher.last_good
    healthy = [i for i, p in enumerate(ctx.fleet.profiles) if p.fault != "other_base"]
    if good is None or not healthy:
        return 0.0
    return sum(ctx.fleet.versions[i] == good.version for i in healthy) / len(healthy)


def on_round_end(ctx: OtaContext) -> Callable[[Any], None]:
    """An ``on_round_end`` callback for ``run_federated`` (takes a ``RoundResult``)."""

    def callback(result: Any) -> None:
        metrics = {**result.train, **result.evaluate}
        run_ota_round(ctx, int(result.round), result.global_adapter, metrics)

    return callback


def finish(ctx: OtaContext) -> dict[str, Any]:
    """Catch-up sweep, consistency check, and the ``fleet`` and ``rollouts`` summary.

    Returns:
        ``{"fleet": {...}, "rollouts": [...]}`` as documented in docs/simulate.md.

    Raises:
        RemoteRejectedError: the server refused an operator call.
    """
    if ctx.finished is not None:
        return ctx.finished
    last = ctx.publisher.releases[-1] if ctx.publisher.releases else None
    if last is not None and ctx.cfg.catch_up:
        ctx.fleet.sweep(ctx.operator, last.rollout_id, round=last.round, final=True)
    ctx.finished = {
        "fleet": fleet_summary(ctx.fleet, ctx.publisher, full_model_bytes=ctx.full_model_bytes),
        "rollouts": rollouts_summary(ctx.publisher, ctx.operator),
    }
    return ctx.finished


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
        for module in config.target_modules:
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
    """The OTA half on synthetic rounds: start, ``rounds`` releases, finish.

    Args:
        out_dir: Work directory.
        base_dir: The NF4 base checkpoint.
        fleet: Fleet configuration.
        rounds: Synthetic rounds (one release each, plus the rollback).
        on_round: Called with each round's result (progress display).

    Returns:
        ``{"fleet": ..., "rollouts": ..., "rounds": [...]}``.

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
        parts = finish(ctx)
        from simulation.fleet.report import write_fleet_report

        write_fleet_report(out_dir, ctx)
    return {**parts, "rounds": [round_json(r) for r in ctx.rounds]}


def round_json(r: RoundOta) -> dict[str, Any]:
    """One round of the OTA half as JSON (``summary.json`` ``ota_rounds``)."""
    return {
        "round": r.round,
        "releases": list(r.releases),
        "bundle_bytes": r.bundle_bytes,
        "adoption": r.adoption,
        "paused": r.paused,
        "planted": list(r.planted),
    }
