"""``fedota`` subcommands owned by ``simulation``. Heavy imports stay inside the commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Mount this package's commands on the root ``fedota`` app."""
