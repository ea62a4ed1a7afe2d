"""③ package → ④ publish when phones run different LoRA ranks (ADR 0016).

Phones of a federation with ``lora-ranks`` train, and run, the global adapter
truncated to their rank. ``RankedPublisher`` keeps one :class:`Publisher` per rank
present in the fleet: each packages the global adapter truncated to its rank, with its
own closed-loop packager state (a rank-``r`` phone holds rank-``r`` tensors, so deltas
are against those), an ``AdapterConfig`` of that rank whose alpha keeps the global
scale, and ``delta_packager.rank_target(base, r)`` as the base its bundles name. The
bundles of every rank go into **one** signed release per round (versions stay in
lockstep: the server's release counter is global), and each rank gets its own staged
rollout. A phone of rank ``r`` (``DeviceConfig.lora_rank``) asks for, verifies and
applies the bundles of its rank target only; the OTA server needs no change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from delta_packager import AdapterConfig, PackagePolicy, Provenance, rank_target
from delta_packager.trust import release as sign_release
from protocol import truncate_to_rank
from simulation.errors import SimulationInputError
from simulation.fleet.config import RolloutPolicy
from simulation.fleet.ota_client import Operator
from simulation.fleet.publisher import Publisher, Release, ReleaseRole, StagedRelease
from simulation.fleet.runtimes import RuntimePool

__all__ = ["RankedPublisher"]


class RankedPublisher:
    """One publisher per LoRA rank; one signed release per round with every rank in it.

    It answers what :class:`Publisher` answers (``release``, ``rollback``,
    ``releases``, ``last_good``, ``digests``, ``full_sizes``), so ``fedota simulate``
    drives either; per-rank state is in ``publishers``.

    Args:
        ranks: The ranks present in the fleet (one bundle set each).
        adapter_config: The global adapter's config (the largest rank of the run).
        base_fingerprint: The NF4 base's fingerprint; rank ``r`` publishes under
            ``rank_target(base_fingerprint, r)``.
        compatible_bases: Further bases (GGUF exports), mapped to their rank targets.
        work_dir, keys_dir, operator, base_dir, golden_texts, pool, rollout,
        min_reports, policy: as for :class:`Publisher`.

    Raises:
        SimulationInputError: no rank, or a rank above the global adapter's.
    """

    def __init__(
        self,
        *,
        ranks: Sequence[int],
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
    ) -> None:
        wanted = sorted(set(ranks))
        if not wanted or not 1 <= wanted[0] <= wanted[-1] <= adapter_config.rank:
            raise SimulationInputError(
                f"fleet LoRA ranks {list(ranks)} must be 1..{adapter_config.rank}, the "
                "global adapter's rank"
            )
        self.keys_dir = keys_dir
        self.operator = operator
        self.publishers: dict[int, Publisher] = {}
        for r in wanted:
            config = dataclasses.replace(
                adapter_config, rank=r, alpha=adapter_config.alpha * r / adapter_config.rank
            )
            self.publishers[r] = Publisher(
                work_dir=work_dir / f"rank-{r}",
                keys_dir=keys_dir,
                operator=operator,
                base_dir=base_dir,
                base_fingerprint=rank_target(base_fingerprint, r),
                adapter_config=config,
                golden_texts=golden_texts,
                pool=pool,
                rollout=rollout,
                min_reports=min_reports,
                policy=policy,
                compatible_bases=sorted(rank_target(b, r) for b in compatible_bases),
                lora_rank=r,
            )
        self.releases: list[Release] = []

    @property
    def top(self) -> Publisher:
        """The largest rank's publisher: its releases stand for the round's."""
        return self.publishers[max(self.publishers)]

    @property
    def last_good(self) -> Release | None:
        """The newest release that is not the injected bad one."""
        good = [r for r in self.releases if r.kind != ReleaseRole.BAD]
        return good[-1] if good else None

    @property
    def digests(self) -> dict[int, str]:
        """Version -> device-exact digest of the largest rank's adapter."""
        return self.top.digests

    @property
    def full_sizes(self) -> dict[int, int]:
        """Version -> the largest rank's full bundle size."""
        return self.top.full_sizes

    def targets(self) -> dict[int, str]:
        """Rank → the base fingerprint its bundles name (what its phones ask for)."""
        return {r: p.fingerprint for r, p in self.publishers.items()}

    def release(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        round: int,
        provenance: Provenance | None = None,
        kind: ReleaseRole = ReleaseRole.GOOD,
    ) -> Release:
        """Package ``tensors`` (the global adapter, A and B) truncated to every rank,
        publish all the bundles as one signed release, and start one rollout per rank.

        Returns:
            The largest rank's release, with every rank's in ``by_rank`` (all of the
            same version).

        Raises:
            PackagerInputError: the adapter is empty, non-finite or mis-shaped.
            RemoteRejectedError: the server refused the bundles, release or rollout.
            SimulationInputError: the ranks' versions diverged (a rank was released
                alone before).
        """
        return self._release_all(
            {
                r: pub.stage(_sliced(tensors, r), round=round, provenance=provenance, kind=kind)
                for r, pub in self.publishers.items()
            }
        )

    def rollback(self, *, round: int, provenance: Provenance | None = None) -> Release:
        """Every rank's last good adapter again, bit-identical, as one new release.

        Raises:
            SimulationInputError: nothing good was released yet.
            RemoteRejectedError: the server refused the bundles, release or rollout.
        """
        staged = {}
        for r, pub in self.publishers.items():
            if pub.good_tensors is None:
                raise SimulationInputError("a rollback needs a good release before it")
            staged[r] = pub.stage(
                pub.good_tensors, round=round, provenance=provenance, kind=ReleaseRole.ROLLBACK
            )
        return self._release_all(staged)

    def _release_all(self, staged: Mapping[int, StagedRelease]) -> Release:
        """Sign and publish every rank's staged bundles as one release, then commit
        each rank (its packager state and its rollout)."""
        versions = {s.state.latest_version for s in staged.values()}
        if len(versions) != 1:
            raise SimulationInputError(f"the ranks' adapter versions diverged: {sorted(versions)}")
        paths = [p for s in staged.values() for p in s.paths]
        self.operator.publish(paths, sign_release(paths, self.keys_dir))
        by_rank = {r: self.publishers[r].commit(s) for r, s in staged.items()}
        rel = dataclasses.replace(by_rank[max(by_rank)], by_rank=by_rank)
        self.releases.append(rel)
        return rel


def _sliced(tensors: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v) for k, v in truncate_to_rank(tensors, rank).items()}
