"""⑦ apply (pure part) — previous adapter state + parsed bundle → new adapter state.

The client SDK calls ``apply_bundle``; the packager calls the very same function on the
bundle bytes it just wrote to learn the state every device will hold. That is what makes
deltas closed-loop (DESIGN decision 5): there is one implementation of the arithmetic.

Invariants:

* pure: inputs are never modified; the result holds fresh float32 arrays;
* deterministic to the bit: per element, ``full`` steps decode, ``delta`` steps compute
  one float32 addition ``previous + decoded`` (IEEE round-to-nearest), no reductions;
* refusals come before any arithmetic: a device base the manifest does not name, as its
  primary or one of its compatible bases (THREATS C12/C13, I42), a release counter not
  above the installed one (B8), a delta that does not start at the installed version or
  layout (C14: the device must get a full bundle instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from delta_packager.encode import decode_tensor
from delta_packager.errors import BaseMismatchError, ChainMismatchError, RollbackError
from delta_packager.format import Bundle, Step
from protocol import ReleaseKind

__all__ = ["AdapterState", "apply_bundle", "apply_steps"]


@dataclass(frozen=True)
class AdapterState:
    """The adapter a device holds: float32 tensors by PEFT state-dict name.

    Attributes:
        version: Adapter version (integer, increasing).
        release_counter: Anti-rollback counter of the release that produced it.
        base_fingerprint: ``"sha256:..."`` of the base model it belongs to (the device's
            base, which the bundle named as its primary or a compatible base).
        tensors: Tensor name -> float32 array (treat as read-only).
    """

    version: int
    release_counter: int
    base_fingerprint: str
    tensors: Mapping[str, np.ndarray]


def apply_steps(
    previous: Mapping[str, np.ndarray] | None, steps: tuple[Step, ...]
) -> dict[str, np.ndarray]:
    """Apply decoded steps in order; the arithmetic shared by packager and device.

    Args:
        previous: Tensors before the first step (ignored if the first step is full).
        steps: Steps from a parsed bundle or the packager's chain.

    Returns:
        New float32 tensors.

    Raises:
        ChainMismatchError: a delta step has no previous state or another layout.
        BundleFormatError: a step's parts do not match its encoding.
    """
    current: dict[str, np.ndarray] | None = None if previous is None else dict(previous)
    for step in steps:
        if step.kind == ReleaseKind.FULL:
            current = {name: decode_tensor(enc) for name, enc in step.tensors.items()}
            continue
        if current is None:
            raise ChainMismatchError(
                f"a delta step to version {step.to_version} needs a previous adapter and the "
                "device holds none: install a full bundle first"
            )
        if set(current) != set(step.tensors):
            missing = sorted(set(step.tensors) ^ set(current))[:3]
            raise ChainMismatchError(
                f"delta to version {step.to_version} and the installed adapter name different "
                f"tensors (e.g. {missing}); install a full bundle instead"
            )
        nxt: dict[str, np.ndarray] = {}
        for name, enc in step.tensors.items():
            prev = current[name]
            if tuple(prev.shape) != enc.shape:
                raise ChainMismatchError(
                    f"tensor {name}: installed shape {list(prev.shape)}, delta shape "
                    f"{list(enc.shape)}; install a full bundle instead"
                )
            decoded = decode_tensor(enc)  # fresh array: safe to add into
            nxt[name] = np.add(prev.astype(np.float32, copy=False), decoded, out=decoded)
        current = nxt
    if current is None:
        raise ChainMismatchError("a bundle without steps cannot be applied")
    return current


def apply_bundle(
    previous: AdapterState | None, bundle: Bundle, *, base_fingerprint: str
) -> AdapterState:
    """Return the adapter state after applying ``bundle`` on top of ``previous``.

    Args:
        previous: The installed adapter, or ``None`` when the device has none.
        bundle: A parsed (and, on a device, TUF-verified) bundle.
        base_fingerprint: Fingerprint of the base model the device actually holds.

    Returns:
        The new state: ``version`` and ``release_counter`` from the bundle, bound to
        ``base_fingerprint``.

    Raises:
        BaseMismatchError: the bundle does not name the device's base (as its primary
            or a compatible base), or the installed adapter is for another base.
        RollbackError: the bundle's release counter is not above the installed one.
        ChainMismatchError: a delta bundle does not start at the installed version.
    """
    m = bundle.manifest
    if not m.applies_to(base_fingerprint):
        raise BaseMismatchError(
            f"bundle is built for base {m.base_fingerprint}, the device holds "
            f"{base_fingerprint}: it cannot be applied; fetch a bundle for this base"
        )
    if previous is not None and previous.base_fingerprint != base_fingerprint:
        raise BaseMismatchError(
            f"installed adapter belongs to base {previous.base_fingerprint}, not the "
            f"device's base {base_fingerprint}: install a full bundle for this base"
        )
    if previous is not None and m.release_counter <= previous.release_counter:
        raise RollbackError(
            f"bundle release counter is {m.release_counter}, the installed adapter's is "
            f"{previous.release_counter}; expected a higher counter: this is a rollback or "
            "a replay and was refused"
        )
    if m.kind == "delta":
        held = None if previous is None else previous.version
        if held != m.from_version:
            raise ChainMismatchError(
                f"delta bundle goes from version {m.from_version} to {m.to_version}, the "
                f"device holds version {held}: ask the server for a full bundle"
            )
    tensors = apply_steps(None if previous is None else previous.tensors, bundle.steps)
    return AdapterState(
        version=m.to_version,
        release_counter=m.release_counter,
        base_fingerprint=base_fingerprint,
        tensors=tensors,
    )
