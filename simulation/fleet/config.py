"""Fleet configuration: device tiers, fault shares and rollout policy, validated once.

Everything ``simulation.fleet`` and ``simulation.ota_rollout`` need is parsed here into
frozen dataclasses; nothing deeper reads the environment or re-checks ranges. Units are
in the names (``budget_bytes``, ``bandwidth_bps``, ``poll_interval_s``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from simulation.errors import SimulationInputError

__all__ = [
    "DEFAULT_TIERS",
    "DEVICE_RUNTIMES",
    "FaultShares",
    "FleetConfig",
    "FleetMode",
    "RolloutPolicy",
    "Tier",
    "auto_stages",
    "with_device_runtime",
    "with_lora_ranks",
]

_MIB = 2**20
RUNTIMES = ("llamacpp", "nf4")  # client.runtime's RuntimeKind
DEVICE_RUNTIMES = ("mixed", *RUNTIMES)


class FleetMode(StrEnum):
    """``fedota simulate --fleet-mode``: how much each phone runs (``FleetConfig.lightweight``)."""

    FULL = "full"  # every phone health-checks and evaluates on its own runtime
    LIGHT = "light"  # the update protocol per phone; measurements shared per (tier, adapter)


@dataclass(frozen=True)
class Tier:
    """A class of phones sharing a memory budget and a network.

    Attributes:
        name: Short label used in the report (``low``, ``mid``, ``high``).
        share: Fraction of the fleet in this tier (tiers are renormalised).
        budget_bytes: Memory the runtime may add on top of the interpreter.
        bandwidth_bps: Download bandwidth in bytes per second (simulated time).
        availability: Probability the phone is online at a poll.
        runtime: The phone's inference runtime: ``llamacpp`` (a GGUF export of the
            base) or ``nf4`` (the pre-quantized checkpoint, transformers + PEFT).
        lora_rank: The LoRA rank the tier's phones train and run when the federation
            allows several (``with_lora_ranks``; ADR 0016); ``None``: the global rank.
    """

    name: str
    share: float
    budget_bytes: int
    bandwidth_bps: float
    availability: float
    runtime: str = "llamacpp"
    lora_rank: int | None = None

    def __post_init__(self) -> None:
        if not self.name or self.share <= 0:
            raise SimulationInputError(f"tier {self.name!r}: share must be > 0")
        if self.budget_bytes <= 0 or self.bandwidth_bps <= 0:
            raise SimulationInputError(
                f"tier {self.name!r}: budget_bytes and bandwidth_bps must be positive"
            )
        if not 0.0 < self.availability <= 1.0:
            raise SimulationInputError(
                f"tier {self.name!r}: availability {self.availability} must be in (0, 1]"
            )
        if self.runtime not in RUNTIMES:
            raise SimulationInputError(
                f"tier {self.name!r}: runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}"
            )
        if self.lora_rank is not None and self.lora_rank < 1:
            raise SimulationInputError(f"tier {self.name!r}: lora_rank must be >= 1")


# Phones run llama.cpp; the high tier keeps the NF4 runtime the clients train on, so
# every default run compares the two on the same releases (``--device-runtime mixed``).
DEFAULT_TIERS: tuple[Tier, ...] = (
    Tier("low", 0.3, 96 * _MIB, 250_000.0, 0.7, "llamacpp"),
    Tier("mid", 0.5, 192 * _MIB, 2_000_000.0, 0.85, "llamacpp"),
    Tier("high", 0.2, 512 * _MIB, 10_000_000.0, 0.95, "nf4"),
)


def with_device_runtime(tiers: tuple[Tier, ...], mode: str) -> tuple[Tier, ...]:
    """``tiers`` with their runtimes set by ``fedota simulate --device-runtime``.

    Args:
        tiers: The fleet's tiers.
        mode: ``llamacpp`` or ``nf4`` (every tier), or ``mixed`` (the tiers' own
            runtimes; with a single tier, or none on llama.cpp, the first tiers run
            llama.cpp and the last one NF4).

    Raises:
        SimulationInputError: ``mode`` is not one of ``DEVICE_RUNTIMES``.
    """
    if mode not in DEVICE_RUNTIMES:
        raise SimulationInputError(
            f"--device-runtime {mode!r} is not one of: {', '.join(DEVICE_RUNTIMES)}"
        )
    if mode != "mixed":
        return tuple(replace(t, runtime=mode) for t in tiers)
    if len(tiers) == 1:
        return (replace(tiers[0], runtime="llamacpp"),)
    if {t.runtime for t in tiers} == set(RUNTIMES):
        return tiers
    last = len(tiers) - 1
    return tuple(
        replace(t, runtime="nf4" if i == last else "llamacpp") for i, t in enumerate(tiers)
    )


def with_lora_ranks(tiers: tuple[Tier, ...], ranks: Sequence[int]) -> tuple[Tier, ...]:
    """``tiers`` with a LoRA rank each when the federation allows several (ADR 0016).

    A phone's rank is sized to its memory (DESIGN decision 9): the tiers, ordered by
    memory budget, take the allowed ranks in order, spread evenly over them, so the
    smallest budget gets the smallest rank and the largest the largest (three tiers
    and ranks 4, 8, 16 give 4, 8 and 16; tiers of equal budget get the same rank).

    Args:
        tiers: The fleet's tiers.
        ranks: The allowed ranks (``lora-ranks``); empty or one: ``tiers`` unchanged.
    """
    allowed = sorted(set(ranks))
    if len(allowed) < 2:
        return tiers
    budgets = sorted({t.budget_bytes for t in tiers})
    last = max(len(budgets) - 1, 1)
    rank_of = {
        b: allowed[math.floor(i * (len(allowed) - 1) / last + 0.5)] for i, b in enumerate(budgets)
    }
    return tuple(replace(t, lora_rank=rank_of[t.budget_bytes]) for t in tiers)


@dataclass(frozen=True)
class FaultShares:
    """Fractions of the fleet with an injected fault (each device has at most one).

    Attributes:
        killed_mid_apply: Updater killed at a step of its first update, then restarted.
        corrupted_mirror: Downloads of the first release come through a mirror that
            flips a byte (the device refuses the payload, keeps its adapter and reports
            a ``retry``: the release stays offered, ADR 0007).
        other_base: Devices holding a base with another fingerprint (never offered).
        far_behind: Devices offline until the last release (get a full bundle).
        bad_release_round: Round whose release is published with an adapter that fails
            the golden health check (``None``: no bad release).
    """

    killed_mid_apply: float = 0.05
    corrupted_mirror: float = 0.05
    other_base: float = 0.05
    far_behind: float = 0.05
    bad_release_round: int | None = 2

    def __post_init__(self) -> None:
        shares = (self.killed_mid_apply, self.corrupted_mirror, self.other_base, self.far_behind)
        if any(not 0.0 <= s <= 1.0 for s in shares) or sum(shares) > 0.8:
            raise SimulationInputError(
                f"fault shares {shares} must each be in [0, 1] and sum to at most 0.8, "
                "so that most of the fleet is healthy"
            )
        if self.bad_release_round is not None and self.bad_release_round < 1:
            raise SimulationInputError("bad_release_round must be >= 1 (or None)")


@dataclass(frozen=True)
class RolloutPolicy:
    """How each release is rolled out (see ``fedota rollout create``).

    Attributes:
        stages: Strictly increasing percent stages ending at 100.
        max_failure_rate: A stage whose failure rate exceeds this pauses the rollout.
        min_reports: Reports a stage needs before the server judges it (``None``: a
            quarter of the devices the first stage covers, at least 2).
        quality_tolerance: The rollout's quality gate: a stage whose phones measured a
            mean golden-prompt loss above (1 + this) x that of the adapter it replaces
            pauses (reason ``quality``); ``None``: no quality gate. The default is
            coarse on purpose: the golden prompts are public text while the phones
            fine-tune on chat messages, so a good release's golden loss rises by about
            30 % over two rounds of the default run (a real drift, not a broken model);
            0.5 lets that through and stops a release that breaks the model.
    """

    stages: tuple[int, ...] = (10, 50, 100)
    max_failure_rate: float = 0.5
    min_reports: int | None = None
    quality_tolerance: float | None = 0.5

    def __post_init__(self) -> None:
        ok = all(0 < a < b for a, b in zip(self.stages, self.stages[1:], strict=False))
        if not self.stages or not ok or self.stages[0] <= 0 or self.stages[-1] != 100:
            raise SimulationInputError(
                f"stages {list(self.stages)} must strictly increase within 1..100 and end at 100"
            )
        if not 0.0 <= self.max_failure_rate < 1.0:
            raise SimulationInputError("max_failure_rate must be in [0, 1)")
        if self.quality_tolerance is not None and not 0.0 <= self.quality_tolerance <= 10.0:
            raise SimulationInputError(
                f"quality_tolerance {self.quality_tolerance} must be in [0, 10] (or None)"
            )

    def reports_needed(self, devices: int) -> int:
        """``min_reports`` for a fleet of ``devices``."""
        if self.min_reports is not None:
            return self.min_reports
        return max(2, devices * self.stages[0] // 400)


def auto_stages(devices: int) -> tuple[int, ...]:
    """Stages whose first one holds about 8 phones (10 % at least, 50 % at most).

    The server judges a stage once ``min_reports`` phones reported; a first stage of
    a couple of phones in a small fleet would often be too small for a bad release to
    trip the failure threshold before the operator must decide.
    """
    first = min(50, max(10, round(800 / devices)))
    return (first, 50, 100) if first < 50 else (50, 100)


@dataclass(frozen=True)
class FleetConfig:
    """The simulated fleet (``fedota simulate --devices ...``).

    Attributes:
        devices: Number of simulated phones (more than the clients that train).
        tiers: Device tiers the profiles are drawn from.
        faults: Fault injection shares.
        rollout: Staged rollout policy of every release.
        lightweight: Exercise the update protocol without per-device inference: the
            golden-prompt measurement is computed once per (tier, base, adapter) and
            shared; no held-out evaluation. For large fleets.
        publish_every: Publish after every N-th round.
        poll_interval_s: Simulated seconds between two polls of a device.
        max_polls_per_round: Polls each device gets per round before the fleet moves on.
        catch_up: ``finish`` runs a last sweep with every device online (far-behind
            ones too) so that "every healthy device on the latest release" is checkable.
        golden_prompts: Number of golden prompts provisioned on every device.
        heldout_texts: Held-out texts each device evaluates the adapter on.
        seed: Seed of the profile draw, availability and faults.
        gguf_quant: Quantization of the GGUF export llama.cpp tiers run (ADR 0011).
    """

    devices: int = 24
    tiers: tuple[Tier, ...] = DEFAULT_TIERS
    faults: FaultShares = field(default_factory=FaultShares)
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)
    lightweight: bool = False
    publish_every: int = 1
    poll_interval_s: float = 60.0
    max_polls_per_round: int = 8
    catch_up: bool = True
    golden_prompts: int = 4
    heldout_texts: int = 3
    seed: int = 0
    gguf_quant: str = "q8_0"

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise SimulationInputError(f"devices must be >= 1, got {self.devices}")
        if not self.tiers:
            raise SimulationInputError("at least one device tier is needed")
        if len({t.name for t in self.tiers}) != len(self.tiers):
            raise SimulationInputError("tier names must be unique")
        if self.publish_every < 1 or self.max_polls_per_round < 1:
            raise SimulationInputError("publish_every and max_polls_per_round must be >= 1")
        if self.poll_interval_s <= 0:
            raise SimulationInputError("poll_interval_s must be > 0")
        if self.golden_prompts < 1 or self.heldout_texts < 1:
            raise SimulationInputError("golden_prompts and heldout_texts must be >= 1")
        if len({t.lora_rank is None for t in self.tiers}) > 1:
            raise SimulationInputError(
                "either every tier has a lora_rank or none has: "
                + ", ".join(f"{t.name}={t.lora_rank}" for t in self.tiers)
            )

    @property
    def lora_ranks(self) -> tuple[int, ...]:
        """The LoRA ranks the tiers run, sorted (empty: every phone the global rank)."""
        return tuple(sorted({t.lora_rank for t in self.tiers if t.lora_rank is not None}))

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes the tiers use, sorted."""
        return tuple(sorted({t.runtime for t in self.tiers}))
