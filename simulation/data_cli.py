"""``fedota data``: write per-phone data partitions for a deployment (SuperNodes).

In simulation the partitions live in memory; on Flower's deployment engine each
SuperNode reads its own file, named by the ``data-file`` node-config key. This command
writes those files (``partition-<i>.json``, the format of
:func:`simulation.data.write_partitions`) and, with ``--golden N``, a ``golden.json``
list of held-out texts for ``fedota device enroll --golden``. The golden texts come
from held-out text only, never from a training partition.

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
        None, "--data", help='JSONL: {"client_id", "text"} lines (default: synthetic).'
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
            or too few held-out texts for ``--golden``.
    """
    from simulation.data import (
        FederatedData,
        JsonlOptions,
        SyntheticConfig,
        describe_skipped,
        generate_synthetic,
        load_jsonl,
        write_partitions,
    )
    from simulation.errors import SimulationInputError

    if data is not None:
        loaded = load_jsonl(data, JsonlOptions(seed=seed, strict=strict))
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
        fed = generate_synthetic(
            SyntheticConfig(
                num_clients=clients,
                num_heldout_clients=1,
                seed=seed,
                min_texts=min(12, max_texts),
                max_texts=max_texts,
            )
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
