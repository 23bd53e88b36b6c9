"""A demo run: its directory, the results gathered so far, and the public ``mtkd`` commands it
runs, each skipped when its output is already there (shared by the demo and its experiments)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtkd.recipes.sizes import DemoSize, ModelShape
from mtkd.store.format import MANIFEST_FILE


class DemoError(Exception):
    """A stage of the demo failed; the message names it."""


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

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

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
        """Run a public ``mtkd`` command exactly as a user would, and log it."""
        argv = [str(a) for a in args]
        self.commands.append("mtkd " + " ".join(argv))
        print_stage(" ".join(["mtkd", *argv[:1]]))
        # vLLM's CPU worker drops to one thread unless OMP_NUM_THREADS says otherwise
        env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)} | os.environ
        env["PYTHONUNBUFFERED"] = "1"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mtkd", *argv], env=env)
        self.record_seconds(self.stage_name(argv), time.perf_counter() - started)
        if done.returncode:
            raise DemoError(f"`mtkd {argv[0]}` failed with exit code {done.returncode}; "
                            "fix the cause and rerun the demo: finished stages are kept")


def train_model(run: Run, out: Path, *, tokens: str, steps: int, batch: int, seed: int,
                shape: ModelShape | None = None, targets: str | None = None,
                objective: str = "ce", extra: Sequence[str] = (),
                evals: int = 5, heldout: str = "tokens-heldout",
                vocab_size: int | None = None) -> dict[str, Any]:
    """Train one model with ``mtkd train`` (``evals`` held-out evaluations on the ``heldout``
    tokens store, the last at the end); returns its final metrics. ``vocab_size``: the model's
    vocabulary when its tokenizer is not the demo's (default ``run.size.vocab_size``)."""
    metrics_path = out / "final_metrics.json"
    if not metrics_path.exists():
        args: list[str | os.PathLike[str]] = [
            "train", "--tokens", run.path("stores", tokens), "--out", out,
            "--heldout", run.path("stores", heldout), "--objective", objective,
            "--steps", str(steps), "--batch-size", str(batch), "--seq-len",
            str(run.size.seq_len), "--lr", str(run.size.lr), "--seed", str(seed),
            "--eval-every", str(max(steps // evals, 1)), *extra,
        ]
        if shape is not None:
            config = out.parent / f"{out.name}.config.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(json.dumps(shape.config(vocab_size or run.size.vocab_size,
                                                      run.size.seq_len)))
            args += ["--student-config", config]
        if targets is not None:
            args += ["--targets", run.path("stores", targets)]
        run.mtkd(*args)
    return json.loads(metrics_path.read_text())
