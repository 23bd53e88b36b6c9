"""Where the demo's controlled pair loses its gain: the cross teacher's rows by alignment kind.

Reads a finished ``mtkd demo`` workdir (``--demo``; without it this checkout's demo, run once
and cached by ``demo_input``): the pair's random-sampling target stores
(``single-t0-narrow-sampled``, same tokenizer as the student; ``single-t0-cross-sampled``,
aligned from the cross teacher's own tokens) and the cross teacher's store. Each student row is
``interior`` (its context ends inside a cross-teacher token), ``chunk`` (both its context end
and its label's end are cross-teacher boundaries: the alignment is exact) or ``label_inside``
(the rest). Prints, per kind, its share and each target's mean probability of the actual next
token and mean entropy; then trains students as the demo does (its ``train_config.json``, new
targets) on three diagnostic stores:

* ``cross_with_narrow_interior``: the cross targets, interior rows from the narrow teacher;
* ``narrow_with_cross_interior``: the converse;
* ``narrow_exact_label``: the narrow teacher's draws through the cross path's estimator (the
  actual token exact, the draws outside it sharing the rest), no alignment.

Headline: ``gap_at_shared_rows_bpb=`` (held-out bits per byte between the cross targets with
the narrow interior rows and the narrow targets), beside ``gap_bpb=`` (cross − narrow).

    .venv/bin/python bench/cross_rows.py [--demo runs/demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from demo_input import add_demo_argument, finished_demo

from mtkd.distill.aggregate.align import INTERIOR
from mtkd.distill.aggregate.cross import align_own_part, read_own_part, read_student_part
from mtkd.distill.aggregate.job import sampled_rows, teacher_rows
from mtkd.distill.aggregate.own_samples import as_head_rows, estimated_rows
from mtkd.distill.aggregate.sampled import fuse_samples
from mtkd.store import Batch, Store, StoreWriter, open_store

NARROW, CROSS = "single-t0-narrow-sampled", "single-t0-cross-sampled"
KINDS = ("chunk", "label_inside", "interior")


def row_kinds(tokens: Store, cross: Store) -> tuple[np.ndarray, np.ndarray]:
    """Per student row of part 0, as the aggregate job aligns the cross teacher's top-k rows:
    0 chunk, 1 label_inside (shared or fallback), 2 interior; and the rows' labels."""
    student = read_student_part(tokens, 0)
    rows = teacher_rows(cross.read_part(0), cross.attrs)
    aligned = align_own_part(student, read_own_part(cross, 0, student, tokens.attrs, rows), 0)
    return np.where(aligned.kind == INTERIOR, 2, np.where(aligned.chunk, 0, 1)), student.labels


def label_prob_and_entropy(targets: Batch, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, probs = targets["ids"], targets["probs"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)
    return np.where(ids == labels[:, None], probs, 0.0).sum(axis=1), entropy


def write_like(base: Store, batch: Batch, arrays: dict[str, np.ndarray], out: Path) -> Path:
    """A one-part target store with ``base``'s header and sequences."""
    writer = StoreWriter(out, base.header)
    if writer.pending_parts(0, 1):
        with writer.open_part(0) as part:
            part.append({a.name: arrays[a.name] for a in base.header.arrays}, batch.lengths,
                        batch.seq_ids)
        writer.finalize()
    return out


def train_bpb(demo: Path, targets: Path, out: Path, alpha: float = 0.0) -> float:
    """Held-out bits per byte of a student trained as the demo's pair students are (with
    ``alpha`` of its loss on the label's cross-entropy; the demo's is 0)."""
    config = json.loads((demo / "students" / CROSS / "train_config.json").read_text())
    config |= {"targets": str(targets), "out": str(out), "progress": False, "alpha": alpha}
    path = out.with_suffix(".json")
    path.write_text(json.dumps(config))
    if not (out / "final_metrics.json").exists():
        subprocess.run([sys.executable, "-m", "mtkd.cli", "train", "--config", str(path)],
                       check=True, stdout=subprocess.DEVNULL)
    return float(json.loads((out / "final_metrics.json").read_text())["heldout_bpb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_demo_argument(ap)
    ap.add_argument("--out", type=Path, default=None, help="default: <demo>/cross-rows")
    args = ap.parse_args()
    demo = finished_demo(args.demo)
    stores, out = demo / "stores", args.out or demo / "cross-rows"
    out.mkdir(parents=True, exist_ok=True)
    kinds, labels = row_kinds(open_store(stores / "tokens-student", verify="none"),
                              open_store(stores / "t0-cross-student", verify="none"))
    targets = {name: open_store(stores / name, verify="none") for name in (NARROW, CROSS)}
    batches = {name: store.read_part(0) for name, store in targets.items()}
    stats = {short: label_prob_and_entropy(batches[name], labels)
             for name, short in ((NARROW, "narrow"), (CROSS, "cross"))}
    for k, kind in enumerate(KINDS):
        rows = kinds == k
        print(f"{kind}.share={rows.mean():.4f}")
        for short, (label_p, entropy) in stats.items():
            print(f"{kind}.{short}_label_p={label_p[rows].mean():.4f}")
            print(f"{kind}.{short}_entropy={entropy[rows].mean():.3f}")

    interior = kinds == 2
    spliced = {}
    for name, base, donor in (("cross_with_narrow_interior", CROSS, NARROW),
                              ("narrow_with_cross_interior", NARROW, CROSS)):
        store, batch = targets[base], batches[base]
        arrays = {a.name: np.array(batch[a.name]) for a in store.header.arrays}
        for field in ("ids", "probs", "tail_mass"):
            arrays[field][interior] = batches[donor][field][interior]
        spliced[name] = write_like(store, batch, arrays, out / name)

    teacher = open_store(stores / "t0-narrow-student", verify="none")
    batch = teacher.read_part(0)
    draws = sampled_rows(batch, teacher.attrs)
    estimate = estimated_rows(draws, labels, batch["target_logprob"])
    store = targets[NARROW]
    fused = fuse_samples([as_head_rows(estimate, draws.num_samples)], np.ones(1),
                         batches[NARROW]["ids"].shape[1], int(store.attrs["vocab_size"]))
    spliced["narrow_exact_label"] = write_like(store, batches[NARROW], fused,
                                               out / "narrow_exact_label")

    bpb = {name: train_bpb(demo, path, out / f"student-{name}")
           for name, path in spliced.items()}
    results = json.loads((demo / "results.json").read_text())["figures"]
    narrow_bpb, cross_bpb = results["single_t0_narrow_sampled_bpb"], results[
        "single_t0_cross_sampled_bpb"]
    for name, value in bpb.items():
        print(f"{name}_bpb={value:.4f}")
    print(f"narrow_bpb={narrow_bpb:.4f}")
    print(f"cross_bpb={cross_bpb:.4f}")
    print(f"gap_bpb={cross_bpb - narrow_bpb:.4f}")
    print(f"gap_at_shared_rows_bpb={bpb['cross_with_narrow_interior'] - narrow_bpb:.4f}")


if __name__ == "__main__":
    main()
