"""The fused target's rows: the top-k cut (order, padding, ties) and the label entry."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.distill.aggregate.targets import add_label_entry, top_k


def test_top_k_orders_pads_and_breaks_ties_by_column():
    q = np.array([[0.1, 0.4, 0.1, 0.0, 0.4], [0.5, 0.5, 0.0, 0.0, 0.0]])
    ids = np.array([[3, 5, 7, 9, 11], [2, 4, -1, -1, -1]], dtype=np.int32)
    got_ids, got_probs = top_k(q, ids, 6)
    np.testing.assert_array_equal(got_ids, [[5, 11, 3, 7, -1, -1], [2, 4, -1, -1, -1, -1]])
    np.testing.assert_allclose(got_probs[0], [0.4, 0.4, 0.1, 0.1, 0, 0])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_label_entry_keeps_the_distribution(seed: int, k: int) -> None:
    """add_label_entry: Σ probs + tail is unchanged, the label gets min(p, tail) only where the
    support lacks it, and every other column is untouched."""
    rng = np.random.default_rng(seed)
    n, vocab = 16, 12
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    probs = rng.dirichlet(np.ones(k + 1), n)
    tail = probs[:, -1].copy()
    probs = probs[:, :k]
    labels = rng.integers(0, vocab, n)
    label_probs = tail * rng.uniform(0, 1.2, n)  # above the tail now and then: capped
    out_ids, out_probs, out_tail = add_label_entry(ids, probs, tail, labels, label_probs)
    np.testing.assert_array_equal(out_ids[:, :k], ids)
    np.testing.assert_array_equal(out_probs[:, :k], probs)
    np.testing.assert_allclose(out_probs.sum(axis=1) + out_tail, 1.0, atol=1e-12)
    outside = ~(ids == labels[:, None]).any(axis=1)
    np.testing.assert_array_equal(out_ids[:, k], np.where(outside, labels, -1))
    np.testing.assert_allclose(out_probs[:, k], np.where(outside, np.minimum(label_probs, tail), 0))
    assert np.all(out_tail >= 0)
