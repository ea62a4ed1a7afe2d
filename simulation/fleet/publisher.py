"""③ package → ④ publish for the simulation: one global adapter → one rolled-out release.

``Publisher.release`` reads top to bottom: package a closed-loop delta against the
packager state (a full anchor when the chain is long), measure the golden-prompt loss of
the *device-exact* adapter on the NF4 base with ``client.runtime`` — the number every
device's health check compares against — record it in the provenance, write the
primary bundle plus the full bundle and catch-up deltas, sign them (offline TUF keys),
publish them and start a staged rollout.

The bad release (fault injection) is a release pipeline bug: its manifest claims the
golden loss of the last good adapter while its payload is a corrupted adapter. A
rollback is a new, higher version whose payload is bit-identical to the last good
adapter (an fp32 full anchor of its device-exact tensors; THREATS B11).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import numpy as np

from delta_packager import (
    AdapterConfig,
    PackagePolicy,
    PackageResult,
    PackagerState,
    Provenance,
    build_bundle,
    package_version,
    save_state,
)
from delta_packager.trust import release as sign_release
from simulation.errors import SimulationInputError
from simulation.fleet.config import RolloutPolicy
from simulation.fleet.ota_client import Operator
from simulation.fleet.runtimes import RuntimePool, adapter_digest

__all__ = ["CATCH_UP_DELTAS", "Publisher", "Release", "ReleaseRole", "StagedRelease"]

logger = logging.getLogger(__name__)
CATCH_UP_DELTAS = 3  # deltas published from this many earlier versions (older: full)


class ReleaseRole(StrEnum):
    """What a release is (``summary.json`` ``rollouts[].kind``)."""

    GOOD = "good"  # the round's global adapter
    BAD = "bad"  # the planted bad release (fault injection): fails its health check
    ROLLBACK = "rollback"  # the last good adapter again, as a new, higher version


@dataclass(frozen=True)
class Release:
    """A published release and how it was rolled out.

    Attributes:
        version: Adapter version (= release counter).
        round: Training round it came from.
        kind: What the release is.
        digest: SHA-256 of the device-exact adapter (``adapter_digest``).
        golden_loss: Golden-prompt loss recorded in the provenance.
        bundles: ``from_version`` (``None``: full) -> bundle size in bytes.
        rollout_id: The rollout started for it.
        lora_rank: The LoRA rank of its bundles when the fleet runs several ranks
            (``None``: the one global rank).
        by_rank: When the fleet runs several ranks, the release of every rank (this
            one is the largest rank's); empty otherwise.
    """

    version: int
    round: int
    kind: ReleaseRole
    digest: str
    golden_loss: float
    bundles: Mapping[int | None, int]
    rollout_id: int
    lora_rank: int | None = None
    by_rank: Mapping[int, Release] = field(default_factory=dict)

    @property
    def rollout_ids(self) -> tuple[int, ...]:
        """Every rollout of this release: one per rank, or the one."""
        return tuple(r.rollout_id for r in self.by_rank.values()) or (self.rollout_id,)

    @property
    def ranks(self) -> tuple[Release, ...]:
        """This release per LoRA rank (itself alone when the fleet runs one rank)."""
        return tuple(self.by_rank.values()) or (self,)

    @property
    def primary_bytes(self) -> int:
        """Size of the bundle most devices download (delta from the previous version)."""
        delta = self.bundles.get(self.version - 1)
        return delta if delta is not None else self.bundles[None]


@dataclass(frozen=True)
class StagedRelease:
    """A packaged version whose bundles are written but not yet published
    (``Publisher.stage``; ``Publisher.commit`` finishes it).

    Attributes:
        state: The packager state with this version in it.
        paths: The bundle files to sign and publish.
        sizes: ``from_version`` (``None``: full) -> bundle size in bytes.
        golden_loss: Golden-prompt loss recorded in the provenance.
        round: Training round it came from.
        kind: What the release is.
    """

    state: PackagerState
    paths: tuple[Path, ...]
    sizes: Mapping[int | None, int]
    golden_loss: float
    round: int
    kind: ReleaseRole


class Publisher:
    """Packages, signs, publishes and rolls out releases for one base model.

    Args:
        work_dir: Bundles and the packager state go here.
        keys_dir: Release pipeline TUF keys.
        operator: Publisher/operator client of the OTA server.
        base_dir: The NF4 base the golden loss is measured on.
        base_fingerprint: Its fingerprint.
        adapter_config: LoRA config of the global adapters.
        golden_texts: The golden prompts devices are provisioned with.
        pool: Shared runtimes (the measurement runs unbudgeted, like a release server).
        rollout: Stages and thresholds of every rollout.
        min_reports: Reports a stage needs before the server judges it.
        policy: Packaging policy.
        compatible_bases: Further base fingerprints every release names (GGUF exports
            of the base); devices holding them are offered the same bundles.
        lora_rank: Set when the fleet runs several LoRA ranks and this publisher
            ships one of them (``simulation.fleet.rank_release``): recorded in its
            releases and inserted after the version in bundle file names
            (``v3-r4-full``), so the bundles of every rank fit in one release.
    """

    def __init__(
        self,
        *,
        work_dir: Path,
        keys_dir: Path,
        operator: Operator,
        base_dir: Path,
        base_fingerprint: str,
        adapter_config: AdapterConfig,
        golden_texts: Sequence[str],
        pool: RuntimePool,
        rollout: RolloutPolicy,
        min_reports: int,
        policy: PackagePolicy | None = None,
        compatible_bases: Sequence[str] = (),
        lora_rank: int | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.lora_rank = lora_rank
        self.bundle_tag = "" if lora_rank is None else f"-r{lora_rank}"
        self.keys_dir = keys_dir
        self.operator = operator
        self.base_dir = base_dir
        self.fingerprint = base_fingerprint
        self.adapter_config = adapter_config
        self.golden_texts = list(golden_texts)
        self.pool = pool
        self.rollout = rollout
        self.min_reports = min_reports
        self.policy = policy or PackagePolicy()
        self.compatible_bases = tuple(compatible_bases)
        self.state: PackagerState | None = None
        self.releases: list[Release] = []
        self.digests: dict[int, str] = {}
        self.good_tensors: dict[str, np.ndarray] | None = None  # last good, device-exact
        self.full_sizes: dict[int, int] = {}  # version -> full bundle bytes
        (work_dir / "bundles").mkdir(parents=True, exist_ok=True)

    @property
    def last_good(self) -> Release | None:
        """The newest release that is not the injected bad one."""
        good = [r for r in self.releases if r.kind != ReleaseRole.BAD]
        return good[-1] if good else None

    def golden_loss(self, tensors: Mapping[str, np.ndarray]) -> float:
        """Golden-prompt loss of ``tensors`` on the NF4 base (what devices must reproduce).

        Raises:
            ClientInputError: the adapter does not fit the base.
        """
        got = self.pool.evaluate(
            self.base_dir, None, dict(tensors), self.adapter_config, self.golden_texts
        )
        return float(got.loss)

    def release(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        round: int,
        provenance: Provenance | None = None,
        kind: ReleaseRole = ReleaseRole.GOOD,
    ) -> Release:
        """Package ``tensors`` as the next version, publish it and start its rollout.

        Args:
            tensors: The adapter to ship (for a ``BAD`` release, the corrupted payload).
            round: Training round it belongs to.
            provenance: Training provenance (round, clients, ε...); the golden loss is
                added to its ``eval_metrics["loss"]``.
            kind: What the release is.

        Returns:
            The release.

        Raises:
            PackagerInputError: the adapter is empty, non-finite or mis-shaped.
            RemoteRejectedError: the server refused the bundles, release or rollout.
        """
        staged = self.stage(tensors, round=round, provenance=provenance, kind=kind)
        self.operator.publish(list(staged.paths), sign_release(list(staged.paths), self.keys_dir))
        return self.commit(staged)

    def rollback(self, *, round: int, provenance: Provenance | None = None) -> Release:
        """Release the last good adapter again, bit-identical, as a new higher version.

        Raises:
            SimulationInputError: nothing good was released yet.
            RemoteRejectedError: the server refused the bundles, release or rollout.
        """
        if self.good_tensors is None:
            raise SimulationInputError("a rollback needs a good release before it")
        return self.release(
            self.good_tensors, round=round, provenance=provenance, kind=ReleaseRole.ROLLBACK
        )

    def stage(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        round: int,
        provenance: Provenance | None = None,
        kind: ReleaseRole = ReleaseRole.GOOD,
    ) -> StagedRelease:
        """The first half of ``release``: package the next version and write its
        bundles; nothing is published and the packager state is not yet advanced.

        Raises:
            PackagerInputError: the adapter is empty, non-finite or mis-shaped.
        """
        policy = self.policy
        if kind == ReleaseRole.ROLLBACK:  # exact payload of the last good adapter, as a new anchor
            policy = replace(policy, chain_limit=0, full_encoding="fp32")
        result, loss = self._package(
            tensors, round, provenance or Provenance(round=round), policy, kind
        )
        paths, sizes = self._write_bundles(result.state, result.bundle_bytes, policy)
        return StagedRelease(result.state, tuple(paths), sizes, loss, round, kind)

    def commit(self, staged: StagedRelease) -> Release:
        """The second half of ``release``, once ``staged``'s bundles are published:
        advance the packager state and start the version's rollout.

        Raises:
            RemoteRejectedError: the server refused the rollout.
        """
        state = staged.state
        save_state(state, self.work_dir / "packager-state")
        self.state = state
        rel = Release(
            version=state.latest_version,
            round=staged.round,
            kind=staged.kind,
            digest=adapter_digest(dict(state.current.tensors)),
            golden_loss=staged.golden_loss,
            bundles=staged.sizes,
            rollout_id=self._start_rollout(state.latest_version),
            lora_rank=self.lora_rank,
        )
        self._record(rel, state)
        return rel

    def _package(
        self,
        tensors: Mapping[str, np.ndarray],
        round: int,
        provenance: Provenance,
        policy: PackagePolicy,
        kind: ReleaseRole,
    ) -> tuple[PackageResult, float]:
        """Package ``tensors`` with the golden loss in the provenance, and that loss.

        The loss is measured on the device-exact adapter, which only packaging yields:
        a draft is packaged first, measured, and the version packaged again with it.
        """
        draft = package_version(
            tensors,
            previous=self.state,
            base_fingerprint=self.fingerprint,
            adapter_config=self.adapter_config,
            provenance=provenance,
            policy=policy,
            compatible_bases=self.compatible_bases,
        )
        if kind == ReleaseRole.BAD:
            assert self.last_good is not None, "a bad release needs a good one before it"
            loss = self.last_good.golden_loss  # the pipeline's claim, not a measurement
        else:
            loss = self.golden_loss(draft.state.current.tensors)
        metrics = {**dict(provenance.eval_metrics), "loss": loss}
        result = package_version(
            tensors,
            previous=self.state,
            base_fingerprint=self.fingerprint,
            adapter_config=self.adapter_config,
            provenance=replace(provenance, round=round, eval_metrics=metrics),
            policy=policy,
            compatible_bases=self.compatible_bases,
        )
        return result, loss

    def _start_rollout(self, version: int) -> int:
        """Start the staged rollout of ``version``; its id."""
        rollout = self.operator.create_rollout(
            version,
            self.fingerprint,
            stages=list(self.rollout.stages),
            max_failure_rate=self.rollout.max_failure_rate,
            min_reports=self.min_reports,
            **(
                {"quality_tolerance": self.rollout.quality_tolerance}
                if self.rollout.quality_tolerance is not None
                else {}
            ),
        )
        return int(rollout["id"])

    def _record(self, rel: Release, state: PackagerState) -> None:
        """Remember a published release (and its tensors, unless it is the bad one)."""
        self.releases.append(rel)
        self.digests[rel.version] = rel.digest
        self.full_sizes[rel.version] = rel.bundles[None]
        if rel.kind != ReleaseRole.BAD:
            self.good_tensors = dict(state.current.tensors)
        logger.info(
            "round %d: released v%d (%s, golden loss %.4f, %d bytes), rollout %d",
            rel.round,
            rel.version,
            rel.kind,
            rel.golden_loss,
            rel.primary_bytes,
            rel.rollout_id,
        )

    def _write_bundles(
        self, state: PackagerState, primary: bytes, policy: PackagePolicy
    ) -> tuple[list[Path], dict[int | None, int]]:
        """Primary bundle, the full bundle, and catch-up deltas from recent versions."""
        version = state.latest_version
        out = self.work_dir / "bundles"
        blobs: dict[int | None, bytes] = {}
        from_version = version - 1 if version > state.anchor_version else None
        blobs[from_version] = primary
        if None not in blobs:
            blobs[None] = build_bundle(state, from_version=None, policy=policy)
        for back in range(2, CATCH_UP_DELTAS + 1):
            start = version - back
            if start >= state.anchor_version and start >= 1:
                blobs[start] = build_bundle(state, from_version=start, policy=policy)
        paths = []
        for origin, data in blobs.items():
            stem = f"v{version}{self.bundle_tag}"
            name = f"{stem}-full.fedota" if origin is None else f"{stem}-from{origin}.fedota"
            path = out / name
            path.write_bytes(data)
            paths.append(path)
        return paths, {k: len(v) for k, v in blobs.items()}
