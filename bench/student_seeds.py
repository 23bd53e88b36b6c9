"""The demo's headline figures with other student seeds: how much of each is the students' seed.

Reads a finished ``mtkd demo`` workdir (``--demo``; without it this checkout's demo, run once
and cached by ``demo_input``). Every student behind a headline figure is trained again from its
own ``train_config.json`` (same targets, same budget, one thread) with each of the given seeds,
a core each side by side, into ``<out>/seed<N>/<student>``; the figures are then recomputed by
the demo's own :func:`~mtkd.recipes.figures.headline_figures` with those students in place of
the demo's (seed 0). Prints each student's held-out bits per byte and each figure per seed; the
headline, last, is ``cross_tokenizer_recovery_max=`` over all seeds (the issue's goal: ≥ 0.9).

    .venv/bin/python bench/student_seeds.py --seeds 1,2 [--demo runs/demo]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from demo_input import add_demo_argument, finished_demo

from mtkd.recipes.figures import headline_figures
from mtkd.recipes.run import Run
from mtkd.recipes.sizes import SIZES

#: The figures compared across seeds (each the demo's, recomputed).
FIGURES = ("real_teacher_gain_pct", "mixture_vs_best_single_pct", "cross_tokenizer_recovery",
           "sampled_vllm_vs_full_kd_pct", "hybrid_vllm_vs_full_kd_pct")


def students_behind(results: dict) -> list[str]:
    """The demo's students that the figures read: CE only, the best single teacher's (top-k,
    draws, the hybrid where trained, full vocabulary), the controlled pair's, SmolLM2's and
    the mixture with it."""
    best = f"single-{results['best_teacher']}"
    wanted = ["ce-only", best, f"{best}-sampled", f"{best}-hybrid", f"{best}-full",
              "single-t0-narrow-sampled",
              "single-t0-cross-sampled", "single-smollm2", "mix-real"]
    return [name for name in wanted if name in results["students"]]


def train(demo: Path, name: str, seed: int, out: Path, targets: Path | None = None) -> dict:
    """The student ``name`` trained as the demo did, but with ``seed`` (and, given, from
    ``targets`` instead of its own); its final metrics."""
    if not (out / "final_metrics.json").exists():
        config = json.loads((demo / "students" / name / "train_config.json").read_text())
        config |= {"seed": seed, "out": str(out), "progress": False}
        if targets is not None:
            config["targets"] = str(targets)
        path = out.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        subprocess.run([sys.executable, "-m", "mtkd.cli", "train", "--config", str(path)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "final_metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_demo_argument(ap)
    ap.add_argument("--seeds", default="1,2", help="student seeds besides the demo's (0)")
    ap.add_argument("--out", type=Path, default=None, help="default: <demo>/student-seeds")
    args = ap.parse_args()
    demo = finished_demo(args.demo)
    results = json.loads((demo / "results.json").read_text())
    names = students_behind(results)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(seed, name) for seed in seeds for name in names]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # one-thread trainings, a core each
        metrics = dict(zip(jobs, pool.map(
            lambda job: train(demo, job[1], job[0],
                              (args.out or demo / "student-seeds") / f"seed{job[0]}" / job[1]),
            jobs), strict=True))
    per_seed = {0: results}
    for seed in seeds:
        per_seed[seed] = copy.deepcopy(results)
        per_seed[seed]["students"] |= {name: metrics[(seed, name)] for name in names}
    recoveries = []
    for seed, res in per_seed.items():
        run = Run(demo, SIZES[res["size"]], results=res)
        figures = headline_figures(run)
        for name in names:
            print(f"seed{seed}.{name}_bpb={res['students'][name]['heldout_bpb']:.4f}")
        for figure in FIGURES:
            if figure in figures:
                print(f"seed{seed}.{figure}={figures[figure]:.4f}")
        recoveries.append(figures.get("cross_tokenizer_recovery", float("nan")))
    print(f"cross_tokenizer_recovery_max={max(recoveries):.4f}")


if __name__ == "__main__":
    main()
