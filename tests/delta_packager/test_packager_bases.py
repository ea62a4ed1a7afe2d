"""A release names every base it applies to (DESIGN decision 11; THREATS C12, I42):
``Manifest.compatible_bases`` through packaging, the strict parser, signing, apply, the
packager state and ``fedota package --also-base``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import zstandard
from tuf.api.metadata import TargetFile
from typer.testing import CliRunner

from delta_packager import (
    AdapterConfig,
    BaseMismatchError,
    BundleFormatError,
    BundleIntegrityError,
    PackagerInputError,
    PackagerState,
    PackagerStateError,
    apply_bundle,
    build_bundle,
    fingerprint_checkpoint,
    fingerprint_gguf,
    load_state,
    package_version,
    parse_bundle,
    read_bundle,
    save_state,
)
from delta_packager.cli import register
from delta_packager.manifest import canonical_json, manifest_from_json
from delta_packager.store import STATE_FILE
from delta_packager.verify import check_bundle_target, target_custom
from tests.delta_packager.packager_helpers import (
    FP_X,
    FP_Y,
    edit_manifest,
    make_bundle_bytes,
    random_adapter,
    train_step,
    unpack,
    write_peft_adapter,
    write_quantized_base,
)

FP_G = "sha256:" + "1" * 64  # a GGUF export of base X, named by the release
FP_H = "sha256:" + "2" * 64  # another GGUF export, named too
FP_Z = "sha256:" + "f" * 64  # a GGUF export the release does not name

# Golden payloads of ``make_bundle_bytes(0, versions=v)`` (sha256 of the decompressed
# safetensors payload), recorded with the fedota of the commit before compatible bases
# existed: a release naming one base must keep its exact bytes.
GOLDEN_PAYLOAD = {
    1: "9c5641cbfa74d1c84c2af52eb4a62b685931a928f67a36c999db1a26859f6e16",
    2: "fd2d0bd2096fcfebe4123c563d49df3f463f98bff6a8832ae794da9afbf12abe",
}


def _chain(
    config: AdapterConfig, versions: int, bases: tuple[str, ...] = (FP_G, FP_H)
) -> list[Any]:
    rng = np.random.default_rng(3)
    adapter, state, results = random_adapter(rng), None, []
    for _ in range(versions):
        result = package_version(
            adapter,
            previous=state,
            base_fingerprint=FP_X,
            adapter_config=config,
            compatible_bases=tuple(reversed(bases)),  # order does not matter
        )
        state, adapter = result.state, train_step(rng, adapter)
        results.append(result)
    return results


def _manifest_json(bundle: bytes) -> dict[str, Any]:
    header, _ = unpack(bundle)
    return dict(json.loads(header["__metadata__"]["fedota.manifest"]))


# ---------------------------------------------------------------- manifest


@pytest.mark.parametrize("versions", [1, 2], ids=["full", "delta"])
def test_one_base_bundles_keep_their_exact_bytes(versions: int) -> None:
    bundle = make_bundle_bytes(0, versions=versions)
    payload = zstandard.ZstdDecompressor().decompress(bundle)
    assert hashlib.sha256(payload).hexdigest() == GOLDEN_PAYLOAD[versions]
    assert "compatible_bases" not in _manifest_json(bundle)
    m = parse_bundle(bundle).manifest
    assert m.compatible_bases == () and m.applies_to(FP_X) and not m.applies_to(FP_G)
    assert "compatible_bases" not in target_custom(parse_bundle(bundle))["fedota"]


def test_manifest_round_trip_with_compatible_bases(adapter_config: AdapterConfig) -> None:
    result = _chain(adapter_config, 1)[0]
    raw = _manifest_json(result.bundle_bytes)
    assert raw["base_fingerprint"] == FP_X and raw["compatible_bases"] == [FP_G, FP_H]
    m = manifest_from_json(canonical_json(raw))
    assert m == result.bundle.manifest and m.compatible_bases == (FP_G, FP_H)
    assert all(m.applies_to(fp) for fp in (FP_X, FP_G, FP_H)) and not m.applies_to(FP_Z)
    assert target_custom(result.bundle)["fedota"]["compatible_bases"] == [FP_G, FP_H]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([], id="empty-list"),
        pytest.param(None, id="null"),
        pytest.param([FP_H, FP_G], id="unsorted"),
        pytest.param([FP_G, FP_G], id="repeated"),
        pytest.param([FP_X], id="the-primary"),
        pytest.param(["sha256:" + "A" * 64], id="uppercase"),
        pytest.param(FP_G, id="a-string"),
        pytest.param([FP_G] * 65, id="too-many"),
    ],
)
def test_malformed_compatible_bases_are_refused(value: object) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["compatible_bases"] = value

    with pytest.raises(BundleFormatError, match="compatible_bases"):
        parse_bundle(edit_manifest(make_bundle_bytes(0), edit))


def test_compatible_bases_are_covered_by_the_signature(adapter_config: AdapterConfig) -> None:
    """A2: naming one more base after signing breaks the match with the signed target."""
    data = _chain(adapter_config, 1, (FP_G,))[0].bundle_bytes
    target = TargetFile.from_data("adapters/1/b.fedota", data, ["sha256"])
    target.unrecognized_fields["custom"] = target_custom(parse_bundle(data))
    assert check_bundle_target(data, target).manifest.compatible_bases == (FP_G,)

    def add(manifest: dict[str, Any]) -> None:
        manifest["compatible_bases"] = [FP_G, FP_Z]

    forged = edit_manifest(data, add)
    with pytest.raises(BundleIntegrityError, match="do not match signed target"):
        check_bundle_target(forged, target)
    resigned = TargetFile.from_data("adapters/1/b.fedota", forged, ["sha256"])
    signed = dict(target_custom(parse_bundle(data))["fedota"])  # the old bases, new size
    signed["uncompressed_bytes"] = parse_bundle(forged).manifest.uncompressed_bytes
    resigned.unrecognized_fields["custom"] = {"fedota": signed}
    with pytest.raises(BundleIntegrityError, match=r"disagree on \['compatible_bases'\]"):
        check_bundle_target(forged, resigned)


# ---------------------------------------------------------------- apply


def test_apply_accepts_every_named_base_and_refuses_others(adapter_config: AdapterConfig) -> None:
    v1, v2 = _chain(adapter_config, 2)
    for device_fp in (FP_X, FP_G, FP_H):
        state = apply_bundle(None, v1.bundle, base_fingerprint=device_fp)
        assert state.base_fingerprint == device_fp  # bound to the device's own base
        state = apply_bundle(state, v2.bundle, base_fingerprint=device_fp)
        assert all(
            state.tensors[k].tobytes() == v2.state.current.tensors[k].tobytes()
            for k in state.tensors
        )
    # C12/I42: the same message as for any other base the bundle does not name.
    with pytest.raises(BaseMismatchError, match=f"built for base {FP_X}, the device holds {FP_Z}"):
        apply_bundle(None, v1.bundle, base_fingerprint=FP_Z)


# ---------------------------------------------------------------- packaging and state


def test_every_bundle_of_a_release_names_the_same_bases(adapter_config: AdapterConfig) -> None:
    results = _chain(adapter_config, 4)
    state = results[-1].state
    assert state.compatible_bases == (FP_G, FP_H)
    for from_version in (None, 1, 2, 3):
        m = parse_bundle(build_bundle(state, from_version=from_version)).manifest
        assert (m.base_fingerprint, m.compatible_bases) == (FP_X, (FP_G, FP_H))
    # The set belongs to a release: the next one may name fewer bases.
    nxt = package_version(
        random_adapter(np.random.default_rng(9)),
        previous=state,
        base_fingerprint=FP_X,
        adapter_config=adapter_config,
    )
    assert nxt.bundle.manifest.compatible_bases == () and nxt.state.compatible_bases == ()


@pytest.mark.parametrize(
    ("bases", "message"),
    [([FP_X], "own base"), (["sha256:xyz"], "not a fingerprint")],
    ids=["the-primary", "not-a-fingerprint"],
)
def test_package_refuses_bad_compatible_bases(
    adapter_config: AdapterConfig, bases: list[str], message: str
) -> None:
    with pytest.raises(PackagerInputError, match=message):
        package_version(
            random_adapter(np.random.default_rng(0)),
            previous=None,
            base_fingerprint=FP_X,
            adapter_config=adapter_config,
            compatible_bases=bases,
        )


@pytest.mark.parametrize("bases", [(), (FP_G, FP_H)], ids=["one-base", "three-bases"])
def test_state_round_trip(tmp_path: Path, adapter_config: AdapterConfig, bases: tuple) -> None:
    state: PackagerState = _chain(adapter_config, 2, bases)[-1].state
    save_state(state, tmp_path)
    record = json.loads((tmp_path / STATE_FILE).read_text())
    assert record.get("compatible_bases", []) == list(bases)
    assert ("compatible_bases" in record) == bool(bases)  # old layout when one base
    assert load_state(tmp_path).compatible_bases == bases


def test_state_with_corrupt_compatible_bases_is_refused(
    tmp_path: Path, adapter_config: AdapterConfig
) -> None:
    save_state(_chain(adapter_config, 1)[-1].state, tmp_path)
    record = json.loads((tmp_path / STATE_FILE).read_text())
    record["compatible_bases"] = [FP_X]
    (tmp_path / STATE_FILE).write_text(json.dumps(record))
    with pytest.raises(PackagerStateError, match="own base"):
        load_state(tmp_path)


# ---------------------------------------------------------------- fedota package --also-base


@pytest.fixture
def app() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def _root() -> None: ...

    register(root)
    return root


def test_cli_also_base_takes_fingerprints_and_paths(tmp_path: Path, app: typer.Typer) -> None:
    rng = np.random.default_rng(0)
    base = write_quantized_base(tmp_path / "nf4")
    gguf = tmp_path / "base.Q4_0.gguf"
    gguf.write_bytes(b"GGUF\x03\0\0\0" + bytes(100))
    out = tmp_path / "out" / "v1.bundle"
    args = ["package", "--base", str(base), "--out", str(out)]
    args += ["--new", str(write_peft_adapter(tmp_path / "a1", random_adapter(rng)))]
    result = CliRunner().invoke(app, [*args, "--also-base", str(gguf), "--also-base", FP_Z])
    assert result.exit_code == 0, result.output
    assert "packaged v1 (full, 3 bases, counter 1)" in result.output
    m = read_bundle(out).manifest
    assert m.base_fingerprint == fingerprint_checkpoint(base)
    assert m.compatible_bases == tuple(sorted([fingerprint_gguf(gguf), FP_Z]))


@pytest.mark.parametrize(
    ("also", "message"),
    [
        ("sha256:NOT-HEX", "is not a fingerprint"),
        ("{tmp}/weights.bin", "not a base model"),
        ("{tmp}/fake.gguf", "not a GGUF file"),
    ],
    ids=["bad-fingerprint", "other-file", "fake-gguf"],
)
def test_cli_also_base_refuses_what_it_cannot_use(
    tmp_path: Path, app: typer.Typer, also: str, message: str
) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04")
    args = ["package", "--base-fingerprint", FP_Y, "--out", str(tmp_path / "v1.bundle")]
    args += [
        "--new",
        str(write_peft_adapter(tmp_path / "a1", random_adapter(np.random.default_rng(0)))),
    ]
    result = CliRunner().invoke(app, [*args, "--also-base", also.format(tmp=tmp_path)])
    assert isinstance(result.exception, PackagerInputError)
    assert message in str(result.exception)
    assert not (tmp_path / "v1.bundle").exists()
