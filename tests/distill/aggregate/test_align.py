"""align: a teacher with another tokenizer at the student's positions — a permuted vocabulary
gives the same-tokenizer rows exactly; finer (character-level) and coarser teachers against
cases computed by hand and against the exact chain rule; real byte-level BPE pairs; bad inputs
refused. Every case runs on both backends (plain Python and numba)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mtkd.distill.aggregate.align import (
    ALIGNERS,
    AlignedRows,
    TokenSpans,
    align_rows,
)
from mtkd.distill.aggregate.align_kernel import FALLBACK, INTERIOR, SHARED
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.vocab_projection import longest_prefix_fn, project_vocab
from mtkd.ingest.token_bytes import byte_bounds, first_token_fn, special_pairs, token_bytes

BACKENDS = ["numpy", "numba"]
ALPHABET = b"abc"


def greedy(text: bytes, vocab: list[bytes | None]) -> tuple[list[int], list[int]]:
    """Longest-match tokenisation of ``text``: ids and bounds ``[L+1]``."""
    first = longest_prefix_fn(vocab)
    ids, bounds = [], [0]
    while bounds[-1] < len(text):
        i = first(text[bounds[-1]:])
        assert i is not None
        ids.append(i)
        bounds.append(bounds[-1] + len(vocab[i] or b""))
    return ids, bounds


def random_text(rng: np.random.Generator, n: int) -> bytes:
    return bytes(rng.choice(list(ALPHABET), n).tolist())


def dense_rows(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """n random full distributions over ``vocab`` ids, as float64 log-probs."""
    z = rng.normal(0.0, 2.0, (n, vocab))
    return z - np.logaddexp.reduce(z, axis=1, keepdims=True)


def sparse(dense: np.ndarray, next_ids: list[int] | np.ndarray, k: int,
           dtype: type = np.float32) -> TeacherRows:
    """Harvest-like rows: the k largest (quantised to ``dtype``) in descending order, the tail
    in float64, the actual next token's log-prob as float32."""
    q = dense.astype(dtype)
    order = np.argsort(-q.astype(np.float64), axis=1, kind="stable")[:, :k]
    lps = np.take_along_axis(q, order, 1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - np.exp(lps.astype(np.float64)).sum(axis=1), 0.0, None))
    target = dense[np.arange(len(dense)), np.asarray(next_ids, np.int64)].astype(np.float32)
    return TeacherRows(order.astype(np.int32), lps, tail, target)


def total_mass(out: AlignedRows) -> np.ndarray:
    return np.exp(out.rows.logprobs.astype(np.float64)).sum(axis=1) + np.exp(
        out.rows.tail_logmass)


def check_distribution(out: AlignedRows, student_size: int) -> None:
    """Every row a distribution over distinct student ids, descending, label consistent."""
    ids, lps = out.rows.ids, out.rows.logprobs
    assert ((ids >= 0) & (ids < student_size)).all()
    assert all(len(set(r)) == len(r) for r in ids.tolist())
    assert (lps[:, :-1] >= lps[:, 1:]).all()
    np.testing.assert_allclose(total_mass(out), 1.0, atol=1e-5)
    assert (out.rows.target_logprob <= 1e-6).all()


# --------------------------------------------------------------------------- same tokenizer


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**32 - 1), extra=st.integers(0, 10), length=st.integers(1, 30),
       k=st.integers(1, 8), half=st.booleans())
def test_permuted_vocabulary_gives_the_same_rows_exactly(backend: str, seed: int, extra: int,
                                                         length: int, k: int,
                                                         half: bool) -> None:
    rng = np.random.default_rng(seed)
    words = {random_text(rng, rng.integers(2, 5)) for _ in range(extra)}
    vocab: list[bytes | None] = [bytes([c]) for c in ALPHABET] + sorted(words) + [None]
    eos, size = len(vocab) - 1, len(vocab)
    ids, bounds = greedy(random_text(rng, length), vocab)
    ids, bounds = [*ids, eos], [*bounds, bounds[-1]]  # the tokens store's end-of-text token
    rows = sparse(dense_rows(rng, len(ids) - 1, size), ids[1:], min(k, size),
                  np.float16 if half else np.float32)
    perm = rng.permutation(size)
    teacher_vocab: list[bytes | None] = [None] * size
    for i, b in enumerate(vocab):
        teacher_vocab[perm[i]] = b
    proj = project_vocab(teacher_vocab, vocab, {int(perm[eos]): eos})
    assert np.array_equal(proj.sigma[perm], np.arange(size))
    teacher_rows = TeacherRows(perm[rows.ids].astype(np.int32), rows.logprobs, rows.tail_logmass,
                               rows.target_logprob)
    out = align_rows(TokenSpans.from_sequences([ids], [bounds]),
                     TokenSpans.from_sequences([perm[ids]], [bounds]), teacher_rows, proj,
                     backend=backend)
    assert np.array_equal(out.rows.ids, rows.ids)
    assert np.array_equal(out.rows.logprobs, rows.logprobs.astype(np.float32))
    assert np.array_equal(out.rows.tail_logmass, rows.tail_logmass)
    assert np.array_equal(out.rows.target_logprob, rows.target_logprob.astype(np.float64))
    assert (out.kind == SHARED).all() and out.chunk.all()


# --------------------------------------------------------------------------- finer teacher


def abab(backend: str, rows: TeacherRows, k_out: int) -> AlignedRows:
    """A character-level teacher {a, b, c} and a student {a, b, c, ab} on "abab"."""
    proj = project_vocab([b"a", b"b", b"c"], [b"a", b"b", b"c", b"ab"])
    return align_rows(TokenSpans.from_sequences([[3, 3]], [[0, 2, 4]]),
                      TokenSpans.from_sequences([[0, 1, 0, 1]], [[0, 1, 2, 3, 4]]), rows, proj,
                      k_out=k_out, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_character_teacher_chain_rule_by_hand(backend: str) -> None:
    """Student row 0 ("ab" | "ab"): teacher row 1 (after "ab") gives a .6, b .3, c .1 and row 2
    (after "aba") gives b .7: the student's "ab" is a then b, .6 × .7 = .42, taken from "a"."""
    lp = np.log([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    rows = TeacherRows(np.array([[1, 0, 2], [0, 1, 2], [1, 0, 2]]), lp, np.full(3, -np.inf),
                       np.log([0.5, 0.6, 0.7]))
    out = abab(backend, rows, k_out=4)
    assert out.rows.ids.tolist() == [[3, 1, 0, 2]]
    np.testing.assert_allclose(np.exp(out.rows.logprobs[0]), [0.42, 0.3, 0.18, 0.1], rtol=1e-6)
    assert out.rows.tail_logmass[0] == -np.inf
    np.testing.assert_allclose(out.rows.target_logprob, np.log(0.42))
    assert out.kind.tolist() == [SHARED] and out.chunk.tolist() == [True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_actual_token_outside_the_top_k_comes_out_of_the_tail(backend: str) -> None:
    """Row 1 keeps b .5, c .3 (k = 2, tail .2 holds a, whose .2 the target gives): a's .2
    leaves the tail; .2 × .5 moves on to "ab". With k_out = 2 a and ab are cut back."""
    rows = TeacherRows(np.array([[1, 0], [1, 2], [1, 0]]), np.log([[0.5, 0.3], [0.5, 0.3],
                                                                    [0.5, 0.3]]),
                       np.log([0.2, 0.2, 0.2]), np.log([0.5, 0.2, 0.5]))
    out = abab(backend, rows, k_out=4)
    got = dict(zip(out.rows.ids[0].tolist(), np.exp(out.rows.logprobs[0]).tolist(), strict=True))
    assert got == pytest.approx({1: 0.5, 2: 0.3, 0: 0.1, 3: 0.1}, rel=1e-6)
    assert np.exp(out.rows.tail_logmass[0]) < 1e-12
    np.testing.assert_allclose(out.rows.target_logprob, np.log(0.1))
    cut = abab(backend, rows, k_out=2)
    assert cut.rows.ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(np.exp(cut.rows.tail_logmass), 0.2)
    np.testing.assert_allclose(cut.rows.target_logprob, np.log(0.1))  # known, though cut


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**32 - 1), extra=st.integers(1, 10), length=st.integers(2, 30))
def test_character_teacher_equals_the_exact_chain_rule(backend: str, seed: int, extra: int,
                                                       length: int) -> None:
    """A full character-level teacher and a greedy student: σ(t) = t; each student row is the
    teacher's row with the path mass of a longer label moved from its first character."""
    rng = np.random.default_rng(seed)
    chars: list[bytes | None] = [bytes([c]) for c in ALPHABET]
    words = {random_text(rng, rng.integers(2, 5)) for _ in range(extra)}
    vocab = chars + sorted(words)
    text = random_text(rng, length)
    s_ids, s_bounds = greedy(text, vocab)
    t_ids = [ALPHABET.index(c) for c in text]
    dense = dense_rows(rng, length - 1, len(chars))
    rows = sparse(dense, t_ids[1:], len(chars), np.float64)
    proj = project_vocab(chars, vocab)
    out = align_rows(TokenSpans.from_sequences([s_ids], [s_bounds]),
                     TokenSpans.from_sequences([t_ids], [list(range(length + 1))]), rows, proj,
                     k_out=len(chars) + 1, backend=backend)
    check_distribution(out, len(vocab))
    assert (out.kind == SHARED).all() and out.chunk.all()
    for j in range(len(s_ids) - 1):
        e, v = s_bounds[j + 1], s_ids[j + 1]
        want = {c: np.exp(dense[e - 1, c]) for c in range(len(chars))}
        if len(vocab[v]) > 1:
            path = np.exp(sum(dense[e - 1 + x, t_ids[e + x]] for x in range(len(vocab[v]))))
            want[t_ids[e]] -= path
            want[v] = path
        got = {int(i): float(np.exp(p)) for i, p in zip(out.rows.ids[j], out.rows.logprobs[j],
                                                          strict=True) if p > -np.inf}
        assert got.keys() <= want.keys()
        for i, p in want.items():
            assert got.get(i, 0.0) == pytest.approx(p, abs=1e-6)
        assert np.exp(out.rows.target_logprob[j]) == pytest.approx(want[v], abs=1e-6)


# --------------------------------------------------------------------------- coarser teacher

# teacher {a, b, ab, ba, <s>} reads "abab" as <s> ab ab; row 0 (after <s>) and row 1 (after "ab")
COARSE_BYTES: list[bytes | None] = [b"a", b"b", b"ab", b"ba", None]
COARSE_TEACHER = TokenSpans.from_sequences([[4, 2, 2]], [[0, 0, 2, 4]])
COARSE_ROWS = TeacherRows(np.array([[2, 0, 3], [2, 3, 1]]),
                          np.log([[0.5, 0.2, 0.2], [0.6, 0.3, 0.05]]), np.log([0.1, 0.05]),
                          np.log([0.5, 0.6]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_coarser_teacher_interior_rows_by_hand(backend: str) -> None:
    """Student {a, b} reads a b a b. Row 0 (after "a", inside the teacher's "ab"): of row 0's
    entries only "ab" spells "a" and more; .5 is rescaled to 1 − tail = .9 and its rest "b"
    is the student's next token. Row 1 (after "ab", shared): σ(ab) = a, σ(ba) = σ(b) = b.
    Row 2 (after "aba"): row 1's "ab" .6 → .95 on "b"."""
    proj = project_vocab(COARSE_BYTES, [b"a", b"b"])
    student = TokenSpans.from_sequences([[0, 1, 0, 1]], [[0, 1, 2, 3, 4]])
    out = align_rows(student, COARSE_TEACHER, COARSE_ROWS, proj, k_out=2, backend=backend)
    assert out.kind.tolist() == [INTERIOR, SHARED, INTERIOR]
    assert out.rows.ids.tolist() == [[1, 0], [0, 1], [1, 0]]
    probs = np.exp(out.rows.logprobs.astype(np.float64))
    np.testing.assert_allclose(probs, [[0.9, 0], [0.6, 0.35], [0.95, 0]], rtol=1e-6)
    np.testing.assert_allclose(np.exp(out.rows.tail_logmass), [0.1, 0.05, 0.05], rtol=1e-9)
    np.testing.assert_allclose(np.exp(out.rows.target_logprob), [0.9, 0.6, 0.95], rtol=1e-6)
    assert out.rows.target_logprob[1] == COARSE_ROWS.target_logprob[0 + 1]  # stored, exact
    assert not out.chunk.any()
    drop = align_rows(student, COARSE_TEACHER, COARSE_ROWS, proj, k_out=2, backend=backend,
                      interior_tail="drop")
    np.testing.assert_allclose(np.exp(drop.rows.logprobs[[0, 2], 0]), 1.0, rtol=1e-6)
    assert (drop.rows.tail_logmass[[0, 2]] == -np.inf).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_coarser_teacher_label_across_a_teacher_boundary(backend: str) -> None:
    """Student {a, b, ba} reads a ba b. Row 0 (after "a"): "ab" rescaled to .9, its rest "b";
    the label "ba" runs into the next teacher token "ab" (.6): .9 × .6 = .54 moves b → ba."""
    proj = project_vocab(COARSE_BYTES, [b"a", b"b", b"ba"])
    student = TokenSpans.from_sequences([[0, 2, 1]], [[0, 1, 3, 4]])
    out = align_rows(student, COARSE_TEACHER, COARSE_ROWS, proj, k_out=3, backend=backend)
    assert out.kind.tolist() == [INTERIOR, INTERIOR]
    assert out.rows.ids[0, :2].tolist() == [2, 1]
    np.testing.assert_allclose(np.exp(out.rows.logprobs[0, :2]), [0.54, 0.36], rtol=1e-6)
    np.testing.assert_allclose(np.exp(out.rows.target_logprob), [0.54, 0.95], rtol=1e-6)
    np.testing.assert_allclose(total_mass(out), 1.0)


# the same teacher reads "aab" as <s> a ab: row 0 (after <s>), row 1 (after "a")
CROSSING_TEACHER = TokenSpans.from_sequences([[4, 0, 2]], [[0, 0, 1, 3]])
CROSSING_ROWS = TeacherRows(np.array([[0, 2, 1], [2, 0, 3]]),
                            np.log([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]]), np.log([0.1, 0.1]),
                            np.log([0.5, 0.6]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_boundary_counts_teacher_tokens_that_cross_it_by_hand(backend: str) -> None:
    """Student {a, b} reads a a b. Its row 0 (after "a") is a teacher boundary too, but the
    teacher's row 1 is conditioned on the teacher ending a token there; the student splits
    "ab" after "a" as well, so row 0's "ab" (.3) is a path through the same student boundary.
    Row 1 pushed forward (a .8, b .1, tail .1) weighs p(a) / (p(a) + p(ab)) = .5 / .8; "ab"
    adds .3 / .8 to "b", its bytes after "a": a .5, b .4375, tail .0625. A student that has
    "ab" (it would not split there) gets row 1 pushed forward alone, as does
    ``student_splits=False``."""
    proj = project_vocab(COARSE_BYTES, [b"a", b"b"])
    student = TokenSpans.from_sequences([[0, 0, 1]], [[0, 1, 2, 3]])
    out = align_rows(student, CROSSING_TEACHER, CROSSING_ROWS, proj, k_out=2, backend=backend)
    assert out.kind.tolist() == [SHARED, INTERIOR]
    assert out.rows.ids[0].tolist() == [0, 1]
    np.testing.assert_allclose(np.exp(out.rows.logprobs[0]), [0.5, 0.4375], rtol=1e-6)
    np.testing.assert_allclose(np.exp(out.rows.tail_logmass[0]), 0.0625, rtol=1e-6)
    np.testing.assert_allclose(np.exp(out.rows.target_logprob[0]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(total_mass(out), 1.0)
    plain = align_rows(student, CROSSING_TEACHER, CROSSING_ROWS, proj, k_out=2,
                       backend=backend, student_splits=False)
    np.testing.assert_allclose(np.exp(plain.rows.logprobs[0]), [0.8, 0.1], rtol=1e-6)
    assert plain.rows.tail_logmass[0] == CROSSING_ROWS.tail_logmass[1]  # stored, exact
    merging = project_vocab(COARSE_BYTES, [b"a", b"b", b"ab"])
    student = TokenSpans.from_sequences([[0, 2]], [[0, 1, 3]])
    out = align_rows(student, CROSSING_TEACHER, CROSSING_ROWS, merging, k_out=3,
                     backend=backend)
    assert out.rows.ids[0].tolist() == [2, 0, 1]
    np.testing.assert_allclose(np.exp(out.rows.logprobs[0]), [0.6, 0.2, 0.1], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interior_rows_keep_the_tokens_the_student_splits_by_hand(backend: str) -> None:
    """Student {a, b, ac} reads a b inside the teacher's "ab" (row 0: ab .5, ac .3, a .1,
    tail .1). Both "ab" and "ac" spell "a" and more, but the student reads "ac" as one token,
    so after its own "a" the text cannot go on with "c": only "ab" is kept, rescaled to .9 on
    "b". ``student_splits=False`` keeps "ac" too (b .5625, c .3375)."""
    teacher_bytes: list[bytes | None] = [b"a", b"b", b"c", b"ab", b"ac", None]
    teacher = TokenSpans.from_sequences([[5, 3]], [[0, 0, 2]])
    rows = TeacherRows(np.array([[3, 4, 0]]), np.log([[0.5, 0.3, 0.1]]), np.log([0.1]),
                       np.log([0.5]))
    proj = project_vocab(teacher_bytes, [b"a", b"b", b"c", b"ac"])
    student = TokenSpans.from_sequences([[0, 1]], [[0, 1, 2]])
    out = align_rows(student, teacher, rows, proj, k_out=2, backend=backend)
    assert out.kind.tolist() == [INTERIOR]
    assert out.rows.ids[0, 0] == 1 and out.rows.logprobs[0, 1] == -np.inf
    np.testing.assert_allclose(np.exp(out.rows.logprobs[0, 0]), 0.9, rtol=1e-6)
    plain = align_rows(student, teacher, rows, proj, k_out=2, backend=backend,
                       student_splits=False)
    assert plain.rows.ids[0].tolist() == [1, 2]
    np.testing.assert_allclose(np.exp(plain.rows.logprobs[0]), [0.5625, 0.3375], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_splits_measure_a_dummy_prefixed_first_token_by_its_bytes(backend: str) -> None:
    """A SentencePiece-style teacher's first token " ab" spans 2 bytes of "abb" but spells 3.
    Student {a, b, c} reads a b b: at its shared row after "ab", only tokens spelling " ab" and
    more could cross (none here: " ac" does not spell it), so the row is row 1 pushed forward
    (b .9, a .05). At its first row (inside " ab") the student reads a lone "a" and so splits
    " ac" after " a" too: both kept (b .5, c .4, rescaled to .9)."""
    teacher_bytes: list[bytes | None] = [b"a", b"b", b"c", b" ab", b" ac", None]
    teacher = TokenSpans.from_sequences([[5, 3, 1]], [[0, 0, 2, 3]])
    rows = TeacherRows(np.array([[3, 4], [1, 0]]), np.log([[0.5, 0.4], [0.9, 0.05]]),
                       np.log([0.1, 0.05]), np.log([0.5, 0.9]))
    proj = project_vocab(teacher_bytes, [b"a", b"b", b"c"])
    student = TokenSpans.from_sequences([[0, 1, 1]], [[0, 1, 2, 3]])
    out = align_rows(student, teacher, rows, proj, k_out=3, backend=backend)
    assert out.kind.tolist() == [INTERIOR, SHARED]
    np.testing.assert_allclose(np.exp(out.rows.logprobs[1, :2]), [0.9, 0.05], rtol=1e-6)
    assert out.rows.ids[1, :2].tolist() == [1, 0]
    assert out.rows.ids[0, :2].tolist() == [1, 2]
    np.testing.assert_allclose(np.exp(out.rows.logprobs[0, :2]), [0.5, 0.4], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_before_any_teacher_context_fall_back(backend: str) -> None:
    """Without the teacher's <s>, nothing predicts its first token: student row 0 (inside it)
    is a fallback row — flagged, all mass in the tail, label unknown."""
    proj = project_vocab(COARSE_BYTES, [b"a", b"b"])
    teacher = TokenSpans.from_sequences([[2, 2]], [[0, 2, 4]])
    out = align_rows(TokenSpans.from_sequences([[0, 1, 0, 1]], [[0, 1, 2, 3, 4]]), teacher,
                     TeacherRows(COARSE_ROWS.ids[1:], COARSE_ROWS.logprobs[1:],
                                 COARSE_ROWS.tail_logmass[1:], COARSE_ROWS.target_logprob[1:]),
                     proj, backend=backend)
    assert out.fallback.tolist() == [True, False, False]
    assert out.rows.tail_logmass[0] == 0.0 and out.rows.target_logprob[0] == -np.inf
    assert (out.rows.logprobs[0] == -np.inf).all()
    assert out.coverage() == {"rows": 3, "shared": 1, "interior": 1, "fallback": 1, "chunk": 0,
                              "label": 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_of_text_tokens(backend: str) -> None:
    """The student's end-of-text token: a teacher's own one (unpaired) at the same byte gives
    it its mass; a teacher without one leaves the row a fallback."""
    proj = project_vocab([b"a", b"b", None], [b"a", b"b", b"ab", None])
    student = TokenSpans.from_sequences([[2, 3]], [[0, 2, 2]])
    teacher = TokenSpans.from_sequences([[0, 1, 2]], [[0, 1, 2, 2]])
    rows = TeacherRows(np.array([[1, 0], [2, 0]]), np.log([[0.9, 0.1], [0.7, 0.2]]),
                       np.log([1e-9, 0.1]), np.log([0.9, 0.7]))
    out = align_rows(student, teacher, rows, proj, backend=backend)
    assert out.rows.ids[0].tolist() == [3, 0] and out.chunk.tolist() == [True]
    np.testing.assert_allclose(np.exp(out.rows.logprobs[0]), [0.7, 0.2])
    np.testing.assert_allclose(np.exp(out.rows.target_logprob), [0.7])
    no_eos = align_rows(student, TokenSpans.from_sequences([[0, 1]], [[0, 1, 2]]),
                        TeacherRows(rows.ids[:1], rows.logprobs[:1], rows.tail_logmass[:1],
                                    rows.target_logprob[:1]), proj, backend=backend)
    assert no_eos.fallback.tolist() == [True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_past_the_teachers_text_fall_back(backend: str) -> None:
    """A window ending inside a character ("abab" + the first byte of "κ"): the teacher read
    "abab" only, its text one byte short. The student rows whose label reaches that byte
    ("b\xce" across the teacher's end, "\xce" after it) fall back: the teacher's mass of "b"
    is not the student's "b\xce"; the rows before are aligned as usual."""
    proj = project_vocab([b"a", b"b"], [b"a", b"b", b"\xce", b"b\xce"])
    teacher = TokenSpans.from_sequences([[0, 1, 0, 1]], [[0, 1, 2, 3, 4]])
    rows = TeacherRows(np.array([[1, 0], [0, 1], [1, 0]]), np.log([[0.9, 0.1], [0.8, 0.2],
                                                                    [0.7, 0.3]]),
                       np.full(3, -np.inf), np.log([0.9, 0.8, 0.7]))
    for ids, ends, labels in (([0, 1, 0, 3], [0, 1, 2, 3, 5], [0.9, 0.8]),
                              ([0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5], [0.9, 0.8, 0.7])):
        out = align_rows(TokenSpans.from_sequences([ids], [ends]), teacher, rows, proj,
                         backend=backend)
        assert out.fallback.tolist() == [False] * len(labels) + [True]
        np.testing.assert_allclose(np.exp(out.rows.target_logprob), [*labels, 0.0])
    with pytest.raises(ValueError, match="not the same text"):  # more than a character short
        align_rows(TokenSpans.from_sequences([[0, 1, 0, 1, 2]], [[0, 1, 2, 3, 4, 8]]), teacher,
                   rows, proj, backend=backend)


@given(seed=st.integers(0, 2**32 - 1), n_seq=st.integers(1, 4), k=st.integers(1, 6),
       drop=st.booleans())
def test_random_pairs_are_distributions_and_backends_agree(seed: int, n_seq: int, k: int,
                                                          drop: bool) -> None:
    """Two random greedy vocabularies over "abc" (either may be the finer), several sequences
    (some too short for rows) in one call: every row a distribution, the label's mass that of
    its entry, sequences independent, and the two backends equal."""
    rng = np.random.default_rng(seed)

    def vocab() -> list[bytes | None]:
        words = {random_text(rng, rng.integers(2, 5)) for _ in range(rng.integers(0, 8))}
        return [bytes([c]) for c in ALPHABET] + sorted(words)

    s_vocab, t_vocab = vocab(), vocab()
    texts = [random_text(rng, rng.integers(1, 25)) for _ in range(n_seq)]
    s_tok = [greedy(t, s_vocab) for t in texts]
    t_tok = [greedy(t, t_vocab) for t in texts]
    next_ids = [i for ids, _ in t_tok for i in ids[1:]]
    rows = sparse(dense_rows(rng, len(next_ids), len(t_vocab)), next_ids, min(k, len(t_vocab)))
    proj = project_vocab(t_vocab, s_vocab)
    student = TokenSpans.from_sequences(*zip(*s_tok, strict=True))
    teacher = TokenSpans.from_sequences(*zip(*t_tok, strict=True))
    tail, k_out = "drop" if drop else "keep", min(k + 1, len(s_vocab))
    outs = [align_rows(student, teacher, rows, proj, k_out=k_out, interior_tail=tail,
                       backend=b) for b in BACKENDS]
    for name in ("ids", "logprobs", "tail_logmass", "target_logprob"):
        np.testing.assert_allclose(getattr(outs[0].rows, name), getattr(outs[1].rows, name),
                                   rtol=1e-6, atol=1e-9)
    out = outs[1]
    assert np.array_equal(outs[0].kind, out.kind) and np.array_equal(outs[0].chunk, out.chunk)
    check_distribution(out, len(s_vocab))
    labels = np.array([i for ids, _ in s_tok for i in ids[1:]])
    has = out.rows.ids == labels[:, None]
    entry = np.where(has, out.rows.logprobs, -np.inf).max(axis=1)
    known = has.any(axis=1)
    np.testing.assert_allclose(out.rows.target_logprob[known], entry[known], atol=1e-6)
    # (the stored tail and target are rounded independently, as in any store)
    label_mass = np.exp(out.rows.target_logprob)
    assert (label_mass <= np.exp(entry) + np.exp(out.rows.tail_logmass) + 1e-6).all()
    want = [np.where(np.isin(sb[1:-1], tb[1:-1]), SHARED,
                     np.where(np.array(sb[1:-1]) < tb[1], FALLBACK, INTERIOR))
            for (_, sb), (_, tb) in zip(s_tok, t_tok, strict=True)]
    assert np.array_equal(out.kind, np.concatenate(want))
    rows0 = student.row_offsets
    for s in range(n_seq):  # each sequence aligned alone gives the same rows
        t0 = teacher.row_offsets
        one = align_rows(TokenSpans.from_sequences([s_tok[s][0]], [s_tok[s][1]]),
                         TokenSpans.from_sequences([t_tok[s][0]], [t_tok[s][1]]),
                         rows.rows(int(t0[s]), int(t0[s + 1])), proj, k_out=k_out,
                         interior_tail=tail, backend="numba")
        assert np.array_equal(one.rows.ids, out.rows.ids[rows0[s]:rows0[s + 1]])
        assert np.array_equal(one.rows.logprobs, out.rows.logprobs[rows0[s]:rows0[s + 1]])


# --------------------------------------------------------------------------- real tokenizers


def bpe(vocab_size: int) -> Tokenizer:
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(stdlib_texts(max_files=20), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def bpe_pair() -> tuple[Tokenizer, Tokenizer]:
    return bpe(300), bpe(1200)


TEXT = "def align(rows, k=64):\n    \"\"\"Héllo — wörld.\"\"\"\n    return [r * 2 for r in rows]\n"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_first", [True, False])
def test_real_byte_level_bpe_pair(bpe_pair: tuple[Tokenizer, Tokenizer], backend: str,
                                  teacher_first: bool) -> None:
    """A finer and a coarser real BPE teacher: distributions, and rows at every shared
    boundary; the same tokenizer on both sides gives the rows back exactly."""
    teacher, student = bpe_pair if teacher_first else bpe_pair[::-1]
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    proj = project_vocab(t_bytes, s_bytes)
    rng = np.random.default_rng(0)
    t_ids, s_ids = teacher.encode(TEXT).ids, student.encode(TEXT).ids
    t_bounds, s_bounds = byte_bounds(t_ids, t_bytes, TEXT), byte_bounds(s_ids, s_bytes, TEXT)
    rows = sparse(dense_rows(rng, len(t_ids) - 1, len(t_bytes)), t_ids[1:], 16)
    out = align_rows(TokenSpans.from_sequences([s_ids], [s_bounds]),
                     TokenSpans.from_sequences([t_ids], [t_bounds]), rows, proj, k_out=17,
                     backend=backend)
    check_distribution(out, len(s_bytes))
    shared = np.isin(s_bounds[1:-1], t_bounds[1:-1])
    assert np.array_equal(out.kind == SHARED, shared)
    assert (out.kind != FALLBACK).sum() >= len(s_ids) - 3
    assert np.isfinite(out.rows.target_logprob[out.kind != FALLBACK]).all()
    same = align_rows(TokenSpans.from_sequences([t_ids], [t_bounds]),
                      TokenSpans.from_sequences([t_ids], [t_bounds]), rows,
                      project_vocab(t_bytes, t_bytes, special_pairs(teacher, teacher)),
                      backend=backend)
    for name in ("ids", "logprobs", "tail_logmass", "target_logprob"):
        assert np.array_equal(getattr(same.rows, name), getattr(rows, name)), name


def test_longest_prefix_against_the_student_model(bpe_pair: tuple[Tokenizer, Tokenizer]
                                                  ) -> None:
    """σ by longest prefix agrees with the student BPE model's own first token on most teacher
    tokens (docs/MATHS.md quotes the measured share); where it differs both are prefixes."""
    for teacher, student in (bpe_pair, bpe_pair[::-1]):
        t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
        greedy_proj = project_vocab(t_bytes, s_bytes)
        exact = project_vocab(t_bytes, s_bytes, first_token=first_token_fn(student))
        spells = greedy_proj.teacher_lengths > 0
        agree = (greedy_proj.sigma == exact.sigma)[spells].mean()
        assert agree > 0.9
        for t in np.flatnonzero(spells):
            for proj in (greedy_proj, exact):
                assert t_bytes[t].startswith(s_bytes[proj.sigma[t]])


# --------------------------------------------------------------------------- bad input


def _args() -> tuple[TokenSpans, TokenSpans, TeacherRows]:
    return (TokenSpans.from_sequences([[0, 1, 0, 1]], [[0, 1, 2, 3, 4]]), COARSE_TEACHER,
            COARSE_ROWS)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s, t, r: (TokenSpans.from_sequences([[0, 1, 0, 1]], [[0, 2, 1, 3, 4]]), t, r),
     "not increasing"),
    (lambda s, t, r: (TokenSpans.from_sequences([[0, 1, 0]], [[0, 1, 2, 3]]), t, r),
     "not the same text"),
    (lambda s, t, r: (TokenSpans.from_sequences([[0, 1, 0, 1]], [[1, 2, 3, 4, 5]]), t, r),
     "not the same text"),
    (lambda s, t, r: (s, t, r.rows(0, 1)), "make 2"),
    (lambda s, t, r: (s, t, TeacherRows(r.ids, r.logprobs, r.tail_logmass)), "target_logprob"),
    (lambda s, t, r: (TokenSpans.from_sequences([[0, 1, 0, 7]], [[0, 1, 2, 3, 4]]), t, r),
     "outside"),
    (lambda s, t, r: (TokenSpans.from_sequences([[0, 1, 1, 1]], [[0, 1, 2, 2, 4]]), t, r),
     "do not match"),
    (lambda s, t, r: (s, TokenSpans.from_sequences([[4, 2, 2]], [[0, 1, 2, 4]]), r),
     "do not match"),
    (lambda s, t, r: (TokenSpans.from_sequences([[0, 1, 0, 1]] * 2, [[0, 1, 2, 3, 4]] * 2), t,
                      r), "2 student sequences but 1"),
])
def test_bad_input_is_refused(change, message: str) -> None:  # type: ignore[no-untyped-def]
    proj = project_vocab(COARSE_BYTES, [b"a", b"b"])
    student, teacher, rows = change(*_args())
    with pytest.raises(ValueError, match=message):
        align_rows(student, teacher, rows, proj, backend="numpy")


def test_bad_options_and_spans_are_refused() -> None:
    proj = project_vocab(COARSE_BYTES, [b"a", b"b"])
    with pytest.raises(ValueError, match="k_out"):
        align_rows(*_args(), proj, k_out=3)
    with pytest.raises(ValueError, match="interior_tail"):
        align_rows(*_args(), proj, interior_tail="guess")
    with pytest.raises(ValueError, match="bounds"):
        TokenSpans.from_sequences([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match="offsets"):
        TokenSpans(np.zeros(3), np.zeros(3), np.zeros(1), np.array([0, 2]))
    with pytest.raises(ValueError, match="pair"):
        project_vocab(COARSE_BYTES, [b"a", b"b"], {4: 2})
    assert ALIGNERS["project"] is align_rows
