"""Errors raised by ``delta_packager``, grouped by who is at fault.

Every message says what was observed, what was expected and what the user can do.
``exit_code`` is what the ``fedota`` CLI exits with when the error reaches it
(2: bad input or usage, 3: rejected for safety; see ``fedota.cli``).

Who is at fault:

* the caller (``PackagerInputError``): a bad path, file, option or adapter;
* the bundle (``BundleRejectedError`` and its subclasses): the bytes on the wire are
  malformed (``BundleFormatError``), do not match what was signed or declared
  (``BundleIntegrityError``), were built for another base model
  (``BaseMismatchError``), would move the device backwards (``RollbackError``), or
  do not start from the state the device holds (``ChainMismatchError``);
* the trust metadata (``TrustError``): signatures, thresholds, expiry, key rotation.
"""

from __future__ import annotations


class PackagerError(Exception):
    """Root of every error ``delta_packager`` raises on purpose."""

    exit_code = 2


class PackagerInputError(PackagerError):
    """The caller gave input that cannot be used (a bad path, file or option)."""

    exit_code = 2


class PackagerStateError(PackagerInputError):
    """The packager state directory is missing, corrupt or belongs to another base."""

    exit_code = 2


class BundleRejectedError(PackagerError):
    """A bundle was refused. Nothing derived from it may be staged or applied."""

    exit_code = 3


class BundleFormatError(BundleRejectedError):
    """The bundle bytes are not a well-formed fedota bundle of a supported version."""


class BundleIntegrityError(BundleRejectedError):
    """The bundle is well formed but its bytes or fields differ from what was declared."""


class BaseMismatchError(BundleRejectedError):
    """The bundle was built for a different base model fingerprint than the device holds."""


class RollbackError(BundleRejectedError):
    """The bundle's release counter is not newer than the one the device has installed."""


class ChainMismatchError(BundleRejectedError):
    """A delta bundle starts from a version or tensor layout the device does not hold."""


class TrustError(PackagerError):
    """TUF metadata is unsigned, under threshold, signed by unknown keys, or expired."""

    exit_code = 3


class KeysError(PackagerInputError):
    """The keys directory is missing files or does not follow the documented layout."""

    exit_code = 2
