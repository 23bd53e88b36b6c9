"""How wide the hybrid's exact head should be, and how many draws it needs: the demo's best
teacher harvested as the hybrid (its exact top-H and D draws from the rest, ``mtkd harvest
--sample-rest``), its students against the full-vocabulary KD student, across student seeds.

Reads a finished ``mtkd demo`` workdir (``--demo``; without it this checkout's demo, run once
and cached by ``demo_input``). For each ``H:D`` in ``--configs`` the best teacher is harvested
over the student's tokens with ``--k H --num-samples D --sample-rest`` and fused by ``mtkd
aggregate --source samples`` into targets of the demo's width ``k``; H = 0 is plain draws (the
demo's own store when D = k, else ``--k 1 --num-samples D``). Each target store's student, and
the full-vocabulary one, are trained as the demo trains its student of plain draws (its
``train_config.json``, only the targets and the seed changed), a core each side by side, into
``<out>/h<H>d<D>-s<seed>``. Prints each student's held-out bits per byte, its distance to full
KD in percent and the targets' bytes per position; the headline, last, is
``hybrid_vs_full_kd_pct_max=`` over the seeds at the hybrid of ``mtkd demo --experiments all``
(``experiments.HYBRID_HEAD``, ``k`` draws; the goal of the demo's draws: ≤ 1.0).

    .venv/bin/python bench/hybrid_heads.py [--demo runs/demo] \
        --configs 0:64,4:64,8:64,16:64,32:64,8:16,8:32 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from demo_input import add_demo_argument, finished_demo
from store_size_inputs import run_mtkd
from student_seeds import train

from mtkd.recipes.experiments import HYBRID_HEAD
from mtkd.recipes.run import is_complete
from mtkd.store import bytes_on_disk, open_store


def hybrid_targets(demo: Path, teacher: str, k: int, head: int, draws: int, out: Path) -> Path:
    """The targets (width ``k``) of ``teacher``'s exact top-``head`` and ``draws`` draws from
    the rest (``head`` 0: plain draws), made once."""
    tokens = demo / "stores" / "tokens-student"
    store = demo / "stores" / f"{teacher}-student"
    if head or draws != k:
        store = out / f"{teacher}-h{head}d{draws}"
        rest = ("--sample-rest",) if head else ()
        if not is_complete(store):
            run_mtkd("harvest", tokens, "--model", demo / "teachers" / teacher / "final",
                     "--out", store, "--k", head or 1, "--num-samples", draws, *rest,
                     "--dtype", "float32", "--enforce-eager")
    targets = out / f"targets-h{head}d{draws}"
    if not is_complete(targets):
        run_mtkd("aggregate", store, "--tokens", tokens, "--out", targets,
                 "--temperatures", "1.0", "--k-out", k, "--source", "samples")
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_demo_argument(ap)
    ap.add_argument("--configs", default=None,
                    help="H:D pairs, exact head and draws from the rest (H 0: plain draws; "
                         f"default 0:k,{HYBRID_HEAD}:k)")
    ap.add_argument("--seeds", default="0,1,2", help="student seeds")
    ap.add_argument("--out", type=Path, default=None, help="default: <demo>/hybrid-heads")
    args = ap.parse_args()
    demo = finished_demo(args.demo)
    out = (args.out or demo / "hybrid-heads").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((demo / "results.json").read_text())
    teacher, k = results["best_teacher"], int(results["spec"]["k"])
    configs = [f"h{h}d{d}" for h, d in (c.split(":") for c in
                                          (args.configs or f"0:{k},{HYBRID_HEAD}:{k}").split(","))]
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = {c: hybrid_targets(demo, teacher, k, *map(int, c[1:].split("d")), out)
               for c in configs}
    student = f"single-{teacher}-sampled"  # the demo's student of plain draws: its settings
    jobs = [("full", s) for s in seeds] + [(c, s) for c in configs for s in seeds]

    def run(job: tuple[str, int]) -> float:
        config, seed = job
        if config == "full":  # the full-vocabulary KD student
            metrics = train(demo, f"single-{teacher}-full", seed, out / f"full-s{seed}")
        else:
            metrics = train(demo, student, seed, out / f"{config}-s{seed}", targets[config])
        return float(metrics["heldout_bpb"])

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # one-thread trainings, a core each
        bpb = dict(zip(jobs, pool.map(run, jobs), strict=True))
    worst: dict[str, float] = {}
    for config in configs:
        store = open_store(targets[config], verify="none")
        print(f"{config}.target_bytes_per_position="
              f"{bytes_on_disk(store.root) / store.num_rows:.1f}")
        for seed in seeds:
            pct = 100 * (bpb[(config, seed)] / bpb[("full", seed)] - 1)
            worst[config] = max(worst.get(config, -float("inf")), pct)
            print(f"{config}.seed{seed}.bpb={bpb[(config, seed)]:.4f} full_bpb="
                  f"{bpb[('full', seed)]:.4f} vs_full_kd_pct={pct:.3f}")
        print(f"{config}.vs_full_kd_pct_max={worst[config]:.3f}")
    if f"h{HYBRID_HEAD}d{k}" in worst:
        print(f"hybrid_vs_full_kd_pct_max={worst[f'h{HYBRID_HEAD}d{k}']:.3f}")


if __name__ == "__main__":
    main()
