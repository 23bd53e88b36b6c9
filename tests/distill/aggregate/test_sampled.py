"""Random-sampling targets: the fused empirical mixture is unbiased, and bad draws are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples
from mtkd.harvest.hf_engine import sample_targets

VOCAB = 30


def draws(logp: torch.Tensor, n: int, seed: int) -> SampledRows:
    ids, counts, _ = sample_targets(logp, n, 1.0, torch.Generator().manual_seed(seed))
    return SampledRows(ids.numpy(), counts.numpy().astype(np.int64), n)


def test_the_fused_draws_are_an_unbiased_estimate_of_the_linear_mixture() -> None:
    """Averaged over independent draws, Σ w_k c_k/N converges to Σ w_k p_k (here within 4
    standard errors per entry), with k_out = V so nothing is lumped."""
    rng = np.random.default_rng(0)
    logits = [torch.from_numpy(rng.standard_normal((5, VOCAB)) * s) for s in (1.0, 3.0)]
    logps = [torch.log_softmax(x, dim=-1) for x in logits]
    w = np.array([0.6, 0.4])
    truth = sum(wk * lp.exp().numpy() for wk, lp in zip(w, logps, strict=True))
    reps, n = 400, 8
    total = np.zeros_like(truth)
    for r in range(reps):
        out = fuse_samples([draws(lp, n, 1000 * r + j) for j, lp in enumerate(logps)], w,
                           VOCAB, VOCAB)
        dense = np.zeros_like(truth)
        rows = np.broadcast_to(np.arange(5)[:, None], out["ids"].shape)
        real = out["ids"] >= 0
        dense[rows[real], out["ids"][real]] = out["probs"][real]
        assert np.allclose(out["tail_mass"], 0, atol=1e-6)
        total += dense
    mean = total / reps
    # Var of one fused entry ≤ Σ w_k² p_k(1−p_k)/N
    se = np.sqrt(sum(wk**2 * lp.exp().numpy() * (1 - lp.exp().numpy()) / n
                     for wk, lp in zip(w, logps, strict=True)) / reps)
    assert np.all(np.abs(mean - truth) <= 4 * se + 1e-9)


@pytest.mark.parametrize(("ids", "counts", "match"), [
    ([[0, 1]], [[2, 1]], "do not sum"),
    ([[0, VOCAB]], [[2, 2]], "outside"),
    ([[0, 1]], [[5, -1]], "negative"),
])
def test_refuses_rows_that_are_not_n_draws(ids, counts, match) -> None:
    rows = SampledRows(np.array(ids), np.array(counts), 4)
    with pytest.raises(ValueError, match=match):
        fuse_samples([rows], [1.0], 4, VOCAB)
