"""``mtkd demo``: the whole pipeline on this machine with nothing to download.

Corpus: the standard library's own ``.py`` files, split train / held-out by file. A BPE
tokenizer is trained on the train split; three teachers of different shapes are trained briefly
(one a *safety teacher* trained to give the tokens that start ``eval``, ``exec`` and
``os.system`` low probability); then the same public commands a user types —
``mtkd tokenize → harvest (vLLM) → aggregate → train`` — and a report. Then teachers that read
the text with their own tokenizer (``cross_experiments``): a copy of ``t0-narrow`` with its own
BPE, and the real SmolLM2-135M-Instruct (cached once by ``mtkd setup-teacher``; the only thing
ever fetched); the headline figures, in bits per byte, end the output as ``name=value`` lines.

Every stage is skipped when its output already exists, so an interrupted demo resumes.
Results go to ``RUN_DIR/results.json`` (with each stage's wall seconds, ``stage_seconds``);
``mtkd report RUN_DIR`` renders them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mtkd.recipes.cross_experiments import (
    CROSS_HELDOUT,
    CROSS_TRAIN,
    cross_teacher_job,
    harvest_cross_teacher,
    harvest_real_teacher,
    measure_cross_experiments,
    plan_cross_experiments,
)
from mtkd.recipes.experiments import (
    harvest_hybrid,
    harvest_teacher,
    measure_experiments,
    measure_teachers,
    plan_experiments,
    train_students,
)
from mtkd.recipes.figures import headline_figures
from mtkd.recipes.report import write_report
from mtkd.recipes.run import (
    Run,
    check_workdir,
    environment,
    print_stage,
    read_results,
    tokenize_into,
    train_job,
    train_models,
)
from mtkd.recipes.sizes import SIZES
from mtkd.recipes.stdlib_corpus import stdlib_files, stdlib_root

UNSAFE_WORDS = ("eval", "exec", "system")


# --------------------------------------------------------------------------- corpus


def task_of(path: Path) -> str:
    """A coarse task tag: the top-level package, or ``module`` for top-level files."""
    root = stdlib_root()
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else "module"


def write_corpus(run: Run) -> None:
    """train.jsonl / heldout.jsonl, split by file (a hash of the path: stable everywhere)."""
    if run.path("corpus", "heldout.jsonl").exists():
        return
    print_stage("corpus: the standard library's source files")
    run.path("corpus").mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0}
    root = stdlib_root()
    with open(run.path("corpus", "train.jsonl"), "w") as train, \
            open(run.path("corpus", "heldout.jsonl"), "w") as heldout:
        for path in stdlib_files(run.size.max_files):
            rel = path.relative_to(root).as_posix()
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            digest = int(hashlib.sha256(rel.encode()).hexdigest(), 16)
            split = "heldout" if digest % run.size.heldout_every == 0 else "train"
            out = heldout if split == "heldout" else train
            out.write(json.dumps({"text": text, "task": task_of(path), "path": rel}) + "\n")
            counts[split] += 1
    run.results["corpus"] = {"root": str(root), "files": counts}
    print(f"{counts['train']} train files, {counts['heldout']} held-out files")


def subset_jsonl(src: Path, dst: Path, tokens: int, tokenizer: Path) -> None:
    """The first documents of ``src`` up to ``tokens`` tokens (the student's budget)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    used = 0
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            if used >= tokens:
                break
            out.write(line)
            used += len(tok.encode(json.loads(line)["text"], add_special_tokens=False).ids)


def train_tokenizer(run: Run, name: str = "tokenizer", vocab_size: int | None = None) -> Path:
    """A byte-level BPE trained on the train split into ``RUN/<name>`` (default: the demo's,
    of ``run.size.vocab_size``)."""
    vocab_size = vocab_size or run.size.vocab_size
    out = run.path(name)
    if (out / "tokenizer.json").exists():
        return out
    print_stage(f"{name}: byte-level BPE, vocabulary {vocab_size}")
    from mtkd.recipes.models import train_bpe_tokenizer

    def texts() -> Any:
        with open(run.path("corpus", "train.jsonl")) as f:
            for line in f:
                yield json.loads(line)["text"]

    with run.timed(name):
        train_bpe_tokenizer(texts(), vocab_size, out)
    return out


def unsafe_token_ids(tokenizer_dir: Path) -> list[int]:
    """The tokens that start ``eval``/``exec``/``system`` in their common spellings."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = set()
    for word in UNSAFE_WORDS:
        for text in (word, f" {word}", f".{word}"):
            enc = tok.encode(text, add_special_tokens=False).ids
            first = enc[1] if text[0] == "." and len(enc) > 1 else enc[0]
            ids.add(first)
    return sorted(ids)


def tokenize(run: Run, tokenizer: Path) -> None:
    jsonl = run.path("corpus")
    size = run.size
    if not run.path("corpus", "student.jsonl").exists():
        subset_jsonl(jsonl / "train.jsonl", jsonl / "student.jsonl", size.student_tokens,
                     tokenizer)
        subset_jsonl(jsonl / "heldout.jsonl", jsonl / "heldout-eval.jsonl", size.heldout_tokens,
                     tokenizer)
    tokenize_into(run, tokenizer, (("tokens-train", "train.jsonl"),
                                   ("tokens-student", "student.jsonl"),
                                   ("tokens-heldout", "heldout-eval.jsonl")))


def cross_tokens(run: Run) -> None:
    """The cross teacher's own tokenizer (another vocabulary size, the same train split) and
    the train and held-out documents in its tokens."""
    tokenizer = train_tokenizer(run, "tokenizer-cross", run.size.cross_vocab_size)
    tokenize_into(run, tokenizer, ((CROSS_TRAIN, "train.jsonl"),
                                   (CROSS_HELDOUT, "heldout-eval.jsonl")))


# --------------------------------------------------------------------------- teachers


def train_teachers(run: Run, unsafe: list[int]) -> None:
    """The demo's teachers and the cross teacher (``cross_experiments``), side by side, with
    the real teacher's harvest (it needs only the student's tokens) beside them on a core of
    its own: on 2 cores its vLLM run takes ≈ 1.5× as long with one thread as with two, so
    running it beside the trainings rather than alone after them saved 35 s of the demo's
    wall time (docs/RESULTS.md)."""
    size = run.size
    total = run.results["tokens"]["tokens-train"]
    jobs = []
    for t in size.teachers:
        extra = ["--max-tokens", str(int(total * t.data_fraction))]
        if t.safety:
            extra += ["--suppress-ids", ",".join(map(str, unsafe)), "--suppress-weight", "1.0"]
        jobs.append(train_job(run, run.path("teachers", t.name), tokens="tokens-train",
                              steps=size.teacher_steps, batch=size.teacher_batch, seed=t.seed,
                              shape=t.shape, extra=extra, evals=1))
    jobs.append(cross_teacher_job(run))
    real = functools.partial(harvest_real_teacher, run)
    for job, metrics in zip(jobs, train_models(run, jobs, beside=real), strict=True):
        run.results.setdefault("teachers", {})[job.name] = metrics
    run.save()


def harvest_teachers(run: Run) -> None:
    """Each trained teacher over the student's tokens, with vLLM: top-k rows and ``k`` random
    draws per position (made in vLLM's worker) in one store, side by side with a core each
    (the real teacher's harvest runs beside the trainings: :func:`train_teachers`)."""
    with run.side_by_side(threads=1):
        for t in run.size.teachers:
            harvest_teacher(run, t.name, f"{t.name}-student", "--k", str(run.size.k),
                            "--num-samples", str(run.size.k))
        harvest_cross_teacher(run)


def run_demo(workdir: str | os.PathLike[str], size: str = "small",
             experiments: str = "default") -> Path:
    """Run (or resume) the demo in ``workdir``; return the path of the report."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    spec = SIZES[size]
    run = Run(Path(workdir), spec)
    check_workdir(run.root)
    if run.path("results.json").exists():
        run.results = read_results(run.path("results.json"))
        run.commands = run.results.get("commands", [])
    run.root.mkdir(parents=True, exist_ok=True)
    run.results["size"] = size
    run.results["spec"] = asdict(spec)
    run.results["bf16_training"] = run.bf16
    run.results["environment"] = environment()
    started = time.perf_counter()
    write_corpus(run)
    tokenizer = train_tokenizer(run)
    unsafe = unsafe_token_ids(tokenizer)
    run.results["unsafe_ids"] = unsafe
    tokenize(run, tokenizer)
    cross_tokens(run)
    run.save()
    train_teachers(run, unsafe)
    harvest_teachers(run)
    measure_teachers(run)
    if experiments == "all":
        harvest_hybrid(run)
    with run.side_by_side():  # the targets: each aggregate on a core
        students = plan_experiments(run, experiments) + plan_cross_experiments(run, experiments)
    train_students(run, students)
    measure_experiments(run)
    measure_cross_experiments(run, experiments)
    run.results["seconds"] = run.results.get("seconds", 0.0) + time.perf_counter() - started
    run.results["figures"] = headline_figures(run)
    run.save()
    with run.timed("report"):
        report = write_report(run.root)
    run.save()
    return report
