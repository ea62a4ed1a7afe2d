"""③ package: bundle format, delta computation and encoding, base fingerprint, signing.

A leaf package shared by ``client`` and ``server``: it imports neither, and its format
module does not import torch. Stages, in pipeline order:

* ``encode`` — fp32 / fp16 / int8 per-row or per-column tensor encodings;
* ``manifest`` and ``format`` — the bundle container and its strict parser;
* ``package`` (+ ``store``) — closed-loop deltas and the packager state on disk;
* ``adapter_io`` — reading a PEFT adapter directory into numpy;
* ``apply`` — previous state + bundle → new state, bit-identical to the packager;
* ``trust`` / ``verify`` — TUF keys, signed targets metadata, key rotation, and the
  checks of metadata and bundles against it (import them directly; they pull in tuf).
"""

from delta_packager.apply import AdapterState, apply_bundle
from delta_packager.errors import (
    BaseMismatchError,
    BundleFormatError,
    BundleIntegrityError,
    BundleRejectedError,
    ChainMismatchError,
    KeysError,
    PackagerError,
    PackagerInputError,
    PackagerStateError,
    RollbackError,
    TrustError,
)
from delta_packager.format import Bundle, parse_bundle, read_bundle
from delta_packager.manifest import AdapterConfig, Manifest, Provenance
from delta_packager.package import PackagePolicy, PackagerState, build_bundle, package_version
from delta_packager.store import load_state, save_state

__all__ = [
    "AdapterConfig",
    "AdapterState",
    "BaseMismatchError",
    "Bundle",
    "BundleFormatError",
    "BundleIntegrityError",
    "BundleRejectedError",
    "ChainMismatchError",
    "KeysError",
    "Manifest",
    "PackagePolicy",
    "PackagerError",
    "PackagerInputError",
    "PackagerState",
    "PackagerStateError",
    "Provenance",
    "RollbackError",
    "TrustError",
    "apply_bundle",
    "build_bundle",
    "load_state",
    "package_version",
    "parse_bundle",
    "read_bundle",
    "save_state",
]
