"""Config files (TOML or YAML) as defaults for a command's flags; flags given override them.

A file holds either the command's options at top level or one table per command
(``[tokenize]``, ``[aggregate]``, ``[train]`` …); a file with tables may hold tables for other
commands too, so one file can serve a whole pipeline. Keys are option names with ``-`` or ``_``.
Unknown keys are refused, naming the key and the options that exist. Relative paths in a file
are relative to the working directory, as on the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(typer.BadParameter):
    """A config file that cannot be used; printed as a usage error (exit code 2).

    Derived from typer's ``BadParameter`` (click's, or the copy of click that newer typer
    vendors), so the command line reports it as a usage error rather than a traceback.
    """


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The file's top-level table; TOML unless the suffix is ``.yaml``/``.yml``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = (yaml.safe_load(text) or {}) if is_yaml else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'YAML' if is_yaml else 'TOML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of options")
    return data


def command_defaults(data: dict[str, Any], command: Any, source: str,
                     sections: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The options of ``command`` (a click command) from a config file, keyed by parameter name.

    ``sections``: names of the app's commands; their tables are skipped in a file shared by
    several commands.
    """
    name = command.name
    params = {p.name for p in command.params if p.name and p.name != "config"}
    if name and name in data:
        section = data[name]
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of options")
        stray = [k for k in data if k not in sections and k != name]
        if stray:
            raise ConfigError(f"{source}: keys {stray} sit outside any command's table; "
                              f"move them into [{name}]")
    else:
        section = data
    out: dict[str, Any] = {}
    for key, value in section.items():
        option = str(key).replace("-", "_")
        if section is data and key in sections and isinstance(value, dict):
            continue  # another command's table
        if option not in params:
            raise ConfigError(
                f"{source}: unknown key {key!r} for `mtkd {name}` "
                f"(known: {', '.join(sorted(params))})"
            )
        out[option] = value
    return out


def apply_config(ctx: typer.Context, _param: typer.CallbackParam,
                 value: str | None) -> str | None:
    """Eager callback of ``--config``: install the file's values as the command's defaults."""
    if value is None:
        return None
    group = ctx.parent.command if ctx.parent is not None else None
    sections = frozenset(getattr(group, "commands", {}) or {})
    defaults = command_defaults(read_config_file(value), ctx.command, str(value), sections)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value
