"""Options of the stages: fields that document and bound themselves, and the files that set them.

Each stage has one config dataclass (``TokenizeConfig``, ``HarvestConfig``, ``AggregateConfig``,
``TrainConfig``) whose fields are declared with :func:`option`: the default, the help text and
the bounds live there once; the dataclass enforces the bounds (:func:`check_bounds`) and the
command line reads all three to build its flags.

A config file (TOML; YAML for ``.yaml``/``.yml``; JSON for ``.json``) holds either one command's
options at top level or one table per command (``[tokenize]``, ``[aggregate]``, ``[train]`` …);
a file with tables may hold tables for other commands too, so one file can serve a whole
pipeline. Keys are option names with ``-`` or ``_``. Unknown keys are refused, naming the key
and the options that exist. Relative paths in a file are relative to the working directory, as
on the command line. This module knows nothing of the command-line library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file that cannot be used (the command line reports it as a usage error)."""


# ----------------------------------------------------------------------------- config fields


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    why: str = "",
    path: bool = False,
) -> Any:
    """A stage-config field with its help text and bounds (``min``/``max`` inclusive; a None
    value is never out of bounds; ``why`` explains them in the refusal). ``path``: the value
    names a file or directory."""
    metadata = {"help": help, "min": min, "max": max, "why": why, "path": path}
    return dataclasses.field(default=default, metadata=metadata)


def check_bounds(config: Any) -> None:
    """Refuse a field of ``config`` outside the bounds its :func:`option` declares."""
    for f in dataclasses.fields(config):
        low, high = f.metadata.get("min"), f.metadata.get("max")
        value = getattr(config, f.name)
        if value is None or (low is None and high is None) or (
            (low is None or value >= low) and (high is None or value <= high)
            and not (isinstance(value, float) and math.isinf(value))  # bounded: finite
        ):
            continue
        why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
        finite = "a finite number " if isinstance(value, float) and math.isinf(value) else ""
        raise ValueError(f"{f.name} must be {finite}{_bounds_text(low, high)}{why}, got {value}")


def changed_options(config: Any) -> set[str]:
    """The fields of the dataclass ``config`` that differ from their declared defaults (what a
    user set): the one test of "given" behind every refusal of an option a run would ignore."""
    changed = set()
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if getattr(config, f.name) != default:
            changed.add(f.name)
    return changed


def _bounds_text(low: float | None, high: float | None) -> str:
    """``≥ low``, ``≤ high`` or ``in [low, high]``."""
    if high is None:
        return f"≥ {low}"
    return f"≤ {high}" if low is None else f"in [{low}, {high}]"


# ------------------------------------------------------------------------------- config files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The file's top-level table: TOML, or YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    suffix = path.suffix.lower()
    kind = "YAML" if suffix in (".yaml", ".yml") else "JSON" if suffix == ".json" else "TOML"
    try:
        if kind == "YAML":
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {kind}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of options")
    return data


def command_defaults(
    data: dict[str, Any],
    command: str,
    options: Mapping[str, str],
    source: str,
    sections: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The values a config file gives the options of ``command``, keyed by parameter name.

    ``options`` maps every accepted key (an option's names with ``_`` for ``-``) to its
    parameter name; ``sections``: the names of all commands, whose tables are skipped in a
    file shared by several commands.
    """
    if command in data:
        section = data[command]
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: [{command}] must be a table of options")
        stray = [k for k in data if k not in sections and k != command]
        if stray:
            raise ConfigError(
                f"{source}: keys {stray} sit outside any command's table; "
                f"move them into [{command}]"
            )
    else:
        section = data
    out: dict[str, Any] = {}
    for key, value in section.items():
        if section is data and key in sections and isinstance(value, dict):
            continue  # another command's table
        name = options.get(str(key).replace("-", "_"))
        if name is None:
            raise ConfigError(
                f"{source}: unknown key {key!r} for `mtkd {command}` "
                f"(known: {', '.join(sorted(options))})"
            )
        out[name] = value
    return out
