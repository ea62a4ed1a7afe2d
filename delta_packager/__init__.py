"""③ package: bundle format, delta computation and encoding, base fingerprint, signing.

A leaf package shared by ``client`` and ``server``: it imports neither, and its format
module does not import torch.
"""

from delta_packager.errors import PackagerError, PackagerInputError

__all__ = ["PackagerError", "PackagerInputError"]
