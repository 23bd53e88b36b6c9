"""K tempered teachers on the union of their top-k supports: the dense stack the numpy backend
(and any operator) works on — union columns, then one tail bucket."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtkd.distill.aggregate.imputation import impute
from mtkd.distill.aggregate.operators import Stack
from mtkd.distill.aggregate.tempering import TemperedRows


@dataclass(frozen=True)
class UnionBlock:
    """K teachers on the union of their supports: ``ids [N,U]`` (ascending per row, padded with
    −1), ``counts [N]`` real union ids per row, and ``stack`` over U+1 categories (the union
    columns, then the tail bucket; padding columns hold 0)."""

    ids: np.ndarray
    counts: np.ndarray
    stack: Stack


def union_support(
    ids: Sequence[np.ndarray], vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-row union of several ``[N,k_j]`` id arrays (ids in [0, V), distinct per teacher).

    Returns the union ``[N,U]`` (ascending, −1 padded), its size per row ``[N]``, and the union
    column of each input id ``[N, Σk_j]`` (inputs side by side). Vectorised: pack (id, input
    column) into one integer key, sort each row once, mark where the id changes, and
    cumulative-sum the marks.
    """
    width = sum(a.shape[1] for a in ids)
    n = ids[0].shape[0]
    shift = max(1, (width - 1).bit_length())
    dtype = np.int32 if (vocab_size << shift) < 2**31 else np.int64
    keys = np.empty((n, width), dtype=dtype)
    start = 0
    for a in ids:
        keys[:, start : start + a.shape[1]] = a
        start += a.shape[1]
    keys <<= shift
    keys |= np.arange(width, dtype=dtype)
    keys.sort(axis=1)
    sorted_ids = keys >> shift
    source_col = keys & ((1 << shift) - 1)
    is_new = np.empty(keys.shape, dtype=bool)
    is_new[:, :1] = True
    np.not_equal(sorted_ids[:, 1:], sorted_ids[:, :-1], out=is_new[:, 1:])
    pos = np.cumsum(is_new, axis=1, dtype=np.int32)
    pos -= 1
    counts = pos[:, -1] + 1 if width else np.zeros(n, np.int32)
    size = int(counts.max()) if n else 0
    rows = np.arange(n, dtype=np.intp)[:, None]
    union = np.full((n, size), -1, dtype=np.int32)
    # Scatter every element (duplicates write the same id to the same place); flat 1-D
    # indices are numpy's fast path.
    union.ravel()[(rows * size + pos).ravel()] = sorted_ids.ravel()
    col_of = np.empty((n, width), dtype=np.int32)
    col_of.ravel()[(rows * width + source_col).ravel()] = pos.ravel()
    return union, counts, col_of


def to_union(
    tempered: Sequence[TemperedRows],
    vocab_size: int,
    *,
    with_logs: bool = False,
    rank_exponents: Sequence[np.ndarray] | None = None,
) -> UnionBlock:
    """Put tempered teachers on their union support, imputing missing ids from each teacher's
    tail (see ``imputation``); every teacher's row still sums to 1 over union + tail.

    Built sparsely: fill each row with the imputed value, scatter the teacher's own k probs.
    Σ p log p comes from the k + 2 distinct values. ``with_logs`` also fills the log stack from
    the tempered log-probs (exact, no log of the probs); otherwise operators that need it take
    the log of the probs. ``rank_exponents`` (one ``[N]`` per teacher: b/T of its Zipf fit)
    selects rank-based imputation instead of the even share.
    """
    union, counts, cols = union_support([t.ids for t in tempered], vocab_size)
    n, size = union.shape
    pad = np.arange(size) >= counts[:, None]
    probs = np.empty((len(tempered), n, size + 1))
    logs = np.empty_like(probs) if with_logs else None
    plogp = np.empty((len(tempered), n))
    row_base = np.arange(n, dtype=np.intp)[:, None] * (size + 1)
    start = 0
    for j, t in enumerate(tempered):
        exps = None if rank_exponents is None else rank_exponents[j]
        imp = impute(t, counts, vocab_size, exps)
        stop = start + t.ids.shape[1]
        flat = (row_base + cols[:, start:stop]).ravel()
        for out, fill, tail, own, empty in (
            (probs[j], imp.v, imp.tail, t.probs, 0.0),
            *(((logs[j], imp.log_v, imp.log_tail, t.logprobs, -np.inf),) if with_logs else ()),
        ):
            out[:, :size] = fill[:, None]
            np.copyto(out[:, :size], empty, where=pad)
            out[:, size] = tail
            out.ravel()[flat] = own.ravel()
        start = stop
        plogp[j] = imp.plogp(t, counts)
    return UnionBlock(union, counts, Stack(probs, logs, plogp))
