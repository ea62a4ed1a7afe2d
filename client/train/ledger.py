"""The phone's persistent privacy ledger (record-level DP, THREATS G38).

Invariants:
* The ledger stores the mechanisms run (sigma, q, steps per round), never just an
  epsilon, so epsilon is recomposed exactly after a restart with the ledger's
  accountant and delta.
* Every write is atomic (temp file, fsync, rename, fsync dir): a crash leaves the
  old or the new ledger, never a torn one. An unreadable ledger is an error, never
  treated as "nothing spent".
* The budget can only be tightened: reopening with a larger budget than the stored
  one keeps the stored one.
* A round is recorded before its adapter leaves the trainer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from client.train.accounting import DPRound, compute_epsilon
from client.train.errors import LedgerError, TrainConfigError
from protocol import atomic_write_text

__all__ = ["LEDGER_FILE", "PrivacyLedger"]

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.json"
_FORMAT = 1


class PrivacyLedger:
    """Record-level epsilon spent by one device over every round it trained.

    Args:
        path: the ledger file, or a state directory (then ``DIR/privacy_ledger.json``).
        delta: delta of every epsilon this ledger reports; fixed for the ledger's life.
        accountant: ``"prv"`` or ``"rdp"``.
        epsilon_budget: cap on the total epsilon; None means no cap.

    Raises:
        LedgerError: the file exists but is unreadable, corrupt, or was written with
            another delta.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        delta: float = 1e-5,
        accountant: str = "prv",
        epsilon_budget: float | None = None,
    ) -> None:
        p = Path(path)
        self.path = p / LEDGER_FILE if p.is_dir() or p.suffix == "" else p
        if accountant not in ("prv", "rdp"):
            raise TrainConfigError(f"accountant must be 'prv' or 'rdp', got {accountant!r}")
        self.delta = delta
        self.accountant = accountant
        self._rounds: list[DPRound] = []
        self._budget = epsilon_budget
        self._cache: float | None = None
        # Epsilon persisted by the last write: never report less (PRV is numerical).
        self._floor = 0.0
        if self.path.exists():
            self._load()
        else:
            self._save()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != _FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            rounds = [DPRound(**r["mechanism"]) for r in data["rounds"]]
            stored_delta = float(data["delta"])
            stored_budget = data.get("epsilon_budget")
            self._floor = float(data.get("epsilon_spent") or 0.0)
        except (OSError, ValueError, KeyError, TypeError, TrainConfigError) as e:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable or corrupt ({e}); refusing to "
                "train, since the privacy already spent is unknown. Restore it from backup; "
                "deleting it would reset the device's privacy accounting"
            ) from e
        if stored_delta != self.delta:
            raise LedgerError(
                f"privacy ledger {self.path} accounts at delta={stored_delta}, but "
                f"delta={self.delta} was requested; use the ledger's delta"
            )
        self._rounds = rounds
        if stored_budget is not None:
            self._budget = (
                float(stored_budget) if self._budget is None else min(self._budget, stored_budget)
            )
        self._save()

    def _save(self) -> None:
        payload = {
            "format": _FORMAT,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon_budget": self._budget,
            "rounds": [{"mechanism": asdict(r)} for r in self._rounds],
            "epsilon_spent": self.spent_epsilon(),
            "updated_at": time.time(),
        }
        atomic_write_text(self.path, json.dumps(payload, indent=2, sort_keys=True), mode=0o600)

    @property
    def epsilon_budget(self) -> float | None:
        """The cap on total epsilon, or None."""
        return self._budget

    @property
    def rounds(self) -> tuple[DPRound, ...]:
        """Every recorded round, oldest first."""
        return tuple(self._rounds)

    def spent_epsilon(self) -> float:
        """Total epsilon over every recorded round (0.0 when none)."""
        if self._cache is None:
            computed = compute_epsilon(self._rounds, delta=self.delta, accountant=self.accountant)
            self._cache = max(computed, self._floor)
        return self._cache

    def epsilon_after(self, planned: DPRound) -> float:
        """Total epsilon if ``planned`` were recorded next."""
        after = compute_epsilon(
            [*self._rounds, planned], delta=self.delta, accountant=self.accountant
        )
        return max(after, self.spent_epsilon())

    def can_train(self, planned: DPRound, *, epsilon_budget: float | None = None) -> bool:
        """Whether ``planned`` keeps the total within the budget.

        Args:
            planned: the round about to run.
            epsilon_budget: an extra cap for this call (the tighter one wins).
        """
        caps = [c for c in (self._budget, epsilon_budget) if c is not None]
        if not caps:
            return True
        return self.epsilon_after(planned) <= min(caps)

    def record(self, done: DPRound) -> float:
        """Persist a finished round atomically and return the new total epsilon.

        Raises:
            OSError: the ledger could not be written (the adapter must then not leave).
        """
        self._rounds.append(done)
        self._cache = None
        try:
            self._save()
        except BaseException:
            self._rounds.pop()
            self._cache = None
            raise
        total = self.spent_epsilon()
        logger.info(
            "privacy ledger %s: %d rounds, epsilon=%.4f", self.path, len(self._rounds), total
        )
        return total
