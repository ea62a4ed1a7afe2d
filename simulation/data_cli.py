"""``fedota data``: write per-phone data partitions for a deployment (SuperNodes).

In simulation the partitions live in memory; on Flower's deployment engine each
SuperNode reads its own file, named by the ``data-file`` node-config key. This command
writes those files (``partition-<i>.json``, the format of
:func:`simulation.data.write_partitions`) and, with ``--golden N``, a ``golden.json``
list of held-out texts for ``fedota device enroll --golden``. The golden texts come
from held-out text only, never from a training partition. ``--partition`` splits the
records as ``fedota simulate --partition`` does (``simulation.data.partitioners``).

Invariant: the same arguments write byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["data_app", "register"]

data_app = typer.Typer(help="Per-phone data partitions for a deployment.", no_args_is_help=True)


@data_app.command("partition")
def partition(
    out: Path = typer.Option(..., "--out", help="Directory for partition-<i>.json files."),
    clients: int = typer.Option(3, "--clients", min=1, help="Training partitions (phones)."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help='JSONL ({"client_id", "text"} lines), a .json/.csv/.parquet/.arrow file or a '
        "save_to_disk directory with a text column (default: synthetic).",
    ),
    partition: str | None = typer.Option(
        None,
        "--partition",
        help="How records become phones: SCHEME[:KEY=VALUE,...], e.g. iid, "
        "dirichlet:alpha=0.3,by=label, shard:shards_per_client=2, exponential (default: "
        "natural, one phone per client_id or synthetic user; the others make --clients).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same files."),
    max_texts: int = typer.Option(
        200, "--max-texts", min=2, help="Most texts per synthetic phone."
    ),
    golden: int = typer.Option(
        0, "--golden", min=0, help="Also write OUT/golden.json with N held-out texts."
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Refuse --data records whose text is empty or whitespace (default: skip them "
        "and say how many per client).",
    ),
) -> None:
    """Write one partition file per phone (and optionally golden prompts) to OUT.

    \f
    Raises:
        SimulationInputError: ``--data`` holds fewer usable clients than ``--clients``,
            too few held-out texts for ``--golden``, or a bad ``--partition``.
    """
    from simulation.data import (
        NATURAL,
        FederatedData,
        JsonlOptions,
        SyntheticConfig,
        describe_skipped,
        load_data_file,
        load_synthetic,
        parse_partition_spec,
        write_partitions,
    )
    from simulation.errors import SimulationInputError

    spec = parse_partition_spec(partition) if partition is not None else NATURAL
    if data is not None:
        # A scheme that makes --clients phones writes them all: none is held out.
        held_out = JsonlOptions().heldout_clients_fraction if spec.scheme == "natural" else 0.0
        loaded = load_data_file(
            data,
            JsonlOptions(seed=seed, strict=strict, heldout_clients_fraction=held_out),
            partition=spec,
            num_clients=clients,
        )
        skipped = describe_skipped(data, loaded.meta["skipped_empty_texts"])
        if skipped:
            typer.echo(skipped, err=True)
        if len(loaded.clients) < clients:
            raise SimulationInputError(
                f"{data} has {len(loaded.clients)} usable clients, --clients asks for "
                f"{clients}; lower --clients or add data"
            )
        fed = FederatedData(
            clients=loaded.clients[:clients],
            heldout_clients=loaded.heldout_clients,
            source=loaded.source,
        )
    else:
        fed = load_synthetic(
            SyntheticConfig(
                num_clients=clients,
                num_heldout_clients=1,
                seed=seed,
                min_texts=min(12, max_texts),
                max_texts=max_texts,
            ),
            spec,
        )
    # Training partitions first: SuperNode i reads partition-<i>.json.
    write_partitions(FederatedData(clients=fed.clients, source=fed.source), out)
    summary = f"wrote {len(fed.clients)} partitions to {out}"
    if golden:
        pool = [t for c in fed.heldout_clients for t in (*c.train, *c.heldout)]
        pool += [t for c in fed.clients for t in c.heldout]
        if len(pool) < golden:
            raise SimulationInputError(
                f"only {len(pool)} held-out texts for --golden {golden}; ask for fewer"
            )
        (out / "golden.json").write_text(json.dumps(pool[:golden], indent=1), encoding="utf-8")
        summary += f" and {golden} golden prompts to {out / 'golden.json'}"
    typer.echo(summary)


def register(app: typer.Typer) -> None:
    """Mount ``fedota data`` on the root ``fedota`` app."""
    app.add_typer(data_app, name="data")
