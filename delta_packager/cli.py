"""``fedota`` subcommands owned by ``delta_packager``. Heavy imports stay inside the commands.

Commands: ``fedota package``, ``fedota bundle inspect``, ``fedota bundle build``,
``fedota keys init``, ``fedota keys rotate``, ``fedota keys release``.
Exit codes: 0 ok, 2 bad input, 3 rejected (malformed or untrusted bundle/metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

bundle_app = typer.Typer(help="Inspect and build OTA bundles.", no_args_is_help=True)
keys_app = typer.Typer(help="TUF keys: init, rotate, release.", no_args_is_help=True)

_ENCODINGS = ("int8", "fp16", "fp32")


def _provenance(path: Path | None) -> Any:
    from delta_packager.errors import BundleFormatError, PackagerInputError
    from delta_packager.manifest import Provenance, provenance_from_dict, provenance_to_dict

    if path is None:
        return Provenance()
    try:
        raw = json.loads(path.read_text())
        merged = provenance_to_dict(Provenance()) | raw
        return provenance_from_dict(merged)
    except (OSError, ValueError, BundleFormatError) as e:
        raise PackagerInputError(
            f"--provenance {path}: {e}; expected a JSON object with keys round, num_clients, "
            "aggregation, clip_norm, noise_multiplier, epsilon, delta, eval_metrics"
        ) from e


def _encoding(value: str, option: str) -> Any:
    from delta_packager.errors import PackagerInputError

    if value not in _ENCODINGS:
        raise PackagerInputError(f"{option} {value!r}; expected one of {', '.join(_ENCODINGS)}")
    return value


def _fingerprint(base: Path | None, base_fingerprint: str | None) -> str:
    from delta_packager.errors import PackagerInputError

    if (base is None) == (base_fingerprint is None):
        raise PackagerInputError("give exactly one of --base DIR or --base-fingerprint sha256:...")
    if base_fingerprint is not None:
        return base_fingerprint
    from delta_packager.fingerprint import fingerprint_checkpoint

    assert base is not None
    return fingerprint_checkpoint(base)


def _also_bases(values: list[str]) -> list[str]:
    """``--also-base`` values as fingerprints: kept as given, or computed from a path."""
    from delta_packager.errors import PackagerInputError
    from delta_packager.fingerprint import FINGERPRINT_PREFIX, fingerprint_base, is_fingerprint

    out = []
    for value in values:
        if value.startswith(FINGERPRINT_PREFIX) and not is_fingerprint(value):
            raise PackagerInputError(
                f"--also-base {value!r} is not a fingerprint; expected sha256: and 64 "
                "lowercase hex digits, or the path of a .gguf file or NF4 checkpoint dir"
            )
        out.append(value if is_fingerprint(value) else fingerprint_base(Path(value)))
    return out


def package(
    new: Path = typer.Option(..., "--new", help="PEFT adapter dir or .safetensors file."),
    out: Path = typer.Option(..., "--out", help="Where to write the bundle."),
    base: Path | None = typer.Option(None, "--base", help="Pre-quantized base checkpoint dir."),
    base_fingerprint: str | None = typer.Option(
        None, "--base-fingerprint", help="Use this sha256:... instead of fingerprinting --base."
    ),
    previous_state: Path | None = typer.Option(
        None, "--previous-state", help="Packager state dir; updated in place. Omit for v1."
    ),
    state_out: Path | None = typer.Option(
        None, "--state-out", help="State dir for a first release [default: OUT_DIR/packager-state]."
    ),
    keys: Path | None = typer.Option(None, "--keys", help="Keys dir: also release (sign) it."),
    from_version: int | None = typer.Option(
        None, "--from-version", help="Device version the bundle starts from [default: previous]."
    ),
    encoding: str = typer.Option("int8", help="Delta encoding: int8, fp16 or fp32."),
    full_encoding: str = typer.Option("int8", help="Full-bundle encoding: int8, fp16 or fp32."),
    chain_limit: int = typer.Option(8, help="Most deltas after a full bundle."),
    max_behind: int = typer.Option(8, help="Devices further behind get a full bundle."),
    ffa: bool = typer.Option(False, "--ffa/--no-ffa", help="Adapter trained with FFA-LoRA."),
    provenance: Path | None = typer.Option(None, help="JSON file with training provenance."),
    also_base: list[str] | None = typer.Option(
        None,
        "--also-base",
        help="Another base the adapter applies to (repeatable): a sha256:... fingerprint, "
        "or a .gguf file or NF4 checkpoint dir to fingerprint.",
    ),
) -> None:
    """Package a new global adapter as the next version's bundle (delta or full).

    Every bundle of the release names the --base and each --also-base (e.g. the GGUF
    exports of the same base that llama.cpp devices run); a device holding any of them
    may apply it. The set belongs to this release: repeat --also-base for every version.
    """
    from delta_packager.adapter_io import load_adapter
    from delta_packager.errors import PackagerStateError
    from delta_packager.format import parse_bundle
    from delta_packager.package import PackagePolicy, build_bundle, package_version
    from delta_packager.store import STATE_FILE, load_state, save_state
    from delta_packager.trust import release
    from protocol import atomic_write

    policy = PackagePolicy(
        delta_encoding=_encoding(encoding, "--encoding"),
        full_encoding=_encoding(full_encoding, "--full-encoding"),
        chain_limit=chain_limit,
        max_behind=max_behind,
    )
    fingerprint = _fingerprint(base, base_fingerprint)
    also = _also_bases(also_base or [])
    prov = _provenance(provenance)
    tensors, adapter_config = load_adapter(new, ffa=ffa or prov.aggregation == "ffa")
    previous = load_state(previous_state) if previous_state is not None else None
    state_dir = previous_state or state_out or out.parent / "packager-state"
    if previous is None and (state_dir / STATE_FILE).exists():
        raise PackagerStateError(
            f"{state_dir} already holds a packager state; pass --previous-state {state_dir} "
            "to continue it, or --state-out NEW_DIR to start a new chain"
        )
    result = package_version(
        tensors,
        previous=previous,
        base_fingerprint=fingerprint,
        adapter_config=adapter_config,
        provenance=prov,
        policy=policy,
        compatible_bases=also,
    )
    data = result.bundle_bytes
    if from_version is not None and from_version != result.bundle.manifest.from_version:
        data = build_bundle(result.state, from_version=from_version, policy=policy)
    atomic_write(out, data)
    save_state(result.state, state_dir)
    m = parse_bundle(data).manifest
    source = "full" if m.from_version is None else f"delta from v{m.from_version}"
    if m.compatible_bases:
        source += f", {1 + len(m.compatible_bases)} bases"
    typer.echo(
        f"packaged v{m.to_version} ({source}, counter {m.release_counter}): {len(data)} bytes "
        f"-> {out}; state: {state_dir}"
    )
    if keys is not None:
        typer.echo(f"released: {release([out], keys)}")


@bundle_app.command("inspect")
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Validate a bundle strictly and print its manifest and sizes."""
    from delta_packager.format import read_bundle
    from delta_packager.manifest import manifest_to_dict

    b = read_bundle(bundle)
    m = b.manifest
    steps = [
        {
            "kind": s.kind,
            "to_version": s.to_version,
            "stored_bytes": sum(e.stored_bytes for e in s.tensors.values()),
            "encodings": sorted({e.encoding for e in s.tensors.values()}),
        }
        for s in b.steps
    ]
    sizes = {"compressed_bytes": b.compressed_bytes, "uncompressed_bytes": m.uncompressed_bytes}
    if as_json:
        typer.echo(json.dumps({"manifest": manifest_to_dict(m), "sizes": sizes, "steps": steps}))
        return
    full = manifest_to_dict(m)
    full["steps"] = steps
    typer.echo(json.dumps(full, indent=2, sort_keys=True))
    ratio = b.compressed_bytes / max(1, m.uncompressed_bytes)
    source = "" if m.from_version is None else f"v{m.from_version}->"
    typer.echo(
        f"{bundle.name}: {m.kind} {source}v{m.to_version}, counter "
        f"{m.release_counter}, {b.compressed_bytes} bytes ({m.uncompressed_bytes} "
        f"uncompressed, ratio {ratio:.3f}), {len(m.shapes)} tensors, {len(b.steps)} step(s)"
    )


@bundle_app.command("build")
def build(
    state: Path = typer.Option(..., "--state", help="Packager state dir."),
    out: Path = typer.Option(..., "--out", help="Where to write the bundle."),
    from_version: int | None = typer.Option(
        None, "--from-version", help="Device's installed version; omit for a full bundle."
    ),
) -> None:
    """Build a catch-up bundle for a device at FROM_VERSION to the latest version."""
    from delta_packager.package import build_bundle
    from delta_packager.store import load_state
    from protocol import atomic_write

    data = build_bundle(load_state(state), from_version=from_version)
    atomic_write(out, data)
    typer.echo(f"wrote {len(data)} bytes -> {out}")


@keys_app.command("init")
def keys_init(
    out: Path = typer.Option(..., "--out", help="New keys directory."),
    root_threshold: int = typer.Option(1, help="Root signature threshold (= number of keys)."),
    targets_threshold: int = typer.Option(1, help="Targets signature threshold."),
    snapshot_threshold: int = typer.Option(1, help="Snapshot signature threshold."),
    timestamp_threshold: int = typer.Option(1, help="Timestamp signature threshold."),
    root_expiry_days: int = typer.Option(365, help="Root metadata validity."),
    targets_expiry_days: int = typer.Option(90, help="Targets metadata validity."),
) -> None:
    """Create root/targets/snapshot/timestamp keys, root v1 and empty targets v1."""
    from delta_packager.trust import init_keys

    root = init_keys(
        out,
        thresholds={
            "root": root_threshold,
            "targets": targets_threshold,
            "snapshot": snapshot_threshold,
            "timestamp": timestamp_threshold,
        },
        root_expiry_days=root_expiry_days,
        targets_expiry_days=targets_expiry_days,
    )
    typer.echo(f"keys in {out}: root v{root.signed.version}, private keys in {out / 'private'}")


@keys_app.command("rotate")
def keys_rotate(
    keys: Path = typer.Option(..., "--keys", help="Keys directory."),
    role: str = typer.Option(..., "--role", help="root, targets, snapshot or timestamp."),
    replace: list[int] | None = typer.Option(None, "--replace", help="1-based key index."),
    threshold: int | None = typer.Option(None, "--threshold", help="New threshold."),
) -> None:
    """Rotate a role's keys in a new root signed by the old and new root keys.

    Without --replace and --threshold every key of the role is replaced; with only
    --threshold, keys are added until the new threshold is met.
    """
    from delta_packager.trust import rotate_keys

    # No --replace with a new --threshold: keep every key and add new ones.
    indices = replace or ([] if threshold is not None else None)
    root = rotate_keys(keys, role, replace=indices, threshold=threshold)
    typer.echo(
        f"root is now v{root.signed.version}; {role} threshold {root.signed.roles[role].threshold}"
    )


@keys_app.command("release")
def keys_release(
    bundles: list[Path] = typer.Argument(..., help="Bundle files."),
    keys: Path = typer.Option(..., "--keys", help="Keys directory."),
    expiry_days: int = typer.Option(90, help="Targets metadata validity."),
) -> None:
    """Add bundles as TUF targets and re-sign targets metadata."""
    from delta_packager.trust import release

    typer.echo(
        f"released {len(bundles)} bundle(s): {release(bundles, keys, expiry_days=expiry_days)}"
    )


def register(app: typer.Typer) -> None:
    """Mount this package's commands on the root ``fedota`` app."""
    app.command("package")(package)
    app.add_typer(bundle_app, name="bundle")
    app.add_typer(keys_app, name="keys")
