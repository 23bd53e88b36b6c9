"""Align a teacher with another tokenizer to the student's positions.

The student and the teacher read the same text, each with its own tokenizer; each token has
byte offsets into the text. Student row j predicts token j+1 from tokens 0..j (its context ends
at the byte where token j ends); a teacher row likewise. :func:`align_rows` turns the teacher's
rows (top-k ids and log-probs over *its* vocabulary, tail log-mass, target log-probs) into rows
over the student's vocabulary, one per student row, that enter ``fuse`` like any same-tokenizer
teacher (a ``TeacherRows``). How (``align_kernel``; docs/MATHS.md, "Teachers with another
tokenizer"): at shared boundaries the teacher row pushed forward by the vocabulary projection
σ (``vocab_projection``); inside a teacher token the row conditioned on the bytes already read;
the actual next student token's mass by the chain rule along the teacher's actual tokens. A row
without any teacher information is a **fallback** (``AlignedRows.fallback``): its contents are
placeholders (all mass in the tail) and the teacher must get weight 0 there.

Another alignment method plugs in as an :class:`Aligner` returning the same ``AlignedRows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mtkd.distill.aggregate.align_kernel import FALLBACK, INTERIOR, SHARED, align_kernel, compiled
from mtkd.distill.aggregate.fuse import default_backend
from mtkd.distill.aggregate.tails import as_float64
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.vocab_projection import VocabProjection

INTERIOR_TAILS = ("keep", "drop")
#: How many bytes short of the student's text the teacher's may end: the start of a UTF-8
#: character that the window's end cuts (the rows predicting them fall back).
MAX_CUT = 3
#: The id of a sequence's first token when it is not known (``TokenSpans``).
UNKNOWN = -1


@dataclass(frozen=True)
class TokenSpans:
    """Tokenised sequences with byte offsets into their text (flat, like the stores).

    Sequence s holds ``ids[offsets[s]:offsets[s+1]]``; its first token starts at byte
    ``starts[s]`` and token i ends at byte ``ends[i]`` (non-decreasing; special tokens take
    zero bytes). A sequence of L tokens has L − 1 rows. A sequence's first token may have id
    ``UNKNOWN`` (−1): no row predicts it, so alignment needs only where it ends (a teacher
    store keeps the ids its rows predict, ``next_id``, not the first one).
    """

    ids: np.ndarray
    ends: np.ndarray
    starts: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        for name in ("ids", "ends", "starts", "offsets"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), np.int64))
        n, s = len(self.ids), len(self.starts)
        if self.ids.ndim != 1 or self.ends.shape != self.ids.shape:
            raise ValueError(f"ids {self.ids.shape} and ends {self.ends.shape} must both be [T]")
        if self.offsets.shape != (s + 1,) or self.offsets[0] != 0 or self.offsets[-1] != n or (
                np.diff(self.offsets) < 0).any():
            raise ValueError(f"offsets must be [S+1] = [{s + 1}], non-decreasing from 0 to {n}")

    @classmethod
    def from_sequences(cls, ids: Sequence[Sequence[int] | np.ndarray],
                       bounds: Sequence[Sequence[int] | np.ndarray]) -> TokenSpans:
        """From per-sequence ids ``[L]`` and bounds ``[L+1]`` (where the first token starts, then
        where each token ends: ``ingest.token_bytes.byte_bounds``)."""
        if len(ids) != len(bounds):
            raise ValueError(f"{len(ids)} id sequences but {len(bounds)} bound sequences")
        for s, (i, b) in enumerate(zip(ids, bounds, strict=True)):
            if len(b) != len(i) + 1:
                raise ValueError(f"sequence {s}: {len(i)} tokens need {len(i) + 1} bounds, "
                                 f"got {len(b)}")
        lengths = [len(i) for i in ids]
        return cls(np.concatenate([np.asarray(i, np.int64) for i in ids]) if ids else [],
                   np.concatenate([np.asarray(b[1:], np.int64) for b in bounds]) if ids else [],
                   [int(b[0]) for b in bounds], np.concatenate([[0], np.cumsum(lengths)]))

    @property
    def num_sequences(self) -> int:
        return len(self.starts)

    @property
    def row_offsets(self) -> np.ndarray:
        """``int64 [S+1]``: sequence s has rows ``row_offsets[s]:row_offsets[s+1]``."""
        rows = np.maximum(np.diff(self.offsets) - 1, 0)
        return np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    def previous_bounds(self) -> np.ndarray:
        """Where each token starts, ``[T]``: its sequence's start, or the previous token's end."""
        prev = np.empty_like(self.ends)
        prev[1:] = self.ends[:-1]
        firsts = self.offsets[:-1][np.diff(self.offsets) > 0]
        prev[firsts] = self.starts[np.diff(self.offsets) > 0]
        return prev

    def span_ends(self) -> np.ndarray:
        """Where each sequence's text ends, ``[S]`` (its start when it has no tokens)."""
        out = self.starts.copy()
        full = np.diff(self.offsets) > 0
        out[full] = self.ends[self.offsets[1:][full] - 1]
        return out


@dataclass(frozen=True)
class AlignedRows:
    """A teacher's rows at the student's positions: ``rows`` (student ids, ``k_out`` wide,
    descending; ``tail_logmass`` and ``target_logprob`` float64, the latter the log-prob of the
    actual student token, −inf where unknown); ``kind int8 [N]`` (``FALLBACK`` / ``SHARED`` /
    ``INTERIOR``); ``chunk bool [N]``: the actual token's mass is the teacher's probability of
    exactly the text of that token (its boundaries are teacher boundaries too)."""

    rows: TeacherRows
    kind: np.ndarray
    chunk: np.ndarray

    @property
    def fallback(self) -> np.ndarray:
        """Rows without teacher information (bool ``[N]``): give the teacher weight 0 there."""
        return self.kind == FALLBACK

    def coverage(self) -> dict[str, int]:
        """Counts of rows: all, shared, interior, fallback, chunk (exact label mass), label
        (actual token with known positive mass)."""
        return {
            "rows": int(self.kind.size),
            "shared": int((self.kind == SHARED).sum()),
            "interior": int((self.kind == INTERIOR).sum()),
            "fallback": int((self.kind == FALLBACK).sum()),
            "chunk": int(self.chunk.sum()),
            "label": int(np.isfinite(self.rows.target_logprob).sum()),
        }


class Aligner(Protocol):
    """An alignment method: a teacher's rows on its tokens → rows at the student's positions."""

    def __call__(self, student: TokenSpans, teacher: TokenSpans, rows: TeacherRows,
                 projection: VocabProjection, *, k_out: int | None = None) -> AlignedRows: ...


def _check_spans(spans: TokenSpans, lengths: np.ndarray, who: str,
                 first_bytes: np.ndarray | None = None) -> None:
    """Refuse ids outside the vocabulary, decreasing offsets, and tokens whose byte span is not
    what they spell (one leading space less is allowed on a sequence's first spelling token).
    A sequence's first token of id ``UNKNOWN`` spells whatever it spans."""
    seq_first = np.repeat(spans.offsets[:-1], np.diff(spans.offsets))
    unknown = (spans.ids == UNKNOWN) & (np.arange(len(spans.ids)) == seq_first)
    if spans.ids.size and (spans.ids[~unknown].min(initial=0) < 0
                           or spans.ids.max() >= len(lengths)):
        raise ValueError(f"{who} ids outside [0, {len(lengths)}) (the projection's vocabulary)")
    prev = spans.previous_bounds()
    width = spans.ends - prev
    if (width < 0).any():
        t = int(np.flatnonzero(width < 0)[0])
        raise ValueError(f"{who} byte offsets are not increasing: token {t} ends at "
                         f"{spans.ends[t]}, before it starts ({prev[t]})")
    known = np.where(unknown, 0, spans.ids)
    spelled = np.where(unknown, width, lengths[known].astype(np.int64))
    bad = width != spelled
    if bad.any():
        spells = spelled > 0
        before = np.cumsum(spells) - spells  # spelling tokens before each token
        first = spells & (before == before[seq_first])  # its sequence's first spelling token
        ok = first & (width == spelled - 1)
        if first_bytes is not None:
            ok &= first_bytes[known] == ord(" ")
        bad &= ~ok
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{who} token {t} (id {spans.ids[t]}) spans {width[t]} bytes of the text "
                         f"but spells {spelled[t]}: offsets and tokens do not match")


def check_spans(student: TokenSpans, teacher: TokenSpans, projection: VocabProjection) -> None:
    """Refuse two tokenisations that do not cover the same text (sequence by sequence; the
    teacher's may end up to ``MAX_CUT`` bytes early, before a character cut by the window's
    end) or whose tokens do not spell the bytes they span (``ValueError``). ``align_rows``
    checks this too; a job calls it first to refuse bad input before it writes anything."""
    if student.num_sequences != teacher.num_sequences:
        raise ValueError(f"{student.num_sequences} student sequences but "
                         f"{teacher.num_sequences} teacher sequences")
    short = student.span_ends() - teacher.span_ends()  # a character cut at the window's end
    if not (np.array_equal(student.starts, teacher.starts)
            and ((short >= 0) & (short <= MAX_CUT)).all()):
        s = int(np.flatnonzero((student.starts != teacher.starts)
                               | (short < 0) | (short > MAX_CUT))[0])
        raise ValueError(f"sequence {s}: the student covers bytes [{student.starts[s]}, "
                         f"{student.span_ends()[s]}) of the text, the teacher "
                         f"[{teacher.starts[s]}, {teacher.span_ends()[s]}): not the same text")
    teacher_first = np.zeros(projection.teacher_size, np.int64)
    spells = projection.teacher_lengths > 0
    teacher_first[spells] = projection.spelled[projection.starts[:-1][spells]]
    _check_spans(teacher, projection.teacher_lengths, "teacher", teacher_first)
    _check_spans(student, projection.student_lengths, "student")


def _check_inputs(student: TokenSpans, teacher: TokenSpans, rows: TeacherRows,
                  projection: VocabProjection, k_out: int, interior_tail: str) -> None:
    check_spans(student, teacher, projection)
    want = int(teacher.row_offsets[-1])
    if rows.n != want:
        raise ValueError(f"the teacher has {rows.n} rows, but its {len(teacher.ids)} tokens in "
                         f"{teacher.num_sequences} sequences make {want} (L − 1 each)")
    if rows.target_logprob is None:
        raise ValueError("aligning a teacher needs its target_logprob (the actual tokens' "
                         "log-probs carry the chain rule)")
    if not 1 <= k_out <= projection.student_size:
        raise ValueError(f"k_out must be in [1, {projection.student_size}], got {k_out}")
    if interior_tail not in INTERIOR_TAILS:
        raise ValueError(f"unknown interior_tail {interior_tail!r}; choose one of "
                         f"{list(INTERIOR_TAILS)}")


def align_rows(
    student: TokenSpans,
    teacher: TokenSpans,
    rows: TeacherRows,
    projection: VocabProjection,
    *,
    k_out: int | None = None,
    interior_tail: str = "keep",
    student_splits: bool = True,
    backend: str | None = None,
) -> AlignedRows:
    """The teacher's ``rows`` (its tokens ``teacher``) at the student's positions.

    ``student`` / ``teacher``: the same texts (each sequence covers the same bytes) tokenised by
    each; ``rows``: Σ(M_s − 1) teacher rows in sequence order (target_logprob needed);
    ``projection``: teacher → student vocabulary. ``k_out``: width of the output (default the
    teacher's k, at most the student's vocabulary). ``interior_tail``: inside a teacher token,
    "keep" the tail's share (the conditioned top-k entries rescaled to 1 − tail) or "drop" it
    (renormalise over them). ``student_splits``: condition each row on the student ending a
    token where it ends, not on the teacher doing so (docs/MATHS.md §9; off: the teacher's
    rows as they are, a linear pushforward at shared boundaries).
    ``backend``: "numba" or "numpy" (the same loop as plain Python), default as ``fuse``.
    Returns Σ(L_s − 1) rows, in sequence order. Raises ``ValueError`` on inconsistent input.
    """
    k_out = min(rows.k, projection.student_size) if k_out is None else k_out
    _check_inputs(student, teacher, rows, projection, k_out, interior_tail)
    kernel = compiled() if (backend or default_backend()) == "numba" else align_kernel
    n = int(student.row_offsets[-1])
    out_ids = np.empty((n, k_out), np.int64)
    out_lp = np.empty((n, k_out), np.float64)
    out_tail, out_target = np.empty(n), np.empty(n)
    kind, chunk = np.empty(n, np.int8), np.empty(n, np.bool_)
    mark_row = np.full(projection.student_size, -1, np.int64)
    mark_col = np.zeros(projection.student_size, np.int64)
    kernel(student.ids, student.ends, student.offsets, student.row_offsets,
           teacher.ids, teacher.ends, teacher.offsets, teacher.row_offsets,
           *(np.ascontiguousarray(a) for a in (
               np.asarray(rows.ids, np.int64), as_float64(rows.logprobs),
               as_float64(rows.tail_logmass), as_float64(rows.target_logprob))),
           projection.sigma.astype(np.int64), projection.starts, projection.spelled,
           projection.suffix.astype(np.int64), projection.student_lengths.astype(np.int64),
           interior_tail == "keep", student_splits,
           out_ids, out_lp, out_tail, out_target, kind, chunk, mark_row, mark_col)
    aligned = TeacherRows(out_ids.astype(np.int32), out_lp.astype(np.float32), out_tail,
                          out_target)
    return AlignedRows(aligned, kind, chunk)


#: Alignment methods by name (``align_rows`` is the first; others return ``AlignedRows`` too).
ALIGNERS: dict[str, Aligner] = {"project": align_rows}
