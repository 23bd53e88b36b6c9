"""union_support and to_union: the per-row union of supports, and every teacher on it (imputed
ids included) still a distribution."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.distill.aggregate.operators import Stack
from mtkd.distill.aggregate.tempering import temper
from mtkd.distill.aggregate.union import to_union, union_support

from .cases import TAILS, teachers_case

SETTINGS = settings(deadline=None)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_teachers=st.integers(1, 4), vocab=st.integers(1, 50))
def test_union_support_matches_per_row_union(seed, n_teachers, vocab):
    rng = np.random.default_rng(seed)
    n = 7
    ids = [
        np.argsort(rng.random((n, vocab)), axis=1)[:, : rng.integers(1, vocab + 1)].astype(np.int32)
        for _ in range(n_teachers)
    ]
    union, counts, cols = union_support(ids, vocab)
    for r in range(n):
        want = np.unique(np.concatenate([a[r] for a in ids]))
        assert counts[r] == len(want)
        np.testing.assert_array_equal(union[r, : counts[r]], want)
        assert (union[r, counts[r] :] == -1).all()
    np.testing.assert_array_equal(
        np.take_along_axis(union, cols.astype(np.intp), axis=1), np.concatenate(ids, axis=1)
    )


@SETTINGS
@given(case=teachers_case(), tail=st.sampled_from(TAILS))
def test_union_imputation_conserves_each_teachers_mass(case, tail):
    teachers, _, temps, _, vocab, _ = case
    tempered = [temper(t, tt, tail, vocab) for t, tt in zip(teachers, temps, strict=True)]
    block = to_union(tempered, vocab)
    probs = block.stack.probs
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, atol=1e-12)
    size = block.ids.shape[1]
    pad = np.arange(size) >= block.counts[:, None]
    assert (probs[:, :, :size][:, pad] == 0).all()
    for j, t in enumerate(tempered):
        in_union = np.searchsorted(block.ids[0, : block.counts[0]], t.ids[0])
        np.testing.assert_allclose(probs[j, 0, in_union], t.probs[0], rtol=1e-12)
        lacks = ~np.isin(block.ids, t.ids) & ~pad
        imputed = probs[j, :, :size][lacks]
        rows = np.nonzero(lacks)[0]
        # At most the k-th prob and at most the even share of the tempered tail.
        assert (imputed <= t.probs.min(axis=1)[rows] * (1 + 1e-12)).all()
        assert (imputed <= t.tail_mass[rows] / max(vocab - t.ids.shape[1], 1) * (1 + 1e-9)).all()
    # The sparse Σ p log p equals the dense one.
    np.testing.assert_allclose(block.stack.plogp, Stack(probs).plogp, atol=1e-12)
