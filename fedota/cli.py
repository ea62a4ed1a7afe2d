"""Root of the ``fedota`` CLI.

Exit codes (shared by every subcommand unless its help says otherwise):

* 0 — success
* 1 — internal error (a bug: please report it with the traceback)
* 2 — bad input or usage: the message says what was wrong and what to do
* 3 — rejected: something was refused for safety (bad signature, wrong base, budget)
* 4 — transient failure: network or server trouble; trying again later may work

Domain errors carry an ``exit_code`` attribute; any exception that has one is printed as
a single ``error: ...`` line instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

app = typer.Typer(
    name="fedota",
    help="Federated 4-bit LoRA fine-tuning with DP, shipped as signed OTA delta bundles.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # Library chatter (weight-loading progress bars, deprecation notices of our
        # pinned dependencies) hides the command's own output; -v shows all of it. Set
        # in the environment so that child processes (Ray workers) inherit it too.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _register_all() -> None:
    # Each package's cli module keeps heavy imports (torch, transformers, flwr) inside
    # its commands, so `fedota --help` stays fast.
    from client import cli as client_cli
    from delta_packager import cli as packager_cli
    from server import cli as server_cli
    from simulation import cli as simulation_cli

    for module in (simulation_cli, packager_cli, server_cli, client_cli):
        module.register(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # domain errors become one line; anything else is a bug
        code = getattr(exc, "exit_code", None)
        if not isinstance(code, int):
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
