"""own_samples: a teacher's draws made estimated rows in its own ids — distributions with the
actual token and the head exact, unbiased over repeated draws — and, aligned to another
tokenizer's positions, unbiased for the exactly aligned distribution at shared boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtkd.distill.aggregate.align import TokenSpans, align_rows
from mtkd.distill.aggregate.align_kernel import SHARED
from mtkd.distill.aggregate.own_samples import as_head_rows, estimated_rows, select_sampled
from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples, head_and_draws
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.vocab_projection import project_vocab
from tests.distill.aggregate.test_align import ALPHABET, dense_rows, greedy, random_text


def draws(rng: np.random.Generator, logp: np.ndarray, n: int) -> SampledRows:
    """``n`` draws per row of ``logp [R,V]``: distinct ids ascending, counts, −1/0 padding."""
    ids = np.full((len(logp), n), -1, np.int32)
    counts = np.zeros((len(logp), n), np.int32)
    for i, row in enumerate(np.exp(logp)):
        c = rng.multinomial(n, row / row.sum())
        drawn = np.flatnonzero(c)
        ids[i, :len(drawn)], counts[i, :len(drawn)] = drawn, c[drawn]
    return SampledRows(ids, counts, n)


def with_head(rows: SampledRows, logp: np.ndarray, head: int) -> SampledRows:
    """The hybrid estimator of a plain store's draws with its exact top-``head``."""
    order = np.argsort(-logp, axis=1, kind="stable")
    top = np.take_along_axis(logp, order, axis=1).astype(np.float32)
    return head_and_draws(order.astype(np.int32), top, rows.ids, rows.counts,
                          rows.num_samples, head)


def densify(rows: TeacherRows, vocab: int) -> np.ndarray:
    """Dense ``[R, V+1]`` probabilities, the tail in the last column."""
    out = np.zeros((rows.ids.shape[0], vocab + 1))
    r = np.repeat(np.arange(rows.ids.shape[0]), rows.ids.shape[1])
    keep = rows.ids.reshape(-1) >= 0
    np.add.at(out, (r[keep], rows.ids.reshape(-1)[keep]),
              np.exp(rows.logprobs.reshape(-1)[keep].astype(np.float64)))
    out[:, -1] = np.exp(rows.tail_logmass)
    return out


@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 30), n=st.integers(1, 40),
       head=st.integers(0, 5))
def test_estimated_rows_are_distributions_with_the_exact_entries(seed: int, vocab: int,
                                                                 n: int, head: int) -> None:
    rng = np.random.default_rng(seed)
    logp = dense_rows(rng, 6, vocab)
    star = rng.integers(0, vocab, 6)
    sampled = draws(rng, logp, n)
    head = min(head, vocab)
    if head:
        sampled = with_head(sampled, logp, head)
    target = logp[np.arange(6), star]
    est = estimated_rows(sampled, star, target)
    dense = densify(est, vocab)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-6)  # float32 entries
    np.testing.assert_allclose(dense[np.arange(6), star], np.exp(target), rtol=1e-6)
    if head:
        top = np.argsort(-logp, axis=1, kind="stable")[:, :head]
        np.testing.assert_allclose(np.take_along_axis(dense, top, axis=1),
                                   np.exp(np.take_along_axis(logp, top, axis=1)), rtol=1e-6)
    real = est.ids >= 0
    assert all(len(set(r[k].tolist())) == k.sum() for r, k in zip(est.ids, real, strict=True))
    with np.errstate(invalid="ignore"):  # −inf − −inf on padding
        steps = np.diff(est.logprobs.astype(np.float64), axis=1)
    assert (steps[real[:, 1:]] <= 0).all()
    assert np.array_equal(est.target_logprob, target)
    # only a row without a draw outside the exact entries keeps a tail: their rest
    outside = dense[:, :vocab] > 0
    outside[np.arange(6), star] = False
    if head:
        np.put_along_axis(outside, top, False, axis=1)
    assert ((dense[:, -1] == 0) | ~outside.any(axis=1)).all()


@pytest.mark.parametrize("head", [0, 2])
def test_estimated_rows_are_unbiased(head: int) -> None:
    """The mean of the estimate over many independent draws is the teacher's distribution
    (within 4.5 standard errors per entry, the errors measured from the estimates), but for
    the rest's mass left in the tail when no draw fell outside the exact entries."""
    rng = np.random.default_rng(3)
    vocab, n, reps = 9, 16, 3000
    logp = dense_rows(rng, 1, vocab) * 0.5
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    star = np.array([int(np.argsort(logp[0])[2])])  # a mid-ranked actual token
    logp_rep = np.repeat(logp, reps, axis=0)
    sampled = draws(rng, logp_rep, n)
    if head:
        sampled = with_head(sampled, logp_rep, head)
    est = densify(estimated_rows(sampled, np.repeat(star, reps),
                                 np.repeat(logp[0, star], reps)), vocab)
    mean, se = est.mean(axis=0), est.std(axis=0) / np.sqrt(reps) + 1e-12
    p = np.exp(logp[0])
    exact = np.zeros(vocab, bool)
    exact[star] = True
    exact[np.argsort(-p, kind="stable")[:head]] = True
    none_outside = p[exact].sum() ** n  # then the rest stays in the tail (the only bias)
    want = np.append(np.where(exact, p, p * (1 - none_outside)), p[~exact].sum() * none_outside)
    assert (np.abs(mean - want) <= 4.5 * se + 1e-7).all(), (mean - want) / se  # t*: float32


def test_aligned_draws_average_to_the_aligned_distribution() -> None:
    """Draws of a teacher with another greedy vocabulary, estimated and aligned: at shared
    boundaries (a linear pushforward, without ``student_splits``' ratio) their mean is the
    alignment of the exact full rows; with it, close to it (a ratio estimator)."""
    rng = np.random.default_rng(11)
    s_vocab = [bytes([c]) for c in ALPHABET] + [b"ab", b"ca"]
    t_vocab = [bytes([c]) for c in ALPHABET] + [b"abc", b"bc", b"cab"]
    text = random_text(rng, 40)
    s_ids, s_bounds = greedy(text, s_vocab)
    t_ids, t_bounds = greedy(text, t_vocab)
    logp = dense_rows(rng, len(t_ids) - 1, len(t_vocab)) * 0.6
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    proj = project_vocab(t_vocab, s_vocab)
    student = TokenSpans.from_sequences([s_ids], [s_bounds])
    teacher = TokenSpans.from_sequences([t_ids], [t_bounds])
    k_out = len(s_vocab)
    full = TeacherRows(np.argsort(-logp, axis=1, kind="stable").astype(np.int32),
                       -np.sort(-logp, axis=1).astype(np.float32),
                       np.full(len(logp), -np.inf), logp[np.arange(len(logp)), t_ids[1:]])
    exact = align_rows(student, teacher, full, proj, k_out=k_out, student_splits=False)
    ratio = align_rows(student, teacher, full, proj, k_out=k_out)
    reps, total = 600, np.zeros((len(s_ids) - 1, k_out + 1))
    total_ratio = np.zeros_like(total)
    for _ in range(reps):
        est = estimated_rows(draws(rng, logp, 8), np.asarray(t_ids[1:]), full.target_logprob)
        total += densify(align_rows(student, teacher, est, proj, k_out=k_out,
                                    student_splits=False).rows, k_out)
        est = estimated_rows(draws(rng, logp, 64), np.asarray(t_ids[1:]), full.target_logprob)
        total_ratio += densify(align_rows(student, teacher, est, proj, k_out=k_out).rows, k_out)
    shared = exact.kind == SHARED
    assert shared.sum() >= 10
    want = densify(exact.rows, k_out)[shared]
    np.testing.assert_allclose((total / reps)[shared], want, atol=0.03)
    # the label's mass is the exact one wherever the path is known exactly
    np.testing.assert_allclose(
        (total / reps)[shared, np.asarray(s_ids[1:])[shared]],
        want[np.arange(shared.sum()), np.asarray(s_ids[1:])[shared]], atol=0.03)
    assert (ratio.kind == exact.kind).all() and not np.allclose(densify(ratio.rows, k_out),
                                                                 densify(exact.rows, k_out))
    error = np.abs(total_ratio / reps - densify(ratio.rows, k_out))
    assert error.max() < 0.05 and error.mean() < 0.005, (error.max(), error.mean())


def test_aligned_rows_fuse_as_exact_heads() -> None:
    """``as_head_rows``: ``fuse_samples`` of one aligned teacher gives its rows back, the tail
    left a tail; ``select_sampled`` takes rows of every field."""
    rng = np.random.default_rng(5)
    logp = dense_rows(rng, 7, 12)
    est = estimated_rows(with_head(draws(rng, logp, 5), logp, 3), np.arange(7),
                         logp[np.arange(7), np.arange(7)])
    kept = densify(est, 12)[:, :12] * 0.75  # aligned rows: a quarter of the mass cut or lost
    rows = as_head_rows(TeacherRows(est.ids, est.logprobs + np.log(0.75).astype(np.float32),
                                    np.log(1 - kept.sum(axis=1)), est.target_logprob), 5)
    fused = fuse_samples([rows], np.ones(1), 12, 12)
    with np.errstate(divide="ignore"):
        logp_out = np.log(fused["probs"]).astype(np.float32)
    dense = densify(TeacherRows(fused["ids"], logp_out,
                                np.log(fused["tail_mass"]), None), 12)
    np.testing.assert_allclose(dense[:, :12], kept, atol=1e-6)
    np.testing.assert_allclose(fused["tail_mass"], 1 - kept.sum(axis=1), atol=1e-6)
    some = select_sampled(rows, np.array([4, 1]))
    assert np.array_equal(some.head_ids, rows.head_ids[[4, 1]])
    assert np.array_equal(some.rest_mass, rows.rest_mass[[4, 1]])
