"""Random-sampling targets of teachers with their own tokenizer: estimated, aligned, fused.

A teacher's draws are in its own ids at its own positions, and the alignment (``align.py``,
docs/MATHS.md §9) maps rows of probabilities, not draws. So each row's draws first become an
estimate of the teacher's distribution in its ids (:func:`estimated_rows`), which aligns like a
top-k row; the aligned rows then enter :func:`~.sampled.fuse_samples` as exact heads without
draws of their own (:func:`as_head_rows`), beside the sampled rows of same-tokenizer teachers,
with the coverage rules of ``coverage.py`` (:func:`fuse_own_samples`).

The estimate keeps the actual next token t* exact (its stored ``target_logprob``; q64r stores
of schema version 7 keep that within the top-k's bound), with the store's exact head if it
has one (a hybrid store, or ``--sample-head``), and shares the rest's exact mass among the
draws outside that head by their counts. The alignment's chain rule needs
p(t*) (MATHS §9, step 3), and given how many draws fell outside the head they are draws from
the rest renormalised, so every entry is unbiased (MATHS §6, the hybrid); with no draw outside,
the rest stays in the tail. The pushforward is linear, so aligned shared-boundary rows stay
unbiased without ``student_splits``; with it (the default) they weigh the row against the
crossing tokens of the row before by estimated masses, and conditioning inside a teacher token
divides by an estimated prefix mass: ratio estimators, consistent, slightly biased for few
draws (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtkd.distill.aggregate.align import AlignedRows
from mtkd.distill.aggregate.coverage import (
    COVERAGE,
    coverage_bits,
    coverage_stats,
    covered_rows,
    fuse_partial_rows,
    mask_weights,
    one_hot,
    uncovered,
)
from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples
from mtkd.distill.aggregate.tempering import TeacherRows


def estimated_rows(rows: SampledRows, next_id: np.ndarray,
                   target_logprob: np.ndarray) -> TeacherRows:
    """Each row's estimate of the teacher's distribution as a sparse row in its own ids: the
    exact head (the store's, if any) and the actual next token ``next_id`` at its exact
    ``target_logprob``, then the draws outside them with the rest's mass shared by their
    counts (tail 0), or, where no draw fell outside, the rest as the tail. Entries in
    descending order, ids −1 at log-prob −inf for padding."""
    n = rows.n
    if rows.head_ids is None:
        head_ids = np.empty((n, 0), np.int64)
        head_p = np.empty((n, 0))
        rest = np.ones(n)
    else:
        head_ids, head_p = rows.head_ids.astype(np.int64), rows.head_probs
        rest = np.asarray(rows.rest_mass, np.float64)
    star = np.asarray(next_id, np.int64)
    with np.errstate(invalid="ignore"):
        p_star = np.exp(np.asarray(target_logprob, np.float64))
    add = (star >= 0) & (p_star > 0) & ~(head_ids == star[:, None]).any(axis=1)
    ids = np.concatenate([head_ids, np.where(add, star, -1)[:, None]], axis=1)
    probs = np.concatenate([head_p, np.where(add, p_star, 0.0)[:, None]], axis=1)
    rest = np.clip(rest - np.where(add, p_star, 0.0), 0.0, 1.0)
    drawn_ids = rows.ids.astype(np.int64)
    outside = (rows.counts > 0) & (drawn_ids >= 0) & ~(
        drawn_ids[:, :, None] == ids[:, None, :]).any(axis=2)
    counts = np.where(outside, rows.counts, 0).astype(np.float64)
    drawn = counts.sum(axis=1)
    share = np.where(drawn > 0, rest / np.maximum(drawn, 1.0), 0.0)
    ids = np.concatenate([ids, np.where(outside, drawn_ids, -1)], axis=1)
    probs = np.concatenate([probs, counts * share[:, None]], axis=1)
    ids = np.where(probs > 0, ids, -1)
    order = np.argsort(-probs, axis=1, kind="stable")
    with np.errstate(divide="ignore"):
        logprobs = np.log(np.take_along_axis(probs, order, axis=1)).astype(np.float32)
        tail = np.log(np.where(drawn > 0, 0.0, rest))
    return TeacherRows(np.take_along_axis(ids, order, axis=1), logprobs, tail,
                       np.asarray(target_logprob, np.float64))


def as_head_rows(aligned: TeacherRows, num_samples: int) -> SampledRows:
    """Aligned estimated rows as ``fuse_samples`` takes them: an exact head (the aligned
    entries), the tail as a rest without draws (so it stays the tail)."""
    n = aligned.ids.shape[0]
    probs = np.exp(aligned.logprobs.astype(np.float64))
    return SampledRows(ids=np.full((n, 1), -1, np.int32), counts=np.zeros((n, 1), np.int32),
                       num_samples=num_samples,
                       head_ids=np.where(probs > 0, aligned.ids, -1), head_probs=probs,
                       rest_mass=np.exp(np.asarray(aligned.tail_logmass, np.float64)))


def select_sampled(rows: SampledRows, index: np.ndarray) -> SampledRows:
    """The rows at ``index`` (a copy)."""
    head = rows.head_ids is not None
    return SampledRows(rows.ids[index], rows.counts[index], rows.num_samples,
                       rows.head_ids[index] if head else None,
                       rows.head_probs[index] if head else None,
                       rows.rest_mass[index] if head else None)


def fuse_own_samples(rows: Sequence[SampledRows], aligned: Sequence[AlignedRows | None],
                     weights: np.ndarray, k_out: int, vocab_size: int, labels: np.ndarray
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The linear mixture of sampled teachers, some aligned from their own tokenizer
    (``aligned[j]`` not None: its estimated rows at the student's positions): static weights
    masked where a teacher does not cover a row, rows missing a teacher fused again from the
    others, the CE fallback where none is left; and the coverage counts of the part."""
    n = len(labels)
    covered = np.stack([np.ones(n, bool) if a is None else covered_rows(a) for a in aligned],
                       axis=1)
    sampled = [r if a is None else as_head_rows(a.rows, r.num_samples)
               for r, a in zip(rows, aligned, strict=True)]
    w = mask_weights(np.asarray(weights, np.float64), covered)
    fused = fuse_samples(sampled, w, k_out, vocab_size)
    fuse_partial_rows(fused, sampled, w, covered,
                      lambda some, ws, _cols: fuse_samples(some, ws, k_out, vocab_size),
                      select=select_sampled)
    one_hot(fused, uncovered(w, covered), labels)
    fused[COVERAGE] = coverage_bits(covered)
    return fused, coverage_stats(aligned, covered, w)
