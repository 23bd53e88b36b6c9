"""G-tests of drawn counts against exact probabilities, pooled over many rows."""

from __future__ import annotations

import numpy as np
import torch

MIN_EXPECTED = 5.0  # ids expected fewer times share one bin per row


def g_statistic(ids: np.ndarray, counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pooled G and degrees of freedom of rows of draws (unique ``ids`` ``[R, M]`` with
    ``counts``; padding id −1) against exact ``probs`` ``[R, V]``.

    Per row, the bins are the ids expected at least :data:`MIN_EXPECTED` times and one bin
    for all the others; G = 2 Σ O ln(O / E) over every row's bins, with Σ (bins − 1) dof.
    """
    g, dof = 0.0, 0
    for row_ids, row_counts, p in zip(ids, counts, probs, strict=True):
        n = int(row_counts.sum())
        observed = np.zeros(len(p))
        valid = row_ids >= 0
        observed[row_ids[valid]] = row_counts[valid]
        expected = n * p
        big = expected >= MIN_EXPECTED
        o = np.append(observed[big], observed[~big].sum())
        e = np.append(expected[big], expected[~big].sum())
        if e[-1] == 0:
            o, e = o[:-1], e[:-1]
        if len(e) < 2:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            g += 2 * float(np.where(o > 0, o * np.log(o / e), 0.0).sum())
        dof += len(e) - 1
    return g, dof


def g_test_p_value(g: float, dof: int) -> float:
    """P(χ²_dof ≥ g): the upper regularised incomplete gamma Q(dof/2, g/2)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(g / 2, dtype=torch.float64)))


def two_sample_g(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """G and dof of a 2 × bins contingency table: are two count vectors one distribution?
    Bins expected fewer than :data:`MIN_EXPECTED` times on either side are merged."""
    total = a + b
    keep = total * min(a.sum(), b.sum()) / total.sum() >= MIN_EXPECTED
    a = np.append(a[keep], a[~keep].sum())
    b = np.append(b[keep], b[~keep].sum())
    if a[-1] + b[-1] == 0:
        a, b = a[:-1], b[:-1]
    table = np.stack([a, b]).astype(np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        g = 2 * float(np.where(table > 0, table * np.log(table / expected), 0.0).sum())
    return g, table.shape[1] - 1
