"""Per-row diagnostics of an aggregation: Jensen gap, teacher disagreement, effective teachers.

All are computed over the same categories the operator saw (union ids + tail bucket), so they
depend on the tail model through the imputed masses. Conventions: 0·log 0 = 0; where q has 0 on
a category some teacher gives mass (geometric pooling, or a tail model that drops the tail), the
KL charges log q = :data:`ZERO_Q_LOG` there instead of −∞, so that a store keeps a finite,
comparable value (an infinite KL is refused by the store writer and would swamp every mean).
"""

from __future__ import annotations

import numpy as np

from mtkd.distill.aggregate.operators import Stack, xlogx

#: log q charged on a category the fusion gives 0 and some teacher does not: 30 nats per unit
#: of that teacher's mass (as if q were e^−30 ≈ 1e−13 there)
ZERO_Q_LOG = -30.0


def entropy(probs: np.ndarray, logprobs: np.ndarray, axis: int = -1) -> np.ndarray:
    """H(p) = −Σ p log p along ``axis`` (nats)."""
    return -xlogx(probs, logprobs).sum(axis=axis)


def kl(probs: np.ndarray, logprobs: np.ndarray, log_q: np.ndarray, axis: int = -1) -> np.ndarray:
    """KL(p‖q) = Σ p (log p − log q) along ``axis``; terms with p = 0 are 0."""
    with np.errstate(invalid="ignore"):
        return np.where(probs > 0, probs * (logprobs - log_q), 0.0).sum(axis=axis)


def jensen_gap(stack: Stack, weights: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Σ_k w_k KL(p_k‖q) per row [N].

    For linear q this is the generalised Jensen–Shannon divergence (information radius)
    H(q) − Σ w_k H(p_k), and exactly L_multi − L_mix for forward KL to any student. For other
    operators it is the weighted divergence of the teachers from the target they were fused into
    (with :data:`ZERO_Q_LOG` where q is 0 under a teacher's mass). Computed as KL(p_k‖q) =
    Σ p_k log p_k − Σ p_k log q (a row-wise dot, no [N,C] temporaries).
    """
    zero_q = q <= 0
    if zero_q.any():
        log_q = np.log(np.where(zero_q, 1.0, q))
        log_q[zero_q] = ZERO_Q_LOG
    else:
        log_q = np.log(q)
    gap = np.zeros(q.shape[0])
    for k in range(stack.n_teachers):
        div = stack.plogp[k] - np.einsum("nc,nc->n", stack.probs[k], log_q)
        wk = weights[:, k]
        used = wk > 0
        gap[used] += wk[used] * div[used]
    return gap


def disagreement(stack: Stack) -> np.ndarray:
    """Mean pairwise total variation ½Σ|p_a − p_b| = 1 − Σ min(p_a, p_b) over teacher pairs
    a < b, per row [N].

    In [0, 1]; 0 for a single teacher. Unweighted: it describes the teachers, not the weights.
    """
    n_teachers, n = stack.probs.shape[:2]
    if n_teachers < 2:
        return np.zeros(n)
    overlap = np.zeros(n)
    low = np.empty(stack.probs.shape[1:])
    for a in range(n_teachers):
        for b in range(a + 1, n_teachers):
            np.minimum(stack.probs[a], stack.probs[b], out=low)
            overlap += low.sum(axis=-1)
    n_pairs = n_teachers * (n_teachers - 1) / 2
    return np.maximum(1.0 - overlap / n_pairs, 0.0)


def effective_teachers(weights: np.ndarray) -> np.ndarray:
    """n_eff = 1/Σ_k w_k² per row (K for uniform weights, 1 for a single teacher); the variance
    of the aggregate under independent teacher noise scales with Σ w_k² = 1/n_eff."""
    return 1.0 / np.square(weights).sum(axis=-1)
