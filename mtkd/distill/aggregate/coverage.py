"""Rows that some teachers do not cover: their weights, their fusion, and the CE fallback.

A teacher aligned from its own tokenizer may have no distribution for a student row (a
**fallback** row, ``align.AlignedRows.fallback``). There the teacher gets weight 0 and the
others are renormalised (docs/MATHS.md §9, "Coverage"):

* ``covered [N,K]`` (``covered_rows``): teacher k has a distribution on row n (always, for a
  teacher in the student's tokens); ``coverage_bits`` stores it as one int32 per row.
* ``MaskedWeights``: any weight policy (static or adaptive) with its weights multiplied by the
  mask and renormalised on the rows that lack a teacher; rows every teacher covers keep the
  policy's weights bit for bit. The policy sees each uncovered teacher's signals replaced by
  neutral ones (its mean target log-prob over the sequence's covered rows, entropy 0), so a
  context weight is the teacher's loss on the rows it covers.
* ``fuse_partial_rows``: rows missing some teachers are fused again from the covering teachers
  alone, so an absent teacher's placeholder row (``fill_placeholders``) never touches the
  union of supports, the imputation or the diagnostics.
* ``one_hot``: rows no teacher covers (or whose covering teachers all weigh 0) get the one-hot
  target on the actual next token, so KD there is CE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mtkd.distill.aggregate.align import AlignedRows
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.weights import WeightInputs, WeightPolicy
from mtkd.store.schema import teacher_block

#: A coverage bitmask is an int32: bit k for teacher k.
MAX_TEACHERS = 31
#: The per-row array of a target store with teachers of their own tokenizer.
COVERAGE = "coverage"


def covered_rows(aligned: AlignedRows) -> np.ndarray:
    """Rows where an aligned teacher gives a distribution: not a fallback, and some mass on a
    student id (a row left all in the tail says nothing about the next token)."""
    finite = np.isfinite(aligned.rows.logprobs).any(axis=1)
    return ~aligned.fallback & finite


def coverage_bits(covered: np.ndarray) -> np.ndarray:
    """``int32 [N]``: bit k set iff teacher k covers the row (``covered [N,K]``)."""
    if covered.shape[1] > MAX_TEACHERS:
        raise ValueError(f"a coverage bitmask holds {MAX_TEACHERS} teachers, got "
                         f"{covered.shape[1]}")
    bits = np.left_shift(1, np.arange(covered.shape[1], dtype=np.int64))
    return (covered.astype(np.int64) @ bits).astype(np.int32)


def fill_placeholders(rows: TeacherRows, covered: np.ndarray) -> TeacherRows:
    """``rows`` with every uncovered row made a flat distribution (k entries and the tail at
    1/(k+1) each): a finite stand-in that every tail model tempers without NaN. Its weight is 0
    and ``fuse_partial_rows`` / ``one_hot`` replace whatever it touched."""
    if covered.all():
        return rows
    flat = -np.log(rows.k + 1.0)
    logprobs = np.array(rows.logprobs, dtype=np.float32)
    tail = np.array(rows.tail_logmass, dtype=np.float64)
    logprobs[~covered] = flat
    tail[~covered] = flat
    return TeacherRows(rows.ids, logprobs, tail, rows.target_logprob)


def select_rows(rows: TeacherRows, index: np.ndarray) -> TeacherRows:
    """The rows at ``index`` (a copy)."""
    return TeacherRows(
        rows.ids[index], rows.logprobs[index], rows.tail_logmass[index],
        None if rows.target_logprob is None else rows.target_logprob[index],
        None if rows.tempered_tail_logmass is None else rows.tempered_tail_logmass[index],
        rows.temperatures,
    )


def mask_weights(weights: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """``weights [N,K]`` (or ``[K]``) times the mask, renormalised where a teacher is missing
    and some covering teacher weighs more than 0; the other rows keep ``weights`` as they are
    (rows every teacher covers: bit for bit; rows left with no weight: ``one_hot`` takes
    them)."""
    w = np.array(np.broadcast_to(weights, covered.shape), dtype=np.float64)
    partial = ~covered.all(axis=1)
    if partial.any():
        masked = w[partial] * covered[partial]
        total = masked.sum(axis=1)
        keep = total > 0
        rows = np.flatnonzero(partial)[keep]
        w[rows] = masked[keep] / total[keep, None]
    return w


def uncovered(weights: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Rows without a covering teacher of positive weight (bool ``[N]``): the CE fallback."""
    return ~((np.asarray(weights) > 0) & covered).any(axis=1)


def neutral_inputs(inputs: WeightInputs, covered: np.ndarray, own: np.ndarray,
                   seq_offsets: np.ndarray) -> WeightInputs:
    """What a policy sees of a teacher where it says nothing: entropy 0 on rows it does not
    cover, and where its target log-prob is unknown (uncovered rows; for a teacher of its own
    tokenizer (``own [K]``) also −inf, the actual token's mass not known) its mean over the
    sequence's rows where it is known (0 if none): a context weight (mean loss) is then the
    mean over those rows, and a token weight is finite. An uncovered teacher's weight is masked
    afterwards anyway; a same-tokenizer teacher's −inf (probability 0) stays as it is."""
    entropy = np.where(covered, inputs.entropy, 0.0)
    target = inputs.target_logprob
    if target is None:
        return WeightInputs(entropy, None)
    known = covered & (np.isfinite(target) | ~np.asarray(own, dtype=bool))
    if known.all():
        return WeightInputs(entropy, target)
    lengths = np.diff(seq_offsets)
    seq = np.repeat(np.arange(len(lengths)), lengths)
    sums = np.zeros((len(lengths), target.shape[1]))
    counts = np.zeros_like(sums)
    np.add.at(sums, seq, np.where(known, target, 0.0))
    np.add.at(counts, seq, known)
    mean = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return WeightInputs(entropy, np.where(known, target, mean[seq]))


class MaskedWeights:
    """A weight policy (callable or static weights) with teachers masked where they do not
    cover a row (``mask_weights``). Keeps the last weights it returned in ``weights``, for
    ``fuse_partial_rows``."""

    def __init__(self, policy: WeightPolicy | np.ndarray, covered: np.ndarray, own: np.ndarray,
                 seq_offsets: np.ndarray) -> None:
        self.policy, self.covered, self.own, self.seq_offsets = policy, covered, own, seq_offsets
        self.weights: np.ndarray | None = None

    def __call__(self, inputs: WeightInputs) -> np.ndarray:
        assert callable(self.policy)
        w = self.policy(neutral_inputs(inputs, self.covered, self.own, self.seq_offsets))
        self.weights = mask_weights(w, self.covered)
        return self.weights

    def static(self) -> np.ndarray:
        """The masked weights of a static policy (no inputs needed)."""
        assert not callable(self.policy)
        self.weights = mask_weights(np.asarray(self.policy, dtype=np.float64), self.covered)
        return self.weights


def fuse_partial_rows(fused: dict[str, np.ndarray], rows: Sequence[Any],
                      weights: np.ndarray, covered: np.ndarray,
                      fuse_rows: Callable[[list[Any], np.ndarray, np.ndarray],
                                          dict[str, np.ndarray]],
                      select: Callable[[Any, np.ndarray], Any] = select_rows) -> None:
    """Fuse again, from the covering teachers alone, every row that misses some teacher but
    not all (in place: ids, probs, tail, diagnostics; weights and n_eff are already right).
    ``fuse_rows(teacher_rows, weights [n,C], teacher_columns)`` fuses a group of rows (taken
    with ``select(rows, index)``: ``TeacherRows`` by default); one call per coverage pattern.
    Blocks of the missing teachers (``teacher{j}_*``) are emptied."""
    gone = uncovered(weights, covered)
    partial = ~covered.all(axis=1) & ~gone
    bits = coverage_bits(covered)
    for pattern in np.unique(bits[partial]):
        idx = np.flatnonzero(partial & (bits == pattern))
        cols = np.flatnonzero(covered[idx[0]])
        sub = fuse_rows([select(rows[j], idx) for j in cols], weights[np.ix_(idx, cols)],
                        cols)
        for name in ("ids", "probs", "tail_mass", "jensen_gap", "disagreement", "tail_bucket"):
            fused[name][idx] = sub[name]
    for j in range(covered.shape[1]):
        missing = ~covered[:, j]
        ids, probs, tail = teacher_block(j)
        if ids in fused and missing.any():
            fused[ids][missing] = -1
            fused[probs][missing] = 0.0
            fused[tail][missing] = 1.0


def one_hot(fused: dict[str, np.ndarray], rows: np.ndarray, labels: np.ndarray) -> None:
    """The CE fallback on ``rows`` (bool ``[N]``), in place: all mass on the actual next token
    ``labels``, weights 0, diagnostics 0."""
    if not rows.any():
        return
    fused["ids"][rows] = -1
    fused["ids"][rows, 0] = labels[rows]
    fused["probs"][rows] = 0.0
    fused["probs"][rows, 0] = 1.0
    for name in ("tail_mass", "weights", "jensen_gap", "disagreement", "n_eff", "tail_bucket"):
        fused[name][rows] = 0.0


def coverage_stats(aligned: Sequence[AlignedRows | None], covered: np.ndarray,
                   weights: np.ndarray) -> dict[str, Any]:
    """Per-teacher counts for a part's commit record (lists over teachers; a teacher in the
    student's tokens counts every row as shared): ``covered_rows``, ``aligned_shared`` /
    ``_interior`` / ``_fallback``, and ``ce_only_rows`` (the one-hot fallback)."""
    n = covered.shape[0]
    counts = [a.coverage() if a is not None else {"shared": n, "interior": 0, "fallback": 0}
              for a in aligned]
    return {
        "covered_rows": covered.sum(axis=0).astype(int).tolist(),
        **{f"aligned_{kind}": [c[kind] for c in counts]
           for kind in ("shared", "interior", "fallback")},
        "ce_only_rows": int(uncovered(weights, covered).sum()),
    }


def complete_rows(target_logprob: np.ndarray, own: Sequence[bool]) -> np.ndarray:
    """Rows where every teacher of its own tokenizer knows the actual token's log-prob: the
    rows ``--weights fit`` fits on (bool ``[N]``; all rows when no teacher has its own)."""
    cols = np.flatnonzero(np.asarray(own, dtype=bool))
    return np.isfinite(target_logprob[:, cols]).all(axis=1)
