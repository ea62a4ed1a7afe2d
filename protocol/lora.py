"""The shape of a LoRA adapter, defined once for every side.

The trainer builds its PEFT model from it (``client.train``), the runtimes attach an
adapter of that shape (``client.runtime``), the signed bundle manifest carries it
(``delta_packager.manifest.AdapterConfig`` extends it with the PEFT config), the update
agent records it beside each staged adapter (:meth:`LoraShape.to_json`), and the
simulation exports adapters of it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LoraShape", "LoraShapeError", "lora_rank_axis", "truncate_to_rank"]


def lora_rank_axis(name: str) -> int | None:
    """Where the LoRA rank sits in tensor ``name``: ``lora_A`` is ``(rank, in)`` (0),
    ``lora_B`` ``(out, rank)`` (1); ``None`` for any other tensor."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def truncate_to_rank(adapter: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """The first ``rank`` rank slices of every LoRA tensor (numpy arrays or torch
    tensors; other tensors as they are): what a phone of rank ``rank`` holds of a
    higher-rank adapter (ADR 0016). ``B[:, :r] @ A[:r]`` is the sum of the first ``r``
    rank-one terms of ``B @ A``.

    Raises:
        LoraShapeError: ``rank`` is below 1, or above a LoRA tensor's rank.
    """
    out: dict[str, Any] = {}
    for name, value in adapter.items():
        axis = lora_rank_axis(name)
        if axis is not None and not 1 <= rank <= value.shape[axis]:
            raise LoraShapeError(
                f"cannot truncate {name} of rank {value.shape[axis]} to rank {rank}"
            )
        out[name] = value if axis is None else value[:rank] if axis == 0 else value[:, :rank]
    return out


class LoraShapeError(ValueError):
    """A LoRA shape is out of range (a rank below 1, a non-positive alpha, ...)."""


@dataclass(frozen=True)
class LoraShape:
    """Shape of the LoRA adapter every client of a federation and every phone shares.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (scale = alpha / rank).
        target_modules: module names to adapt; ``None`` means every linear projection
            except the output head (PEFT's ``"all-linear"``).
        adapt_head: also adapt the output head (``lm_head``).
        ffa: FFA-LoRA (Sun et al., ICLR 2024): A frozen at a seeded init that every
            client reproduces from ``init_seed``; only B is trained and exchanged.
        init_seed: seed of the LoRA A initialisation (identical on every client).
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    adapt_head: bool = False
    ffa: bool = False
    init_seed: int = 0

    def __post_init__(self) -> None:
        rank, alpha = self.rank, self.alpha
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise LoraShapeError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(alpha, numbers.Real) and alpha > 0 and math.isfinite(alpha)):
            raise LoraShapeError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if self.target_modules is not None and (
            not self.target_modules
            or not all(isinstance(m, str) and m for m in self.target_modules)
        ):
            raise LoraShapeError(
                "LoRA target_modules must be None (every linear projection) or a non-empty "
                f"tuple of module names, got {self.target_modules!r}"
            )

    def as_shape(self) -> LoraShape:
        """Just the shape: a subclass's own fields (a PEFT config, a dropout) dropped."""
        return LoraShape(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraShape)})

    @property
    def scale(self) -> float:
        """The factor LoRA multiplies ``B·A`` by (``alpha / rank``)."""
        return float(self.alpha) / self.rank

    def to_json(self) -> dict[str, Any]:
        """The JSON form (what the update agent records beside a staged adapter)."""
        return {
            "rank": self.rank,
            "alpha": float(self.alpha),
            "target_modules": None if self.target_modules is None else list(self.target_modules),
            "adapt_head": self.adapt_head,
            "ffa": self.ffa,
            "init_seed": self.init_seed,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LoraShape:
        """Parse :meth:`to_json`'s form; ``rank`` and ``alpha`` are required, an empty
        or missing ``target_modules`` means every linear projection.

        Raises:
            LoraShapeError: a field is missing or out of range.
        """
        try:
            modules = raw.get("target_modules")
            return cls(
                rank=int(raw["rank"]),
                alpha=float(raw["alpha"]),
                target_modules=tuple(str(m) for m in modules) if modules else None,
                adapt_head=bool(raw.get("adapt_head", False)),
                ffa=bool(raw.get("ffa", False)),
                init_seed=int(raw.get("init_seed", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, LoraShapeError):
                raise
            raise LoraShapeError(f"not a LoRA shape: {raw!r} ({e})") from e
