"""The fused target's rows, shared by both fusions (``fuse`` of top-k teachers and
``fuse_samples`` of sampled ones): the check of their inputs' rows, the arrays they fill, the
top-k cut of q, and the label entry added to either's output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtkd.distill.aggregate.diagnostics import effective_teachers


def check_same_rows(teachers: Sequence[Any], kind: str) -> None:
    """Refuse an empty list, or teachers (anything with ``.n`` rows) of unequal row counts."""
    if not teachers:
        raise ValueError(f"need at least one {kind}")
    n = teachers[0].n
    for j, t in enumerate(teachers):
        if t.n != n:
            raise ValueError(f"{kind} {j} has {t.n} rows, {kind} 0 has {n}")


def fused_rows(weights: np.ndarray, k_out: int) -> dict[str, np.ndarray]:
    """The fused target's arrays for ``weights [N,K]`` rows, to be filled (the weights and
    ``n_eff`` are set; ``tail_bucket`` starts at 0)."""
    n = weights.shape[0]
    return {
        "ids": np.empty((n, k_out), np.int32),
        "probs": np.empty((n, k_out), np.float32),
        "tail_mass": np.empty(n, np.float32),
        "weights": weights.astype(np.float32),
        "jensen_gap": np.empty(n, np.float32),
        "disagreement": np.empty(n, np.float32),
        "n_eff": effective_teachers(weights).astype(np.float32),
        "tail_bucket": np.zeros(n, np.float32),
    }


def top_k(q: np.ndarray, ids: np.ndarray, k_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k_out`` largest entries of ``q [N,U]`` with their ``ids``, in descending float32
    order (ties: smaller column first); padded with id −1 / prob 0, and ids of zero mass → −1.

    One sort of packed (float32 bits, column) int64 keys — far faster than argpartition."""
    n, size = q.shape
    out_ids = np.full((n, k_out), -1, dtype=np.int32)
    out_probs = np.zeros((n, k_out), dtype=np.float64)
    m = min(k_out, size)
    if m == 0 or n == 0:
        return out_ids, out_probs
    shift = max(1, (size - 1).bit_length())
    bits = (q.astype(np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    keys = (bits << shift) | (size - 1 - np.arange(size, dtype=np.int64))
    keys.sort(axis=1)
    cols = size - 1 - (keys[:, : -m - 1 : -1] & ((1 << shift) - 1))
    cols += np.arange(n, dtype=np.int64)[:, None] * size  # flat indices into q and ids
    out_probs[:, :m] = q.ravel()[cols]
    out_ids[:, :m] = np.where(out_probs[:, :m] > 0, ids.ravel()[cols], -1)
    return out_ids, out_probs


def add_label_entry(
    ids: np.ndarray, probs: np.ndarray, tail_mass: np.ndarray, labels: np.ndarray,
    label_probs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the actual next token out of the tail: one more column per row.

    Where the label is not in a row's support, column ``k`` holds it with its exact target
    probability (e.g. Σ_k w_k p_k(y) for a linear mixture at T = 1: every teacher store holds
    p_k(y)), taken out of the tail bucket; elsewhere it is padding (id −1, prob 0). The target
    is still the same distribution, on a finer partition: forward KL to it is closer to the
    full-vocabulary KL, at the cost of one stored entry, on exactly the token held-out
    cross-entropy scores. ``label_probs`` above the tail (imputation rounding) are capped.
    """
    n, k = ids.shape
    outside = ~(ids == labels[:, None]).any(axis=1) & (label_probs > 0)
    share = np.where(outside, np.minimum(label_probs, tail_mass), 0.0)
    out_ids = np.full((n, k + 1), -1, dtype=ids.dtype)
    out_ids[:, :k] = ids
    out_ids[outside, k] = labels[outside]
    out_probs = np.zeros((n, k + 1), dtype=probs.dtype)
    out_probs[:, :k] = probs
    out_probs[:, k] = share
    return out_ids, out_probs, np.maximum(tail_mass - share, 0.0).astype(tail_mass.dtype)
