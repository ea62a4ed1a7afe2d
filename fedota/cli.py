"""Root of the ``fedota`` CLI.

Exit codes (shared by every subcommand unless its help says otherwise):

* 0 — success
* 1 — internal error (a bug: please report it with the traceback)
* 2 — bad input or usage: the message says what was wrong and what to do; also a
  command whose pip extra is not installed (``fedota serve`` in a device-only install)
* 3 — rejected: something was refused for safety (bad signature, wrong base, budget)
* 4 — transient failure: network or server trouble; trying again later may work

Domain errors carry an ``exit_code`` attribute; any exception that has one is printed as
a single ``error: ...`` line instead of a traceback.

Install profiles (pyproject.toml): the core install is what a device needs (``fedota
device ...``, ``fedota package|bundle|keys``); the server and simulation commands need
their extras. Each package's commands are registered as a group (``COMMAND_GROUPS``); a
group whose extra is missing is still listed, but each of its commands only prints which
extra to install and exits 2, so a device-only install starts without a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click
import typer

__all__ = ["COMMAND_GROUPS", "EXTRA_MODULES", "CommandGroup", "app", "extra_providing", "main"]

EXIT_USAGE = 2

_SERVER = (
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "pydantic",
    "pydantic_settings",
    "prometheus_client",
    "psycopg",
)
_TRAIN = (
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "bitsandbytes",
    "peft",
    "opacus",
    "dp_accounting",
    "flwr",
)

# extra -> the top-level modules an install with that extra can import (an extra's own
# packages and those of the extras it includes; pyproject.toml's
# [project.optional-dependencies] is the source, keep the two in step).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "device": ("llama_cpp", "gguf"),
    "server": _SERVER,
    "train": _TRAIN,
    "sim": (
        *_TRAIN,
        *_SERVER,
        "ray",
        "matplotlib",
        "tensorboard",
        "tomli_w",
        "flwr_datasets",
        "datasets",
    ),
}


@dataclass(frozen=True)
class CommandGroup:
    """One package's ``fedota`` commands and the pip extra they need.

    Attributes:
        module: The package's CLI module; its ``register(app)`` mounts the commands. It
            must import nothing beyond the core install at module level.
        extra: The extra every command of the group needs (``None``: the core install).
    """

    module: str
    extra: str | None = None

    def missing(self) -> str | None:
        """The first module of ``extra`` that cannot be imported here, else ``None``.

        Looked up with ``importlib.util.find_spec``, which imports nothing.
        """
        for name in EXTRA_MODULES.get(self.extra or "", ()):
            if importlib.util.find_spec(name) is None:
                return name
        return None


# In the order `fedota --help` lists them.
COMMAND_GROUPS: tuple[CommandGroup, ...] = (
    CommandGroup("simulation.cli", extra="sim"),
    CommandGroup("delta_packager.cli"),
    CommandGroup("server.cli", extra="server"),
    CommandGroup("client.cli"),
)


def extra_providing(module: str | None) -> str | None:
    """The smallest extra that installs top-level ``module`` (``None``: none of them)."""
    top = (module or "").partition(".")[0]
    return next((extra for extra, names in EXTRA_MODULES.items() if top in names), None)


def _needs_extra_message(command: str, extra: str, missing: str) -> str:
    return (
        f"error: '{command}' needs the {extra} extra ({missing} is not installed): "
        f"pip install 'fedota[{extra}]'"
    )


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


def _unavailable(command: str, extra: str, missing: str) -> Callable[[], None]:
    def needs_extra() -> None:
        typer.echo(_needs_extra_message(command, extra, missing), err=True)
        raise typer.Exit(EXIT_USAGE)

    return needs_extra


def _register_unavailable(
    register: Callable[[typer.Typer], None], extra: str, missing: str
) -> None:
    """Mount a stand-in for each top-level command ``register`` would mount.

    The stand-in keeps the name and help line (so ``fedota --help`` still lists it) and
    takes any arguments, ``--help`` included, only to say which extra is missing.
    """
    scratch = typer.Typer()
    register(scratch)
    for name, command in typer.main.get_group(scratch).commands.items():
        first = (command.short_help or command.help or "").strip().split("\n\n")[0]
        short = " ".join(first.split()).rstrip(".")
        app.command(
            name,
            help=f"{short} (needs the {extra} extra).",
            add_help_option=False,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        )(_unavailable(f"fedota {name}", extra, missing))


def _register_all() -> None:
    # Each package's cli module keeps heavy imports (torch, transformers, flwr, fastapi)
    # inside its commands, so `fedota --help` stays fast and starts in a device install.
    for group in COMMAND_GROUPS:
        register = importlib.import_module(group.module).register
        missing = group.missing()
        if group.extra is None or missing is None:
            register(app)
        else:
            _register_unavailable(register, group.extra, missing)


def _command_path(argv: Sequence[str]) -> str:
    """``fedota`` plus the subcommand names at the head of ``argv`` (for messages)."""
    command: click.Command = typer.main.get_command(app)
    path = ["fedota"]
    for arg in argv:
        if arg.startswith("-"):
            continue  # the groups take flags only, so every value is a command name
        if not isinstance(command, click.Group) or arg not in command.commands:
            break
        path.append(arg)
        command = command.commands[arg]
    return " ".join(path)


_register_all()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as exc:  # a command reached a package of a missing extra
        extra = extra_providing(exc.name)
        if extra is None:
            raise
        missing = (exc.name or "").partition(".")[0]
        typer.echo(_needs_extra_message(_command_path(sys.argv[1:]), extra, missing), err=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:  # domain errors become one line; anything else is a bug
        code = getattr(exc, "exit_code", None)
        if not isinstance(code, int):
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
