"""The demo end to end, reduced (``--size tiny``): the README's first command, in minutes.

It runs the public CLI as a user would: tokenizer, three teachers (one a safety teacher),
vLLM harvest, aggregation, students, experiments, the cross-tokenizer stages (a teacher with its
own BPE and the real SmolLM2, both harvested in their own tokens over ~20k student tokens) and
the report. Quality numbers of the tiny
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
import torch

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
    real = "real_teacher_skipped" not in results  # SmolLM2 absent and not buildable here
    harvests = [c for c in commands if c.startswith("mtkd harvest ")]
    assert len(harvests) == 4 + real  # one vLLM run a teacher: 3 demo teachers, t0-cross, SmolLM2
    assert sum("--tokenization own" in c for c in harvests) == 1 + real
    students = results["students"]
    best = results["best_teacher"]
    assert {"ce-only", "mix-linear", f"single-{best}", f"single-{best}-full",
            f"single-{best}-sampled", "single-t0-narrow-sampled",
            "single-t0-cross-sampled"} <= set(students)
    assert {"single-smollm2", "mix-real"} <= set(students) or not real
    for name, metrics in students.items():
        assert math.isfinite(metrics["heldout_ce"]) and 0 < metrics["heldout_ce"] < 10, name
    quality = results["quality"]
    assert set(quality["teacher_ce"]) == {"t0-narrow", "t1-wide", "t2-safety"}
    assert results["safety"]["bound_holds"]

    figures = results["figures"]  # the cross-tokenizer figures, in bits per byte
    names = ["ce_only_bpb", "cross_tokenizer_recovery", "alignment_coverage_cross",
             "demo_seconds"]
    names += ["alignment_coverage_real", "real_teacher_gain_pct",
              "mixture_vs_best_single_pct"] if real else []
    for name in names:
        assert math.isfinite(figures[name]), name
    for name in ("alignment_coverage_cross", "alignment_coverage_real"):
        assert 0 <= figures.get(name, 0) <= 1, name
    for name, metrics in students.items():
        assert 0 < metrics["heldout_bpb"] < 10, name

    report = (workdir / "report" / "report.md").read_text()
    for name in names:  # printed at the end of `mtkd demo` as name=value lines
        assert f"\n{name}=" in first.stdout, name
    for name, metrics in students.items():  # the table shows the run's numbers
        assert f"{metrics['heldout_ce']:.4f}" in report, name
    assert "safety bound holds" in report
    env = results["environment"]  # the figures' environment, in the results and the report
    assert env["packages"]["torch"] == torch.__version__ and env["cpus"] == os.cpu_count()
    assert f"torch {torch.__version__}" in report
    assert (workdir / "report" / "index.html").exists()
    assert list((workdir / "report").glob("*.png"))

    second = run_demo(workdir)  # every stage is done: nothing is trained or harvested again
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads((workdir / "results.json").read_text())
    assert again["commands"] == commands
