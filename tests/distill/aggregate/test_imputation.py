"""Imputation of the ids a teacher lacks: the rank-based share against direct sums, and mass
conservation with the bounds of both variants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.distill.aggregate.imputation import impute, log_rank_share
from mtkd.distill.aggregate.tails import Zipf
from mtkd.distill.aggregate.tempering import temper
from mtkd.distill.aggregate.union import to_union

from .cases import TAILS, teachers_case

SETTINGS = settings(deadline=None)


@SETTINGS
@given(case=teachers_case(), tail=st.sampled_from(TAILS))
def test_rank_imputation_conserves_mass_and_exceeds_the_even_share(case, tail):
    """Rank-based imputation: each lacking teacher still sums to 1, its imputed mass stays
    ≤ its k-th prob and ≤ its tail, and is at least the even share (the first ranks of a
    decreasing tail hold at least their even share of it)."""
    teachers, _, temps, _, vocab, _ = case
    tempered = [temper(t, tt, tail, vocab) for t, tt in zip(teachers, temps, strict=True)]
    exps = [Zipf().exponent(t.logprobs) / tt for t, tt in zip(teachers, temps, strict=True)]
    block = to_union(tempered, vocab, rank_exponents=exps)
    np.testing.assert_allclose(block.stack.probs.sum(axis=2), 1.0, atol=1e-12)
    assert (block.stack.probs >= 0).all()
    for t, s in zip(tempered, exps, strict=True):
        rank, even = impute(t, block.counts, vocab, s), impute(t, block.counts, vocab)
        missing = block.counts - t.ids.shape[1]
        lacks = missing > 0
        assert (rank.v[lacks] <= t.probs.min(axis=1)[lacks] * (1 + 1e-12)).all()
        assert (missing * rank.v <= t.tail_mass * (1 + 1e-9) + 1e-300).all()
        assert (rank.v[lacks] >= even.v[lacks] * (1 - 1e-9)).all()
        np.testing.assert_allclose(rank.tail + missing * rank.v, t.tail_mass, atol=1e-12)


@pytest.mark.parametrize("s", [0.0, 0.5, 1.0, 1.7, 3.0])
@pytest.mark.parametrize(("k", "m", "vocab"), [(16, 1, 100), (64, 20, 32000), (64, 100, 500)])
def test_rank_share_against_direct_sums(s, k, m, vocab):
    ranks = np.arange(k + 1, vocab + 1, dtype=np.float64)
    terms = ranks**-s
    want = terms[:m].sum() / terms.sum()
    got = np.exp(log_rank_share(np.array([s]), k, np.array([m]), vocab))[0]
    assert got <= 1.0
    np.testing.assert_allclose(got, want, rtol=2e-3)
