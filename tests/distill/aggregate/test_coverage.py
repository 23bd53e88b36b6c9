"""coverage: weights masked where a teacher says nothing, the coverage bitmask, the neutral
signals a weight policy sees, and the one-hot (CE) fallback."""

from __future__ import annotations

import numpy as np

from mtkd.distill.aggregate.coverage import (
    MaskedWeights,
    complete_rows,
    coverage_bits,
    mask_weights,
    neutral_inputs,
    one_hot,
    uncovered,
)
from mtkd.distill.aggregate.weights import AdaptiveWeights, WeightInputs, sequence_mean_loss

COVERED = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0], [0, 1, 0]], bool)


def test_masked_weights_renormalise_only_rows_missing_a_teacher():
    w = np.array([0.2, 0.3, 0.5])
    got = mask_weights(w, COVERED)
    assert got[0].tolist() == w.tolist()  # bit for bit
    np.testing.assert_allclose(got[1], [0.2 / 0.7, 0, 0.5 / 0.7])
    assert got[2].tolist() == [0, 0, 1.0]
    assert got[3].tolist() == w.tolist()  # nobody left: one_hot takes the row
    assert uncovered(got, COVERED).tolist() == [False, False, False, True, False]
    zero = mask_weights(np.array([0.0, 0.0, 1.0]), COVERED)
    assert uncovered(zero, COVERED).tolist() == [False, False, False, True, True]


def test_coverage_bits():
    assert coverage_bits(COVERED).tolist() == [7, 5, 4, 0, 2]
    assert coverage_bits(COVERED).dtype == np.int32


def test_complete_rows_look_at_own_teachers_only():
    lp = np.array([[-1.0, -np.inf], [-np.inf, -2.0], [-1.0, -2.0]])
    assert complete_rows(lp, [False, True]).tolist() == [False, True, True]
    assert complete_rows(lp, [False, False]).all()


def test_neutral_inputs_give_context_weights_over_covered_rows():
    """The mean loss a context policy sees of a partial teacher is its mean over the rows it
    covers; a same-tokenizer teacher's −inf (p = 0) is left as it is."""
    target = np.array([[-1.0, -2.0], [-3.0, -np.inf], [-5.0, -4.0], [-np.inf, -1.0]])
    covered = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], bool)
    offsets = np.array([0, 3, 4])
    got = neutral_inputs(WeightInputs(np.ones((4, 2)), target), covered,
                         np.array([False, True]), offsets)
    assert got.entropy[1].tolist() == [1.0, 0.0]
    assert got.target_logprob[1, 1] == -3.0  # mean of -2, -4
    assert got.target_logprob[3, 0] == -np.inf  # same-tokenizer: p = 0 is known
    loss = sequence_mean_loss(got.target_logprob, offsets)
    np.testing.assert_allclose(loss[0], [3.0, 3.0])
    policy = MaskedWeights(AdaptiveWeights(context="loss", seq_offsets=offsets), covered,
                           np.array([False, True]), offsets)
    w = policy(WeightInputs(np.ones((4, 2)), target))
    assert w[1].tolist() == [1.0, 0.0] and np.isfinite(w).all()
    np.testing.assert_allclose(w[0], [0.5, 0.5])


def test_one_hot_rows():
    fused = {"ids": np.array([[3, 1], [2, -1]], np.int32),
             "probs": np.array([[0.5, 0.2], [0.9, 0]], np.float32),
             "weights": np.array([[0.5, 0.5], [1, 0]], np.float32),
             **{k: np.full(2, 0.3, np.float32) for k in ("tail_mass", "jensen_gap",
                                                        "disagreement", "n_eff",
                                                        "tail_bucket")}}
    one_hot(fused, np.array([False, True]), np.array([7, 8]))
    assert fused["ids"].tolist() == [[3, 1], [8, -1]]
    assert fused["probs"][1].tolist() == [1.0, 0.0] and fused["tail_mass"][1] == 0
    assert fused["weights"][1].tolist() == [0, 0] and fused["n_eff"][1] == 0
