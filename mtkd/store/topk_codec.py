"""Compact, bounded-error coding ``q64`` of a teacher store's top-k columns (pure numpy).

Why: stored plainly (int32 ids + float16 log-probs, zstd) a k=64 position costs ≈175–182 bytes;
``q64`` brings it to ≈103 bytes on a real harvest (docs/FORMAT.md, "Top-k coding"), with a
stated error bound instead of float16's relative one.

Per row of k entries:

* **Log-probs** become uint16 codes of −log p on a grid of 1/64 nat down to −443/64 ≈ −6.92
  (every entry with p ≥ 1e-3), then 1/16 nat (``COARSE`` = 4 fine steps) down to
  ``MIN_LOGPROB`` ≈ −4075; the code ``NEG_INF`` is −inf. Decoded values are multiples of 1/64
  (exact in float32), so |decoded − stored| ≤ 1/128 for log p ≥ −6.92, ≤ 1/32 down to
  ``MIN_LOGPROB``; anything lower decodes as ``MIN_LOGPROB`` (exp of either is 0 in float64).
* **Ids** are kept in ascending order as deltas ``id_0 + 1, id_1 − id_0, …`` (small numbers:
  the gaps between the row's ids); id −1 (padding) is delta 0 and sorts first. The log-prob
  codes are stored in the same (id) order, and decoding restores the rank order by sorting on
  them: exact up to entries whose codes tie, which come back in id order (each id keeps its
  own value).
* Both are stored as **byte planes**, ``uint8 [w, k]`` per row (the low bytes of the k values,
  then the next bytes): the high planes are nearly constant and zstd shrinks them to little.
  Codes use w = 2; ids w = 2 when ``vocab_size`` ≤ 65535, else 4 (any id < 2^31).

A store records the coding in ``attrs.topk_coding``; :func:`encode_rows` (called by the
writer) and :func:`decode_rows` (called by every read) make it transparent to callers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

Q64 = "q64"
CODINGS = (Q64,)
#: Header attribute naming the coding of ``topk_ids`` / ``topk_logprobs`` (absent: plain).
CODING_ATTR = "topk_coding"
IDS, LOGPROBS = "topk_ids", "topk_logprobs"

FINE = 64  #: fine grid steps per nat
FINE_MAX = 443  #: last fine code: ceil(64 · ln 1000), so every p ≥ 1e-3 is on the fine grid
COARSE = 4  #: fine steps per coarse step (1/16 nat)
NEG_INF = 0xFFFF  #: the code of −inf
MAX_CODE = NEG_INF - 1  #: the most negative finite code
MIN_LOGPROB = -(FINE_MAX + (MAX_CODE - FINE_MAX) * COARSE) / FINE  #: ≈ −4075.1
FINE_ERROR = 0.5 / FINE  #: bound on |error| for log p ≥ −FINE_MAX/64 (covers p ≥ 1e-3)
COARSE_ERROR = 0.5 * COARSE / FINE  #: bound on |error| for MIN_LOGPROB ≤ log p < −FINE_MAX/64
CODE_WIDTH = 2  #: bytes per log-prob code


def id_width(vocab_size: int | None) -> int:
    """Bytes per stored id delta: 2 when every ``id + 1`` fits a uint16, else 4."""
    return 2 if vocab_size is not None and 0 < vocab_size <= 0xFFFF else 4


def quantise(logprobs: np.ndarray) -> np.ndarray:
    """uint16 codes of natural log-probs (any float dtype, ≤ 1/128, no NaN; −inf allowed)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if np.isnan(lp).any() or (lp > FINE_ERROR).any():
        raise ValueError("log-probs must not be NaN or above 1/128")
    with np.errstate(over="ignore"):
        units = -lp * FINE  # −log p in fine steps; +inf for −inf (and beyond −1e306)
    fine = np.rint(units)
    coarse = FINE_MAX + np.rint((units - FINE_MAX) / COARSE)
    codes = np.where(fine <= FINE_MAX, np.maximum(fine, 0), np.minimum(coarse, MAX_CODE))
    codes[np.isneginf(lp)] = NEG_INF
    return codes.astype(np.uint16)


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


def to_planes(values: np.ndarray, width: int) -> np.ndarray:
    """``[n, k]`` unsigned values → ``uint8 [n, width, k]`` little-endian byte planes."""
    le = np.ascontiguousarray(values, dtype=f"<u{width}")
    return np.ascontiguousarray(le.view(np.uint8).reshape(*le.shape, width).swapaxes(-1, -2))


def from_planes(planes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_planes`: ``uint8 [n, w, k]`` → native ``uint{8w} [n, k]``."""
    width = planes.shape[-2]
    joined = np.ascontiguousarray(np.asarray(planes, dtype=np.uint8).swapaxes(-1, -2))
    return joined.view(f"<u{width}")[..., 0].astype(f"=u{width}", copy=False)


def encode(ids: np.ndarray, logprobs: np.ndarray, *, vocab_size: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows ``ids [n, k]`` (−1 = padding) and ``logprobs [n, k]`` → the stored
    ``(topk_ids, topk_logprobs)`` byte planes; raises ValueError on values it cannot hold."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape != np.shape(logprobs):
        raise ValueError(f"ids {ids.shape} and logprobs {np.shape(logprobs)} must both be [n, k]")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    width = id_width(vocab_size)
    top = min(2 ** (8 * width) - 2, 2**31 - 1)
    if ids.size and (ids.min() < -1 or ids.max() > top):
        raise ValueError(f"ids in [{ids.min()}, {ids.max()}] outside [-1, {top}] "
                         f"(vocab_size {vocab_size})")
    # one sort of (id + 1, code) keys puts both columns in id order (faster than argsort)
    keys = np.sort((ids.astype(np.int64) + 1) << 16 | quantise(logprobs), axis=1)
    deltas = np.diff(keys >> 16, axis=1, prepend=0)
    return to_planes(deltas, width), to_planes(keys & 0xFFFF, CODE_WIDTH)


def decode(id_planes: np.ndarray, code_planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored planes → ``ids int32 [n, k]`` and ``logprobs float32 [n, k]`` in rank order
    (descending log-prob; tied codes in ascending id order)."""
    shifted = np.cumsum(from_planes(id_planes), axis=1, dtype=np.uint32)  # id + 1 ≤ 2^31
    # one sort of (code, id + 1) keys: rank order, tied codes in id order
    keys = np.sort(from_planes(code_planes).astype(np.int64) << 32 | shifted, axis=1)
    return (((keys & 0xFFFFFFFF) - 1).astype(np.int32), dequantise(keys >> 32))


def decode_logprobs(code_planes: np.ndarray) -> np.ndarray:
    """The log-probs alone, in rank order (what :func:`decode` returns without the ids)."""
    return dequantise(np.sort(from_planes(code_planes), axis=1))


# --------------------------------------------------------------------------- store rows


def coding(attrs: Mapping[str, Any]) -> str | None:
    """The top-k coding a store's attrs name (None: plain arrays); refuses unknown ones."""
    name = attrs.get(CODING_ATTR)
    if name is not None and name not in CODINGS:
        raise ValueError(f"unknown {CODING_ATTR} {name!r} (this mtkd reads {list(CODINGS)})")
    return name


def stored_arrays(k: int, vocab_size: int | None) -> dict[str, tuple[str, tuple[int, int]]]:
    """Stored dtype and row shape of the coded arrays (for a store's header)."""
    return {IDS: ("uint8", (id_width(vocab_size), k)), LOGPROBS: ("uint8", (CODE_WIDTH, k))}


def encode_rows(rows: Mapping[str, Any], attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """``rows`` with the top-k columns coded as ``attrs`` say (unchanged for a plain store)."""
    if coding(attrs) is None:
        return rows
    id_planes, code_planes = encode(rows[IDS], rows[LOGPROBS], vocab_size=attrs.get("vocab_size"))
    return {**rows, IDS: id_planes, LOGPROBS: code_planes}


def stored_names(names: Iterable[str], attrs: Mapping[str, Any]) -> list[str]:
    """The arrays to read for ``names``: decoding the ids needs the log-prob codes too."""
    names = list(names)
    if coding(attrs) is not None and IDS in names and LOGPROBS not in names:
        names.append(LOGPROBS)
    return names


def decode_rows(arrays: dict[str, np.ndarray], attrs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Arrays as read from a store → ``topk_ids`` int32 and ``topk_logprobs`` float32 in rank
    order (unchanged for a plain store); every reader of a store goes through this."""
    if coding(attrs) is None or LOGPROBS not in arrays:
        return arrays
    if IDS in arrays:
        ids, logprobs = decode(arrays[IDS], arrays[LOGPROBS])
        return {**arrays, IDS: ids, LOGPROBS: logprobs}
    return {**arrays, LOGPROBS: decode_logprobs(arrays[LOGPROBS])}
