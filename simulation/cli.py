"""``fedota`` subcommands owned by ``simulation``. Heavy imports stay inside the commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

base_model_app = typer.Typer(
    help="Create, sample and fingerprint the generated base model.", no_args_is_help=True
)


def default_cache_dir() -> Path:
    """Where generated base models are cached: ``$FEDOTA_CACHE`` or ``~/.cache/fedota``."""
    env = os.environ.get("FEDOTA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedota"


@base_model_app.command("init")
def base_model_init(
    out: Path = typer.Option(..., "--out", help="Directory to write (must be new or empty)."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help='Public pretraining text as JSONL ({"text": ...} per line). '
        "Default: the built-in synthetic public split.",
    ),
    preset: str = typer.Option("tiny", "--preset", help="Model size: tiny | small."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives identical weights."),
) -> None:
    """Train a byte-level BPE tokenizer and pretrain a Llama base on public text."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from simulation.base_model import PRESETS, init_base_model
    from simulation.data import generate_public_texts, read_jsonl_texts
    from simulation.errors import SimulationInputError

    if preset not in PRESETS:  # fail before any slow work
        raise SimulationInputError(
            f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}"
        )
    texts = read_jsonl_texts(data) if data else generate_public_texts(3000, seed)
    with Progress(
        TextColumn("pretraining"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task("train", total=PRESETS[preset].steps, loss="")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, loss=f"loss {loss:.3f}")

        info = init_base_model(
            out,
            public_texts=texts,
            preset=preset,
            seed=seed,
            data_label=str(data) if data else "synthetic",
            on_step=on_step,
        )
    typer.echo(
        f"base model ({info.preset}, {info.num_parameters:,} parameters) written to {out}; "
        f"final loss {info.final_loss:.4f}; NF4 copy in {info.nf4_path}; "
        f"fingerprint {info.fingerprint}"
    )


@base_model_app.command("sample")
def base_model_sample(
    model: Path = typer.Option(..., "--model", help="Base model directory (float or NF4)."),
    prompt: list[str] = typer.Option(["hey ana, are we"], "--prompt", help="Prompt(s)."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, max=512),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Load the model as NF4 and print a greedy continuation of each prompt."""
    import torch
    from transformers import AutoTokenizer

    from client.runtime import load_quantized

    torch.manual_seed(seed)
    lm: Any = load_quantized(model)
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    for p in prompt:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = lm.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        typer.echo(
            f"{p!r} → {tok.decode(out[0][ids['input_ids'].shape[1] :], skip_special_tokens=True)!r}"
        )


@base_model_app.command("fingerprint")
def base_model_fingerprint(
    model: Path = typer.Argument(..., help="A pre-quantized checkpoint, or a base from init."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the bare hash."),
) -> None:
    """Print the base fingerprint bundles are bound to (over the NF4 tensors, the
    quantization config and the tokenizer)."""
    from delta_packager.fingerprint import fingerprint_checkpoint

    target = model / "nf4" if (model / "nf4" / "config.json").is_file() else model
    fp = fingerprint_checkpoint(target)
    typer.echo(json.dumps({"path": str(target), "fingerprint": fp}) if as_json else fp)


def simulate(
    clients: int = typer.Option(6, "--clients", min=1, help="Training clients (synthetic data)."),
    clients_per_round: int = typer.Option(
        3, "--clients-per-round", min=1, help="Clients sampled per round."
    ),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Federated rounds."),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="Differential privacy on or off."),
    dp_mode: str = typer.Option(
        "record", "--dp-mode", help="record: DP-SGD on each phone; user: central DP-FedAvg."
    ),
    target_epsilon: float = typer.Option(8.0, "--target-epsilon", help="ε to aim at."),
    aggregation: str | None = typer.Option(
        None, "--aggregation", help="fedavg | ffa (default: ffa with DP, fedavg without)."
    ),
    data: Path | None = typer.Option(None, "--data", help='JSONL: {"client_id", "text"} lines.'),
    base_model: Path | None = typer.Option(
        None, "--base-model", help="Base model directory (default: the cached tiny base)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same run."),
    out: Path = typer.Option(Path("runs/simulate"), "--out", help="Output directory."),
    local_steps: int | None = typer.Option(
        None,
        "--local-steps",
        min=1,
        help="Steps per client round (default: 3 with record-level DP, else 10).",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        envvar="RAY_ADDRESS",
        help="Run the clients on an existing Ray cluster (HOST:PORT of its head, or auto).",
    ),
) -> None:
    """Federated LoRA fine-tuning of the NF4 base on simulated phones; writes OUT/summary.json."""
    from rich.console import Console

    from simulation.errors import SimulationInputError
    from simulation.federated import FederatedConfig, run_federated

    if dp_mode not in ("record", "user"):
        raise SimulationInputError(f"--dp-mode {dp_mode!r} is not one of: record, user")
    import logging

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # Flower logs at DEBUG through its own handler; keep it out of ours (fedota -v
        # shows everything).
        logging.getLogger("flwr").propagate = False
    console = Console(stderr=True)
    cfg = FederatedConfig(
        out_dir=out,
        num_clients=clients,
        clients_per_round=clients_per_round,
        rounds=rounds,
        dp_mode=dp_mode if dp else "none",
        target_epsilon=target_epsilon,
        aggregation=aggregation,
        data_file=data,
        base_model=base_model,
        seed=seed,
        cache_dir=default_cache_dir(),
        local_steps=local_steps,
        ray_address=ray_address,
        resume=resume,
    )

    def on_round_end(result: object) -> None:
        r = getattr(result, "round", 0)
        ev, tr = getattr(result, "evaluate", {}), getattr(result, "train", {})
        eps = tr.get("user-epsilon", tr.get("record-epsilon"))
        line = (
            f"round {r}/{rounds}: eval loss {ev.get('clients-loss', float('nan')):.4f} "
            f"acc {ev.get('clients-accuracy', float('nan')):.4f}"
        )
        if r:
            line += (
                f" | trained {int(tr.get('clients-trained', 0))}/"
                f"{int(tr.get('clients-sampled', 0))}, upload "
                f"{int(tr.get('upload-bytes', 0)):,} B"
            )
            line += f", ε {eps:.3g}" if eps else ""
        console.print(line)

    with console.status("federated training (Ray simulation)…"):
        summary = run_federated(cfg, on_round_end=on_round_end)
    base, final, priv = summary.data["baseline"], summary.data["final"], summary.data["privacy"]
    typer.echo(
        f"accuracy {base['eval_accuracy']:.4f} → {final['eval_accuracy']:.4f}, loss "
        f"{base['eval_loss']:.4f} → {final['eval_loss']:.4f}; privacy {priv['mode']}"
        + (f" ε={priv['epsilon']:.3g} δ={priv['delta']:g}" if priv["epsilon"] else "")
        + f"; summary in {summary.path}"
    )


adapter_app = typer.Typer(
    help="Turn a federated run's global adapter into a deployable PEFT adapter.",
    no_args_is_help=True,
)


@adapter_app.command("export")
def adapter_export(
    run: Path = typer.Option(
        ..., "--run", help="A `fedota simulate --out` dir, or a server checkpoint dir."
    ),
    base_model: Path = typer.Option(..., "--base-model", help="The base the run trained on."),
    out: Path = typer.Option(..., "--out", help="New PEFT adapter directory."),
    rank: int = typer.Option(None, "--rank", min=1, help="LoRA rank (default: from summary)."),
    alpha: float = typer.Option(None, "--alpha", help="LoRA alpha (default: 2 × rank)."),
    seed: int = typer.Option(None, "--seed", help="The run's seed (FFA's shared A init)."),
    ffa: bool = typer.Option(None, "--ffa/--no-ffa", help="Trained with FFA-LoRA?"),
) -> None:
    """Write the newest global adapter of RUN, with FFA's frozen A rebuilt, as a PEFT
    adapter directory for `fedota package --new`."""
    from simulation.export import LoraShape, export_adapter, latest_global, lora_shape_of_run

    global_path, _ = latest_global(run)
    if None in (rank, seed, ffa):
        known = lora_shape_of_run(run)
        rank = known.rank if rank is None else rank
        seed = known.init_seed if seed is None else seed
        ffa = known.ffa if ffa is None else ffa
        alpha = known.alpha if alpha is None else alpha
    shape = LoraShape(rank, float(alpha if alpha is not None else 2 * rank), seed, bool(ffa))
    result = export_adapter(global_path, base_model, out, shape)
    typer.echo(
        f"adapter from {global_path} (round {result.round}) written to {out}: "
        f"{result.num_tensors} tensors, rank {shape.rank}, alpha {shape.alpha:g}, "
        f"{'FFA' if shape.ffa else 'fedavg'}"
    )


def register(app: typer.Typer) -> None:
    """Mount this package's commands on the root ``fedota`` app."""
    app.add_typer(base_model_app, name="base-model")
    app.add_typer(adapter_app, name="adapter")
    from simulation import data_cli

    data_cli.register(app)
    app.command("simulate")(simulate)
