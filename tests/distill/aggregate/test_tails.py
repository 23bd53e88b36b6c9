"""Tail models and tempering of truncated distributions, against dense references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.distill.aggregate.tails import (
    TAIL_MODELS,
    Exact,
    Lump,
    Zipf,
    as_float64,
    expm1_ratio,
    get_tail_model,
    log_power_sum,
    logsumexp,
)
from mtkd.distill.aggregate.tempering import TeacherRows, temper

from .cases import dense_logprobs, sparse_rows, tempered_dense

SETTINGS = settings(deadline=None)
MODELS_IDENTITY_AT_1 = ["lump", "zipf", "exact"]


@st.composite
def teacher_case(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 60))
    k = draw(st.integers(1, vocab))
    scale = draw(st.floats(0.1, 6.0))
    return dense_logprobs(np.random.default_rng(seed), n, vocab, scale), k


@SETTINGS
@given(case=teacher_case(), model=st.sampled_from(MODELS_IDENTITY_AT_1))
def test_tail_models_are_identity_at_t1(case, model):
    logp, k = case
    rows = sparse_rows(logp, k)
    out = temper(rows, 1.0, model, logp.shape[1])
    np.testing.assert_allclose(np.exp(out.logprobs), np.exp(rows.logprobs), atol=1e-12)
    np.testing.assert_allclose(out.tail_mass, np.exp(rows.tail_logmass), atol=1e-12)


@SETTINGS
@given(case=teacher_case())
def test_renormalise_at_t1_drops_the_tail(case):
    logp, k = case
    rows = sparse_rows(logp, k)
    out = temper(rows, 1.0, "renormalise", logp.shape[1])
    p = np.exp(rows.logprobs)
    np.testing.assert_allclose(out.probs, p / p.sum(axis=1, keepdims=True), atol=1e-12)
    assert (out.tail_mass == 0).all()


@SETTINGS
@given(
    case=teacher_case(), model=st.sampled_from(sorted(TAIL_MODELS)), temperature=st.floats(0.2, 5.0)
)
def test_tempered_rows_are_distributions_with_ranking_kept(case, model, temperature):
    logp, k = case
    rows = sparse_rows(logp, k, (temperature,))
    out = temper(rows, temperature, model, logp.shape[1])
    total = out.probs.sum(axis=1) + out.tail_mass
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    assert (out.probs >= 0).all() and (out.tail_mass >= 0).all()
    # Tempering is monotone inside the support: the stored (descending) order is kept.
    assert (np.diff(out.logprobs, axis=1) <= 1e-12).all()


@SETTINGS
@given(case=teacher_case(), temperature=st.floats(0.2, 5.0))
def test_exact_tail_matches_full_vocabulary_tempering(case, temperature):
    logp, k = case
    rows = sparse_rows(logp, k, (0.5, temperature))
    out = temper(rows, temperature, "exact", logp.shape[1])
    dense = tempered_dense(logp, temperature)
    np.testing.assert_allclose(
        out.probs, np.exp(np.take_along_axis(dense, rows.ids, axis=1)), atol=1e-10
    )
    top = np.exp(np.take_along_axis(dense, rows.ids, axis=1)).sum(axis=1)
    np.testing.assert_allclose(out.tail_mass, 1.0 - top, atol=1e-10)


def test_exact_without_stored_tails_raises():
    logp = dense_logprobs(np.random.default_rng(0), 3, 20, 1.0)
    rows = sparse_rows(logp, 5, (2.0,))
    with pytest.raises(ValueError, match="exact"):
        temper(rows, 3.0, "exact", 20)
    # T=1 needs nothing stored: the exact tempered tail is the stored tail itself.
    temper(sparse_rows(logp, 5), 1.0, "exact", 20)


@SETTINGS
@given(case=teacher_case(), temperature=st.floats(0.2, 5.0))
def test_zipf_tail_lies_between_lump_and_even_spread(case, temperature):
    logp, k = case
    vocab = logp.shape[1]
    rows = sparse_rows(logp, k)
    lump = Lump().log_tempered_tail(rows.logprobs, rows.tail_logmass, temperature, vocab, None)
    zipf = Zipf().log_tempered_tail(rows.logprobs, rows.tail_logmass, temperature, vocab, None)
    if vocab == k:
        assert np.isneginf(zipf).all()
        return
    even = lump + (1 - 1 / temperature) * np.log(vocab - k)
    lo, hi = np.minimum(lump, even), np.maximum(lump, even)
    finite = np.isfinite(lump)
    assert (zipf[finite] >= lo[finite] - 1e-9).all() and (zipf[finite] <= hi[finite] + 1e-9).all()


@SETTINGS
@given(
    k=st.integers(1, 40),
    extra=st.integers(1, 3000),
    temperature=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_zipf_tail_equals_brute_force_extrapolation(k, extra, temperature, seed):
    rng = np.random.default_rng(seed)
    vocab = k + extra
    logprobs = np.sort(rng.standard_normal((3, k)) * 2 - 3, axis=1)[:, ::-1]
    tail = np.log(rng.uniform(0.01, 0.9, 3))
    model = Zipf()
    got = model.log_tempered_tail(logprobs, tail, temperature, vocab, None)
    b = model.exponent(logprobs)
    ranks = np.arange(k + 1, vocab + 1, dtype=np.float64)
    shape = ranks[None, :] ** -b[:, None]
    masses = np.exp(tail)[:, None] * shape / shape.sum(axis=1, keepdims=True)
    want = np.log((masses ** (1 / temperature)).sum(axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)


def test_zipf_recovers_a_power_law_exponent():
    ranks = np.arange(1, 33, dtype=np.float64)
    logprobs = np.log(0.2) - 1.3 * np.log(ranks)
    np.testing.assert_allclose(Zipf().exponent(logprobs[None, :]), [1.3], atol=1e-12)
    np.testing.assert_allclose(Zipf(fit_from=0.0).exponent(logprobs[None, :]), [1.3], atol=1e-12)


@pytest.mark.parametrize("first", [2, 3, 9, 65])
@pytest.mark.parametrize("last_extra", [0, 1, 4, 5, 200, 5000])
def test_log_power_sum_against_direct_sum(first, last_extra):
    s = np.array([0.0, 0.3, 1.0, 1.0 + 1e-12, 1.7, 4.0, 25.0, 300.0])
    last = first + last_extra
    j = np.arange(first, last + 1, dtype=np.float64)
    want = logsumexp(-s[:, None] * np.log(j)[None, :])
    np.testing.assert_allclose(log_power_sum(s, first, last), want, rtol=1e-9, atol=1e-8)


@SETTINGS
@given(z=st.floats(-30.0, 30.0))
def test_expm1_ratio_is_expm1_over_z_and_smooth_at_zero(z):
    """φ(z)·z = expm1(z) away from 0; near it, including both sides of the cut-over at
    |z| = 1e-10, φ(z) = 1 + z/2 + O(z²)."""
    got = expm1_ratio(np.array([z, z * 1e-9]))
    if abs(z) >= 1e-10:
        np.testing.assert_allclose(got[0] * z, np.expm1(z), rtol=1e-12)
    small = z * 1e-9
    assert abs(got[1] - (1.0 + 0.5 * small)) <= small * small + 4 * np.finfo(float).eps


@SETTINGS
@given(
    case=teacher_case(),
    model=st.sampled_from(["lump", "renormalise"]),
    t1=st.floats(0.2, 5.0),
    t2=st.floats(0.2, 5.0),
)
def test_entropy_does_not_decrease_with_temperature(case, model, t1, t2):
    """Top-k + bucket entropy is monotone where the bucket is tempered as one category.

    (With exact or zipf tails the bucket holds many tempered tokens, and the entropy of the
    coarse top-k + bucket view can fall as T grows although the full distribution's rises.)
    """
    logp, k = case
    lo, hi = min(t1, t2), max(t1, t2)
    rows = sparse_rows(logp, k, (lo, hi))
    h_lo = temper(rows, lo, model, logp.shape[1]).entropy()
    h_hi = temper(rows, hi, model, logp.shape[1]).entropy()
    assert (h_hi >= h_lo - 1e-9).all()


def test_registry_and_errors():
    assert isinstance(get_tail_model("zipf", fit_from=0.25), Zipf)
    assert isinstance(get_tail_model(Exact()), Exact)
    with pytest.raises(ValueError, match="unknown tail model 'nope'"):
        get_tail_model("nope")
    with pytest.raises(ValueError, match="fit_from"):
        Zipf(fit_from=1.0)
    logp = dense_logprobs(np.random.default_rng(1), 2, 10, 1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            temper(sparse_rows(logp, 3), bad, "lump", 10)
    with pytest.raises(ValueError, match="tempered_tail_logmass"):
        TeacherRows(
            np.zeros((2, 3), np.int32),
            np.zeros((2, 3)),
            np.zeros(2),
            None,
            np.zeros((2, 2)),
            (2.0,),
        )


def test_as_float64_is_exact_for_every_float16():
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    half = bits.view(np.float16)
    got = as_float64(half)
    want = half.astype(np.float64)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])
    np.testing.assert_array_equal(as_float64(np.ones(3, np.float32)), np.ones(3))


@SETTINGS
@given(case=teacher_case(), model=st.sampled_from(sorted(TAIL_MODELS)),
       temperature=st.floats(0.2, 5.0))
def test_temper_with_a_kept_normaliser_is_the_same(case, model, temperature):
    """What fuse does between the weight policy's pass and the fusion pass."""
    logp, k = case
    rows = sparse_rows(logp, k, (temperature,))
    first = temper(rows, temperature, model, logp.shape[1])
    again = temper(rows, temperature, model, logp.shape[1],
                   normaliser=(first.log_norm, first.tail_logmass))
    np.testing.assert_allclose(again.probs, first.probs, atol=1e-12)
    np.testing.assert_allclose(again.tail_mass, first.tail_mass, atol=1e-12)
    # entropy of the top-k + bucket view against the direct formula
    cats = np.concatenate([first.probs, first.tail_mass[:, None]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = -np.where(cats > 0, cats * np.log(cats), 0.0).sum(axis=1)
    np.testing.assert_allclose(first.entropy(), direct, atol=1e-10)
