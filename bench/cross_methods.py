"""Which cross-tokenizer target teaches best: the methods on the demo's controlled pair.

Reads a finished ``mtkd demo`` workdir (``--demo``; without it this checkout's demo, run once
and cached by ``demo_input``). For each method it builds the targets of both teachers of the
pair (``t0-narrow``, the student's tokenizer; ``t0-cross``, its own), trains their students as
the demo does (its ``train_config.json``, new targets) and prints held-out bits per byte and
``recovery`` = (CE only − cross student) ÷ (CE only − narrow student):

* ``projection``: the demo's own targets (byte-boundary alignment, the projection σ at shared
  boundaries, the chain rule for the actual token; from the teachers' 64 draws per position),
  read from the demo's results;
* ``chunk_likelihood`` (ALM-style): each row reduced to two outcomes, the actual next token
  with the probability the alignment gives it (the teacher's chunk likelihood where both ends
  of the student token are teacher boundaries) and everything else (``aggregate
  --label-entry``, then the rest of the row moved to the tail); ``chunk_likelihood_ce`` the
  same with half the loss on the label's cross-entropy (``alpha`` 0.5; the demo uses 0), as
  ALM's binarised likelihoods are a weak signal alone;
* ``matched_vocabulary`` (GOLD's exact part, without its ULD term, which needs a loss on
  sorted probabilities): the demo's cross targets kept only on student tokens whose text is
  also one cross-teacher token, plus the actual token; the rest moved to the tail. The
  same-tokenizer teacher matches every token, so its student is the projection one. The
  same for the real teacher (SmolLM2), whose vocabulary matches less of the student's.

Headline: the best method's recovery, ``best_recovery=``.

    .venv/bin/python bench/cross_methods.py [--demo runs/demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from cross_rows import label_prob_and_entropy, train_bpb
from demo_input import add_demo_argument, finished_demo

from mtkd.distill.aggregate.cross import read_student_part
from mtkd.ingest.token_bytes import token_bytes
from mtkd.ingest.tokenizer import load_pretrained_tokenizer
from mtkd.store import Store, StoreWriter, open_store

NARROW, CROSS, REAL = "t0-narrow", "t0-cross", "smollm2"
METHODS = ("projection", "chunk_likelihood", "chunk_likelihood_ce", "matched_vocabulary")


def keep_only(ids: np.ndarray, probs: np.ndarray, tail: np.ndarray,
              keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows with only the ``keep`` entries (moved to the front, in their order), the rest's
    mass added to the tail."""
    order = np.argsort(~keep, axis=1, kind="stable")
    kept = np.take_along_axis(keep, order, axis=1)
    new_ids = np.where(kept, np.take_along_axis(ids, order, axis=1), -1).astype(ids.dtype)
    new_probs = np.where(kept, np.take_along_axis(probs, order, axis=1), 0).astype(probs.dtype)
    moved = np.where(keep, 0.0, probs.astype(np.float64)).sum(axis=1)
    return new_ids, new_probs, (tail + moved).astype(tail.dtype)


def rewrite(base: Store, tokens: Store, out: Path, keep_fn) -> Path:
    """``base`` with each part's sparse rows filtered by ``keep_fn(ids, labels) → mask``."""
    writer = StoreWriter(out, base.header)
    for part in writer.pending_parts():
        batch = base.read_part(part)
        labels = read_student_part(tokens, part).labels
        arrays = {a.name: np.array(batch[a.name]) for a in base.header.arrays}
        arrays["ids"], arrays["probs"], arrays["tail_mass"] = keep_only(
            arrays["ids"], arrays["probs"], arrays["tail_mass"], keep_fn(arrays["ids"], labels))
        with writer.open_part(part) as w:
            w.append(arrays, batch.lengths, batch.seq_ids)
    writer.finalize()
    return out


def label_entry_targets(demo: Path, teacher: str, out: Path) -> Path:
    """The teacher's aligned top-k targets with the actual token's exact probability."""
    if not (out / "manifest.json").exists():
        stores = demo / "stores"
        subprocess.run([sys.executable, "-m", "mtkd.cli", "aggregate",
                        str(stores / f"{teacher}-student"), "--tokens",
                        str(stores / "tokens-student"), "--out", str(out), "--temperatures",
                        "1.0", "--k-out", "64", "--label-entry"], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def matched_student_ids(demo: Path, teacher_store: str) -> np.ndarray:
    """Mask over the student's vocabulary: its token's text is also one token of the teacher
    (the tokenizer its harvest recorded)."""
    teacher = open_store(demo / "stores" / teacher_store, verify="none").attrs
    student = token_bytes(load_pretrained_tokenizer(demo / "tokenizer").tokenizer)
    spelled = {b for b in token_bytes(load_pretrained_tokenizer(teacher["teacher_tokenizer"])
                                      .tokenizer) if b}
    return np.array([b is not None and b in spelled for b in student])


def matched_only(matched: np.ndarray):
    """``rewrite``'s filter: entries on matched tokens, and the label."""
    return lambda ids, labels: ((matched[np.maximum(ids, 0)] & (ids >= 0))
                                | (ids == labels[:, None]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_demo_argument(ap)
    ap.add_argument("--out", type=Path, default=None, help="default: <demo>/cross-methods")
    args = ap.parse_args()
    demo = finished_demo(args.demo)
    out = args.out or demo / "cross-methods"
    out.mkdir(parents=True, exist_ok=True)
    tokens = open_store(demo / "stores" / "tokens-student", verify="none")
    figures = json.loads((demo / "results.json").read_text())["figures"]
    ce = figures["ce_only_bpb"]
    bpb = {("projection", NARROW): figures["single_t0_narrow_sampled_bpb"],
           ("projection", CROSS): figures["single_t0_cross_sampled_bpb"]}

    for teacher in (NARROW, CROSS):
        full = open_store(label_entry_targets(demo, teacher, out / f"label-{teacher}"),
                          verify="none")
        chunk = rewrite(full, tokens, out / f"chunk-{teacher}",
                        lambda ids, labels: ids == labels[:, None])
        bpb[("chunk_likelihood", teacher)] = train_bpb(demo, chunk,
                                                       out / f"student-chunk-{teacher}")
        bpb[("chunk_likelihood_ce", teacher)] = train_bpb(
            demo, chunk, out / f"student-chunk-ce-{teacher}", alpha=0.5)
        label_p, _ = label_prob_and_entropy(full.read_part(0),
                                            read_student_part(tokens, 0).labels)
        print(f"{teacher}.label_prob_mean={label_p.mean():.4f}")

    matched = matched_student_ids(demo, f"{CROSS}-student")
    print(f"matched_vocabulary_share={matched.mean():.4f}")
    cross = open_store(demo / "stores" / f"single-{CROSS}-sampled", verify="none")
    gold = rewrite(cross, tokens, out / "matched-cross", matched_only(matched))
    bpb[("matched_vocabulary", NARROW)] = bpb[("projection", NARROW)]
    bpb[("matched_vocabulary", CROSS)] = train_bpb(demo, gold, out / "student-matched-cross")

    # The real teacher (SmolLM2, another family): where matching is not nearly everything
    real = demo / "stores" / f"single-{REAL}"
    if real.exists():
        matched = matched_student_ids(demo, f"{REAL}-student")
        gold = rewrite(open_store(real, verify="none"), tokens, out / "matched-real",
                       matched_only(matched))
        print(f"real.matched_vocabulary_share={matched.mean():.4f}")
        print(f"real.projection_bpb={figures['single_smollm2_bpb']:.4f}")
        print(f"real.matched_vocabulary_bpb="
              f"{train_bpb(demo, gold, out / 'student-matched-real'):.4f}")

    print(f"ce_only_bpb={ce:.4f}")
    recovery = {}
    for method in METHODS:
        narrow, crossed = bpb[(method, NARROW)], bpb[(method, CROSS)]
        recovery[method] = (ce - crossed) / (ce - narrow)
        print(f"{method}.narrow_bpb={narrow:.4f}")
        print(f"{method}.cross_bpb={crossed:.4f}")
        print(f"{method}.recovery={recovery[method]:.4f}")
    best = min(METHODS, key=lambda m: bpb[(m, CROSS)])
    print(f"best_cross_method={best}")
    print(f"best_recovery={recovery[best]:.4f}")


if __name__ == "__main__":
    main()
