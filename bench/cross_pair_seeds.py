"""The demo's controlled pair again with other teacher seeds: how much of
``cross_tokenizer_recovery`` is the pair's teachers rather than the alignment.

Replays, from a finished ``mtkd demo`` workdir (``--demo``; without it this checkout's demo, run
once and cached by ``demo_input``), the commands its results.json recorded for the pair (both
teachers trained, harvested with draws, aggregated, each one's student trained), with the
teachers' ``--seed`` replaced and every output under ``<out>/seed<N>``; the students keep the
demo's seed. The demo's own pair is seed 1 (its figures are read, not recomputed). Prints per
seed the teachers' and students' held-out bits per byte and the recovery, then
``recovery_median=`` and the headline ``recovery_of_mean_gains=`` (mean cross gain ÷ mean
same-tokenizer gain over all seeds).

    .venv/bin/python bench/cross_pair_seeds.py --seeds 2,3 [--demo runs/demo]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from demo_input import add_demo_argument, finished_demo

PAIR = ("t0-narrow", "t0-cross")


def pair_commands(results: dict) -> list[str]:
    """The recorded commands that make the pair's teachers, stores and students."""
    wanted = re.compile(r"teachers/t0-(narrow|cross)\b|stores/t0-(narrow|cross)-student\b"
                        r"|single-t0-(narrow|cross)-sampled\b")
    return [c for c in results["commands"] if wanted.search(c)
            and (" train " in f" {c} " or c.split()[1] in ("harvest", "aggregate"))
            and "mix-" not in c]


def reseeded(command: str, demo: Path, out: Path, seed: int) -> list[str]:
    """One recorded command with the teachers' seed and the pair's outputs moved to ``out``."""
    args = shlex.split(command)
    for name in ("teachers", "students"):  # outputs and models, not the model configs
        args = [a if a.endswith(".json") else a.replace(f"{demo}/{name}/", f"{out}/{name}/")
                for a in args]
    args = [re.sub(rf"{re.escape(str(demo))}/stores/(t0-|single-t0-)",
                   rf"{out}/stores/\1", a) for a in args]
    if "teachers/" in " ".join(args[args.index("--out"):args.index("--out") + 2]):
        args[args.index("--seed") + 1] = str(seed)
    return [sys.executable, "-m", "mtkd.cli", *args[1:]]


def heldout_bpb(run: Path) -> float:
    return float(json.loads((run / "final_metrics.json").read_text())["heldout_bpb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_demo_argument(ap)
    ap.add_argument("--seeds", default="2,3", help="teacher seeds besides the demo's (1)")
    ap.add_argument("--out", type=Path, default=None, help="default: <demo>/pair-seeds")
    args = ap.parse_args()
    demo = finished_demo(args.demo)
    results = json.loads((demo / "results.json").read_text())
    figures = results["figures"]
    ce_only = figures["ce_only_bpb"]
    rows = {1: (figures["teacher_t0_narrow_bpb"], figures["teacher_t0_cross_bpb"],
                figures["single_t0_narrow_sampled_bpb"], figures["single_t0_cross_sampled_bpb"])}
    for seed in (int(s) for s in args.seeds.split(",")):
        out = (args.out or demo / "pair-seeds") / f"seed{seed}"
        for sub in ("teachers", "stores", "students"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for command in pair_commands(results):
            argv = reseeded(command, demo, out, seed)
            target = Path(argv[argv.index("--out") + 1])
            if not (target / "final_metrics.json").exists() and not (
                    target / "manifest.json").exists():
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        rows[seed] = tuple(heldout_bpb(out / d) for d in (
            "teachers/t0-narrow", "teachers/t0-cross", "students/single-t0-narrow-sampled",
            "students/single-t0-cross-sampled"))
    gains = []
    for seed, (t_narrow, t_cross, narrow, cross) in sorted(rows.items()):
        gains.append((ce_only - narrow, ce_only - cross))
        print(f"seed{seed}.teacher_narrow_bpb={t_narrow:.4f}")
        print(f"seed{seed}.teacher_cross_bpb={t_cross:.4f}")
        print(f"seed{seed}.student_narrow_bpb={narrow:.4f}")
        print(f"seed{seed}.student_cross_bpb={cross:.4f}")
        print(f"seed{seed}.recovery={gains[-1][1] / gains[-1][0]:.4f}")
    same, cross = np.array(gains).T
    print(f"recovery_median={float(np.median(cross / same)):.4f}")
    print(f"recovery_of_mean_gains={cross.mean() / same.mean():.4f}")


if __name__ == "__main__":
    main()
