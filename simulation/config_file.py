"""``fedota simulate --config FILE.toml``: every option of a command, read from a file.

Stage: the edge (CLI), before any run starts. The file is parsed once, here, into the
values the command's options would have had; the command then builds its typed config
from them as it does from flags (docs/adr/0015-config-files-and-run-tracking.md).

Invariants:

* **Generic over the command.** The keys are the command's own long option names
  without ``--`` (``clients-per-round``; ``dp`` for ``--dp/--no-dp``), read from the
  click command, so an option someone adds to the command is a key at once. Only the
  options about the invocation itself are not keys: ``--config`` and
  ``--print-config`` (``META``).
* **Precedence is click's.** The file fills ``ctx.default_map``: a flag given on the
  command line wins, then an option's environment variable, then the file, then the
  option's default (``click.core.ParameterSource``).
* **Values are checked like flags,** by the option's own click type (ranges, choices),
  and must have the TOML type of the option (``true``, ``3``, ``0.5``, ``"text"``); a
  bad value or an unknown key is one line naming the file, the key and what to do.
* **Relative paths in a file are relative to the file.** Recorded paths are absolute,
  so ``OUT/config.toml`` reproduces a run from any working directory.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import click

from protocol import atomic_write_text
from simulation.errors import SimulationInputError

__all__ = [
    "CONFIG_FILE",
    "META",
    "NOT_RECORDED",
    "apply_config_file",
    "option_help",
    "option_keys",
    "options_toml",
    "recorded_options",
    "write_config_file",
]

CONFIG_FILE = "config.toml"  # written into OUT by every run started from the CLI
META = frozenset({"config", "print_config"})  # about the invocation: never a file key
# Keys a file may set but the record leaves out: they say how this invocation treats an
# existing OUT, not what the run is (a rerun from OUT/config.toml starts afresh).
NOT_RECORDED = frozenset({"resume"})


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """The config-file keys of ``command``, in its option order: long name → option."""
    keys: dict[str, click.Option] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in META:
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        keys[(longs[0] if longs else param.opts[0]).lstrip("-")] = param
    return keys


def apply_config_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Any:
    """Click callback of an eager ``--config`` option: the file becomes the defaults.

    Raises:
        SimulationInputError: the file is missing or not TOML, a key is not an option
            of the command, or a value does not fit its option.
    """
    if value is None or ctx.resilient_parsing:
        return value
    path = Path(value)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimulationInputError(
            f"--config {path}: no such file; write one with `fedota simulate --print-config`"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SimulationInputError(f"--config {path}: cannot be read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise SimulationInputError(f"--config {path}: not valid TOML ({e}); fix the file") from e
    keys = option_keys(ctx.command)
    defaults = dict(ctx.default_map or {})
    for key, raw in data.items():
        option = keys.get(key)
        if option is None or option.name is None:
            raise SimulationInputError(_unknown(path, key, keys))
        defaults[option.name] = _file_value(ctx, path, key, option, raw)
    ctx.default_map = defaults
    return value


def _unknown(path: Path, key: str, keys: Mapping[str, click.Option]) -> str:
    valid = list(keys)
    closest = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f" (did you mean {closest[0]!r}?)" if closest else ""
    return (
        f"--config {path}: unknown key {key!r}{hint}; the keys are the options of "
        "`fedota simulate --help` without their dashes (`--print-config` lists them all)"
    )


def _file_value(ctx: click.Context, path: Path, key: str, option: click.Option, raw: Any) -> Any:
    """``raw`` checked against ``option`` (TOML type, then the option's own checks)."""
    where = f"--config {path}: {key} = {raw!r}"
    if isinstance(raw, dict):
        raise SimulationInputError(f"{where} is a table; keys are flat: write `{key} = VALUE`")
    if isinstance(raw, list) and not option.multiple:
        raise SimulationInputError(f"{where} is a list; {key} takes one value")
    for item in raw if isinstance(raw, list) else [raw]:
        expected = _toml_type(option.type)
        if not _has_toml_type(item, expected):
            raise SimulationInputError(f"{where} is not {expected}; write it as such")
    if isinstance(option.type, click.Path):
        raw = (
            [_relative_to(path, v) for v in raw]
            if isinstance(raw, list)
            else _relative_to(path, raw)
        )
    try:
        option.type_cast_value(ctx, raw)
    except click.BadParameter as e:
        raise SimulationInputError(
            f"{where}: {e.message.rstrip('.')}; fix it in the file"
        ) from None
    return raw


def _toml_type(kind: click.ParamType) -> str:
    if isinstance(kind, click.types.BoolParamType):
        return "a boolean (true or false)"
    if isinstance(kind, click.types.IntParamType):
        return "a whole number"
    if isinstance(kind, click.types.FloatParamType):
        return "a number"
    return "a string (in quotes)"


def _has_toml_type(value: Any, expected: str) -> bool:
    if expected.startswith("a boolean"):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if expected == "a whole number":
        return isinstance(value, int)
    if expected == "a number":
        return isinstance(value, int | float)
    return isinstance(value, str)


def _relative_to(config: Path, value: str) -> str:
    """A path of the file, relative to the file's directory unless absolute."""
    p = Path(value)
    return str(p if p.is_absolute() else config.parent / p)


def recorded_options(ctx: click.Context) -> dict[str, Any]:
    """Every option of the running command as resolved (flags, file, environment,
    defaults), keyed like the file, as JSON values: what the run records.

    Paths are absolute; ``None`` means unset (the option's own default applies).
    """
    out: dict[str, Any] = {}
    for key, option in option_keys(ctx.command).items():
        if option.name in NOT_RECORDED or option.name not in ctx.params:
            continue
        out[key] = _plain(ctx.params[option.name], is_path=isinstance(option.type, click.Path))
    return out


def _plain(value: Any, *, is_path: bool) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v, is_path=is_path) for v in value]
    if isinstance(value, Path) or (is_path and isinstance(value, str)):
        return os.path.abspath(value)
    if isinstance(value, Enum):
        return value.value
    return value


def option_help(command: click.Command) -> dict[str, str]:
    """Each key's help text, on one line (for the comments of an unset key)."""
    return {k: " ".join((o.help or "").split()) for k, o in option_keys(command).items()}


def options_toml(
    options: Mapping[str, Any], command_name: str, helps: Mapping[str, str] | None = None
) -> str:
    """``options`` as a TOML file that ``--config`` reads back to the same options.

    Unset options (``None``; TOML has no null) are written as comments, with their help
    from ``helps`` where given.
    """
    import tomli_w

    lines = [
        f"# fedota {command_name} --config FILE: the options of a run (`--help` says each).",
        "# Flags given on the command line override these values; relative paths are",
        "# relative to this file. Commented keys are unset: their default applies.",
        "",
    ]
    for key, value in options.items():
        if value is None:
            lines.append(f"# {key} =   (unset) {(helps or {}).get(key, '')}".rstrip())
        else:
            lines.append(tomli_w.dumps({key: value}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_config_file(out_dir: Path, options: Mapping[str, Any], command_name: str) -> Path:
    """Write ``out_dir/config.toml`` atomically: ``fedota COMMAND --config`` of it
    reproduces the run (given another ``--out``).

    Raises:
        OSError: the directory cannot be written.
    """
    path = out_dir / CONFIG_FILE
    atomic_write_text(path, options_toml(options, command_name))
    return path
