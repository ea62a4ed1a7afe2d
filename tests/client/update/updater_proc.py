"""A real updater process for the crash tests: SIGKILLs itself at a named step.

Usage: python updater_proc.py STATE_DIR KILL_STEP [LOSS]   (LOSS: measured golden loss,
or ``real``: the device's own runtime health check, ``client.update.default_checker``)

KILL_STEP is a step the agent announces to its hook, or one of ``RUNTIME_STEPS``: points
inside the llama.cpp health check, which announces none, or ``file-op:K``: just before
the K-th file operation (see ``kill_at_file_op``) after the health check started — a
kill between the commit's own writes, renames and removals. A KILL_STEP that is never
reached lets the update run to its end.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from client.update import (
    GoldenLossChecker,
    HealthChecker,
    Measurement,
    check_and_update,
    default_checker,
)

#: ``write_lora``: the GGUF LoRA temp file holds its header, not its tensors yet;
#: ``evaluate``: the LoRA is complete in the runtime cache, the golden loss is running.
RUNTIME_STEPS = ("write_lora", "evaluate")


def die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_inside_runtime(step: str) -> None:
    import gguf

    from client.runtime import LlamaCppRuntime

    if step == "write_lora":
        gguf.GGUFWriter.write_tensors_to_file = die  # type: ignore[method-assign]
    elif step == "evaluate":
        LlamaCppRuntime.evaluate = die  # type: ignore[method-assign,assignment]


def _writes(args: tuple[object, ...]) -> bool:
    """Whether an ``open`` audit event opens for writing (builtin ``open`` or ``os.open``)."""
    path, mode, flags = args
    if isinstance(path, int):
        return False  # os.fdopen of a descriptor whose opening was counted already
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR))


def kill_at_file_op(k: int) -> Callable[[], None]:
    """SIGKILL just before the ``k``-th file operation once armed: a file opened for
    writing, a rename/replace or a removal (Python audit events, so no code is patched).

    Returns:
        The function that arms the counter.
    """
    count, armed = 0, False

    def audit(event: str, args: tuple[object, ...]) -> None:
        nonlocal count
        if not armed:
            return
        if event in ("os.rename", "os.remove") or (event == "open" and _writes(args)):
            count += 1
            if count == k:
                die()

    def arm() -> None:
        nonlocal armed
        armed = True

    sys.addaudithook(audit)
    return arm


def main() -> None:
    from client.update import DeviceState

    state_dir, kill_step = sys.argv[1], sys.argv[2]
    state = DeviceState(Path(state_dir))

    arm = kill_at_file_op(int(kill_step[8:])) if kill_step.startswith("file-op:") else None

    def hook(step: str) -> None:
        if step == kill_step:
            die()
        if arm is not None and step == "health_check":
            arm()

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
