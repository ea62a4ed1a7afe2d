"""From a federated run to a deployable adapter: the step between ② aggregate and
③ package.

The server checkpoints the *exchanged* global adapter. Under FFA-LoRA that is only the
B tensors: every phone rebuilds the frozen A from the shared seed, and so must the
release pipeline before packaging, because a device's runtime needs A and B. This
writes a standard PEFT adapter directory (``adapter_model.safetensors`` +
``adapter_config.json``) that ``fedota package --new`` accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import Aggregation, LoraShape, atomic_dir
from simulation.errors import SimulationInputError

__all__ = [
    "ExportedAdapter",
    "export_adapter",
    "global_adapts_head",
    "latest_global",
    "lora_shape_of_run",
]


@dataclass(frozen=True)
class ExportedAdapter:
    """A PEFT adapter directory written by :func:`export_adapter`."""

    path: Path
    round: int | None
    num_tensors: int
    shape: LoraShape


def latest_global(run_or_checkpoints: Path) -> tuple[Path, int | None]:
    """The newest ``global.safetensors`` of a run dir, a checkpoint dir or a round dir.

    Raises:
        SimulationInputError: nothing checkpointed there.
    """
    path = Path(run_or_checkpoints)
    for candidate in (path, path / "checkpoints"):
        latest = candidate / "LATEST"
        if latest.is_file():
            name = latest.read_text().strip()
            return candidate / name / "global.safetensors", int(name.rsplit("-", 1)[-1])
    if (path / "global.safetensors").is_file():
        return path / "global.safetensors", None
    raise SimulationInputError(
        f"{path} holds no checkpointed global adapter (no LATEST or global.safetensors); "
        "pass a `fedota simulate --out` directory or a server checkpoint directory"
    )


def global_adapts_head(global_path: Path) -> bool:
    """Whether a checkpointed global adapter holds LoRA tensors of the output head.

    Every base family fedota supports names its head ``lm_head``; a run whose settings
    are unknown (a server checkpoint directory has no ``summary.json``) is read from
    its tensor names.
    """
    from safetensors import safe_open

    with safe_open(str(global_path), framework="numpy") as f:
        return any(".lm_head.lora_" in f".{name}" for name in f.keys())  # noqa: SIM118


def lora_shape_of_run(run_dir: Path) -> LoraShape:
    """Read the LoRA settings from a run's ``summary.json``.

    Raises:
        SimulationInputError: no readable summary; pass the settings explicitly.
    """
    summary = Path(run_dir) / "summary.json"
    try:
        config = json.loads(summary.read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise SimulationInputError(
            f"cannot read the LoRA settings from {summary} ({e}); pass --rank, --alpha, "
            "--seed, --ffa/--no-ffa and --lora-head/--no-lora-head as the run used them"
        ) from e
    rank = int(config["lora_rank"])
    alpha = float(config.get("lora_alpha") or 2 * rank)  # the ClientApp's default
    return LoraShape(
        rank=rank,
        alpha=alpha,
        init_seed=int(config["seed"]),
        ffa=config["aggregation"] == Aggregation.FFA,
        adapt_head=bool(config.get("lora_head", False)),  # summaries before the option
    )


def export_adapter(
    global_path: Path, base_dir: Path, out_dir: Path, shape: LoraShape
) -> ExportedAdapter:
    """Write the full PEFT adapter (A and B) for an exchanged global adapter.

    Raises:
        SimulationInputError: ``out_dir`` exists, or the tensors do not fit the base.
    """
    import torch
    from safetensors.numpy import load_file, save_file

    from client.train import AdapterMismatchError, LocalTrainer, LoraSettings

    out = Path(out_dir)
    if out.exists():
        raise SimulationInputError(f"{out} already exists; choose a new --out")
    exchanged = {k: torch.from_numpy(v) for k, v in load_file(str(global_path)).items()}
    lora = LoraSettings(
        rank=shape.rank,
        alpha=shape.alpha,
        adapt_head=shape.adapt_head,
        ffa=shape.ffa,
        init_seed=shape.init_seed,
    )
    try:
        full = LocalTrainer(base_dir, lora).full_adapter(exchanged)
    except AdapterMismatchError as e:
        raise SimulationInputError(
            f"{global_path} does not fit {base_dir} with rank {shape.rank}"
            f"{' and the output head' if shape.adapt_head else ''}: {e}; pass the run's "
            "--rank and --lora-head/--no-lora-head"
        ) from e
    modules = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in full})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": shape.rank,
        "lora_alpha": shape.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": modules,
        "fedota": {"ffa": shape.ffa, "init_seed": shape.init_seed, "head": shape.adapt_head},
    }
    with atomic_dir(out) as tmp:
        save_file({k: v.numpy() for k, v in full.items()}, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    round_ = None
    if global_path.parent.name.startswith("round-"):
        round_ = int(global_path.parent.name.rsplit("-", 1)[-1])
    return ExportedAdapter(out, round_, len(full), shape)
