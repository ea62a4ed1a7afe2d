"""A real updater process for the crash tests: SIGKILLs itself at a named step.

Usage: python updater_proc.py STATE_DIR KILL_STEP [LOSS]   (LOSS: measured golden loss,
or ``real``: the device's own runtime health check, ``client.update.default_checker``)

KILL_STEP is a step the agent announces to its hook, or one of ``RUNTIME_STEPS``: points
inside the llama.cpp health check, which announces none.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from client.update import check_and_update, default_checker
from client.update.health import GoldenLossChecker, HealthChecker, Measurement

#: ``write_lora``: the GGUF LoRA temp file holds its header, not its tensors yet;
#: ``evaluate``: the LoRA is complete in the runtime cache, the golden loss is running.
RUNTIME_STEPS = ("write_lora", "evaluate")


def die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_inside_runtime(step: str) -> None:
    import gguf

    from client.runtime.llamacpp import LlamaCppRuntime

    if step == "write_lora":
        gguf.GGUFWriter.write_tensors_to_file = die  # type: ignore[method-assign]
    elif step == "evaluate":
        LlamaCppRuntime.evaluate = die  # type: ignore[method-assign,assignment]


def main() -> None:
    from client.update.state import DeviceState

    state_dir, kill_step = sys.argv[1], sys.argv[2]
    state = DeviceState(Path(state_dir))

    def hook(step: str) -> None:
        if step == kill_step:
            die()

    if kill_step in RUNTIME_STEPS:
        kill_inside_runtime(kill_step)

    checker: HealthChecker
    if len(sys.argv) > 3 and sys.argv[3] == "real":
        checker = default_checker(state)
    else:
        loss = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
        checker = GoldenLossChecker(
            measure=lambda adapter, manifest: Measurement(loss=loss, peak_bytes=1000),
            budget_bytes=2**30,
        )
    outcome = check_and_update(state, checker=checker, hook=hook)
    sys.stdout.write(f"{outcome.status}\n")


if __name__ == "__main__":
    main()
