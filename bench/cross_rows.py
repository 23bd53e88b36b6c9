"""Where the demo's controlled pair loses its gain: the cross teacher's rows by alignment kind.

Reads a finished ``mtkd demo`` workdir (``--demo``): the pair's random-sampling target stores
(``single-t0-narrow-sampled``, same tokenizer as the student; ``single-t0-cross-sampled``,
aligned from the cross teacher's own tokens) and the cross teacher's store. Each student row
is ``interior`` (its context ends inside a cross-teacher token), ``chunk`` (both its context
end and its label's end are cross-teacher boundaries: the alignment is exact) or
``label_inside`` (the rest). Prints, per kind, its share and each target's mean probability
of the actual next token and mean entropy; then trains students as the demo does (its
``train_config.json``, new targets) on three diagnostic stores:

* ``cross_with_narrow_interior``: the cross targets, interior rows from the narrow teacher;
* ``narrow_with_cross_interior``: the converse;
* ``narrow_exact_label``: the narrow teacher's draws through the cross path's estimator (the
  actual token exact, the draws outside it sharing the rest), no alignment.

Headline: ``gap_at_shared_rows_bpb=`` (held-out bits per byte between the cross targets with
the narrow interior rows and the narrow targets), beside ``gap_bpb=`` (cross − narrow).

    .venv/bin/python bench/cross_rows.py --demo runs/demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mtkd.distill.aggregate.own_samples import as_head_rows, estimated_rows
from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples
from mtkd.store import Batch, Store, StoreWriter, open_store

NARROW, CROSS = "single-t0-narrow-sampled", "single-t0-cross-sampled"
KINDS = ("chunk", "label_inside", "interior")


def read(stores: Path, name: str) -> Batch:
    return open_store(stores / name, verify="none").read_part(0)


def row_kinds(tokens: Batch, cross: Batch) -> np.ndarray:
    """Per student row: 0 chunk, 1 label_inside, 2 interior (see the module doc)."""
    ends, cross_ends = tokens["byte_end"], cross["context_end"]
    kinds = []
    for s in range(len(tokens.offsets) - 1):
        e = ends[tokens.offsets[s]:tokens.offsets[s + 1]]
        bounds = set(cross_ends[cross.offsets[s]:cross.offsets[s + 1]].tolist()) | {int(e[-1])}
        shared = np.array([int(x) in bounds for x in e])
        kinds.append(np.where(~shared[:-1], 2, np.where(shared[1:], 0, 1)))
    return np.concatenate(kinds)


def labels_of(tokens: Batch) -> np.ndarray:
    ids, off = tokens["token_ids"], tokens.offsets
    return np.concatenate([ids[off[s] + 1:off[s + 1]] for s in range(len(off) - 1)])


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


def train_bpb(demo: Path, targets: Path, out: Path) -> float:
    """Held-out bits per byte of a student trained as the demo's pair students are."""
    config = json.loads((demo / "students" / CROSS / "train_config.json").read_text())
    config |= {"targets": str(targets), "out": str(out), "progress": False}
    path = out.with_suffix(".json")
    path.write_text(json.dumps(config))
    if not (out / "final_metrics.json").exists():
        subprocess.run([sys.executable, "-m", "mtkd.cli", "train", "--config", str(path)],
                       check=True, stdout=subprocess.DEVNULL)
    return float(json.loads((out / "final_metrics.json").read_text())["heldout_bpb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished mtkd demo workdir")
    ap.add_argument("--out", type=Path, default=None, help="default: <demo>/cross-rows")
    args = ap.parse_args()
    stores, out = args.demo / "stores", args.out or args.demo / "cross-rows"
    out.mkdir(parents=True, exist_ok=True)
    tokens = read(stores, "tokens-student")
    kinds = row_kinds(tokens, read(stores, "t0-cross-student"))
    labels = labels_of(tokens)
    narrow, cross = read(stores, NARROW), read(stores, CROSS)
    stats = {name: label_prob_and_entropy(b, labels) for name, b in
             (("narrow", narrow), ("cross", cross))}
    for k, kind in enumerate(KINDS):
        rows = kinds == k
        print(f"{kind}.share={rows.mean():.4f}")
        for name, (label_p, entropy) in stats.items():
            print(f"{kind}.{name}_label_p={label_p[rows].mean():.4f}")
            print(f"{kind}.{name}_entropy={entropy[rows].mean():.3f}")

    interior = kinds == 2
    spliced = {}
    for name, base, donor in (("cross_with_narrow_interior", CROSS, narrow),
                              ("narrow_with_cross_interior", NARROW, cross)):
        store = open_store(stores / base, verify="none")
        batch = store.read_part(0)
        arrays = {a.name: np.array(batch[a.name]) for a in store.header.arrays}
        for field in ("ids", "probs", "tail_mass"):
            arrays[field][interior] = donor[field][interior]
        spliced[name] = write_like(store, batch, arrays, out / name)

    teacher = read(stores, "t0-narrow-student")
    draws = SampledRows(teacher["sample_ids"], teacher["sample_counts"].astype(np.int64),
                        int(teacher["sample_counts"][0].sum()))
    estimate = estimated_rows(draws, labels, teacher["target_logprob"])
    store = open_store(stores / NARROW, verify="none")
    fused = fuse_samples([as_head_rows(estimate, draws.num_samples)], np.ones(1),
                         narrow["ids"].shape[1], int(store.attrs["vocab_size"]))
    spliced["narrow_exact_label"] = write_like(store, narrow, fused, out / "narrow_exact_label")

    bpb = {name: train_bpb(args.demo, path, out / f"student-{name}")
           for name, path in spliced.items()}
    results = json.loads((args.demo / "results.json").read_text())["figures"]
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
