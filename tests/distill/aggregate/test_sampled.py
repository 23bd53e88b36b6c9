"""Random-sampling targets: the fused empirical mixture is unbiased, and bad draws are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples, head_and_draws
from mtkd.harvest.hf_engine import sample_targets

VOCAB = 30


def draws(logp: torch.Tensor, n: int, seed: int) -> SampledRows:
    ids, counts, _ = sample_targets(logp, n, 1.0, torch.Generator().manual_seed(seed))
    return SampledRows(ids.numpy(), counts.numpy().astype(np.int64), n)


def dense(out: dict[str, np.ndarray]) -> np.ndarray:
    """Fused sparse rows as ``[N, VOCAB]`` probabilities (padding dropped)."""
    d = np.zeros((len(out["ids"]), VOCAB))
    rows = np.broadcast_to(np.arange(len(out["ids"]))[:, None], out["ids"].shape)
    real = out["ids"] >= 0
    d[rows[real], out["ids"][real]] = out["probs"][real]
    return d


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
        assert np.allclose(out["tail_mass"], 0, atol=1e-6)
        total += dense(out)
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


def hybrid(logp: torch.Tensor, head: int, n: int, seed: int) -> SampledRows:
    """The exact top-``head`` entries plus ``n`` draws from the rest (harvest --sample-rest)."""
    top = logp.topk(head, dim=-1)
    ids, counts, _ = sample_targets(logp, n, 1.0, torch.Generator().manual_seed(seed),
                                    exclude=top.indices)
    rest = 1.0 - top.values.exp().sum(-1)
    return SampledRows(ids.numpy(), counts.numpy().astype(np.int64), n,
                       head_ids=top.indices.numpy(), head_probs=top.values.exp().numpy(),
                       rest_mass=rest.numpy())


def test_the_hybrid_is_unbiased_and_beats_plain_draws_of_the_same_budget() -> None:
    """Head + rest·c/N: its mean over independent draws is the teacher's distribution, and
    at the same number of stored ids (head + draws) its squared error is lower than plain
    draws' (the head, where most of the mass is, is exact)."""
    rng = np.random.default_rng(1)
    logp = torch.log_softmax(torch.from_numpy(rng.standard_normal((6, VOCAB)) * 2.5), dim=-1)
    truth = logp.exp().numpy()
    reps, head, n = 600, 4, 8

    hyb = np.stack([dense(fuse_samples([hybrid(logp, head, n, r)], [1.0], VOCAB, VOCAB))
                    for r in range(reps)])
    plain = np.stack([dense(fuse_samples([draws(logp, head + n, 10_000 + r)], [1.0], VOCAB,
                                         VOCAB)) for r in range(reps)])
    np.testing.assert_allclose(hyb.sum(-1), 1.0, atol=1e-9)  # a distribution
    # head entries are exact in every repetition
    top = logp.topk(head, dim=-1).indices.numpy()
    np.testing.assert_allclose(np.take_along_axis(hyb, top[None].repeat(reps, 0), 2),
                               np.take_along_axis(np.broadcast_to(truth, hyb.shape),
                                                  top[None].repeat(reps, 0), 2), atol=1e-12)
    # unbiased: within 5 standard errors per entry; off the head an entry is rest·c/N with
    # c ~ Binomial(N, p/rest)
    rest = 1.0 - np.take_along_axis(truth, top, 1).sum(-1, keepdims=True)
    pi = truth / rest
    se = rest * np.sqrt(pi * np.clip(1 - pi, 0, None) / n / reps)
    assert np.all(np.abs(hyb.mean(0) - truth) <= 5 * se + 1e-6)  # probs are float32
    # lower mean squared error than plain draws of the same number of stored ids
    assert ((hyb - truth) ** 2).sum(-1).mean() < 0.5 * ((plain - truth) ** 2).sum(-1).mean()


def test_the_head_of_a_plain_store_with_its_draws_is_the_hybrid_estimator() -> None:
    """``head_and_draws`` (aggregate --sample-head h on a plain store): the exact top-h, and
    the rest's exact mass shared by the draws that fell outside it. Given m >= 1 such draws
    they are m draws from the rest, so the mean over repetitions is p·(1 − P(m = 0)) off the
    head (the rest stays in the tail when no draw left the head) and p on it; and on the same
    draws its squared error is below the plain empirical distribution's."""
    rng = np.random.default_rng(2)
    logp = torch.log_softmax(torch.from_numpy(rng.standard_normal((6, VOCAB)) * 2.5), dim=-1)
    truth = logp.exp().numpy()
    reps, head, n = 600, 4, 8
    top = logp.topk(VOCAB, dim=-1)
    rest = 1.0 - np.take_along_axis(truth, top.indices[:, :head].numpy(), 1).sum(-1)

    hyb, plain, tails = [], [], []
    for r in range(reps):
        drawn = draws(logp, n, 20_000 + r)
        rows = head_and_draws(top.indices.numpy(), top.values.numpy(), drawn.ids, drawn.counts,
                              n, head)
        out = fuse_samples([rows], [1.0], VOCAB, VOCAB)
        hyb.append(dense(out))
        tails.append(out["tail_mass"])
        plain.append(dense(fuse_samples([drawn], [1.0], VOCAB, VOCAB)))
    hyb, plain, tails = np.stack(hyb), np.stack(plain), np.stack(tails)
    in_head = np.zeros_like(truth, bool)
    np.put_along_axis(in_head, top.indices[:, :head].numpy(), True, 1)
    none_out = (1 - rest) ** n  # P(every draw in the head)
    want = np.where(in_head, truth, truth * (1 - none_out[:, None]))
    np.testing.assert_allclose(hyb[:, in_head], np.broadcast_to(truth[in_head], (reps,
                               in_head.sum())), atol=1e-6)  # the head is exact every time
    # off the head an entry lies in [0, rest] with mean want: its variance is <= want·rest
    se = np.sqrt(want * rest[:, None] / reps)
    assert np.all(np.abs(hyb.mean(0) - want)[~in_head] <= 5 * se[~in_head] + 1e-7)
    # the tail is rest with probability none_out, else 0
    assert np.all(np.abs(tails.mean(0) - rest * none_out)
                  <= 5 * rest * np.sqrt(none_out / reps) + 1e-6)
    np.testing.assert_allclose(hyb.sum(-1) + tails, 1.0, atol=1e-6)
    assert ((hyb - truth) ** 2).sum(-1).mean() < 0.5 * ((plain - truth) ** 2).sum(-1).mean()
    with pytest.raises(ValueError, match="head must be in"):
        head_and_draws(top.indices.numpy(), top.values.numpy(), drawn.ids, drawn.counts, n,
                       VOCAB + 1)


def test_the_union_fusion_equals_the_dense_mixture_on_a_large_vocabulary() -> None:
    """Fused on the union of the drawn ids, the mixture of a plain and a hybrid teacher with
    per-row weights equals the dense one over all 49,152 ids: its k_out largest entries (ties to
    the smaller id), the lumped tail, Σ_k w_k KL(p_k‖q) and the teachers' total variation."""
    vocab, n, k_out = 49_152, 40, 12
    rng = np.random.default_rng(3)
    logps = [torch.log_softmax(torch.from_numpy(rng.standard_normal((n, vocab)) * s), dim=-1)
             for s in (3.0, 4.0)]
    teachers = [draws(logps[0], 32, 7), hybrid(logps[1], 5, 24, 8)]
    w = rng.dirichlet([1.0, 1.0], size=n)
    out = fuse_samples(teachers, w, k_out, vocab)

    p = np.zeros((2, n, vocab))
    rows = np.arange(n)[:, None]
    np.add.at(p[0], (rows, teachers[0].ids), teachers[0].counts / 32)
    t = teachers[1]
    np.add.at(p[1], (rows, t.ids), t.counts / t.counts.sum(1, keepdims=True) * t.rest_mass[:, None])
    np.add.at(p[1], (rows, t.head_ids), t.head_probs)
    p[1] /= p[1].sum(1, keepdims=True)
    q = np.einsum("nk,knv->nv", w, p)
    order = np.lexsort((np.arange(vocab)[None].repeat(n, 0), -q.astype(np.float32)), axis=1)
    top = order[:, :k_out]
    np.testing.assert_array_equal(out["ids"], np.where(np.take_along_axis(q, top, 1) > 0, top, -1))
    np.testing.assert_allclose(out["probs"], np.take_along_axis(q, top, 1), rtol=1e-6)
    np.testing.assert_allclose(out["tail_mass"], 1 - np.take_along_axis(q, top, 1).sum(1),
                               atol=1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * np.log(p / q), 0.0).sum(-1)
    np.testing.assert_allclose(out["jensen_gap"], (w.T * kl).sum(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["disagreement"], 0.5 * np.abs(p[0] - p[1]).sum(-1),
                               rtol=1e-5)
