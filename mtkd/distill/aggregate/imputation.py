"""Imputation: a teacher's mass on a union id outside its own top-k (shared by both backends).

For an id in another teacher's top-k but not in teacher B's, B's probability is unknown but at
most B's k-th (tempered) probability. By default we give it B's per-id share of its tempered
tail, v = min(t_B/(V − k_B), p_B,(k)) — the even spread over B's V − k_B unseen ids, capped at
its k-th prob — and take it out of B's tail: t_B ← t_B − m·v for the m union ids B lacks. Since
m ≤ V − k_B, the tail stays ≥ 0 and B's mass over union ∪ tail still sums to 1. The even share
is conservative (an id another teacher ranks highly is likely among B's next ranks, so its true
prob is often nearer the cap); ``imputation="rank"`` gives it the mean of B's next m ranks
under a Zipf fit instead (measured closer to the truth; not continuous in the union).
Geometric pooling is the operator most sensitive to the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtkd.distill.aggregate.operators import xlogx
from mtkd.distill.aggregate.tails import Zipf, as_float64, expm1_ratio
from mtkd.distill.aggregate.tempering import TemperedRows

IMPUTATIONS = ("even", "rank")


@dataclass(frozen=True)
class Imputed:
    """One teacher's imputation on a block: per row ``v`` (mass of each union id it lacks) and
    ``tail`` (its tail after giving that away), with their logs; all ``[N]`` float64."""

    v: np.ndarray
    log_v: np.ndarray
    tail: np.ndarray
    log_tail: np.ndarray

    def plogp(self, t: TemperedRows, counts: np.ndarray) -> np.ndarray:
        """Σ p log p of the teacher on union + tail (its own k, the imputed ids, the tail)."""
        missing = counts - t.ids.shape[1]
        return (
            t.plogp_topk() + missing * xlogx(self.v, self.log_v) + xlogx(self.tail, self.log_tail)
        )


def tempered_rank_exponent(logprobs: np.ndarray, temperature: float) -> np.ndarray:
    """s = b/T: the tempered tail's power-law exponent from the Zipf fit of the T=1 top-k."""
    return Zipf().exponent(as_float64(logprobs)) / temperature


def log_rank_share(s: np.ndarray, k: np.ndarray | int, missing: np.ndarray, vocab_size: int
                   ) -> np.ndarray:
    """log of the share of a power-law tail ρ^{−s} over ranks k+1..V held by its first
    ``missing`` ranks k+1..k+m, both sums taken as the midpoint integrals ∫ x^{−s} dx over
    [k+½, k+m+½] and [k+½, V+½] (so the share is ≤ 1; accurate to ~s²/(24k²) for k ≥ 16).

    ∫_lo^hi x^{−s} dx = lo^{1−s}·Δ·φ((1−s)Δ), Δ = log(hi/lo), φ = :func:`~.tails.expm1_ratio`.
    """
    s = np.asarray(s, dtype=np.float64)
    lo = np.asarray(k, dtype=np.float64) + 0.5
    d_m = np.log1p(np.maximum(missing, 0) / lo)
    d_v = np.log((vocab_size + 0.5) / lo)

    def log_int(delta: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(delta) + np.log(expm1_ratio((1.0 - s) * delta))

    return np.minimum(log_int(d_m) - log_int(d_v), 0.0)


def impute_logs(
    log_t: np.ndarray,
    log_pmin: np.ndarray,
    missing: np.ndarray,
    k: np.ndarray | int,
    vocab_size: int,
    rank_exponent: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(log v, log t') for teachers with tempered tail log-mass ``log_t``, k-th tempered
    log-prob ``log_pmin`` and ``missing`` union ids outside their top-``k`` (any broadcastable
    shapes, e.g. ``[N]`` or ``[N,K]``).

    Even share (``rank_exponent`` None): v = min(t/(V − k), p_(k)). Rank-based: the missing ids
    take the teacher's next ranks k+1..k+m of a power-law tail ρ^{−s} (s = b/T from the Zipf fit
    of its top-k), each the mean of those ranks' share of t, capped at p_(k):
    v = min(t·share_m/m, p_(k)). Either way m·v ≤ t, and t' = t − m·v ≥ 0, computed as
    log t + log1p(−min(m·v/t, 1)). Where the union holds all V − k ids the teacher lacks,
    v = t/(V − k) and t' = 0 exactly (the tail category is empty).
    """
    n_free = vocab_size - np.asarray(k)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_free = np.log(np.maximum(n_free, 1))
        if rank_exponent is None:
            log_v = np.minimum(log_t - log_free, log_pmin)
        else:
            m = np.maximum(missing, 1)
            share = log_rank_share(rank_exponent, k, m, vocab_size)
            log_v = np.minimum(log_t + share - np.log(m), log_pmin)
        log_v = np.where(n_free > 0, log_v, -np.inf)
        # the union holds every id the teacher lacks: its tail has nowhere else to go, so
        # they share it exactly (no cap, no rounding residue left in an empty tail category)
        full = (np.asarray(missing) >= n_free) & (n_free > 0)
        log_v = np.where(full, log_t - log_free, log_v)
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = np.where(np.isfinite(log_t), missing * np.exp(log_v - log_t), 0.0)
    with np.errstate(divide="ignore"):
        return log_v, np.where(full, -np.inf, log_t + np.log1p(-np.minimum(ratio, 1.0)))


def impute(
    t: TemperedRows, counts: np.ndarray, vocab_size: int, rank_exponent: np.ndarray | None = None
) -> Imputed:
    """Imputation of the ids a teacher lacks on a union of ``counts [N]`` ids per row
    (see :func:`impute_logs`; ``rank_exponent [N]`` selects the rank-based variant)."""
    k = t.ids.shape[1]
    if k == 0:
        log_v, log_tail = np.full(counts.shape, -np.inf), t.tail_logmass
    else:
        log_v, log_tail = impute_logs(t.tail_logmass, t.logprobs.min(axis=1), counts - k, k,
                                      vocab_size, rank_exponent)
    return Imputed(np.exp(log_v), log_v, np.exp(log_tail), log_tail)
