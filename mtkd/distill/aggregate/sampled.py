"""Random-sampling KD targets (Anshumann et al. 2025, "Sparse Logit Sampling").

A teacher harvested with ``--num-samples N`` stores, per position, the distinct ids of N draws
from its distribution and their counts. The empirical distribution c/N is an unbiased estimate
of the teacher's (so is the hybrid's head + rest·c/N, its draws taken outside the exact top-k
head: lower variance, the head being exact), so forward KL to it has the full-vocabulary
loss's expected gradient, unlike a top-k cut (which drops the tail's shape). Fusing K sampled
teachers with static weights w gives Σ_k w_k c_k/N, an unbiased estimate of their linear
mixture; other operators of empirical distributions are biased, so only the linear one is
offered.

From a plain store (draws from the whole distribution beside the exact top-k), the hybrid's
estimator is had without its harvest (``head_and_draws``): the exact top-h head, and the draws
that fell outside it, which given their number m ≥ 1 are m draws from the rest, scaled to the
rest's exact mass: unbiased wherever some draw fell outside the head (when none did, the rest
stays in the tail bucket).

The fused rows have the same fields as :func:`~.fuse.fuse` returns, so the target
store and the trainer are the same for sampled and top-k targets. Their tail is empty unless
more than ``k_out`` distinct ids were drawn (the rest is lumped into ``tail_mass``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtkd.distill.aggregate.diagnostics import disagreement, jensen_gap
from mtkd.distill.aggregate.operators import Stack
from mtkd.distill.aggregate.targets import check_same_rows, fused_rows, top_k
from mtkd.distill.aggregate.union import union_support
from mtkd.distill.aggregate.weights import validate_weights

#: Scratch per block, in float64 elements (K teachers × rows × union width).
BLOCK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class SampledRows:
    """One teacher's draws for N positions: ``ids [N,S]`` distinct per row (−1 padded) and
    ``counts [N,S]`` (0 on padding), each row's counts summing to ``num_samples``.

    The hybrid (``harvest --sample-rest``, or ``head_and_draws``) adds the exact head:
    ``head_ids [N,h]`` with ``head_probs``, the draws then count outside the head and carry its
    complement ``rest_mass [N]``: the estimate is head + rest_mass · counts / Σ counts (a
    row's counts sum to at most ``num_samples``; with none, the rest is left to the tail).
    """

    ids: np.ndarray
    counts: np.ndarray
    num_samples: int
    head_ids: np.ndarray | None = None
    head_probs: np.ndarray | None = None
    rest_mass: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.ids.shape != self.counts.shape:
            raise ValueError(f"sample ids {self.ids.shape} and counts {self.counts.shape} "
                             "must both be [N,S]")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        head = (self.head_ids, self.head_probs, self.rest_mass)
        if any(h is not None for h in head) and (
                any(h is None for h in head) or self.head_ids.shape != self.head_probs.shape
                or self.rest_mass.shape != (self.n,) or len(self.head_ids) != self.n):
            raise ValueError("a hybrid's head needs ids and probs [N,h] and the rest mass [N]")

    @property
    def n(self) -> int:
        return self.ids.shape[0]


def check_sampled(teachers: Sequence[SampledRows], vocab_size: int) -> None:
    """Refuse rows that are not N draws each: bad ids, negative counts, wrong totals."""
    check_same_rows(teachers, "sampled teacher")
    for j, t in enumerate(teachers):
        real = t.counts > 0
        if np.any(t.counts < 0) or np.any(real & ((t.ids < 0) | (t.ids >= vocab_size))):
            raise ValueError(f"sampled teacher {j}: ids outside [0, {vocab_size}) or "
                             "negative counts")
        totals = t.counts.sum(axis=1, dtype=np.int64)
        wrong = totals > t.num_samples if t.head_ids is not None else totals != t.num_samples
        if np.any(wrong):
            raise ValueError(f"sampled teacher {j}: a row's counts do not sum to "
                             f"num_samples={t.num_samples}")


def head_and_draws(topk_ids: np.ndarray, topk_logprobs: np.ndarray, sample_ids: np.ndarray,
                   sample_counts: np.ndarray, num_samples: int, head: int) -> SampledRows:
    """The hybrid's estimator from a plain store's rows: the exact top-``head`` of the top-k
    (descending) and the draws that fell outside it, with the rest's exact mass."""
    if not 1 <= head <= topk_ids.shape[1]:
        raise ValueError(f"the head must be in [1, {topk_ids.shape[1]}] (the stored k), "
                         f"got {head}")
    head_ids = topk_ids[:, :head]
    head_probs = np.exp(topk_logprobs[:, :head].astype(np.float64))
    in_head = (sample_ids[:, :, None] == head_ids[:, None, :]).any(axis=2)
    counts = np.where(in_head, 0, sample_counts)
    rest = np.clip(1.0 - head_probs.sum(axis=1), 0.0, 1.0)
    return SampledRows(sample_ids, counts, num_samples, head_ids, head_probs, rest)


def estimate(t: SampledRows, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """One teacher's estimate on ``rows``, sparse: ids (−1 where empty) and probabilities, the
    hybrid's head columns first. Plain draws give c/N; the hybrid its exact head + the rest's
    mass shared as the draws say, renormalised (the stored head is coded) where some draw fell
    outside it; a row without draws leaves the rest to the tail."""
    counts = t.counts[rows]
    ids = np.where(counts > 0, t.ids[rows], -1)
    if t.head_ids is None:
        return ids, counts / t.num_samples
    drawn = counts.sum(axis=1, keepdims=True)
    head_ids = t.head_ids[rows]
    ids = np.concatenate([head_ids, ids], axis=1)
    probs = np.concatenate([np.where(head_ids >= 0, t.head_probs[rows], 0.0),
                            counts / np.maximum(drawn, 1) * t.rest_mass[rows, None]], axis=1)
    total = probs.sum(axis=1, keepdims=True)
    probs /= np.where(drawn > 0, np.maximum(total, 1e-300), 1.0)
    return ids, probs


def fuse_samples(
    teachers: Sequence[SampledRows],
    weights: np.ndarray | Sequence[float],
    k_out: int,
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """The linear mixture of K teachers' empirical distributions, as sparse target rows.

    ``weights``: static ``[K]`` or per-row ``[N,K]``. Returns what :func:`~.fuse.fuse`
    does (``ids``, ``probs``, ``tail_mass``, ``weights``, ``jensen_gap``, ``disagreement``,
    ``n_eff``, ``tail_bucket``), with the diagnostics of the empirical distributions.

    Works on the union of the rows' drawn ids (at most Σ_k S_k columns, whatever the
    vocabulary): ids outside it have zero mass in every teacher, so the mixture, its top
    entries and the diagnostics are those of the dense rows.
    """
    check_sampled(teachers, vocab_size)
    if k_out < 1:
        raise ValueError(f"k_out must be >= 1, got {k_out}")
    n, n_teachers = teachers[0].n, len(teachers)
    w = np.broadcast_to(validate_weights(np.asarray(weights, float), n_teachers, n_rows=n),
                        (n, n_teachers))
    out = fused_rows(w, k_out)  # the tail bucket stays 0: the draws' support is all there is
    width = sum(t.ids.shape[1] + (0 if t.head_ids is None else t.head_ids.shape[1])
                for t in teachers)
    block = max(1, BLOCK_ELEMENTS // (n_teachers * width))
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        pieces = [estimate(t, rows) for t in teachers]
        # empty entries become one id past the vocabulary: a union column of zero mass
        ids = [np.where(i >= 0, i, vocab_size) for i, _ in pieces]
        union, _, cols = union_support(ids, vocab_size + 1)
        size = union.shape[1]
        dense = np.zeros((n_teachers, union.shape[0], size))
        flat_rows = np.arange(union.shape[0], dtype=np.intp)[:, None] * size
        at = 0
        for j, (i, p) in enumerate(pieces):
            flat = (flat_rows + cols[:, at:at + i.shape[1]]).ravel()
            np.add.at(dense[j].ravel(), flat, p.ravel())  # a hybrid's head may be drawn too
            at += i.shape[1]
        wb = np.ascontiguousarray(w[rows])
        q = np.einsum("nk,knc->nc", wb, dense)
        ids_out, probs_out = top_k(q, union, k_out)
        out["ids"][rows] = ids_out
        out["probs"][rows] = probs_out
        out["tail_mass"][rows] = np.maximum(1.0 - probs_out.sum(axis=1), 0.0)
        stack = Stack(dense)
        out["jensen_gap"][rows] = jensen_gap(stack, wb, q)
        out["disagreement"][rows] = disagreement(stack)
    return out
