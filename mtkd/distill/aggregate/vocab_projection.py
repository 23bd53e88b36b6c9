"""Vocabulary projection: each teacher token (and each of its suffixes) → a student token.

A teacher with another tokenizer gives distributions over *its* next token. Where a student row
sees the same text, a teacher token t of bytes b stands for the student's next token being the
first token of the student's tokenisation of b, written σ(t). It is computed once per
(teacher, student) pair, for every suffix b[o:] of every teacher token too: the student finer
than the teacher reads a position inside a teacher token, where the rest of the token is what
comes next (``align``'s interior rows).

The default σ is the **longest student token that is a prefix** of the bytes: what a greedy
(maximal-munch, WordPiece-like) tokenizer gives, and what BPE gives in most cases. ``first_token``
(e.g. ``ingest.token_bytes.first_token_fn``) gives the student's BPE model's own first token
instead, which matched the student's actual tokens more often (docs/MATHS.md, "Teachers with
another tokenizer"): use it when the student's tokenizer is at hand.
Special tokens spell nothing: their image comes from ``pairs`` (specials matched by content)
or is −1 (no student image: the mass joins the tail).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VocabProjection:
    """A precomputed sparse projection of a teacher vocabulary onto a student vocabulary.

    ``sigma int32 [V_t]``: σ(t), the student id of whole teacher token t (−1: none);
    ``starts int64 [V_t+1]`` and ``spelled uint8 [n]``: teacher token t spells
    ``spelled[starts[t]:starts[t+1]]``; ``suffix int32 [n]``: ``suffix[starts[t] + o]`` is the
    student id for the teacher bytes from offset o on (−1: none; o = 0 is σ before ``pairs``);
    ``student_lengths int32 [V_s]``: bytes each student id spells (0: special or unused).
    """

    sigma: np.ndarray
    starts: np.ndarray
    spelled: np.ndarray
    suffix: np.ndarray
    student_lengths: np.ndarray

    def __post_init__(self) -> None:
        n_t = len(self.sigma)
        if self.starts.shape != (n_t + 1,) or self.spelled.shape != self.suffix.shape or (
                int(self.starts[-1]) != len(self.spelled)):
            raise ValueError("inconsistent projection tables: starts must be [V_t+1] and end at "
                             "len(spelled) == len(suffix)")
        for name in ("sigma", "suffix"):
            a = getattr(self, name)
            if a.size and (int(a.min()) < -1 or int(a.max()) >= self.student_size):
                raise ValueError(f"{name} holds student ids outside [-1, {self.student_size})")

    @property
    def teacher_size(self) -> int:
        return len(self.sigma)

    @property
    def student_size(self) -> int:
        return len(self.student_lengths)

    @property
    def teacher_lengths(self) -> np.ndarray:
        """Bytes each teacher id spells, ``int64 [V_t]`` (0: special or unused)."""
        return np.diff(self.starts)

    def image(self, teacher_id: int, offset: int = 0) -> int:
        """The student id for teacher token ``teacher_id`` read from byte ``offset`` on."""
        if offset == 0:
            return int(self.sigma[teacher_id])
        return int(self.suffix[self.starts[teacher_id] + offset])


def longest_prefix_fn(student_bytes: Sequence[bytes | None]) -> Callable[[bytes], int | None]:
    """The function giving the id of the longest student token that is a prefix of a byte
    string (``None`` when none is); among student ids spelling the same bytes, the smallest."""
    lookup: dict[bytes, int] = {}
    for i, b in enumerate(student_bytes):
        if b and b not in lookup:
            lookup[b] = i
    longest = max(map(len, lookup), default=0)

    def first(b: bytes) -> int | None:
        for n in range(min(len(b), longest), 0, -1):
            i = lookup.get(b[:n])
            if i is not None:
                return i
        return None

    return first


def project_vocab(
    teacher_bytes: Sequence[bytes | None],
    student_bytes: Sequence[bytes | None],
    pairs: Mapping[int, int] | None = None,
    *,
    first_token: Callable[[bytes], int | None] | None = None,
    student_size: int | None = None,
) -> VocabProjection:
    """Build the projection of a teacher vocabulary onto a student vocabulary.

    ``teacher_bytes`` / ``student_bytes``: what each id spells (``ingest.token_bytes.
    token_bytes``; ``None`` for specials). ``pairs``: teacher id → student id images that
    override σ of whole tokens (special tokens by content: ``token_bytes.special_pairs``; or
    tokens known to be the same when several student ids spell the same bytes).
    ``first_token``: bytes → student id (default: :func:`longest_prefix_fn`).
    ``student_size``: the student's id range, if larger than ``len(student_bytes)``.
    """
    first = first_token or longest_prefix_fn(student_bytes)
    size = max(student_size or 0, len(student_bytes))
    lengths = np.array([len(b) if b else 0 for b in teacher_bytes], dtype=np.int64)
    starts = np.zeros(len(teacher_bytes) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    spelled = np.frombuffer(b"".join(b or b"" for b in teacher_bytes), dtype=np.uint8).copy()
    suffix = np.full(len(spelled), -1, dtype=np.int32)
    cache: dict[bytes, int] = {}
    for t, b in enumerate(teacher_bytes):
        for o in range(len(b) if b else 0):
            rest = b[o:]
            u = cache.get(rest)
            if u is None:
                found = first(rest)
                u = cache[rest] = -1 if found is None or found >= size else int(found)
            suffix[starts[t] + o] = u
    sigma = np.full(len(teacher_bytes), -1, dtype=np.int32)
    spells = lengths > 0
    sigma[spells] = suffix[starts[:-1][spells]]
    for t, u in (pairs or {}).items():
        if not (0 <= t < len(sigma) and 0 <= u < size):
            raise ValueError(f"pair {t} → {u} outside the teacher [0, {len(sigma)}) or student "
                             f"[0, {size}) vocabulary")
        sigma[t] = u
    student_lengths = np.zeros(size, dtype=np.int32)
    student_lengths[: len(student_bytes)] = [len(b) if b else 0 for b in student_bytes]
    return VocabProjection(sigma, starts, spelled, suffix, student_lengths)
