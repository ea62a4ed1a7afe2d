"""③ package — the bundle manifest: typed values and their strict JSON schema (v1).

The manifest travels as canonical JSON (sorted keys, no spaces, ASCII, no NaN) in the
safetensors metadata of a bundle. ``manifest_from_json`` is strict: exact key sets,
exact types, finite numbers, supported format version only. Stdlib only.

Invariants checked here (the container checks live in ``delta_packager.format``):

* ``kind == "full"`` ⇔ ``from_version is None`` ⇔ the first step is a ``full`` step;
  every later step is a ``delta``.
* each step advances exactly one version, the last reaching ``to_version``; a delta's
  ``from_version`` is the version just before its first step;
* LoRA tensor shapes agree with ``adapter_config.rank`` (``A`` is r × in, ``B`` out × r).
* every step names every adapter tensor exactly once (``shapes`` is the layout);
* ``provenance`` records the privacy spend per unit (``record_epsilon``,
  ``record_delta``, ``user_epsilon``, ``user_delta``; ADR 0014) only when recorded, so
  older bundles keep their exact bytes;
* ``compatible_bases`` (further bases the adapter applies to) is omitted when empty, so
  bundles that name one base keep their exact bytes; when present it is a sorted list
  of unique fingerprints other than ``base_fingerprint``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from delta_packager.encode import ENCODINGS
from delta_packager.errors import BundleFormatError
from delta_packager.fingerprint import MAX_COMPATIBLE_BASES, is_fingerprint
from protocol import PRIVACY_KEYS, LoraShape, LoraShapeError, PrivacySpend, ReleaseKind

__all__ = [
    "FORMAT_VERSION",
    "AdapterConfig",
    "Manifest",
    "Provenance",
    "StepInfo",
    "adapter_config_from_dict",
    "adapter_config_to_dict",
    "canonical_json",
    "manifest_from_json",
    "manifest_to_dict",
    "provenance_from_dict",
    "provenance_to_dict",
    "rank_mismatches",
]

FORMAT_VERSION = 1
MAX_STEPS = 64
MAX_TENSORS = 20_000
MAX_DIMS = 8
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,512}$")


def canonical_json(obj: object) -> str:
    """Serialize ``obj`` in the one canonical form fedota signs and compares."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


@dataclass(frozen=True)
class AdapterConfig(LoraShape):
    """The LoRA adapter a bundle describes: its :class:`protocol.LoraShape` (rank,
    alpha, target modules, FFA) and the PEFT config it came with.

    Attributes:
        peft_config: The PEFT ``adapter_config.json`` content, for rebuilding the model.

    The manifest carries ``target_modules`` as a list; an empty one is ``None`` here
    (every linear projection).
    """

    peft_config: Mapping[str, Any] = field(default_factory=dict, kw_only=True)


@dataclass(frozen=True)
class Provenance:
    """How the adapter was trained (DESIGN decision 4). ``None`` means not recorded."""

    round: int | None = None
    num_clients: int | None = None
    aggregation: str | None = None
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    eval_metrics: Mapping[str, float] = field(default_factory=dict)
    record_epsilon: float | None = None
    record_delta: float | None = None
    user_epsilon: float | None = None
    user_delta: float | None = None

    def privacy(self) -> PrivacySpend | None:
        """The privacy spend by unit (ADR 0005), ``None`` when none is recorded.

        ``epsilon``/``delta`` name no unit, so they do not count for a privacy policy;
        ``record_*`` and ``user_*`` do (the signed ``custom.fedota.privacy`` block).
        """
        spend = PrivacySpend(
            record_epsilon=self.record_epsilon,
            record_delta=self.record_delta,
            user_epsilon=self.user_epsilon,
            user_delta=self.user_delta,
        )
        return spend if spend.to_json() else None


@dataclass(frozen=True)
class StepInfo:
    """One step of a bundle: a full state or a delta, reaching ``to_version``."""

    kind: str
    to_version: int
    encodings: Mapping[str, str]


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to decide whether and how to apply a bundle.

    ``base_fingerprint`` is the base the packager state is built for;
    ``compatible_bases`` names further bases (e.g. GGUF exports of it, DESIGN decision
    11) the same runtime-neutral adapter applies to. Both are signed with the manifest.
    """

    kind: str
    from_version: int | None
    to_version: int
    release_counter: int
    base_fingerprint: str
    uncompressed_bytes: int
    adapter_config: AdapterConfig
    provenance: Provenance
    shapes: Mapping[str, tuple[int, ...]]
    steps: tuple[StepInfo, ...]
    format_version: int = FORMAT_VERSION
    compatible_bases: tuple[str, ...] = ()

    def applies_to(self, fingerprint: str) -> bool:
        """Whether the adapter applies to the base ``fingerprint`` (primary or compatible)."""
        return fingerprint == self.base_fingerprint or fingerprint in self.compatible_bases


def adapter_config_to_dict(ac: AdapterConfig) -> dict[str, Any]:
    """Return the JSON form of an adapter config (the manifest's ``adapter_config``)."""
    return {
        "rank": ac.rank,
        "alpha": float(ac.alpha),
        "target_modules": list(ac.target_modules or ()),
        "ffa": ac.ffa,
        "peft_config": dict(ac.peft_config),
    }


def provenance_to_dict(pv: Provenance) -> dict[str, Any]:
    """Return the JSON form of training provenance (the manifest's ``provenance``)."""
    return {
        "round": pv.round,
        "num_clients": pv.num_clients,
        "aggregation": pv.aggregation,
        "clip_norm": pv.clip_norm,
        "noise_multiplier": pv.noise_multiplier,
        "epsilon": pv.epsilon,
        "delta": pv.delta,
        "eval_metrics": {k: float(v) for k, v in pv.eval_metrics.items()},
        # the per-unit spend only when recorded: older manifests keep their exact bytes
        **(pv.privacy() or PrivacySpend()).to_json(),
    }


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    """Return the JSON-ready form of ``m`` (what ``canonical_json`` serializes)."""
    out: dict[str, Any] = {
        "format_version": m.format_version,
        "kind": m.kind,
        "from_version": m.from_version,
        "to_version": m.to_version,
        "release_counter": m.release_counter,
        "base_fingerprint": m.base_fingerprint,
        "uncompressed_bytes": m.uncompressed_bytes,
        "adapter_config": adapter_config_to_dict(m.adapter_config),
        "provenance": provenance_to_dict(m.provenance),
        "shapes": {k: list(v) for k, v in m.shapes.items()},
        "steps": [
            {"kind": s.kind, "to_version": s.to_version, "encodings": dict(s.encodings)}
            for s in m.steps
        ],
    }
    if m.compatible_bases:  # absent when empty: one-base bundles keep their exact bytes
        out["compatible_bases"] = list(m.compatible_bases)
    return out


# ------------------------------------------------------------------ strict reading


def _fail(where: str, observed: object, expected: str) -> BundleFormatError:
    text = repr(observed)
    if len(text) > 80:
        text = text[:77] + "..."
    return BundleFormatError(
        f"manifest field {where}: observed {text}, expected {expected}; "
        "the bundle is malformed or from an incompatible fedota: do not apply it"
    )


def _obj(v: object, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(where, v, "an object")
    if set(v) != keys:
        raise _fail(where, sorted(v), f"exactly the keys {sorted(keys)}")
    return v


def _int(v: object, where: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum or v >= 2**53:
        raise _fail(where, v, f"an integer >= {minimum}" + (" or null" if optional else ""))
    return v


def _num(v: object, where: str, *, optional: bool = True) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _fail(where, v, "a finite number" + (" or null" if optional else ""))
    return float(v)


def _str(v: object, where: str, *, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > 256:
        raise _fail(where, v, "a string of at most 256 characters")
    return v


def _fingerprint(v: object, where: str) -> str:
    if not isinstance(v, str) or not is_fingerprint(v):
        raise _fail(where, v, '"sha256:" and 64 lowercase hex digits')
    return v


def _bases(v: object, primary: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not 0 < len(v) <= MAX_COMPATIBLE_BASES:
        raise _fail("compatible_bases", v, f"a list of 1..{MAX_COMPATIBLE_BASES} fingerprints")
    bases = tuple(_fingerprint(x, "compatible_bases[]") for x in v)
    if list(bases) != sorted(set(bases)) or primary in bases:
        raise _fail("compatible_bases", v, "sorted unique fingerprints, not base_fingerprint")
    return bases


def _req_int(v: object, where: str, minimum: int = 0) -> int:
    out = _int(v, where, minimum=minimum)
    assert out is not None
    return out


def adapter_config_from_dict(v: object) -> AdapterConfig:
    """Validate and parse an ``adapter_config`` object.

    Raises:
        BundleFormatError: missing or extra fields, or wrong types.
    """
    d = _obj(v, "adapter_config", {"rank", "alpha", "target_modules", "ffa", "peft_config"})
    mods = d["target_modules"]
    if not isinstance(mods, list) or not all(isinstance(x, str) for x in mods) or len(mods) > 256:
        raise _fail("adapter_config.target_modules", mods, "a list of strings")
    if not isinstance(d["ffa"], bool):
        raise _fail("adapter_config.ffa", d["ffa"], "true or false")
    if not isinstance(d["peft_config"], dict):
        raise _fail("adapter_config.peft_config", d["peft_config"], "an object")
    alpha = _num(d["alpha"], "adapter_config.alpha", optional=False)
    assert alpha is not None
    try:
        return AdapterConfig(
            rank=_req_int(d["rank"], "adapter_config.rank", 1),
            alpha=alpha,
            target_modules=tuple(mods) or None,
            ffa=d["ffa"],
            peft_config=d["peft_config"],
        )
    except LoraShapeError as e:
        raise BundleFormatError(f"manifest field adapter_config: {e}") from e


def provenance_from_dict(v: object) -> Provenance:
    """Validate and parse a ``provenance`` object.

    Raises:
        BundleFormatError: missing or extra fields, wrong types, non-finite numbers.
    """
    keys = {"round", "num_clients", "aggregation", "clip_norm", "noise_multiplier"}
    optional = set(PRIVACY_KEYS) & (v.keys() if isinstance(v, dict) else set())
    d = _obj(v, "provenance", keys | {"epsilon", "delta", "eval_metrics"} | optional)
    metrics = d["eval_metrics"]
    if not isinstance(metrics, dict) or len(metrics) > 256:
        raise _fail("provenance.eval_metrics", metrics, "an object of at most 256 numbers")
    parsed: dict[str, float] = {}
    for k, x in metrics.items():
        value = _num(x, f"provenance.eval_metrics.{k}", optional=False)
        assert value is not None
        parsed[k] = value
    return Provenance(
        round=_int(d["round"], "provenance.round", optional=True),
        num_clients=_int(d["num_clients"], "provenance.num_clients", optional=True),
        aggregation=_str(d["aggregation"], "provenance.aggregation", optional=True),
        clip_norm=_num(d["clip_norm"], "provenance.clip_norm"),
        noise_multiplier=_num(d["noise_multiplier"], "provenance.noise_multiplier"),
        epsilon=_num(d["epsilon"], "provenance.epsilon"),
        delta=_num(d["delta"], "provenance.delta"),
        eval_metrics=parsed,
        **{k: _nonnegative(d[k], f"provenance.{k}") for k in sorted(optional)},
    )


def _nonnegative(v: object, where: str) -> float:
    value = _num(v, where, optional=False)
    assert value is not None
    if value < 0:
        raise _fail(where, v, "a finite number >= 0")
    return value


def _shapes(v: object) -> dict[str, tuple[int, ...]]:
    if not isinstance(v, dict) or not 0 < len(v) <= MAX_TENSORS:
        raise _fail("shapes", v, f"an object of 1..{MAX_TENSORS} tensors")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in v.items():
        if not _TENSOR_NAME.match(name):
            raise _fail("shapes", name, "tensor names of [A-Za-z0-9_.-], 1..512 characters")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or not all(0 <= d < 2**31 for d in shape)
        ):
            raise _fail(f"shapes.{name}", shape, f"a list of at most {MAX_DIMS} sizes")
        out[name] = tuple(shape)
    return out


def _steps(v: object, names: set[str]) -> tuple[StepInfo, ...]:
    if not isinstance(v, list) or not 0 < len(v) <= MAX_STEPS:
        raise _fail("steps", v, f"a list of 1..{MAX_STEPS} steps")
    steps = []
    for i, raw in enumerate(v):
        d = _obj(raw, f"steps[{i}]", {"kind", "to_version", "encodings"})
        if d["kind"] not in tuple(ReleaseKind):
            raise _fail(f"steps[{i}].kind", d["kind"], '"full" or "delta"')
        enc = d["encodings"]
        if not isinstance(enc, dict) or set(enc) != names:
            raise _fail(f"steps[{i}].encodings", enc, "one encoding for every tensor in shapes")
        for name, e in enc.items():
            if e not in ENCODINGS:
                raise _fail(f"steps[{i}].encodings.{name}", e, f"one of {list(ENCODINGS)}")
        steps.append(StepInfo(d["kind"], _req_int(d["to_version"], f"steps[{i}].to_version"), enc))
    return tuple(steps)


def rank_mismatches(shapes: Mapping[str, tuple[int, ...]], rank: int) -> list[str]:
    """Names of LoRA tensors whose shape disagrees with ``rank`` (A: r x in, B: out x r)."""
    bad = []
    for name, shape in shapes.items():
        axis = 0 if ".lora_A." in name else -1 if ".lora_B." in name else None
        if axis is not None and len(shape) == 2 and shape[axis] != rank:
            bad.append(name)
    return sorted(bad)


def _check_chain(m: Manifest) -> None:
    first_full = m.steps[0].kind == ReleaseKind.FULL
    if m.kind not in tuple(ReleaseKind):
        raise _fail("kind", m.kind, '"full" or "delta"')
    full = m.kind == ReleaseKind.FULL
    if full != (m.from_version is None) or full != first_full:
        raise _fail(
            "kind/from_version/steps[0]", m.kind, "full ⇔ from_version null ⇔ full 1st step"
        )
    if any(s.kind != "delta" for s in m.steps[1:]):
        raise _fail("steps", [s.kind for s in m.steps], "only the first step may be full")
    versions = [s.to_version for s in m.steps]
    if any(b != a + 1 for a, b in itertools.pairwise(versions)):
        raise _fail("steps[].to_version", versions, "consecutive versions, one per step")
    if versions[-1] != m.to_version:
        raise _fail("to_version", m.to_version, f"the last step's version {versions[-1]}")
    if m.from_version is not None and m.from_version != versions[0] - 1:
        raise _fail("from_version", m.from_version, f"{versions[0] - 1}, the first step's base")
    bad = rank_mismatches(m.shapes, m.adapter_config.rank)
    if bad:
        raise _fail(
            f"shapes.{bad[0]}",
            list(m.shapes[bad[0]]),
            f"rank {m.adapter_config.rank} on its r axis",
        )


def manifest_from_json(text: str) -> Manifest:
    """Parse and validate a manifest; it must be in canonical form.

    Raises:
        BundleFormatError: invalid JSON, non-canonical form, unknown format version,
            missing or extra fields, wrong types, non-finite numbers, or an
            inconsistent version chain.
    """
    if len(text) > 16 * 2**20:
        raise BundleFormatError(f"manifest is {len(text)} characters; at most 16 MiB expected")

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            raise BundleFormatError("manifest JSON repeats a key; expected unique keys")
        return d

    def no_constants(name: str) -> None:
        raise BundleFormatError(f"manifest JSON contains {name}; expected finite numbers only")

    try:
        raw = json.loads(text, object_pairs_hook=no_dupes, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        if isinstance(e, BundleFormatError):
            raise
        raise BundleFormatError(f"manifest is not valid JSON ({e}); the bundle is corrupt") from e
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        got = raw.get("format_version") if isinstance(raw, dict) else type(raw).__name__
        raise BundleFormatError(
            f"bundle format_version is {got!r}; this fedota reads only version "
            f"{FORMAT_VERSION}: upgrade the client or republish the bundle"
        )
    if canonical_json(raw) != text:
        raise BundleFormatError(
            "manifest JSON is not in canonical form (sorted keys, no spaces, ASCII); "
            "it was edited after packaging: do not apply it"
        )
    keys = {"format_version", "kind", "from_version", "to_version", "release_counter"}
    keys |= {"base_fingerprint", "uncompressed_bytes", "adapter_config", "provenance"}
    keys |= {"shapes", "steps"} | ({"compatible_bases"} & raw.keys())  # optional key
    d = _obj(raw, "(top level)", keys)
    fingerprint = _fingerprint(d["base_fingerprint"], "base_fingerprint")
    shapes = _shapes(d["shapes"])
    bases = _bases(d["compatible_bases"], fingerprint) if "compatible_bases" in d else ()
    m = Manifest(
        kind=d["kind"],
        from_version=_int(d["from_version"], "from_version", optional=True),
        to_version=_req_int(d["to_version"], "to_version", 1),
        release_counter=_req_int(d["release_counter"], "release_counter", 1),
        base_fingerprint=fingerprint,
        uncompressed_bytes=_req_int(d["uncompressed_bytes"], "uncompressed_bytes", 8),
        adapter_config=adapter_config_from_dict(d["adapter_config"]),
        provenance=provenance_from_dict(d["provenance"]),
        shapes=shapes,
        steps=_steps(d["steps"], set(shapes)),
        compatible_bases=bases,
    )
    _check_chain(m)
    return m
