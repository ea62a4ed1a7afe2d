"""``fedota`` subcommands owned by ``simulation``. Heavy imports stay inside the commands."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from simulation.config_file import apply_config_file

if TYPE_CHECKING:
    from server.federation import RoundResult
    from simulation.federated import FederatedConfig
    from simulation.fleet import Endpoint, FleetConfig
    from simulation.ota_rollout import RoundOta
    from simulation.pipeline import EndToEndResult
    from simulation.run_summary import Summary

base_model_app = typer.Typer(
    help="Create, sample, export and fingerprint the base model.", no_args_is_help=True
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
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Refuse --data records whose text is empty or whitespace (default: skip them "
        "and say how many).",
    ),
    steps: int | None = typer.Option(
        None,
        "--steps",
        min=1,
        help="Pretraining steps (default: the preset's, 400 for tiny, or enough to see "
        "the text 8 times if that is more).",
    ),
) -> None:
    """Train a byte-level BPE tokenizer and pretrain a Llama base on public text."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from simulation.base_model import PRESETS, init_base_model
    from simulation.data import generate_public_texts, read_jsonl_corpus
    from simulation.errors import SimulationInputError

    if preset not in PRESETS:  # fail before any slow work
        raise SimulationInputError(
            f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}"
        )
    if data:
        corpus = read_jsonl_corpus(data, strict=strict)
        if corpus.skipped_empty:
            typer.echo(
                f"{data}: skipped {corpus.skipped_empty} record(s) with an empty text "
                "(--strict refuses them instead)",
                err=True,
            )
        texts = corpus.texts
    else:
        texts = generate_public_texts(3000, seed)
    with Progress(
        TextColumn("pretraining"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task("train", total=PRESETS[preset].steps, loss="")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=f"loss {loss:.3f}")

        info = init_base_model(
            out,
            public_texts=texts,
            preset=preset,
            seed=seed,
            data_label=str(data) if data else "synthetic",
            steps=steps,
            on_step=on_step,
        )
    typer.echo(
        f"base model ({info.preset}, {info.num_parameters:,} parameters) written to {out}; "
        f"{info.steps} steps, final loss {info.final_loss:.4f}; NF4 copy in {info.nf4_path}; "
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
    lm: Any = load_quantized(model, inference_only=True)
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
    model: Path = typer.Argument(
        ..., help="A pre-quantized checkpoint, a base from init, or a .gguf export."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the bare hash."),
) -> None:
    """Print the base fingerprint bundles are bound to (over the NF4 tensors, the
    quantization config and the tokenizer; or over a GGUF export's bytes)."""
    from delta_packager import fingerprint_base

    target = model / "nf4" if (model / "nf4" / "config.json").is_file() else model
    fp = fingerprint_base(target)
    typer.echo(json.dumps({"path": str(target), "fingerprint": fp}) if as_json else fp)


@base_model_app.command("export")
def base_model_export(
    model: Path = typer.Option(
        ...,
        "--model",
        exists=True,
        file_okay=False,
        help="A base from init, its NF4 copy, or a local Llama/Qwen2 Hugging Face directory.",
    ),
    out: Path = typer.Option(..., "--out", help="The .gguf file to write (must not exist)."),
    fmt: str = typer.Option("gguf", "--format", help="Export format: gguf."),
    quant: str = typer.Option("q8_0", "--quant", help="q8_0 | q4_0 | q4_k_m | f16."),
    source: str = typer.Option(
        "nf4",
        "--from",
        help="nf4: the dequantized NF4 weights phones train on (ADR 0011); float: the "
        "float checkpoint.",
    ),
    check_texts: Path | None = typer.Option(
        None,
        "--check-texts",
        exists=True,
        dir_okay=False,
        help='More text for the tokenizer check, JSONL ({"text": ...} per line).',
    ),
) -> None:
    """Export a base as a GGUF file for the llama.cpp device runtime: weights, tokenizer
    (checked to tokenize exactly as Hugging Face does), quantized by llama.cpp."""
    from client.runtime import export_gguf
    from simulation.data import read_jsonl_texts
    from simulation.errors import SimulationInputError

    if fmt != "gguf":
        raise SimulationInputError(f"unknown --format {fmt!r}; supported: gguf")
    texts = read_jsonl_texts(check_texts) if check_texts else []
    info = export_gguf(
        model,
        out,
        quant=quant,
        source=source,
        check_texts=texts,
        on_stage=lambda text: typer.echo(f"… {text}", err=True),
    )
    typer.echo(
        f"GGUF base ({info.arch}, {info.quant} from {info.source} weights, "
        f"{info.bytes / 2**20:.1f} MiB) written to {out}; tokenizer matched Hugging Face on "
        f"{info.tokenizer_texts_checked} texts; fingerprint {info.fingerprint}"
    )


def simulate(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None,
        "--config",
        is_eager=True,
        callback=apply_config_file,
        dir_okay=False,
        help="A TOML file of options (keys: the option names without --); flags given "
        "here override it. OUT/config.toml of a run reruns that run.",
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved options as TOML and exit."
    ),
    clients: int = typer.Option(
        6,
        "--clients",
        min=1,
        help="Training clients: synthetic users, or the clients a --partition other than "
        "natural makes.",
    ),
    clients_per_round: int = typer.Option(
        3,
        "--clients-per-round",
        "--cohort",
        min=1,
        help="Clients sampled per round (under --dp-mode user the expected cohort: each "
        "client is drawn with probability cohort / clients).",
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
    data: Path | None = typer.Option(
        None,
        "--data",
        help='JSONL ({"client_id", "text"} lines), a .json/.csv/.parquet/.arrow file or a '
        "save_to_disk directory with a text column.",
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Refuse --data records whose text is empty or whitespace (default: skip them "
        "and say how many per client).",
    ),
    partition: str | None = typer.Option(
        None,
        "--partition",
        help="How records become clients: SCHEME[:KEY=VALUE,...] with SCHEME natural, iid, "
        "dirichlet, shard, pathological, linear, square, exponential or size, e.g. "
        "dirichlet:alpha=0.3,by=label or size:sizes=400/100/50 (default: natural, one "
        "client per client_id or synthetic user). Every scheme but natural and size makes "
        "--clients clients.",
    ),
    base_model: Path | None = typer.Option(
        None, "--base-model", help="Base model directory (default: the cached tiny base)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same run."),
    out: Path = typer.Option(Path("runs/simulate"), "--out", help="Output directory."),
    local_steps: int | None = typer.Option(
        None,
        "--local-steps",
        min=1,
        help="Optimizer steps per client per round (default: 8 under record-level DP, else 10).",
    ),
    lora_rank: int | None = typer.Option(
        None, "--lora-rank", min=1, help="LoRA rank (default: 8); the upload grows with it."
    ),
    lora_head: bool | None = typer.Option(
        None,
        "--lora-head/--no-lora-head",
        help="LoRA on the output head as well as every linear projection (default: on "
        "under record-level DP, where it gains the most).",
    ),
    lora_ranks: str | None = typer.Option(
        None,
        "--lora-ranks",
        help="Ranks phones may train, e.g. 4,8,16: each phone trains the largest its "
        "training memory fits; the global adapter has the largest (replaces --lora-rank).",
    ),
    memory_tiers: str | None = typer.Option(
        None,
        "--client-memory-tiers",
        help="Training memory budgets of the phones in MiB, e.g. 40,48,64: phone i gets "
        "tier i mod k (default: no budget, so every phone trains the largest rank).",
    ),
    strategy: str = typer.Option(
        "fedavg",
        "--strategy",
        help="fedavg | fedavgm | fedadam | fedyogi (server optimizers, applied to the "
        "noised update under user-level DP) | fedprox (phones add (mu/2)·||w - w_global||²).",
    ),
    server_lr: float | None = typer.Option(
        None,
        "--server-lr",
        help="Server learning rate of fedavgm/fedadam/fedyogi (default 1.0 / 0.01 / 0.01).",
    ),
    server_momentum: float | None = typer.Option(
        None, "--server-momentum", help="fedavgm's momentum (default 0.9)."
    ),
    proximal_mu: float | None = typer.Option(
        None, "--proximal-mu", help="fedprox's mu (default 0.01)."
    ),
    clip_quantile: float | None = typer.Option(
        None,
        "--clip-quantile",
        help="User-level DP: adapt the clip each round so this share of updates stays "
        "unclipped (Andrew et al. 2021; e.g. 0.5); default: a fixed clip.",
    ),
    eval_clients: int = typer.Option(
        0,
        "--eval-clients",
        min=0,
        help="Training clients evaluated each round (a seeded subset; 0: all of them).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the training of the run in --out (with --no-ota)."
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        envvar="RAY_ADDRESS",
        help="Run the clients on an existing Ray cluster (HOST:PORT of its head, or auto).",
    ),
    ota: bool = typer.Option(
        True, "--ota/--no-ota", help="Ship each round to a simulated fleet (or train only)."
    ),
    devices: int = typer.Option(24, "--devices", min=1, help="Simulated phones in the fleet."),
    publish_every: int = typer.Option(
        1, "--publish-every", min=1, help="Release the global adapter every N rounds."
    ),
    fleet_mode: str = typer.Option(
        "full",
        "--fleet-mode",
        help="full: every phone health-checks and evaluates on its own runtime; light: "
        "the update protocol only, inference shared (for large fleets).",
    ),
    device_runtime: str = typer.Option(
        "mixed",
        "--device-runtime",
        help="The phones' inference runtime: llamacpp (a GGUF export of the base), nf4 "
        "(transformers + bitsandbytes), or mixed (low and mid tiers on llama.cpp, high on "
        "NF4).",
    ),
    faults: bool | None = typer.Option(
        None,
        "--faults/--no-faults",
        help="Inject faults: phones killed mid-apply, a corrupted mirror, phones on another "
        "base or far behind, and a planted bad release that fails its health check "
        "(default: on for the built-in demo, off with --data or --base-model).",
    ),
    stages: str = typer.Option(
        "auto",
        "--stages",
        help="Rollout stages in percent of the fleet, ending at 100 (auto: a first stage "
        "of about 8 phones, then 50 and 100).",
    ),
    quality_tolerance: float = typer.Option(
        0.5,
        "--quality-tolerance",
        min=0.0,
        help="Quality gate of every rollout: a stage pauses (reason quality) when its "
        "phones report a mean golden-prompt loss above (1 + this) x the replaced "
        "adapter's (ADR 0014).",
    ),
    server: str | None = typer.Option(
        None,
        "--server",
        help="A running OTA server URL (default: an embedded one on 127.0.0.1). Its keys "
        "come from FEDOTA_PUBLISHER_KEY, FEDOTA_OPERATOR_KEY, FEDOTA_ENROLLMENT_SECRET.",
    ),
    keys: Path | None = typer.Option(
        None, "--keys", help="Release keys directory (default: OUT/ota/keys, created)."
    ),
) -> None:
    """Federated LoRA fine-tuning of the NF4 base on simulated phones, each round shipped
    to a fleet through the OTA server; writes OUT/summary.json and OUT/report.md."""
    from simulation.config_file import option_help, options_toml, recorded_options
    from simulation.data import parse_partition_spec
    from simulation.errors import SimulationInputError
    from simulation.federated import FederatedConfig, describe_resume

    options = recorded_options(ctx)  # flags over --config over defaults; OUT/config.toml
    if print_config:
        typer.echo(options_toml(options, "simulate", option_help(ctx.command)), nl=False)
        return

    if dp_mode not in ("record", "user"):
        raise SimulationInputError(f"--dp-mode {dp_mode!r} is not one of: record, user")
    _quiet_flower()
    cfg = FederatedConfig(
        out_dir=out,
        num_clients=clients,
        clients_per_round=clients_per_round,
        rounds=rounds,
        dp_mode=dp_mode if dp else "none",
        target_epsilon=target_epsilon,
        aggregation=aggregation,
        data_file=data,
        strict_data=strict,
        partition=parse_partition_spec(partition) if partition is not None else None,
        base_model=base_model,
        seed=seed,
        cache_dir=default_cache_dir(),
        local_steps=local_steps,
        lora_rank=lora_rank,
        lora_head=lora_head,
        ray_address=ray_address,
        resume=resume,
        options=options,
        extra=_strategy_keys(strategy, server_lr, server_momentum, proximal_mu, clip_quantile)
        | ({"eval-max-clients": eval_clients} if eval_clients else {})
        | ({"lora-ranks": lora_ranks} if lora_ranks else {})
        | ({"client-memory-tiers-mib": memory_tiers} if memory_tiers else {}),
    )
    fleet = (
        _fleet_config(
            devices,
            rounds,
            publish_every,
            fleet_mode,
            stages,
            quality_tolerance=quality_tolerance,
            faults=faults_default(faults, data=data, base_model=base_model),
            seed=seed,
            device_runtime=device_runtime,
        )
        if ota
        else None
    )
    endpoint = _endpoint(server) if ota and server else None
    if endpoint is not None and keys is None:
        raise SimulationInputError(
            "--server needs --keys DIR: the release keys whose root.json the server trusts"
        )

    if cfg.base_model is None:  # the cached tiny base; built with a progress bar on first use
        cfg = dataclasses.replace(cfg, base_model=_default_base(seed))
    if not ota and (resumed := describe_resume(cfg)):  # with OTA, --resume is refused
        typer.echo(resumed, err=True)

    result = _simulate_with_progress(cfg, fleet, endpoint, keys)
    if result.report is None:
        typer.echo(f"{_training_line(result.summary.data)}; summary in {result.summary.path}")
        return
    _print_final_table(result.summary.data)
    typer.echo(f"summary in {result.summary.path}; report in {result.report}")


def _strategy_keys(
    strategy: str,
    server_lr: float | None,
    server_momentum: float | None,
    proximal_mu: float | None,
    clip_quantile: float | None,
) -> dict[str, object]:
    """The run-config keys of the strategy options that were given (none: defaults)."""
    keys = {
        "strategy": None if strategy == "fedavg" else strategy,
        "server-learning-rate": server_lr,
        "server-momentum": server_momentum,
        "proximal-mu": proximal_mu,
        "user-clip-quantile": clip_quantile,
    }
    return {k: v for k, v in keys.items() if v is not None}


def _quiet_flower() -> None:
    """Keep Flower's own logging out of ours, unless ``fedota -v`` asked for everything."""
    import logging

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # Flower logs at DEBUG through its own handler.
        logging.getLogger("flwr").propagate = False
        # Flower 1.41 deprecates its Python `run_simulation` entry point in favour of
        # `flwr run`; fedota keeps it because the OTA half hooks into the ServerApp in
        # this process (ADR 0008). The notice is not actionable for a user of fedota.
        logging.getLogger("flwr").addFilter(lambda record: "run_simulation" not in str(record.args))


def _simulate_with_progress(
    cfg: FederatedConfig, fleet: FleetConfig | None, endpoint: Endpoint | None, keys: Path | None
) -> EndToEndResult:
    """``simulate_end_to_end`` under a status line, one line per round (and its release)."""
    from rich.console import Console

    from simulation.pipeline import simulate_end_to_end

    console = Console(stderr=True)

    def on_round(result: RoundResult, ota_round: RoundOta | None) -> None:
        console.print(_round_line(result, cfg.rounds))
        if ota_round is not None and ota_round.releases:
            console.print("  " + _ota_line(ota_round))

    what = "federated training (Ray simulation)"
    what += f" → OTA fleet of {fleet.devices}" if fleet is not None else ""
    with console.status(what + "…"):
        return simulate_end_to_end(cfg, fleet, server=endpoint, keys_dir=keys, on_round=on_round)


def faults_default(flag: bool | None, *, data: Path | None, base_model: Path | None) -> bool:
    """Whether to inject faults: as ``--faults/--no-faults`` says, else only in the
    built-in demo (a user's own data or base gets a run without planted faults)."""
    if flag is not None:
        return flag
    return data is None and base_model is None


def _default_base(seed: int) -> Path:
    """The cached tiny base for ``seed``, pretrained (a few minutes) when missing."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from simulation.base_model import PRESETS, ensure_base_model

    with Progress(
        TextColumn("building the tiny base model (once; cached)"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("pretrain", total=PRESETS["tiny"].steps, loss="")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=f"loss {loss:.3f}")

        return ensure_base_model(default_cache_dir(), preset="tiny", seed=seed, on_step=on_step)


def _fleet_config(
    devices: int,
    rounds: int,
    publish_every: int,
    mode: str,
    stages: str,
    *,
    quality_tolerance: float = 0.5,
    faults: bool,
    seed: int,
    device_runtime: str = "mixed",
) -> FleetConfig:
    from simulation.errors import SimulationInputError
    from simulation.fleet import (
        DEFAULT_TIERS,
        FaultShares,
        FleetConfig,
        FleetMode,
        RolloutPolicy,
        auto_stages,
        with_device_runtime,
    )

    try:
        fleet_mode = FleetMode(mode)
    except ValueError:
        raise SimulationInputError(
            f"--fleet-mode {mode!r} is not one of: {', '.join(FleetMode)}"
        ) from None
    try:
        percents = auto_stages(devices) if stages == "auto" else _percents(stages)
    except ValueError:
        raise SimulationInputError(
            f"--stages {stages!r} is not a comma-separated list of percents, e.g. 10,50,100"
        ) from None
    # The bad release needs a good one before it: the second published round.
    bad_round = 2 * publish_every if 2 * publish_every <= rounds else None
    shares = FaultShares(bad_release_round=bad_round) if faults else FaultShares(0, 0, 0, 0, None)
    return FleetConfig(
        devices=devices,
        tiers=with_device_runtime(DEFAULT_TIERS, device_runtime),
        faults=shares,
        rollout=RolloutPolicy(percents, quality_tolerance=quality_tolerance),
        lightweight=fleet_mode == FleetMode.LIGHT,
        publish_every=publish_every,
        seed=seed,
    )


def _percents(stages: str) -> tuple[int, ...]:
    return tuple(int(p) for p in stages.split(","))


def _endpoint(url: str) -> Endpoint:
    from simulation.errors import SimulationInputError
    from simulation.fleet import Endpoint

    names = ("FEDOTA_PUBLISHER_KEY", "FEDOTA_OPERATOR_KEY", "FEDOTA_ENROLLMENT_SECRET")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise SimulationInputError(
            f"--server {url} needs the secrets in {', '.join(missing)} (set them in the "
            "environment; they are never taken from the command line)"
        )
    return Endpoint(url.rstrip("/"), *(os.environ[n] for n in names))


def _training_line(summary: Summary) -> str:
    """The run's result in one line (without a fleet: there is no report)."""
    base, final, priv = summary.baseline, summary.final, summary.privacy
    return (
        f"accuracy {base.eval_accuracy:.4f} → {final.eval_accuracy:.4f}, loss "
        f"{base.eval_loss:.4f} → {final.eval_loss:.4f}; privacy {priv.mode}"
        + (f" ε={priv.epsilon:.3g} δ={priv.delta:g}" if priv.epsilon else "")
    )


def _round_line(result: RoundResult, rounds: int) -> str:
    r = result.round
    ev, tr = result.evaluate, result.train
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
    return line


def _ota_line(ota_round: RoundOta) -> str:
    from simulation.fleet import planted_release

    releases = ", ".join(f"v{v}" for v in ota_round.releases)
    parts = [f"released {releases}", f"bundle {ota_round.bundle_bytes:,} B"]
    planted = ota_round.planted
    parts += [
        f"{planted_release(v)}, auto-paused and replaced by the last good adapter" for v in planted
    ]
    if ota_round.paused and not planted:
        parts.append("a rollout was paused")
    parts.append(f"{100 * ota_round.adoption:.0f}% of healthy phones on the latest good")
    return "OTA: " + "; ".join(parts)


def _print_final_table(summary: Summary) -> None:
    from rich.console import Console
    from rich.table import Table

    from simulation.report import final_table

    table = Table(title="fedota simulate", show_header=False)
    for key, value in final_table(summary.to_dict()):
        table.add_row(key, value)
    Console().print(table)


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
    lora_head: bool = typer.Option(
        None, "--lora-head/--no-lora-head", help="Was the output head adapted too?"
    ),
) -> None:
    """Write the newest global adapter of RUN, with FFA's frozen A rebuilt, as a PEFT
    adapter directory for `fedota package --new`."""
    from protocol import LoraShape
    from simulation.export import (
        export_adapter,
        global_adapts_head,
        latest_global,
        lora_shape_of_run,
    )

    global_path, _ = latest_global(run)
    if None in (rank, seed, ffa):
        known = lora_shape_of_run(run)
        rank = known.rank if rank is None else rank
        seed = known.init_seed if seed is None else seed
        ffa = known.ffa if ffa is None else ffa
        alpha = known.alpha if alpha is None else alpha
        lora_head = known.adapt_head if lora_head is None else lora_head
    if lora_head is None:  # a checkpoint dir has no summary: the tensors tell
        lora_head = global_adapts_head(global_path)
    shape = LoraShape(
        rank=rank,
        alpha=float(alpha if alpha is not None else 2 * rank),
        init_seed=seed,
        ffa=bool(ffa),
        adapt_head=bool(lora_head),
    )
    result = export_adapter(global_path, base_model, out, shape)
    typer.echo(
        f"adapter from {global_path} (round {result.round}) written to {out}: "
        f"{result.num_tensors} tensors, rank {shape.rank}, alpha {shape.alpha:g}, "
        f"{'FFA' if shape.ffa else 'fedavg'}{', output head too' if shape.adapt_head else ''}"
    )


def register(app: typer.Typer) -> None:
    """Mount this package's commands on the root ``fedota`` app."""
    app.add_typer(base_model_app, name="base-model")
    app.add_typer(adapter_app, name="adapter")
    from simulation import compare, data_cli

    data_cli.register(app)
    compare.register(app)
    app.command("simulate")(simulate)
