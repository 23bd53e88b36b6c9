"""Top-k ids coded against a reference row (coding ``q64v3``; numba).

Why: a top-k row shares few ids with the previous row (12 of 64 on SmolLM2), but about half with
the latest earlier row of its sequence that has the **same top-1 id** (32 of 64): rows that
predict the same token have similar candidate sets (``bench/topk_entropy.py``). On a real
49k-vocabulary teacher this takes the top-k columns from q64v2's 135.7 to 124.1 bytes per
position with zstd (``bench/store_size.py``), decoded values unchanged.

Per row (log-prob codes on q64's grid, ``topk_codec``; rank order = entries sorted by (code,
id), ties in ascending id order):

* ``topk_ids`` ``[k + 1]`` values: the row's top-1 id + 1 (0 for a row of padding), then the
  gaps between the row's *new* ids (those its reference lacks) in ascending order, ``id_0 + 1,
  id_1 − id_0, …`` (padding −1 is gap 0 and comes first), zero-filled;
* ``topk_recur`` ``[⌈k / 8⌉]`` packed bits (little bit order): bit r says that the reference's
  rank-r id is in this row (a reference is the latest earlier row of the same sequence whose
  top-1 id is this row's; no reference: all bits 0);
* ``topk_logprobs`` ``[k + 1]``: the row's floor F (its largest code), then F − code for the
  recurring ids (in the reference's rank order), then for the new ids (ascending).

The number of new ids is k minus the recurring ones, so no terminator is stored. A reference
is always inside its sequence: every read returns whole sequences, so each decodes alone (rows
in order: a row's reference is decoded before it).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

try:
    from numba import prange
    from numba.extending import register_jitable
except ImportError:  # without numba the kernels run as plain Python
    prange = range

    def register_jitable(fn):  # type: ignore[no-untyped-def]
        return fn


_KERNELS: SimpleNamespace | None = None


def recur_bytes(k: int) -> int:
    """Bytes per row of the packed recurrence bits."""
    return -(-k // 8)


def references(top1: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each row's reference: the latest earlier row of its sequence (``lengths`` rows each, in
    order) with the same top-1 id ≥ 0; −1 where there is none."""
    n = len(top1)
    rows = np.arange(n)
    seq = np.repeat(np.arange(len(lengths)), lengths)
    order = np.lexsort((rows, top1, seq))
    same = ((seq[order[1:]] == seq[order[:-1]]) & (top1[order[1:]] == top1[order[:-1]])
            & (top1[order[1:]] >= 0))
    ref = np.full(n, -1, dtype=np.int64)
    ref[order[1:][same]] = order[:-1][same]
    return ref


@register_jitable
def sort_row(keys):
    """Sort one row's keys in place: insertion sort for a usual k (the recurring ids come
    nearly in rank order, so it beats quicksort there), numba's sort for a long row."""
    k = len(keys)
    if k > 128:
        keys.sort()
        return
    for s in range(1, k):
        key = keys[s]
        t = s
        while t > 0 and keys[t - 1] > key:
            keys[t] = keys[t - 1]
            t -= 1
        keys[t] = key


def _encode_kernel(sorted_ids, sorted_codes, rank_ids, ref, stored_ids, recur, stored_codes):
    """Fill each row's stored ids (top-1 + 1, new-id gaps), recurrence bits and codes (stored
    order) from its entries in id order and in rank order."""
    n, k = sorted_ids.shape
    taken = np.zeros(k, dtype=np.bool_)
    for i in range(n):
        taken[:] = False
        stored_ids[i, 0] = rank_ids[i, 0] + 1
        m = 0
        j = ref[i]
        if j >= 0:
            for r in range(k):
                rid = rank_ids[j, r]
                if rid < 0:
                    continue
                lo, hi = 0, k  # binary search of rid in the row's ascending ids
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if sorted_ids[i, mid] < rid:
                        lo = mid + 1
                    else:
                        hi = mid
                at = lo
                if at < k and sorted_ids[i, at] == rid:
                    recur[i, r] = True
                    taken[at] = True
                    stored_codes[i, m] = sorted_codes[i, at]
                    m += 1
        prev = -1
        slot = 1
        for at in range(k):
            if not taken[at]:
                stored_ids[i, slot] = sorted_ids[i, at] - prev
                prev = sorted_ids[i, at]
                stored_codes[i, m + slot - 1] = sorted_codes[i, at]
                slot += 1


def _decode_kernel(stored_ids, recur, codes, ref, rank_ids, rank_codes, offsets):
    """Rebuild each row's ids in stored order from its reference's decoded rank order and its
    new-id gaps, then sort the row on (code, id + 1) into rank order; the sequences (row
    ``offsets``) in parallel: a row's reference is an earlier row of its own sequence."""
    k = codes.shape[1]
    for q in prange(len(offsets) - 1):
        keys = np.empty(k, dtype=np.int64)
        for i in range(offsets[q], offsets[q + 1]):
            _decode_row(i, stored_ids, recur, codes, ref, rank_ids, rank_codes, keys)


@register_jitable
def _decode_row(i, stored_ids, recur, codes, ref, rank_ids, rank_codes, keys):
    """Row ``i`` of :func:`_decode_kernel` (``keys``: a scratch row)."""
    k = codes.shape[1]
    m = 0
    j = ref[i]
    if j >= 0:
        for r in range(k):
            if recur[i, r]:
                keys[m] = rank_ids[j, r]
                m += 1
    prev = -1
    for s in range(k - m):
        prev += stored_ids[i, 1 + s]
        keys[m + s] = prev
    for s in range(k):
        keys[s] = codes[i, s] << 32 | (keys[s] + 1)
    sort_row(keys)
    for s in range(k):
        rank_ids[i, s] = (keys[s] & 0xFFFFFFFF) - 1
        rank_codes[i, s] = keys[s] >> 32


def _compiled() -> SimpleNamespace:
    global _KERNELS
    if _KERNELS is None:
        import numba

        jit = numba.njit(cache=True, nogil=True)
        _KERNELS = SimpleNamespace(encode=jit(_encode_kernel),
                                   decode=numba.njit(cache=True, nogil=True,
                                                     parallel=True)(_decode_kernel))
    return _KERNELS


def encode(ids: np.ndarray, codes: np.ndarray, lengths: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``ids [n, k]`` (−1 padding) and their q64 ``codes`` in sequences of ``lengths``
    rows → stored ids ``[n, k + 1]``, packed recurrence bits ``[n, ⌈k/8⌉]`` and codes in stored
    order ``[n, k]`` (int64; the caller takes the floor and writes byte planes). ValueError if
    a row repeats an id other than padding."""
    n, k = ids.shape
    shifted = ids.astype(np.int64) + 1
    codes = codes.astype(np.int64)
    by_id = np.sort(shifted << 16 | codes, axis=1)
    sorted_ids = (by_id >> 16) - 1
    if ((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any():
        raise ValueError("top-k ids must be distinct in each row (padding -1 apart)")
    by_rank = np.sort(codes << 32 | shifted, axis=1)
    rank_ids = (by_rank & 0xFFFFFFFF) - 1
    ref = references(rank_ids[:, 0] if k else np.full(n, -1), np.asarray(lengths))
    stored_ids = np.zeros((n, k + 1), dtype=np.int64)
    recur = np.zeros((n, k), dtype=np.bool_)
    stored_codes = np.empty((n, k), dtype=np.int64)
    if n and k:
        _compiled().encode(sorted_ids, by_id & 0xFFFF, rank_ids, ref, stored_ids, recur,
                           stored_codes)
    return stored_ids, np.packbits(recur, axis=1, bitorder="little"), stored_codes


def decode(stored_ids: np.ndarray, recur_bits: np.ndarray, codes: np.ndarray,
           offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored ids ``[n, k + 1]``, packed recurrence bits and codes in stored order ``[n, k]``
    of whole sequences (row ``offsets``) → ids and codes ``[n, k]`` in rank order."""
    n, k = codes.shape
    rank_ids = np.empty((n, k), dtype=np.int64)
    rank_codes = np.empty((n, k), dtype=np.int64)
    if not n or not k:
        return rank_ids, rank_codes
    stored_ids = stored_ids.astype(np.int64)
    ref = references(stored_ids[:, 0] - 1, np.diff(np.asarray(offsets, dtype=np.int64)))
    recur = np.unpackbits(recur_bits, axis=1, count=k, bitorder="little").astype(np.bool_)
    _compiled().decode(stored_ids, recur, np.asarray(codes, dtype=np.int64), ref, rank_ids,
                       rank_codes, np.asarray(offsets, dtype=np.int64))
    return rank_ids, rank_codes
