"""Teacher stores in the teacher's own tokens, read and aligned to the student's positions.

A teacher with another tokenizer is harvested over the text of each window of the tokens store,
tokenised its own way (``attrs["tokenization"] == "own"``, docs/FORMAT.md): row i of a
sequence holds the teacher's distribution after its token i, which ends at byte
``context_end[i]`` of the window text, and its actual next token ``next_id[i]``. The tokens store
says where each student token ends (``byte_end``). This module turns one part of such a store
into ``TokenSpans`` on both sides and aligns the rows (``align.align_rows``) with the vocabulary
projection of the (teacher, student) pair, built once per process from both tokenizers. Any
mismatch (another text, offsets beyond the window, tokens that do not spell their bytes) is a
``StoreError`` naming the store, part and sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from mtkd.distill.aggregate.align import UNKNOWN, AlignedRows, TokenSpans, align_rows, check_spans
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.vocab_projection import VocabProjection, project_vocab
from mtkd.ingest.token_bytes import first_token_fn, special_pairs, token_bytes
from mtkd.store import Store, StoreError
from mtkd.store.schema import (
    BYTE_END,
    CONTEXT_END,
    NEXT_ID,
    OWN_TOKENS,
    TOKEN_IDS,
    require_byte_ends,
    vocab_fingerprint,
)

#: What aligning needs of the teacher store's attrs.
OWN_ATTRS = ("teacher_tokenizer", "teacher_tokenizer_hash", "k")


def is_own(store: Store) -> bool:
    """Whether ``store`` holds a teacher's rows in its own tokens (not the tokens store's)."""
    return store.attrs.get("tokenization") == OWN_TOKENS


def check_own_teacher(tokens: Store, teacher: Store) -> None:
    """Refuse an own-tokens teacher store that cannot be aligned to ``tokens`` (before any part
    is read): missing arrays or attrs, a tokenizer that changed since harvest, k too large."""
    require_byte_ends(tokens, f"aligning {teacher.root}, a teacher with its own tokenizer,")
    missing = [n for n in (CONTEXT_END, NEXT_ID) if n not in teacher.array_names]
    missing += [a for a in OWN_ATTRS if teacher.attrs.get(a) is None]
    if missing:
        raise StoreError(f"{teacher.root} says tokenization 'own' but lacks {missing}: it cannot "
                         "be aligned to the student's tokens (harvest it again)")
    if tokens.attrs.get("tokenizer") is None:
        raise StoreError(f"{tokens.root}: attrs name no tokenizer; the student's tokenizer is "
                         "needed to align a teacher with its own tokenizer")
    for path, want, who in (
            (tokens.attrs["tokenizer"], tokens.attrs.get("tokenizer_hash"), tokens.root),
            (teacher.attrs["teacher_tokenizer"], teacher.attrs["teacher_tokenizer_hash"],
             teacher.root)):
        got = vocab_fingerprint(_tokenizer(str(path)).get_vocab(with_added_tokens=True))
        if want is not None and got != want:
            raise StoreError(f"the tokenizer at {path} is not the one {who} was made with "
                             f"(vocabulary hash {got}, the store says {want})")
    size = int(tokens.attrs["vocab_size"])
    if int(teacher.attrs["k"]) > size:
        raise StoreError(f"{teacher.root}: k = {teacher.attrs['k']} is more than the student's "
                         f"vocabulary ({size}); aligned rows keep k entries")


@lru_cache(maxsize=8)
def _tokenizer(path: str) -> Tokenizer:
    """The fast tokenizer a store names: a ``tokenizer.json`` or a directory holding one (read
    with ``tokenizers``: this stage imports no transformers)."""
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise StoreError(f"{file}: no such tokenizer file (aligning a teacher with its own "
                         "tokenizer needs both tokenizers' tokenizer.json)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own exception types
        raise StoreError(f"{file}: cannot load the tokenizer ({e})") from None


@lru_cache(maxsize=8)
def projection(student_tokenizer: str, teacher_tokenizer: str,
               student_size: int) -> VocabProjection:
    """The teacher → student vocabulary projection, built once per pair and process: specials
    paired by content, σ the student BPE model's own first token (docs/MATHS.md §9)."""
    student, teacher = _tokenizer(student_tokenizer), _tokenizer(teacher_tokenizer)
    return project_vocab(token_bytes(teacher), token_bytes(student),
                         special_pairs(teacher, student), first_token=first_token_fn(student),
                         student_size=student_size)


@dataclass(frozen=True)
class StudentPart:
    """One part of the tokens store as the alignment sees it: its tokens' byte spans (each
    window's text from byte 0) and the label of every row (the actual next student token)."""

    spans: TokenSpans
    labels: np.ndarray
    seq_ids: np.ndarray


def read_student_part(tokens: Store, part: int) -> StudentPart:
    batch = tokens.read_part(part, [TOKEN_IDS, BYTE_END])
    spans = TokenSpans(batch[TOKEN_IDS], batch[BYTE_END], np.zeros(len(batch.seq_ids)),
                       batch.offsets)
    return StudentPart(spans, np.delete(batch[TOKEN_IDS], batch.offsets[:-1]), batch.seq_ids)


@dataclass(frozen=True)
class OwnTeacherPart:
    """One part of an own-tokens teacher store: its rows (teacher ids) and tokens' spans, and
    what its projection is built from."""

    source: str
    rows: TeacherRows | None
    spans: TokenSpans
    student_tokenizer: str
    teacher_tokenizer: str
    student_size: int
    k: int


def teacher_spans(context_end: np.ndarray, next_id: np.ndarray, row_offsets: np.ndarray,
                  text_ends: np.ndarray) -> TokenSpans:
    """The teacher's tokens from its rows: sequence s of r rows has r + 1 tokens; token 0
    (id ``UNKNOWN``) ends at row 0's ``context_end``, token i + 1 (``next_id`` of row i) at row
    i + 1's or, for the last, at ``text_ends[s]``: where the teacher's text ends (the window's
    end, or before a character cut there: ``last_token_ends``). A sequence without rows (too
    short, or unreadable by the teacher) is one token over the whole text: no row, so every
    student row of it falls back."""
    rows = np.diff(row_offsets)
    n_seq = len(rows)
    offsets = np.asarray(row_offsets, np.int64) + np.arange(n_seq + 1)
    ids = np.full(int(offsets[-1]), UNKNOWN, np.int64)
    ends = np.empty(int(offsets[-1]), np.int64)
    shift = np.repeat(np.arange(n_seq), rows)  # row r of sequence s is token r + s
    flat = np.arange(int(row_offsets[-1])) + shift
    ids[flat + 1] = next_id
    ends[flat] = context_end
    ends[offsets[1:] - 1] = text_ends
    return TokenSpans(ids, ends, np.zeros(n_seq), offsets)


def last_token_ends(context_end: np.ndarray, next_id: np.ndarray, row_offsets: np.ndarray,
                    text_ends: np.ndarray, teacher_lengths: np.ndarray) -> np.ndarray:
    """Where the teacher's text ends in each window, ``[S]``: its last token's start plus the
    bytes it spells, at most the window's end (a first token's dummy-prefix space is not in the
    text). It ends before the window's end when the window ends inside a character, whose bytes
    the teacher did not read (``harvest.own_tokens``); the window's end for a sequence without
    rows."""
    ends = np.asarray(text_ends, np.int64).copy()
    full = np.diff(row_offsets) > 0
    last = np.asarray(row_offsets)[1:][full] - 1
    spelled = np.asarray(teacher_lengths, np.int64)[np.asarray(next_id, np.int64)[last]]
    ends[full] = np.minimum(np.asarray(context_end, np.int64)[last] + spelled, ends[full])
    return ends


def read_own_part(teacher: Store, part: int, student: StudentPart, tokens_attrs: Mapping[str, Any],
                  rows: TeacherRows | None) -> OwnTeacherPart:
    """Part ``part`` of ``teacher`` against the student's part (``rows`` read by the caller, or
    None for a check of the spans alone). Refuses other sequences and offsets beyond the text."""
    batch = teacher.read_part(part, [CONTEXT_END, NEXT_ID])
    where = f"{teacher.root} part {part}"
    if not np.array_equal(batch.seq_ids, student.seq_ids):
        raise StoreError(f"{where}: its sequences are not those of the tokens store's part")
    text_ends = student.spans.span_ends()
    ends = batch[CONTEXT_END].astype(np.int64)
    limit = np.repeat(text_ends, np.diff(batch.offsets))
    outside = (ends < 0) | (ends > limit)
    if outside.any():
        r = int(np.flatnonzero(outside)[0])
        s = int(np.searchsorted(batch.offsets, r, side="right") - 1)
        raise StoreError(f"{where}, sequence {s}: a teacher token ends at byte {ends[r]}, "
                         f"outside its window text (bytes 0..{limit[r]}): the teacher's offsets "
                         "do not cover this text")
    if rows is not None and rows.n != len(ends):
        raise StoreError(f"{where}: {rows.n} teacher rows but {len(ends)} offsets")
    student_tokenizer, teacher_tokenizer = (str(tokens_attrs["tokenizer"]),
                                            str(teacher.attrs["teacher_tokenizer"]))
    lengths = projection(student_tokenizer, teacher_tokenizer,
                         int(tokens_attrs["vocab_size"])).teacher_lengths
    next_id = batch[NEXT_ID]
    if next_id.size and (next_id.min() < 0 or next_id.max() >= len(lengths)):
        raise StoreError(f"{where}: teacher ids outside [0, {len(lengths)}), its tokenizer's "
                         "vocabulary")
    read_ends = last_token_ends(ends, next_id, batch.offsets, text_ends, lengths)
    return OwnTeacherPart(str(teacher.root), rows,
                          teacher_spans(ends, next_id, batch.offsets, read_ends),
                          student_tokenizer, teacher_tokenizer,
                          int(tokens_attrs["vocab_size"]), int(teacher.attrs["k"]))


def own_projection(own: OwnTeacherPart) -> VocabProjection:
    return projection(own.student_tokenizer, own.teacher_tokenizer, own.student_size)


def check_own_part(student: StudentPart, own: OwnTeacherPart, part: int) -> None:
    """Refuse a part whose two tokenisations do not cover the same texts or do not spell them."""
    try:
        check_spans(student.spans, own.spans, own_projection(own))
    except ValueError as e:
        raise StoreError(f"{own.source} part {part} against the tokens store: {e}") from None


def align_own_part(student: StudentPart, own: OwnTeacherPart, part: int) -> AlignedRows:
    """The teacher's rows of this part at the student's positions (``k`` entries per row)."""
    assert own.rows is not None
    try:
        return align_rows(student.spans, own.spans, own.rows, own_projection(own), k_out=own.k)
    except ValueError as e:
        raise StoreError(f"{own.source} part {part} against the tokens store: {e}") from None
