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

from delta_packager import AdapterConfig, PackagePolicy, Provenance, rank_target, save_state
from delta_packager.trust import release as sign_release
from protocol import truncate_to_rank
from simulation.errors import SimulationInputError
from simulation.fleet.config import RolloutPolicy
from simulation.fleet.ota_client import Operator
from simulation.fleet.publisher import Publisher, Release, ReleaseRole
from simulation.fleet.runtimes import RuntimePool, adapter_digest

__all__ = ["RankedPublisher"]


class RankedPublisher:
    """One publisher per LoRA rank; one signed release per round with every rank in it.

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
                bundle_tag=f"-r{r}",
            )

    def targets(self) -> dict[int, str]:
        """Rank → the base fingerprint its bundles name (what its phones ask for)."""
        return {r: p.fingerprint for r, p in self.publishers.items()}

    def release(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        round: int,
        provenance: Provenance | None = None,
    ) -> dict[int, Release]:
        """Package ``tensors`` (the global adapter, A and B) truncated to every rank,
        publish all the bundles as one signed release, and start one rollout per rank.

        Returns:
            Rank → its release (all of the same version).

        Raises:
            PackagerInputError: the adapter is empty, non-finite or mis-shaped.
            RemoteRejectedError: the server refused the bundles, release or rollout.
            SimulationInputError: the ranks' versions diverged (a rank was released
                alone before).
        """
        prov = provenance or Provenance(round=round)
        staged = {}
        for r, pub in self.publishers.items():
            sliced = {k: np.ascontiguousarray(v) for k, v in truncate_to_rank(tensors, r).items()}
            result, loss = pub._package(sliced, round, prov, pub.policy, ReleaseRole.GOOD)
            paths, sizes = pub._write_bundles(result.state, result.bundle_bytes, pub.policy)
            staged[r] = (result.state, paths, sizes, loss)
        versions = {state.latest_version for state, *_ in staged.values()}
        if len(versions) != 1:
            raise SimulationInputError(f"the ranks' adapter versions diverged: {sorted(versions)}")
        paths = [p for _, rank_paths, _, _ in staged.values() for p in rank_paths]
        self.operator.publish(paths, sign_release(paths, self.keys_dir))
        out = {}
        for r, (state, _, sizes, loss) in staged.items():
            pub = self.publishers[r]
            save_state(state, pub.work_dir / "packager-state")
            pub.state = state
            rel = Release(
                version=state.latest_version,
                round=round,
                kind=ReleaseRole.GOOD,
                digest=adapter_digest(dict(state.current.tensors)),
                golden_loss=loss,
                bundles=sizes,
                rollout_id=pub._start_rollout(state.latest_version),
            )
            pub._record(rel, state)
            out[r] = rel
        return out
