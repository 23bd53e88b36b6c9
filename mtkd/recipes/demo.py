"""``mtkd demo``: the whole pipeline on this machine with nothing to download.

Corpus: the standard library's own ``.py`` files, split train / held-out by file. A BPE
tokenizer is trained on the train split; three teachers of different shapes are trained briefly
(one a *safety teacher* trained to give the tokens that start ``eval``, ``exec`` and
``os.system`` low probability); then the same public commands a user types —
``mtkd tokenize → harvest (vLLM) → aggregate → train`` — and a report.

Every stage is skipped when its output already exists, so an interrupted demo resumes.
Results go to ``RUN_DIR/results.json``; ``mtkd report RUN_DIR`` renders them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtkd.store import open_store
from mtkd.store.core import MANIFEST_FILE

EXCLUDED = ("site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
            "ensurepip", "__pycache__", "pydoc_data")
UNSAFE_WORDS = ("eval", "exec", "system")


class DemoError(Exception):
    """A stage of the demo failed; the message names it."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int

    def config(self, vocab_size: int, max_len: int) -> dict[str, Any]:
        return {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": self.hidden,
                "intermediate_size": 4 * self.hidden, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.heads,
                "max_position_embeddings": 2 * max_len, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Teacher:
    name: str
    shape: ModelShape
    data_fraction: float
    seed: int
    temperature: float
    safety: bool = False


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: ``small`` is the default run, ``tiny`` the CI smoke run."""

    vocab_size: int
    seq_len: int
    heldout_every: int  # one file in this many is held out
    teacher_steps: int
    teacher_batch: int
    student_tokens: int  # the student's (deliberately small) training budget, in corpus tokens
    student_steps: int
    student_batch: int
    heldout_tokens: int
    max_files: int | None
    teachers: tuple[Teacher, ...]
    student: ModelShape = ModelShape(2, 128, 4)
    k: int = 64
    lr: float = 2e-3


TEACHERS = (  # one cost, different shapes and data: each sees its own seeded 70% of the corpus
    Teacher("t0-narrow", ModelShape(2, 256, 4), 0.7, 1, 1.0),
    Teacher("t1-wide", ModelShape(2, 320, 5), 0.7, 2, 1.0),
    Teacher("t2-safety", ModelShape(2, 256, 4), 0.7, 3, 1.0, safety=True),
)

SIZES = {
    "small": DemoSize(vocab_size=2048, seq_len=256, heldout_every=12, teacher_steps=150,
                      teacher_batch=8, student_tokens=80_000, student_steps=200,
                      student_batch=8, heldout_tokens=60_000, max_files=None, teachers=TEACHERS),
    "tiny": DemoSize(vocab_size=512, seq_len=128, heldout_every=10, teacher_steps=30,
                     teacher_batch=4, student_tokens=20_000, student_steps=30, student_batch=4,
                     heldout_tokens=8_000, max_files=80, k=16,
                     teachers=tuple(Teacher(t.name, ModelShape(1, 64, 2), t.data_fraction, t.seed,
                                            t.temperature, t.safety) for t in TEACHERS),
                     student=ModelShape(1, 64, 2)),
}


@dataclass
class Run:
    """A demo run directory and the results gathered so far (saved after every stage)."""

    root: Path
    size: DemoSize
    results: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def save(self) -> None:
        self.results["commands"] = self.commands
        tmp = self.path("results.json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=_jsonable))
        os.replace(tmp, self.path("results.json"))

    def mtkd(self, *args: str | os.PathLike[str]) -> None:
        """Run a public ``mtkd`` command exactly as a user would, and log it."""
        argv = [str(a) for a in args]
        self.commands.append("mtkd " + " ".join(argv))
        _stage(" ".join(["mtkd", *argv[:1]]))
        # vLLM's CPU worker drops to one thread unless OMP_NUM_THREADS says otherwise
        env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)} | os.environ
        env["PYTHONUNBUFFERED"] = "1"
        done = subprocess.run([sys.executable, "-m", "mtkd", *argv], env=env)
        if done.returncode:
            raise DemoError(f"`mtkd {argv[0]}` failed with exit code {done.returncode}; "
                            "fix the cause and rerun the demo: finished stages are kept")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


def _stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _done(store: Path) -> bool:
    return (store / MANIFEST_FILE).exists()


# --------------------------------------------------------------------------- corpus


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The standard library's own source files (tests and third-party packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in EXCLUDED or part.startswith("test")
                              for part in p.relative_to(root).parts))
    return files[:max_files] if max_files else files


def task_of(path: Path) -> str:
    """A coarse task tag: the top-level package, or ``module`` for top-level files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else "module"


def write_corpus(run: Run) -> None:
    """train.jsonl / heldout.jsonl, split by file (a hash of the path: stable everywhere)."""
    if run.path("corpus", "heldout.jsonl").exists():
        return
    _stage("corpus: the standard library's source files")
    run.path("corpus").mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0}
    root = Path(sysconfig.get_paths()["stdlib"])
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


def train_tokenizer(run: Run) -> Path:
    out = run.path("tokenizer")
    if (out / "tokenizer.json").exists():
        return out
    _stage(f"tokenizer: byte-level BPE, vocabulary {run.size.vocab_size}")
    from mtkd.recipes.models import train_bpe_tokenizer

    def texts() -> Any:
        with open(run.path("corpus", "train.jsonl")) as f:
            for line in f:
                yield json.loads(line)["text"]

    train_bpe_tokenizer(texts(), run.size.vocab_size, out)
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
    for name, src in (("tokens-train", "train.jsonl"), ("tokens-student", "student.jsonl"),
                      ("tokens-heldout", "heldout-eval.jsonl")):
        if not _done(run.path("stores", name)):
            run.mtkd("tokenize", jsonl / src, "--tokenizer", tokenizer, "--out",
                     run.path("stores", name), "--max-len", str(size.seq_len), "--task-field",
                     "task")
    for name in ("tokens-train", "tokens-student", "tokens-heldout"):
        store = open_store(run.path("stores", name), verify="none")
        run.results.setdefault("tokens", {})[name] = store.num_rows


# --------------------------------------------------------------------------- models


def train_model(run: Run, out: Path, *, tokens: str, steps: int, batch: int, seed: int,
                shape: ModelShape | None = None, targets: str | None = None,
                objective: str = "ce", extra: Sequence[str] = (),
                evals: int = 5) -> dict[str, Any]:
    """Train one model with ``mtkd train`` (``evals`` held-out evaluations, the last at the
    end); returns its final metrics."""
    metrics_path = out / "final_metrics.json"
    if not metrics_path.exists():
        args: list[str | os.PathLike[str]] = [
            "train", "--tokens", run.path("stores", tokens), "--out", out,
            "--heldout", run.path("stores", "tokens-heldout"), "--objective", objective,
            "--steps", str(steps), "--batch-size", str(batch), "--seq-len",
            str(run.size.seq_len), "--lr", str(run.size.lr), "--seed", str(seed),
            "--eval-every", str(max(steps // evals, 1)), *extra,
        ]
        if shape is not None:
            config = out.parent / f"{out.name}.config.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(json.dumps(shape.config(run.size.vocab_size, run.size.seq_len)))
            args += ["--student-config", config]
        if targets is not None:
            args += ["--targets", run.path("stores", targets)]
        run.mtkd(*args)
    return json.loads(metrics_path.read_text())


def train_teachers(run: Run, unsafe: list[int]) -> None:
    size = run.size
    total = run.results["tokens"]["tokens-train"]
    for t in size.teachers:
        extra = ["--max-tokens", str(int(total * t.data_fraction))]
        if t.safety:
            extra += ["--suppress-ids", ",".join(map(str, unsafe)), "--suppress-weight", "1.0"]
        metrics = train_model(run, run.path("teachers", t.name), tokens="tokens-train",
                              steps=size.teacher_steps, batch=size.teacher_batch, seed=t.seed,
                              shape=t.shape, extra=extra, evals=1)
        run.results.setdefault("teachers", {})[t.name] = metrics
        run.save()


def harvest_teachers(run: Run) -> None:
    """Each teacher over the student's tokens, with vLLM."""
    for t in run.size.teachers:
        out = run.path("stores", f"{t.name}-student")
        if not _done(out):
            run.mtkd("harvest", run.path("stores", "tokens-student"), "--model",
                     run.path("teachers", t.name, "final"), "--out", out, "--k",
                     str(run.size.k), "--dtype", "float32", "--enforce-eager")


# --------------------------------------------------------------------------- measurements


def heldout_logprobs(run: Run) -> np.ndarray:
    """[N,K] each teacher's log-prob of the actual next token on the held-out tokens.

    Computed in-process with the full-vocabulary reference engine (no vLLM start needed).
    """
    from mtkd.harvest.hf_engine import HfReferenceEngine

    store = open_store(run.path("stores", "tokens-heldout"), verify="none")
    batch = store.read(np.arange(store.num_sequences), ["token_ids"])
    seqs = [batch["token_ids"][a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:],
                                                      strict=True)]
    cols = []
    for t in run.size.teachers:
        engine = HfReferenceEngine(str(run.path("teachers", t.name, "final")), k=1)
        cols.append(engine.harvest(seqs)["target_logprob"].astype(np.float64))
    return np.stack(cols, axis=1)


def mixture_quality(run: Run, weightings: dict[str, np.ndarray]) -> dict[str, Any]:
    """Held-out CE of each teacher and of their (temperature-1) mixtures, one per weighting."""
    lp = heldout_logprobs(run)
    ce = -lp.mean(axis=0)
    mixtures = {name: float(-np.mean(np.log(np.exp(lp) @ np.asarray(w))))
                for name, w in weightings.items()}
    return {"teacher_ce": dict(zip([t.name for t in run.size.teachers], ce.tolist(),
                                   strict=True)),
            "mixture_ce": mixtures, "positions": len(lp)}


def run_demo(workdir: str | os.PathLike[str], size: str = "small",
             experiments: str = "default") -> Path:
    """Run (or resume) the demo in ``workdir``; return the path of the report."""
    from mtkd.recipes.report import write_report

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    spec = SIZES[size]
    run = Run(Path(workdir), spec)
    run.root.mkdir(parents=True, exist_ok=True)
    if run.path("results.json").exists():
        run.results = json.loads(run.path("results.json").read_text())
        run.commands = run.results.get("commands", [])
    run.results["size"] = size
    run.results["spec"] = asdict(spec)
    started = time.perf_counter()
    write_corpus(run)
    tokenizer = train_tokenizer(run)
    unsafe = unsafe_token_ids(tokenizer)
    run.results["unsafe_ids"] = unsafe
    tokenize(run, tokenizer)
    run.save()
    train_teachers(run, unsafe)
    harvest_teachers(run)
    from mtkd.recipes.experiments import run_experiments

    run_experiments(run, experiments)
    run.results["seconds"] = run.results.get("seconds", 0.0) + time.perf_counter() - started
    run.save()
    return write_report(run.root)
