"""The privacy release gate both sides enforce: what a release spent, what a policy allows.

A release's privacy spend travels signed: the manifest's provenance records it, and the
packager repeats it in the TUF target's ``custom.fedota.privacy`` block
(``{"record_epsilon", "record_delta", "user_epsilon", "user_delta"}``, each key present
only when recorded, each value a decimal string since TUF's canonical JSON has no
floats), so a device can judge a release *before* it downloads a byte and
the server can judge it at publish and at rollout time (ADR 0014).

The two ε are kept apart, as everywhere in fedota (ADR 0005): record-level (per text,
the maximum over phones) and user-level (per device, central DP-FedAvg). A policy bounds
each on its own; ``max_delta`` bounds the δ of every ε the policy bounds. A spend that
is not recorded is unbounded: a release whose provenance lacks the ε (or δ) a policy
bounds is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["PRIVACY_KEYS", "PrivacyPolicy", "PrivacySpend", "privacy_violation"]

PRIVACY_KEYS = ("record_epsilon", "record_delta", "user_epsilon", "user_delta")
_DECIMAL = re.compile(r"[0-9]{1,20}(\.[0-9]{1,20})?(e[+-][0-9]{1,3})?")


@dataclass(frozen=True)
class PrivacySpend:
    """The (ε, δ) a release's training spent, per unit; ``None``: not recorded."""

    record_epsilon: float | None = None
    record_delta: float | None = None
    user_epsilon: float | None = None
    user_delta: float | None = None

    def to_json(self) -> dict[str, float]:
        """The recorded values only, as numbers (the manifest's provenance, the server's
        database)."""
        return {f.name: float(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def to_signed(self) -> dict[str, str]:
        """The recorded values only, as decimal strings: the ``custom.fedota.privacy``
        block of a TUF target. TUF's canonical JSON has no floats, so each number is
        its shortest round-tripping ``repr`` (``9.1``, ``1e-05``)."""
        return {k: repr(v) for k, v in self.to_json().items()}

    @classmethod
    def from_json(cls, raw: object) -> PrivacySpend:
        """Parse ``to_json``'s form (numbers) or ``to_signed``'s (decimal strings) strictly.

        Raises:
            ValueError: not an object of the known keys with finite numbers >= 0.
        """
        if not isinstance(raw, Mapping) or not set(raw) <= set(PRIVACY_KEYS):
            raise ValueError(f"privacy must be an object with keys among {list(PRIVACY_KEYS)}")
        values: dict[str, float] = {}
        for key, value in raw.items():
            if isinstance(value, str) and _DECIMAL.fullmatch(value):
                value = float(value)  # the signed form
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"privacy.{key} must be a decimal number, got {value!r}")
            number = float(value)
            if not math.isfinite(number) or number < 0:
                raise ValueError(f"privacy.{key} must be finite and >= 0, got {value!r}")
            values[str(key)] = number
        return cls(**values)


@dataclass(frozen=True)
class PrivacyPolicy:
    """The most a release may have spent; ``None`` bounds nothing.

    Attributes:
        max_record_epsilon: Largest record-level (per text) ε a release may carry.
        max_user_epsilon: Largest user-level (per device) ε a release may carry.
        max_delta: Largest δ of any ε this policy bounds (or of any recorded ε when
            no ε is bounded).
    """

    max_record_epsilon: float | None = None
    max_user_epsilon: float | None = None
    max_delta: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{f.name} must be a finite number > 0, got {value!r}")

    @property
    def is_set(self) -> bool:
        """Whether the policy bounds anything."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_json(self) -> dict[str, float]:
        """The bounds that are set."""
        return {f.name: float(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> PrivacyPolicy:
        """From ``to_json``'s form (``None``: no policy).

        Raises:
            ValueError: unknown keys or values that are not finite numbers > 0.
        """
        if not raw:
            return cls()
        known = {f.name for f in fields(cls)}
        if not set(raw) <= known:
            raise ValueError(
                f"privacy policy keys must be among {sorted(known)}, got {sorted(raw)}"
            )
        return cls(**{k: float(v) for k, v in raw.items()})


def _num(value: float) -> str:
    return f"{value:g}"


def privacy_violation(policy: PrivacyPolicy, spend: PrivacySpend | None) -> str | None:
    """Why a release that spent ``spend`` breaks ``policy``, or ``None`` if it does not.

    The message names the numbers, e.g. ``spent record-level ε=9.1 > policy
    max_record_epsilon=8``; a spend the policy bounds but the release does not record
    reads ``records no record-level ε (unbounded) > policy max_record_epsilon=8``.
    """
    spend = spend or PrivacySpend()
    bounded: list[tuple[str, str, float | None]] = []  # (unit, key, its δ)
    for unit, key, epsilon, delta, limit in (
        (
            "record",
            "record_epsilon",
            spend.record_epsilon,
            spend.record_delta,
            policy.max_record_epsilon,
        ),
        ("user", "user_epsilon", spend.user_epsilon, spend.user_delta, policy.max_user_epsilon),
    ):
        if limit is None:
            continue
        if epsilon is None:
            return f"records no {unit}-level ε (unbounded) > policy max_{key}={_num(limit)}"
        if epsilon > limit:
            return f"spent {unit}-level ε={_num(epsilon)} > policy max_{key}={_num(limit)}"
        bounded.append((unit, key, delta))
    if policy.max_delta is None:
        return None
    if not bounded:  # only δ is bounded: every recorded ε must name a small enough δ
        bounded = [
            (unit, f"{unit}_epsilon", delta)
            for unit, epsilon, delta in (
                ("record", spend.record_epsilon, spend.record_delta),
                ("user", spend.user_epsilon, spend.user_delta),
            )
            if epsilon is not None
        ]
        if not bounded:
            return f"records no ε, δ (unbounded) > policy max_delta={_num(policy.max_delta)}"
    for unit, _key, delta in bounded:
        if delta is None:
            return (
                f"records no {unit}-level δ (unbounded) > policy max_delta={_num(policy.max_delta)}"
            )
        if delta > policy.max_delta:
            return f"spent {unit}-level δ={_num(delta)} > policy max_delta={_num(policy.max_delta)}"
    return None
