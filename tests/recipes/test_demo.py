"""The demo end to end, reduced (``--size tiny``): the README's first command, in minutes.

It runs the public CLI as a user would: tokenizer, three teachers (one a safety teacher),
vLLM harvest, aggregation, students, experiments and the report. Quality numbers of the tiny
run mean little (teachers train for seconds); what is checked is that every stage runs, the
report is built from the run's own numbers, and a rerun resumes instead of redoing work.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_demo(workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "mtkd", "demo", "--size", "tiny", "--workdir", str(workdir)],
        capture_output=True, text=True, env=env, timeout=1800,
    )


@pytest.mark.engine
def test_tiny_demo_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    first = run_demo(workdir)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    results = json.loads((workdir / "results.json").read_text())
    commands = results["commands"]
    for stage in ("tokenize", "train", "harvest", "aggregate"):
        assert any(c.startswith(f"mtkd {stage} ") for c in commands), stage
    assert sum(c.startswith("mtkd harvest ") for c in commands) == 3  # one vLLM run a teacher
    students = results["students"]
    best = results["best_teacher"]
    assert {"ce-only", "mix-linear", f"single-{best}", f"single-{best}-full"} <= set(students)
    for name, metrics in students.items():
        assert math.isfinite(metrics["heldout_ce"]) and 0 < metrics["heldout_ce"] < 10, name
    quality = results["quality"]
    assert set(quality["teacher_ce"]) == {"t0-narrow", "t1-wide", "t2-safety"}
    assert results["safety"]["bound_holds"]

    report = (workdir / "report" / "report.md").read_text()
    for name, metrics in students.items():  # the table shows the run's numbers
        assert f"{metrics['heldout_ce']:.4f}" in report, name
    assert "safety bound holds" in report
    assert (workdir / "report" / "index.html").exists()
    assert list((workdir / "report").glob("*.png"))

    second = run_demo(workdir)  # every stage is done: nothing is trained or harvested again
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads((workdir / "results.json").read_text())
    assert again["commands"] == commands
