"""Config files (TOML or YAML) as defaults for a command's flags; flags given override them.

A file holds either the command's options at top level or one table per command
(``[aggregate]``, ``[train]`` …). Keys are option names with ``-`` or ``_``. Unknown keys are
refused, naming the key and the options that exist.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click
import yaml


class ConfigError(click.BadParameter):
    """A config file that cannot be used; click prints it as a usage error (exit code 2)."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of options")
    return data


def command_defaults(data: dict[str, Any], command: click.Command, source: str,
                     sections: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The options of ``command`` from a config file, keyed by parameter name.

    ``sections``: names of other commands' tables, skipped in a file shared by several commands.
    """
    section = data.get(command.name, data) if command.name else data
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [{command.name}] must be a table")
    params = {p.name: p for p in command.params if p.name and p.name != "config"}
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if name not in params and key in sections:
            continue
        if name not in params:
            raise ConfigError(
                f"{source}: unknown key {key!r} for `mtkd {command.name}` "
                f"(known: {', '.join(sorted(params))})"
            )
        out[name] = value
    return out


def apply_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager callback of ``--config``: install the file's values as the command's defaults."""
    if value is None:
        return None
    group = ctx.parent.command if ctx.parent is not None else None
    sections = frozenset(getattr(group, "commands", {}))
    defaults = command_defaults(read_config_file(value), ctx.command, value, sections)
    ctx.default_map = (ctx.default_map or {}) | defaults
    return value
