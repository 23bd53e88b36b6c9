"""A finished ``mtkd demo`` workdir, the input of the benches that study the demo's figures.

``--demo DIR`` names a run the user made (it must be finished: its results.json holds the
figures). Without it, this checkout's ``mtkd demo`` runs once into ``~/.cache/mtkd/bench/``
(``$MTKD_CACHE``), in a directory named by a hash of what makes it (the mtkd sources, the
Python version, the demo's options), and every bench reuses it after: a new user reproduces
each figure with one command (≈ 10 min more the first time, on 2 cores). The demo records its
stores' absolute paths in the commands that results.json keeps, so it runs in place rather
than being renamed into place; an interrupted run resumes where it stopped (``mtkd demo``
skips the stages it finished), and only a run with figures counts as finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import mtkd
from mtkd.recipes.real_teacher import cache_root

#: The demo's options: the defaults, which docs/RESULTS.md's demo figures use.
DEMO_ARGS = ("--size", "small")


def source_digest() -> str:
    """A hash of every mtkd source file (names and bytes): another checkout, another demo."""
    root = Path(mtkd.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def is_finished(workdir: Path) -> bool:
    """True once ``mtkd demo`` has written its figures (the last thing a run records)."""
    try:
        return "figures" in json.loads((workdir / "results.json").read_text())
    except (OSError, ValueError):
        return False


def cached_demo_dir(cache: Path | None = None) -> Path:
    """Where this checkout's demo runs for the benches (see the module doc)."""
    made_by = {"mtkd": source_digest(), "python": platform.python_version(), "args": DEMO_ARGS}
    key = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:16]
    return (cache or cache_root() / "bench") / f"demo-{key}"


def finished_demo(demo: Path | None) -> Path:
    """``demo`` resolved if it is a finished run, else SystemExit; None: the cached demo,
    run first if it has not finished (its progress on this console)."""
    if demo is not None:
        demo = demo.resolve()
        if not is_finished(demo):
            raise SystemExit(f"{demo} is not a finished `mtkd demo` workdir (its results.json "
                             "holds no figures); leave --demo out to run the demo once here")
        return demo
    workdir = cached_demo_dir()
    if not is_finished(workdir):
        print(f"running `mtkd demo` once into {workdir} (≈ 10 min on 2 cores)", flush=True)
        workdir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mtkd", "demo", "--workdir", str(workdir), *DEMO_ARGS]
        if subprocess.run(cmd).returncode != 0 or not is_finished(workdir):
            raise SystemExit(f"`{' '.join(cmd)}` did not finish; run it again to resume")
    return workdir


def add_demo_argument(ap: argparse.ArgumentParser) -> None:
    """The benches' ``--demo`` option."""
    ap.add_argument("--demo", type=Path, default=None,
                    help="a finished mtkd demo workdir (default: this checkout's demo, run once "
                         "into the bench cache and reused)")
