"""q64r's actual-token log-prob and tail mass, coded against the decoded top-k row.

Why: stored exactly (float32, zstd) ``target_logprob`` and ``tail_logmass`` cost 7.3 of q64r's
96.2 bytes per position on SmolLM2 at k = 64. Yet a reader of a q64r row already holds most of
what they say: the actual token is nearly always one of the top-k (94 % of SmolLM2's rows),
with that entry's log-prob, and the tail is close to 1 − Σ top-k p. So a store with
``attrs.scalar_coding = "q64r"`` (schema version 7) keeps, per row:

* ``target_level`` (int32): the actual token's level (its q64 code on the store's tail grid,
  ``q64_grid.tail_levels``) minus the level of the top-k entry at its rank (rank clipped to
  [1, k]: the last entry for a token beyond the top-k). It is 0 whenever the actual token is
  that entry. It reads back as that level's log-prob: the top-k's own bound (1/128 nat where
  p ≥ 1e-3, half a tail step below).
* ``tail_residual`` (int32): the tail's distance from the one the decoded top-k predict,
  log(1 − Σ p̂) with Σ p̂ capped below 1, on q64's fine grid (1/64 nat), rounded;
  ``NEG_INF_TAIL`` for a tail of −inf. It reads back within 1/128 nat, and never above 0.

``target_rank`` stays as it is: the reader needs it to find the entry. Pure functions of the
columns and the top-k rows' levels on the store's grid (``tail_step``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mtkd.store.errors import DamagedRowsError
from mtkd.store.q64_grid import (
    FINE,
    FINE_ERROR,
    level_logprobs,
    neg_inf_level,
    quantise,
    tail_levels,
)

TARGET_LOGPROB, TARGET_RANK, TAIL_LOGMASS = "target_logprob", "target_rank", "tail_logmass"
TARGET_LEVEL, TAIL_RESIDUAL = "target_level", "tail_residual"
#: Header attribute: q64r codes the actual token's log-prob and the tail against the top-k
SCALAR_CODING_ATTR = "scalar_coding"
NEG_INF_TAIL = int(np.iinfo(np.int32).min)  #: ``tail_residual`` of a tail of −inf
MAX_TAIL_GAP = 1 << 20  #: nats between a tail and its prediction that the coding accepts
MAX_TOPK_MASS = 1.0 - 2.0 ** -20  #: Σ p̂ above this (the grid's rounding) predicts log 2^-20


def predicted_tail(top_logprobs: np.ndarray) -> np.ndarray:
    """log(1 − Σ p̂) of each row of decoded top-k log-probs (float64; order-free: summed
    sorted, so a reader's rows in another tie order predict the very same value)."""
    p = np.exp(np.sort(np.asarray(top_logprobs, dtype=np.float64), axis=1))
    return np.log1p(-np.minimum(p.sum(axis=1), MAX_TOPK_MASS))


def _entry_levels(top_levels: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Each row's level at its actual token's rank, clipped to [1, k] (levels sorted)."""
    levels = np.sort(np.asarray(top_levels, dtype=np.int64), axis=1)
    if levels.shape[1] == 0:
        raise ValueError("scalars are coded against the top-k: k must be at least 1")
    at = np.clip(np.asarray(ranks, dtype=np.int64), 1, levels.shape[1]) - 1
    return levels[np.arange(len(levels)), at]


def encode(rows: Mapping[str, np.ndarray], top_levels: np.ndarray, tail_step: int
           ) -> dict[str, np.ndarray]:
    """The stored columns of ``rows``' actual-token log-probs, ranks and tails, whose top-k
    rows have ``top_levels`` on a ``tail_step`` grid; ValueError for columns not of one value
    per row (nothing else checks them: they are not stored as given), a log-prob q64 refuses,
    or a tail that is NaN, above 0 by more than the grid's rounding, or too far from its
    prediction."""
    n = len(top_levels)
    for name in (TARGET_LOGPROB, TARGET_RANK, TAIL_LOGMASS):
        if np.shape(rows[name]) != (n,):
            raise ValueError(f"{name}: shape {np.shape(rows[name])}, expected ({n},)")
    tail = np.asarray(rows[TAIL_LOGMASS], dtype=np.float64)
    gap = tail - predicted_tail(level_logprobs(top_levels, tail_step))
    finite = ~np.isneginf(tail)
    if np.isnan(tail).any() or (tail > FINE_ERROR).any() \
            or (np.abs(gap[finite]) > MAX_TAIL_GAP).any():
        raise ValueError(f"{TAIL_LOGMASS} must be −inf or a log-mass at most 1/128, not NaN "
                         f"nor {MAX_TAIL_GAP} nats from 1 − Σ top-k p")
    residual = np.full(n, NEG_INF_TAIL, dtype=np.int32)
    residual[finite] = np.rint(gap[finite] * FINE)
    target = tail_levels(quantise(rows[TARGET_LOGPROB], tail_step), tail_step)
    levels = target - _entry_levels(top_levels, rows[TARGET_RANK])
    return {TARGET_LEVEL: levels.astype(np.int32), TAIL_RESIDUAL: residual}


def decode(arrays: Mapping[str, np.ndarray], ranks: np.ndarray, top_levels: np.ndarray,
           top_logprobs: np.ndarray, tail_step: int) -> dict[str, np.ndarray]:
    """``target_logprob`` and ``tail_logmass`` (float32) of the stored columns, given the
    decoded top-k rows' levels and log-probs; ValueError for a level off the grid (damaged)."""
    levels = _entry_levels(top_levels, ranks) + arrays[TARGET_LEVEL].astype(np.int64)
    if len(levels) and (levels.min() < 0 or levels.max() > neg_inf_level(tail_step)):
        rows = np.flatnonzero((levels < 0) | (levels > neg_inf_level(tail_step)))
        raise DamagedRowsError(f"{TARGET_LEVEL}: levels outside the grid (damaged)",
                               (int(rows[0]), int(rows[-1]) + 1))
    residual = arrays[TAIL_RESIDUAL]
    tail = np.minimum(predicted_tail(top_logprobs) + residual / FINE, 0.0)  # a mass ≤ 1
    tail[residual == NEG_INF_TAIL] = -np.inf
    return {TARGET_LOGPROB: level_logprobs(levels, tail_step),
            TAIL_LOGMASS: tail.astype(np.float32)}
