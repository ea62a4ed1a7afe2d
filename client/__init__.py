"""fedota client SDK: what runs on the phone.

Stages: ① train (``client.train``) · ⑤ download, ⑥ verify, ⑦ apply (``client.update``) ·
⑧ infer (``client.runtime``). ``client.Device`` is the SDK façade over the device half
(enroll, update, status, generate, evaluate), documented in ``docs/sdk.md``. Must not
import ``server``, ``simulation``, fastapi or sqlalchemy (enforced by
``tests/test_import_directions.py``).

``client.Device``, ``client.ClientError`` and ``client.ClientInputError`` are what code
outside this package imports from here. The Flower ``ClientApp`` (``client.client_app``,
``[tool.flwr.app.components]``) needs flwr, which a device install does not hold: import
it directly where it is needed, never from here.
"""

import logging
from typing import TYPE_CHECKING

from client.errors import ClientError, ClientInputError

if TYPE_CHECKING:
    from client.device import Device


class _SkipUnusedKernelNotice(logging.Filter):
    """Drop bitsandbytes' import-time notice about a CPU kernel fedota never runs.

    On CPUs with AVX512-BF16, importing bitsandbytes 0.50.2 tries to fetch a fused
    bfloat16 4-bit GEMM kernel from the Hugging Face hub and logs a warning when it
    cannot. fedota never fetches anything from a hub: training keeps every NF4 matmul in
    float (``client.runtime.keep_float_compute``), and the runtime uses the bfloat16
    kernel built into bitsandbytes (ADR 0010), so the warning only pollutes stderr.
    Installed here, before any submodule can import bitsandbytes; other bitsandbytes
    warnings pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_SkipUnusedKernelNotice())

__all__ = ["ClientError", "ClientInputError", "Device"]


def __getattr__(name: str) -> object:
    # The SDK façade is imported on first use, so that importing a submodule (the
    # trainer, the runtime) does not pull in the update agent's HTTP and TUF stack.
    if name == "Device":
        from client.device import Device

        return Device
    raise AttributeError(f"module 'client' has no attribute {name!r}")
