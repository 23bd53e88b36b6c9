"""Options of the stage commands, made from their config dataclasses, and the parsers and
refusals the commands share.

A stage's options are made from the fields of its config dataclass (:func:`stage_options`):
their defaults, help texts and bounds live there (:func:`mtkd.config.option`), never here.
``--config FILE`` (TOML, YAML or JSON) installs the file's values as defaults that flags
override.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from mtkd.config import ConfigError, command_defaults, read_config_file

#: The parameter of a command that receives the options made from its stage config's fields.
StageFields = dict[str, Any]
Command = Callable[..., None]
#: ``ctx.meta`` key: the parameters a config file sets to null (click would read "no default").
_NULLS = "mtkd.config_nulls"
#: ``ctx.meta`` key: the config file and, per parameter it sets, the key as written there.
_SPELLED = "mtkd.config_keys"
#: The context of the stage command running (set by :func:`stage_options`' wrapper).
_COMMAND_CONTEXT: ContextVar[typer.Context | None] = ContextVar("mtkd_command", default=None)
_CTX = "mtkd_context"  # the parameter through which typer hands a stage command its context


def stage_options(
    config_cls: type,
    *,
    skip: Collection[str] = (),
    flags: Mapping[str, tuple[str, ...]] | None = None,
) -> Callable[[Command], Command]:
    """Give a command one option per field of the dataclass ``config_cls`` but ``skip``.

    The options stand where the command's ``fields: StageFields`` parameter stands; it receives
    their values as a dict ready for ``config_cls(**fields)`` (paths as str, repeated options
    as tuples). A field's flag is ``--field-name`` unless ``flags`` gives its names.
    """
    hints = typing.get_type_hints(config_cls)
    made = [
        _field_parameter(f, hints[f.name], (flags or {}).get(f.name, ()))
        for f in dataclasses.fields(config_cls)
        if f.init and f.name not in skip
    ]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        params = [  # all keyword-only: typer passes them by name
            q.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in signature.parameters.values()
            for q in (made if p.name == "fields" else [p])
        ]
        params.append(inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=typer.Context))

        def run(**kwargs: Any) -> None:
            ctx = kwargs.pop(_CTX)
            kwargs.update(_config_nulls(ctx))
            fields = {p.name: _field_value(kwargs.pop(p.name)) for p in made}
            token = _COMMAND_CONTEXT.set(ctx)  # for given_as, while the command runs
            try:
                command(fields=fields, **kwargs)
            finally:
                _COMMAND_CONTEXT.reset(token)

        functools.update_wrapper(run, command, ("__module__", "__name__", "__doc__"), ())
        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return run

    return decorate


def _field_parameter(field: dataclasses.Field, hint: Any, names: tuple[str, ...]) -> Any:
    """The keyword parameter (typer option) of one config field."""
    meta = field.metadata
    cli_type = _cli_type(hint, meta.get("path", False))
    repeatable = typing.get_origin(cli_type) is list
    text = meta.get("help", "")
    info = typer.Option(
        *names,
        help=text.rstrip(".") + " (repeatable)." if repeatable else text,
        min=meta.get("min"),
        max=meta.get("max"),
    )
    default = field.default
    if default is dataclasses.MISSING:
        default = inspect.Parameter.empty
    elif repeatable:
        default = list(default)
    annotation = Annotated[cli_type, info]  # type: ignore[valid-type]
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def _cli_type(hint: Any, path: bool) -> Any:
    """A field's type as typer parses it: paths as Path, Literal as str, ``tuple[X, ...]`` as a
    repeated option; ``| None`` kept."""
    args = typing.get_args(hint)
    optional = type(None) in args
    inner = next(a for a in args if a is not type(None)) if optional else hint
    if path:
        inner = Path
    elif typing.get_origin(inner) is Literal:
        inner = str
    elif typing.get_origin(inner) is tuple and typing.get_args(inner)[-1] is Ellipsis:
        inner = list[typing.get_args(inner)[0]]  # type: ignore[misc]
    return inner | None if optional else inner


def _field_value(value: Any) -> Any:
    """A parsed option as its config field holds it: paths as str, repeated values as a tuple."""
    if isinstance(value, Path):
        return str(value)
    return tuple(value) if isinstance(value, list) else value


def _config_nulls(ctx: typer.Context) -> dict[str, None]:
    """The parameters that a config file sets to null and no flag sets otherwise."""
    return {name: None for name in ctx.meta.get(_NULLS, ())
            if getattr(ctx.get_parameter_source(name), "name", None) == "DEFAULT"}


def _apply_config(ctx: typer.Context, _param: typer.CallbackParam,
                  value: str | None) -> str | None:
    """Eager callback of ``--config``: install the file's values as the command's defaults."""
    if value is None:
        return None
    group = ctx.parent.command if ctx.parent is not None else None
    sections = frozenset(getattr(group, "commands", {}) or {})
    keys = {  # every name of an option, with _ for -, → its parameter
        key.replace("-", "_"): p.name
        for p in ctx.command.params if p.name and p.name != "config"
        for key in (p.name, *(o[2:] for o in p.opts if o.startswith("--")))
    }
    command = ctx.command.name or ""
    try:
        data = read_config_file(value)
        values = command_defaults(data, command, keys, str(value), sections)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    section = data.get(command, data) if isinstance(data.get(command), dict) else data
    spelled = {keys.get(str(k).replace("-", "_")): str(k) for k in section}
    for param in ctx.command.params:  # a repeatable option given one value: a list of one
        if getattr(param, "multiple", False) and isinstance(values.get(param.name), str):
            values[param.name] = [values[param.name]]
    _check_values(ctx, values, str(value), spelled)
    ctx.meta[_SPELLED] = (str(value), spelled)
    ctx.meta[_NULLS] = {name for name, v in values.items() if v is None}
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _check_values(ctx: typer.Context, values: Mapping[str, Any], source: str,
                  spelled: Mapping[str | None, str]) -> None:
    """Refuse a config file's value that its option would refuse as a flag, naming the file and
    the key (click would name only the option, as if a flag had been given)."""
    for param in ctx.command.params:
        if param.name in values and values[param.name] is not None:
            runtime = getattr(param, "get_runtime_param", None)  # typer ≥ 0.26 converts itself
            try:
                if runtime is not None:
                    runtime().coerce(values[param.name], param=param, ctx=ctx)
                else:
                    param.type_cast_value(ctx, values[param.name])
            except typer.BadParameter as e:
                key = spelled.get(param.name, param.name)
                raise typer.BadParameter(
                    f"{source}: {key} = {values[param.name]!r}: {e.message}") from None


def help_of(config_cls: type, name: str) -> str:
    """The help text of a config field that a command parses itself."""
    return next(f for f in dataclasses.fields(config_cls) if f.name == name).metadata["help"]


def as_given(value: Any) -> Any:
    """Parser of an option that a config file may give as a list or a table: kept as it is."""
    return value


# ------------------------------------------------------------------------------ shared options

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML/YAML/JSON file of option values (flags override it).",
        callback=_apply_config,
        is_eager=True,
        exists=False,
    ),
]
WorkerIndexOpt = Annotated[
    int | None,
    typer.Option(help="This worker's index when several machines share the job "
                      "(Slurm array index, k8s completion index). Default: run all workers here."),
]
NumWorkersOpt = Annotated[
    int, typer.Option(min=1, help="Number of workers sharing the job's parts.")
]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def workers(worker_index: int | None, num_workers: int) -> tuple[int, int, int]:
    """(worker_index, num_workers, local processes): all workers here unless an index is given."""
    if worker_index is None:
        return 0, 1, num_workers
    if not 0 <= worker_index < num_workers:
        raise fail(f"--worker-index {worker_index} is not in [0, {num_workers})", 2)
    return worker_index, num_workers, 1



def given_as(flag: str) -> str:
    """How the user gave the option ``flag`` (e.g. ``--weights``): the flag, or
    ``FILE: key`` when its value came from a ``--config`` file, for a message about it."""
    ctx = _COMMAND_CONTEXT.get()
    name = flag.lstrip("-").replace("-", "_")
    if ctx is None or _SPELLED not in ctx.meta:
        return flag
    source = getattr(ctx.get_parameter_source(name), "name", None)
    file, spelled = ctx.meta[_SPELLED]
    return f"{file}: {spelled.get(name, name)}" if source == "DEFAULT_MAP" else flag


def floats(text: Any, what: str) -> tuple[float, ...] | None:
    """Parse "0.5,0.3,0.2" (or a list from a config file) into numbers."""
    return _comma_list(text, what, float, "numbers")


def token_ids(text: Any, what: str) -> tuple[int, ...] | None:
    """Parse "12,97" (or a list from a config file) into token ids: whole numbers ≥ 0 (a float
    such as 1.5 is refused, not truncated)."""
    values = _comma_list(text, what, int, "token ids (whole numbers ≥ 0)")
    items = text if isinstance(text, (list, tuple)) else ()
    if values is not None and (min(values, default=0) < 0
                               or any(isinstance(x, (bool, float)) for x in items)):
        raise fail(f"{given_as(what)} must be token ids (whole numbers ≥ 0) separated by "
                   f"commas, got {text!r}", 2)
    return values


def _comma_list(text: Any, what: str, kind: Callable[[str], Any], said: str
                ) -> tuple[Any, ...] | None:
    """``text`` split at commas (or a config file's list), each item made ``kind``."""
    if text is None:
        return None
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        return tuple(kind(str(x).strip()) for x in items)
    except ValueError:
        raise fail(f"{given_as(what)} must be {said} separated by commas, got {text!r}",
                   2) from None


def task_weights(items: list[Any] | None, k: int) -> dict[str, tuple]:
    """Parse ``TAG=w1,...,wK`` items; a config file may give a table ``{TAG = [w1, ...]}``
    (it arrives as one item)."""
    out: dict[str, tuple] = {}
    for item in items or ():
        if isinstance(item, dict):
            out.update({str(tag): tuple(floats(v, "task weights") or ())
                        for tag, v in item.items()})
            continue
        tag, sep, values = str(item).partition("=")
        if not sep:
            raise fail(f"--task-weight must look like TAG=w1,...,w{k}, got {item!r}", 2)
        out[tag] = floats(values, "task weights") or ()
    return out
