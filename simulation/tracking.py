"""``OUT/tensorboard/``: every round's metrics of a federated run as TensorBoard events.

Stage: ② aggregate, observed from the workstation. ``run_federated`` opens a
:class:`RunTracker` on every run and logs each completed round as the server reports
it, so ``tensorboard --logdir runs/`` shows runs side by side while they train
(docs/adr/0015-config-files-and-run-tracking.md says why TensorBoard).

Invariants:

* **One scalar per metric and round, step = round** (0 = the baseline evaluation).
  Tags are ``<phase>/<metric>``: ``evaluate/clients-accuracy``,
  ``evaluate/clients-loss``, ``evaluate/heldout-accuracy``, ``train/upload-bytes``,
  ``train/record-epsilon`` or ``train/user-epsilon`` (never combined, ADR 0005), plus
  ``round/elapsed_s``. Every numeric metric the server reports is logged under its
  own name, so metrics that a new strategy adds are tracked without a change here.
* **The events equal the checkpointed history.** Opening the tracker removes the
  event files a previous start left, then replays the history the run resumes from;
  the rounds this process trains follow. A resumed run thus holds each round once,
  as ``summary.json`` does.
* The run's options (``OUT/config.toml``) are logged once as the text ``config``.
* **The OTA half** (``fedota simulate`` with a fleet) logs each published round to
  ``OUT/tensorboard/ota`` (:class:`OtaTracker`; TensorBoard shows it as the run
  ``RUN/ota``): ``ota/bundle-bytes``, ``ota/adoption``, ``ota/releases``,
  ``ota/updated``, ``ota/rolled-back``, ``ota/rejected`` and ``ota/paused``, step =
  round. A run resumed with ``--resume`` trains without the fleet, so its OTA events
  are those of the first start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.federation import RoundCallback, RoundResult
    from simulation.ota_rollout import RoundOta

__all__ = [
    "EVENTS_DIR",
    "OTA_EVENTS_DIR",
    "OtaTracker",
    "RunTracker",
    "ota_scalars",
    "round_scalars",
]

EVENTS_DIR = "tensorboard"
OTA_EVENTS_DIR = f"{EVENTS_DIR}/ota"
_EPSILON = {"record": "record-epsilon", "user": "user-epsilon"}  # dp-mode -> its ε metric
_EVENT_FILES = "events.out.tfevents.*"


def round_scalars(
    train: Mapping[str, Any],
    evaluate: Mapping[str, Any],
    *,
    dp_mode: str,
    elapsed_s: float | None = None,
) -> dict[str, float]:
    """The scalars one round is logged as, tag → value.

    Non-numbers and NaN are left out, and so is the ε of a privacy level the run did
    not use (the server reports ``record-epsilon`` 0 without DP: not a guarantee).
    """
    unused = {k for mode, k in _EPSILON.items() if mode != dp_mode}
    out: dict[str, float] = {}
    for phase, metrics in (("evaluate", evaluate), ("train", train)):
        for key, value in sorted(metrics.items()):
            if key in unused:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and math.isfinite(value):
                out[f"{phase}/{key}"] = float(value)
    if elapsed_s is not None:
        out["round/elapsed_s"] = float(elapsed_s)
    return out


class RunTracker:
    """The TensorBoard event writer of one run directory.

    Use as a context manager; :meth:`after_round` wraps a round callback so that every
    completed round is logged (and flushed) before the wrapped callback runs.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        dp_mode: str,
        history: Sequence[Mapping[str, Any]] = (),
        config_toml: str | None = None,
    ) -> None:
        """Open ``out_dir/tensorboard`` afresh and replay ``history``.

        Args:
            out_dir: the run directory.
            dp_mode: ``none``, ``record`` or ``user``: which ε is logged.
            history: the server's history the run resumes from (``RoundResult.as_json``
                entries; empty for a new run).
            config_toml: the run's options as TOML, logged as the text ``config``.

        Raises:
            ModuleNotFoundError: the ``tensorboard`` package (sim extra) is missing.
            OSError: the directory cannot be written.
        """
        import tensorboard  # noqa: F401  # named in the error if the sim extra is missing
        from torch.utils.tensorboard import SummaryWriter

        self.dp_mode = dp_mode
        self.log_dir = out_dir / EVENTS_DIR
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.log_dir.glob(_EVENT_FILES):
            stale.unlink()  # rebuilt from the history below: each round once
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30)
        if config_toml:
            self._writer.add_text("config", f"```toml\n{config_toml}```", global_step=0)
        for entry in history:
            self.log_round(
                int(entry["round"]),
                entry.get("train", {}),
                entry.get("evaluate", {}),
                elapsed_s=entry.get("elapsed_s"),
            )
        self._writer.flush()

    def log_round(
        self,
        round_number: int,
        train: Mapping[str, Any],
        evaluate: Mapping[str, Any],
        *,
        elapsed_s: float | None = None,
    ) -> None:
        """Log one round's metrics at step ``round_number``."""
        scalars = round_scalars(train, evaluate, dp_mode=self.dp_mode, elapsed_s=elapsed_s)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=round_number)

    def after_round(self, then: RoundCallback | None) -> RoundCallback:
        """A round callback that logs the round, flushes, then calls ``then``."""

        def on_round_end(result: RoundResult) -> None:
            self.log_round(
                int(result.round), result.train, result.evaluate, elapsed_s=result.elapsed_s
            )
            self._writer.flush()
            if then is not None:
                then(result)

        return on_round_end

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ota_scalars(ota_round: RoundOta) -> dict[str, float]:
    """The scalars one published round of the OTA half is logged as, tag → value."""
    sweeps = ota_round.sweeps
    return {
        "ota/bundle-bytes": float(ota_round.bundle_bytes),
        "ota/adoption": float(ota_round.adoption),
        "ota/releases": float(len(ota_round.releases)),
        "ota/updated": float(sum(s.updated for s in sweeps)),
        "ota/rolled-back": float(sum(s.rolled_back for s in sweeps)),
        "ota/rejected": float(sum(s.rejected for s in sweeps)),
        "ota/paused": float(ota_round.paused),
    }


class OtaTracker:
    """The TensorBoard event writer of the OTA half, in ``out_dir/tensorboard/ota``.

    A context manager; :meth:`log_round` logs (and flushes) one published round.
    """

    def __init__(self, out_dir: Path) -> None:
        """Open ``out_dir/tensorboard/ota`` afresh.

        Raises:
            ModuleNotFoundError: the ``tensorboard`` package (sim extra) is missing.
            OSError: the directory cannot be written.
        """
        import tensorboard  # noqa: F401  # named in the error if the sim extra is missing
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = out_dir / OTA_EVENTS_DIR
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.log_dir.glob(_EVENT_FILES):
            stale.unlink()
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30)

    def log_round(self, ota_round: RoundOta) -> None:
        """Log a round the OTA half published (rounds it skipped are not logged)."""
        if not ota_round.releases:
            return
        for tag, value in ota_scalars(ota_round).items():
            self._writer.add_scalar(tag, value, global_step=ota_round.round)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> OtaTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
