"""③ package — closed-loop deltas: new global adapter + packager state → bundle + state.

The packager keeps, per base model, the *chain* since the last full bundle: the anchor
(a ``full`` step) and every ``delta`` step after it, plus the exact float32 adapter a
device holds after applying them (``PackagerState.current``). A new version's delta is
``new − current`` — computed against what devices really hold, not against the float
adapter the server aggregated — so int8 rounding never accumulates (DESIGN decision 5).

Invariants:

* ``current`` is obtained by writing the bundle, parsing it back with the strict parser
  and running ``apply_bundle`` on it: the packager and a device run the same code on the
  same bytes, so they agree bit for bit;
* versions and release counters strictly increase by one per ``package_version`` call;
* a chain never holds more than ``chain_limit`` deltas: the next version is a new full
  anchor (everyone downloads it once);
* every bundle for a version reconstructs the same ``current``: a device ``k`` versions
  behind gets one bundle with the ``k`` stacked delta steps (a collapsed delta), and a
  device behind the anchor or more than ``max_behind`` versions back gets the anchor plus
  the chain (``kind="full"``) — never a chain it cannot apply (THREATS C14);
* every bundle built from a state names the same bases: the state's base and its
  ``compatible_bases`` (further bases the runtime-neutral adapter applies to, e.g. GGUF
  exports; DESIGN decision 11), so catch-up deltas and full bundles agree.

Why stacked steps and not one re-quantized delta: ``S_a + dequant(q(S_c − S_a))`` is
not ``S_c`` bit for bit, so a device taking a shortcut would leave the closed loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from delta_packager.apply import AdapterState, apply_bundle, apply_steps
from delta_packager.encode import Scheme, encode_tensor
from delta_packager.errors import PackagerInputError, PackagerStateError
from delta_packager.fingerprint import normalize_bases
from delta_packager.format import Bundle, Step, parse_bundle, serialize_bundle
from delta_packager.manifest import AdapterConfig, Manifest, Provenance, rank_mismatches
from protocol import ReleaseKind

__all__ = [
    "ChainStep",
    "PackagePolicy",
    "PackageResult",
    "PackagerState",
    "build_bundle",
    "check_state",
    "package_version",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagePolicy:
    """How the packager encodes and when it falls back to a full bundle.

    Attributes:
        delta_encoding: Encoding of delta steps (``int8`` default).
        full_encoding: Encoding of full anchors (``int8``, the default, is the small
            one: docs/benchmarks.md, "Bundle sizes"; ``fp16`` or ``fp32`` trade size
            for a more exact anchor).
        chain_limit: Most delta steps after an anchor; the next version is a new anchor.
        max_behind: A device more versions behind than this gets a full bundle.
        zstd_level: zstd level for bundles.
        deadband_steps: A tensor's delta is sent as ``zero`` when its largest element
            is at most this many int8 steps (``absmax(new) / 127``) of the new weights.
            The device then stays within half an int8 step — the accuracy a full int8
            bundle has — and, the loop being closed, the skipped residual is carried by
            the next delta that needs it. It stops unchanged tensors (a frozen FFA
            ``A``) from shipping float32 rounding noise. 0 disables it.
    """

    delta_encoding: Scheme = "int8"
    full_encoding: Scheme = "int8"
    chain_limit: int = 8
    max_behind: int = 8
    zstd_level: int = 10
    deadband_steps: float = 0.5

    def __post_init__(self) -> None:
        if self.chain_limit < 0 or self.max_behind < 1:
            raise PackagerInputError(
                f"chain_limit={self.chain_limit}, max_behind={self.max_behind}; "
                "expected chain_limit >= 0 and max_behind >= 1"
            )


@dataclass(frozen=True)
class ChainStep:
    """One version in the chain: its encoded step and release metadata."""

    step: Step
    release_counter: int
    provenance: Provenance = field(default_factory=Provenance)


@dataclass(frozen=True)
class PackagerState:
    """What the packager remembers between releases for one base model.

    Attributes:
        base_fingerprint: The base every bundle of this state binds to.
        adapter_config: LoRA config of the latest version.
        chain: Anchor (``full`` step) first, then consecutive ``delta`` steps.
        current: The device-exact adapter at the latest version.
        compatible_bases: Further bases every bundle of the latest release names
            (sorted, unique, without ``base_fingerprint``).
    """

    base_fingerprint: str
    adapter_config: AdapterConfig
    chain: tuple[ChainStep, ...]
    current: AdapterState
    compatible_bases: tuple[str, ...] = ()

    @property
    def latest_version(self) -> int:
        """Version of the latest release."""
        return self.current.version

    @property
    def anchor_version(self) -> int:
        """Version of the last full anchor."""
        return self.chain[0].step.to_version

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Adapter tensor layout."""
        return {k: tuple(v.shape) for k, v in self.current.tensors.items()}


@dataclass(frozen=True)
class PackageResult:
    """A new version: the updated state and its primary bundle (bytes + parsed)."""

    state: PackagerState
    bundle_bytes: bytes
    bundle: Bundle


def _validate_new(new: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not new:
        raise PackagerInputError("the new adapter has no tensors; expected LoRA weights")
    out = {}
    for name, arr in new.items():
        a = np.asarray(arr)
        if a.dtype.kind != "f":
            raise PackagerInputError(f"tensor {name} has dtype {a.dtype}; expected floats")
        if not np.all(np.isfinite(a)):
            raise PackagerInputError(
                f"tensor {name} has NaN or Inf values; expected finite numbers: the "
                "aggregated adapter is broken, do not release it"
            )
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def _bundle_bytes(
    state: PackagerState, steps: tuple[ChainStep, ...], from_version: int | None, *, zstd_level: int
) -> bytes:
    last = steps[-1]
    manifest = Manifest(
        kind=ReleaseKind.FULL if from_version is None else ReleaseKind.DELTA,
        from_version=from_version,
        to_version=last.step.to_version,
        release_counter=last.release_counter,
        base_fingerprint=state.base_fingerprint,
        uncompressed_bytes=0,
        adapter_config=state.adapter_config,
        provenance=last.provenance,
        shapes=state.shapes,
        steps=(),
        compatible_bases=state.compatible_bases,
    )
    return serialize_bundle(manifest, tuple(c.step for c in steps), zstd_level=zstd_level)


def build_bundle(
    state: PackagerState, *, from_version: int | None, policy: PackagePolicy | None = None
) -> bytes:
    """Build the bundle that moves a device at ``from_version`` to the latest version.

    Args:
        state: The packager state.
        from_version: The device's installed version, or ``None`` for a device with no
            adapter (or an unknown one).
        policy: Fallback and compression settings (defaults if ``None``).

    Returns:
        Bundle bytes: a delta with the stacked steps after ``from_version`` when the
        device is on the current chain and at most ``max_behind`` back, else a full one.

    Raises:
        PackagerInputError: ``from_version`` is the latest version or newer.
    """
    policy = policy or PackagePolicy()
    latest = state.latest_version
    if from_version is not None and from_version >= latest:
        raise PackagerInputError(
            f"device version {from_version} is not behind the latest version {latest}; "
            "there is nothing to package for it"
        )
    on_chain = from_version is not None and from_version >= state.anchor_version
    if not on_chain or latest - (from_version or 0) > policy.max_behind:
        return _bundle_bytes(state, state.chain, None, zstd_level=policy.zstd_level)
    assert from_version is not None
    first = from_version - state.anchor_version + 1
    return _bundle_bytes(state, state.chain[first:], from_version, zstd_level=policy.zstd_level)


def package_version(
    new: Mapping[str, np.ndarray],
    *,
    previous: PackagerState | None,
    base_fingerprint: str,
    adapter_config: AdapterConfig,
    provenance: Provenance | None = None,
    policy: PackagePolicy | None = None,
    compatible_bases: Sequence[str] = (),
) -> PackageResult:
    """Release ``new`` as the next version; return the new state and its primary bundle.

    The primary bundle is the delta from the previous version, or the new full anchor
    when there is no previous state, the chain is at ``chain_limit``, or the tensor
    layout changed.

    Args:
        new: The new global adapter, tensor name -> float array.
        previous: The packager state so far, or ``None`` for the first release.
        base_fingerprint: ``"sha256:..."`` of the pre-quantized base checkpoint.
        adapter_config: LoRA config of ``new``.
        provenance: Training provenance for the manifest.
        policy: Encoding and fallback settings (defaults if ``None``).
        compatible_bases: Further base fingerprints the adapter applies to (GGUF
            exports of the base, ``fingerprint_base``); every bundle of this release
            names them. Order and duplicates do not matter.

    Returns:
        The new state and bundle; ``state.current`` equals what a device reconstructs.

    Raises:
        PackagerInputError: ``new`` is empty, non-float, has NaN/Inf values, or LoRA
            shapes that disagree with ``adapter_config.rank``; or a compatible base is
            not a fingerprint or is ``base_fingerprint`` itself.
        PackagerStateError: ``previous`` belongs to another base model.
    """
    policy = policy or PackagePolicy()
    provenance = provenance or Provenance()
    also = normalize_bases(base_fingerprint, compatible_bases)
    tensors = _validate_new(new)
    bad = rank_mismatches({k: tuple(v.shape) for k, v in tensors.items()}, adapter_config.rank)
    if bad:
        raise PackagerInputError(
            f"tensor {bad[0]} has shape {list(tensors[bad[0]].shape)}, the adapter config says "
            f"rank {adapter_config.rank}: pass the adapter_config.json that belongs to it"
        )
    if previous is not None and previous.base_fingerprint != base_fingerprint:
        raise PackagerStateError(
            f"the packager state was built for base {previous.base_fingerprint}, this "
            f"release is for {base_fingerprint}: deltas across bases are meaningless; "
            "start a new state directory for the new base"
        )
    version = 1 if previous is None else previous.latest_version + 1
    counter = 1 if previous is None else previous.current.release_counter + 1
    chain = _next_chain(tensors, previous, _NewStep(version, counter, provenance), policy)
    full = len(chain) == 1
    from_version = None if full or previous is None else previous.latest_version
    draft = PackagerState(
        base_fingerprint, adapter_config, chain, _placeholder(tensors, base_fingerprint), also
    )
    primary = chain if full else chain[-1:]
    data = _bundle_bytes(draft, primary, from_version, zstd_level=policy.zstd_level)
    # Close the loop: the state we remember is the one a device computes from these bytes.
    bundle = parse_bundle(data)
    device_prev = None if full or previous is None else previous.current
    current = apply_bundle(device_prev, bundle, base_fingerprint=base_fingerprint)
    state = PackagerState(base_fingerprint, adapter_config, chain, current, also)
    logger.info(
        "packaged version %d (%s, counter %d): %d bytes",
        version,
        bundle.manifest.kind,
        counter,
        len(data),
    )
    return PackageResult(state=state, bundle_bytes=data, bundle=bundle)


@dataclass(frozen=True)
class _NewStep:
    """Version, release counter and provenance of the step being added."""

    version: int
    release_counter: int
    provenance: Provenance


def _next_chain(
    tensors: dict[str, np.ndarray],
    previous: PackagerState | None,
    info: _NewStep,
    policy: PackagePolicy,
) -> tuple[ChainStep, ...]:
    """The chain after adding ``tensors``: a new full anchor, or one more delta."""
    layout_changed = previous is not None and previous.shapes != {
        k: tuple(v.shape) for k, v in tensors.items()
    }
    if previous is None or layout_changed or len(previous.chain) - 1 >= policy.chain_limit:
        enc = {n: encode_tensor(t, policy.full_encoding) for n, t in sorted(tensors.items())}
        anchor = Step(ReleaseKind.FULL, info.version, enc)
        return (ChainStep(anchor, info.release_counter, info.provenance),)
    cur = previous.current.tensors
    enc = {
        n: encode_tensor(_delta(t, cur[n], policy.deadband_steps), policy.delta_encoding)
        for n, t in sorted(tensors.items())
    }
    step = ChainStep(
        Step(ReleaseKind.DELTA, info.version, enc), info.release_counter, info.provenance
    )
    return (*previous.chain, step)


def _delta(new: np.ndarray, current: np.ndarray, deadband_steps: float) -> np.ndarray:
    delta = np.subtract(new, current, dtype=np.float32)
    if deadband_steps > 0 and delta.size:
        step = float(np.max(np.abs(new))) / 127
        if float(np.max(np.abs(delta))) <= deadband_steps * step:
            return np.zeros_like(delta)
    return delta


def _placeholder(tensors: Mapping[str, np.ndarray], base_fingerprint: str) -> AdapterState:
    # Only its shapes are read (for the manifest) before the real state is known.
    return AdapterState(0, 0, base_fingerprint, tensors)


def check_state(state: PackagerState) -> None:
    """Re-apply the whole chain and check it reproduces ``state.current`` bit for bit.

    Raises:
        PackagerStateError: the chain and the stored current state disagree.
    """
    rebuilt = apply_steps(None, tuple(c.step for c in state.chain))
    cur = state.current.tensors
    same = set(rebuilt) == set(cur) and all(
        rebuilt[k].shape == cur[k].shape and rebuilt[k].tobytes() == cur[k].tobytes() for k in cur
    )
    if not same:
        raise PackagerStateError(
            "the packager state's chain does not reproduce its stored adapter; the state "
            "directory is corrupt: restore it from backup or start a new chain"
        )
