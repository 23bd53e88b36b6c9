"""q64's grid: the uint16 codes every top-k coding puts log-probs on (``topk_codec``).

Codes of −log p in steps of 1/64 nat down to −443/64 ≈ −6.92 (every entry with p ≥ 1e-3), then
1/16 nat (``COARSE`` = 4 fine steps) down to ``MIN_LOGPROB`` ≈ −4075; the code ``NEG_INF`` is
−inf. q64r may put the tail on a coarser grid of ``tail_step`` coarse steps, and codes *levels*:
the codes such a grid can hold, numbered consecutively (:func:`tail_levels`).
"""

from __future__ import annotations

import functools

import numpy as np

FINE = 64  #: fine grid steps per nat
FINE_MAX = 443  #: last fine code: ceil(64 · ln 1000), so every p ≥ 1e-3 is on the fine grid
COARSE = 4  #: fine steps per coarse step (1/16 nat)
NEG_INF = 0xFFFF  #: the code of −inf
MAX_CODE = NEG_INF - 1  #: the most negative finite code
MIN_LOGPROB = -(FINE_MAX + (MAX_CODE - FINE_MAX) * COARSE) / FINE  #: ≈ −4075.1
FINE_ERROR = 0.5 / FINE  #: bound on |error| for log p ≥ −FINE_MAX/64 (covers p ≥ 1e-3)
COARSE_ERROR = 0.5 * COARSE / FINE  #: bound on |error| for MIN_LOGPROB ≤ log p < −FINE_MAX/64
CODE_WIDTH = 2  #: bytes per log-prob code


def quantise(logprobs: np.ndarray, tail_step: int = 1) -> np.ndarray:
    """uint16 codes of natural log-probs (any float dtype, ≤ 1/128, no NaN; −inf allowed);
    ``tail_step``: the tail's grid in coarse steps (q64r; codes stay q64 codes)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if np.isnan(lp).any() or (lp > FINE_ERROR).any():
        raise ValueError("log-probs must not be NaN or above 1/128")
    with np.errstate(over="ignore"):
        units = -lp * FINE  # −log p in fine steps; +inf for −inf (and beyond −1e306)
    fine = np.rint(units)
    coarse = FINE_MAX + np.rint((units - FINE_MAX) / (COARSE * tail_step)) * tail_step
    last = FINE_MAX + (MAX_CODE - FINE_MAX) // tail_step * tail_step  # tail_floor's code
    codes = np.where(fine <= FINE_MAX, np.maximum(fine, 0), np.minimum(coarse, last))
    codes[np.isneginf(lp)] = NEG_INF
    return codes.astype(np.uint16)


def tail_floor(tail_step: int) -> float:
    """The most negative finite log-prob a ``tail_step`` grid decodes to (``MIN_LOGPROB`` at
    1; lower ones decode as it): its bound of step/32 nat holds down to there."""
    return float(dequantise(FINE_MAX + (MAX_CODE - FINE_MAX) // tail_step * tail_step))


def neg_inf_level(tail_step: int) -> int:
    """The level of −inf on a ``tail_step`` grid: the last, one past its finite ones."""
    return FINE_MAX + (MAX_CODE - FINE_MAX) // tail_step + 1


def tail_levels(codes: np.ndarray, tail_step: int) -> np.ndarray:
    """q64 codes on a ``tail_step`` tail grid → consecutive levels (int64, same order; −inf
    the last): what q64r codes, so a coarse tail costs no bits for its unused codes."""
    codes = np.asarray(codes, dtype=np.int64)
    tail = FINE_MAX + (codes - FINE_MAX) // tail_step
    return np.where(codes <= FINE_MAX, codes,
                    np.where(codes == NEG_INF, neg_inf_level(tail_step), tail))


def level_codes(levels: np.ndarray, tail_step: int) -> np.ndarray:
    """Inverse of :func:`tail_levels`."""
    levels = np.asarray(levels, dtype=np.int64)
    top = neg_inf_level(tail_step)
    codes = FINE_MAX + (levels - FINE_MAX) * tail_step
    return np.where(levels <= FINE_MAX, levels, np.where(levels >= top, NEG_INF, codes))


def _decode_table() -> np.ndarray:
    """float32 value of every code: exact multiples of 1/64 (units < 2^24), −inf last."""
    c = np.arange(NEG_INF + 1, dtype=np.int64)
    units = np.where(c <= FINE_MAX, c, FINE_MAX + (c - FINE_MAX) * COARSE)
    table = np.float32(0) - units.astype(np.float32) / np.float32(FINE)
    table[NEG_INF] = -np.inf
    table.flags.writeable = False
    return table


_TABLE = _decode_table()


def dequantise(codes: np.ndarray) -> np.ndarray:
    """float32 log-probs of uint16 codes (exact multiples of 1/64, or −inf)."""
    return _TABLE[np.asarray(codes)]


@functools.cache
def _level_table(tail_step: int) -> np.ndarray:
    table = dequantise(level_codes(np.arange(neg_inf_level(tail_step) + 1), tail_step))
    table.flags.writeable = False
    return table


def level_logprobs(levels: np.ndarray, tail_step: int) -> np.ndarray:
    """float32 log-probs of levels on a ``tail_step`` grid: ``dequantise(level_codes(…))`` in
    one gather (a q64r read spends a fifth of its time on the two otherwise); levels past
    the last (−inf) read as it."""
    table = _level_table(tail_step)
    return table[np.clip(levels, 0, len(table) - 1)]
