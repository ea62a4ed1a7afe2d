"""③ package: bundle format, delta computation and encoding, base fingerprint, signing.

A leaf package shared by ``client`` and ``server``: it imports neither, and its format
module does not import torch. Stages, in pipeline order:

* ``encode`` — fp32 / fp16 / int8 per-row or per-column tensor encodings;
* ``manifest`` and ``format`` — the bundle container and its strict parser;
* ``package`` (+ ``store``) — closed-loop deltas and the packager state on disk;
* ``adapter_io`` — reading a PEFT adapter directory into numpy;
* ``fingerprint`` — the identity of a base model (checkpoint directory or GGUF file);
* ``apply`` — previous state + bundle → new state, bit-identical to the packager;
* ``trust`` / ``verify`` — TUF keys, signed targets metadata, key rotation, and the
  checks of metadata and bundles against it.

Import the names below from here: they are what code outside this package uses.
``trust`` and ``verify`` are not re-exported: they load tuf, securesystemslib and
cryptography (about 100 modules), which the bundle format, the runtime and ``fedota
--help`` do not need; import them directly where signatures are made or checked.
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
from delta_packager.fingerprint import (
    TOKENIZER_FILES,
    fingerprint_base,
    fingerprint_checkpoint,
    fingerprint_gguf,
    rank_target,
)
from delta_packager.format import DEFAULT_MAX_UNCOMPRESSED_BYTES, Bundle, parse_bundle, read_bundle
from delta_packager.manifest import AdapterConfig, Manifest, Provenance
from delta_packager.package import (
    PackagePolicy,
    PackageResult,
    PackagerState,
    build_bundle,
    package_version,
)
from delta_packager.store import load_state, save_state

__all__ = [
    "DEFAULT_MAX_UNCOMPRESSED_BYTES",
    "TOKENIZER_FILES",
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
    "PackageResult",
    "PackagerError",
    "PackagerInputError",
    "PackagerState",
    "PackagerStateError",
    "Provenance",
    "RollbackError",
    "TrustError",
    "apply_bundle",
    "build_bundle",
    "fingerprint_base",
    "fingerprint_checkpoint",
    "fingerprint_gguf",
    "load_state",
    "package_version",
    "parse_bundle",
    "rank_target",
    "read_bundle",
    "save_state",
]
