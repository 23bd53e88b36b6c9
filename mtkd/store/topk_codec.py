"""Compact, bounded-error codings of a teacher store's sparse columns (pure numpy).

Why: stored plainly (int32 ids + float16 log-probs, zstd) a k=64 position of a real 49k-vocabulary
teacher costs ≈ 230 bytes; the codings below store the same rows with a stated error bound
(docs/FORMAT.md, "Top-k coding", for the measured sizes).

All codings put log-probs on one grid, **q64** (``q64_grid``): uint16 codes of −log p in steps
of 1/64 nat down to −443/64 ≈ −6.92 (every entry with p ≥ 1e-3), then 1/16 nat (``COARSE`` = 4
fine steps) down to ``MIN_LOGPROB`` ≈ −4075; the code ``NEG_INF`` is −inf. Decoded values are
multiples of 1/64 (exact in float32), so |decoded − stored| ≤ 1/128 for log p ≥ −6.92, ≤ 1/32
down to ``MIN_LOGPROB``; anything lower decodes as ``MIN_LOGPROB`` (exp of either is 0 in
float64).

Top-k rows (``topk_ids`` / ``topk_logprobs``), per row of k entries:

* **Ids** are kept in ascending order as deltas ``id_0 + 1, id_1 − id_0, …`` (the gaps between
  the row's ids); id −1 (padding) is delta 0 and sorts first. The log-prob codes are stored in
  the same (id) order, and decoding restores the rank order by sorting on them: exact up to
  entries whose codes tie, which come back in id order (each id keeps its own value).
* ``q64``: the codes as they are. ``q64v2``: the row's floor F
  (its largest code: the least likely entry) first, then F − code per entry. Most of a top-k
  row sits just above its floor, so these are small numbers (≈ 12 bytes less per row of 64 on
  a real teacher); ids may take 1 to 4 bytes (``delta_width``: any vocabulary; q64 stops at 2
  bytes up to 65,535 ids, else 4).
* q64v2 may renumber the ids first through the store's id table (``id_table``,
  ``attrs.topk_id_table``): frequent tokens become small numbers, so the gaps shrink.
* Both as **byte planes**, ``uint8 [w, k]`` per row (the low bytes of the k values, then the
  next bytes): the high planes are nearly constant and zstd shrinks them to little.

``q64v3`` stores q64v2's floor-relative codes but codes each row's ids against a reference row
of its sequence (the latest earlier one with the same top-1 id; ``reference_codec``): ≈ 13 bytes
per row of 64 less on a real teacher, and reads decode whole sequences.

``q64r`` range-codes q64v3's values, one stream per sequence or, with ``attrs.topk_stream_rows``,
per run of consecutive sequences of that many rows (``stream_codec``): ≈ 27 bytes per row of 64
less than q64v3 on a real teacher, decoded values unchanged. It alone may also put
the tail (codes past ``FINE_MAX``: p < 1e-3) on a coarser grid (``attrs.topk_tail_step``
coarse steps of 1/16 nat; 4 is 1/4 nat, |error| ≤ 1/8 nat there), which leaves the bound
where p ≥ 1e-3 as it is.

``q64v2``, ``q64v3`` and ``q64r`` also code the random-sampling columns (unique ids ascending, then
padding −1 / 0 / −inf): ``sample_ids`` as deltas the same way (padding delta 0, last),
``sample_counts`` in one byte when ``num_samples`` ≤ 255, ``sample_logprobs`` as q64 codes in
the same order. q64r with ``attrs.sample_coding`` (what it writes since schema version 6)
range-codes them against the decoded top-k rows instead (``sample_stream``): most draws hit
the top-k, whose ids and log-probs the reader already has (≈ 15 bytes per position against 53
on a real teacher with 64 draws). With ``attrs.scalar_coding`` (since schema version 7) it
codes ``target_logprob`` and ``tail_logmass`` against them too (``scalar_codec``), within the
top-k's bound.

A store records the coding in ``attrs.topk_coding``; :func:`encode_rows` (called by the
writer) and :func:`decode_rows` (called by every read) make it transparent to callers: they see
int32 ids, float32 log-probs in descending order and uint16 counts whatever the coding.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mtkd.store import reference_codec, sample_stream, scalar_codec, stream_codec
from mtkd.store.id_table import ID_TABLE_ATTR, lookups, renumber
from mtkd.store.q64_grid import (
    CODE_WIDTH,
    dequantise,
    level_logprobs,
    neg_inf_level,
    quantise,
    tail_levels,
)
from mtkd.store.scalar_codec import (
    SCALAR_CODING_ATTR,
    TAIL_LOGMASS,
    TAIL_RESIDUAL,
    TARGET_LEVEL,
    TARGET_LOGPROB,
    TARGET_RANK,
)
from mtkd.store.stream_frames import stream_lengths, stream_offsets

Q64, Q64V2, Q64V3, Q64R = "q64", "q64v2", "q64v3", "q64r"
CODINGS = (Q64, Q64V2, Q64V3, Q64R)
#: The codings that store each row's codes as distances to its floor (and may use an id table).
FLOOR_CODINGS = (Q64V2, Q64V3, Q64R)
#: The codings that code each row's ids against its reference row (read by whole sequences).
REFERENCE_CODINGS = (Q64V3, Q64R)
#: Header attribute naming the coding of the sparse columns (absent: plain).
CODING_ATTR = "topk_coding"
IDS, LOGPROBS = "topk_ids", "topk_logprobs"
RECUR = "topk_recur"  #: q64v3: which of the reference row's ids recur (packed bits)
STREAM = "topk_stream"  #: q64r: each sequence's top-k rows as one range-coded stream
SAMPLE_IDS, SAMPLE_COUNTS, SAMPLE_LOGPROBS = "sample_ids", "sample_counts", "sample_logprobs"
#: The codings that also code the random-sampling columns.
SAMPLE_CODINGS = (Q64V2, Q64V3, Q64R)
#: Header attribute: q64r codes the sampled columns against the top-k (``sample_stream``),
#: value ``"q64r"``; absent: as q64v2 does (stores written before schema version 6).
SAMPLE_CODING_ATTR = "sample_coding"
SAMPLE_STREAM = "sample_stream"  #: q64r: each stream's draws, coded against its top-k rows
SAMPLE_COLUMNS = (SAMPLE_IDS, SAMPLE_COUNTS, SAMPLE_LOGPROBS)
#: Header attribute: q64r's tail grid, in coarse steps (absent: 1, q64's own).
TAIL_STEP_ATTR = "topk_tail_step"
TAIL_STEPS = (1, 2, 4, 8, 16)  #: 1/16, 1/8, 1/4, 1/2 and 1 nat
#: Header attribute: q64r codes consecutive sequences of an append as one stream until it holds
#: this many rows (absent or 0: a stream per sequence), so short sequences share what their
#: models learn; ``STREAM_START`` (uint8 per row) marks each stream's first row.
STREAM_ROWS_ATTR = "topk_stream_rows"
STREAM_START = "topk_stream_start"
#: Header attribute: how q64r numbers the ids seen among earlier rows' new ids, ``"count"``
#: (most counted first) or absent (by first sight: stores written before schema version 5).
ID_RANKING_ATTR = "topk_id_ranking"
BY_COUNT = "count"
RAW_ORDER = (IDS, RECUR, LOGPROBS)  #: q64r's mode-0 sequences: q64v3's arrays in this order

def _word(width: int) -> int:
    """The unsigned integer size (1, 2, 4 or 8 bytes) that holds ``width`` bytes."""
    return 1 << (width - 1).bit_length()


def to_planes(values: np.ndarray, width: int) -> np.ndarray:
    """``[n, k]`` unsigned values → ``uint8 [n, width, k]`` little-endian byte planes (the
    values must fit ``width`` bytes: higher bytes are dropped)."""
    word = _word(width)
    le = np.ascontiguousarray(values, dtype=f"<u{word}")
    planes = le.view(np.uint8).reshape(*le.shape, word)[..., :width]
    return np.ascontiguousarray(planes.swapaxes(-1, -2))


def from_planes(planes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_planes`: ``uint8 [n, w, k]`` → native unsigned ``[n, k]`` (of the
    smallest numpy size holding w bytes)."""
    planes = np.asarray(planes, dtype=np.uint8)
    width, word = planes.shape[-2], _word(planes.shape[-2])
    if width == word:
        joined = np.ascontiguousarray(planes.swapaxes(-1, -2))
    else:
        joined = np.zeros((*planes.shape[:-2], planes.shape[-1], word), dtype=np.uint8)
        joined[..., :width] = planes.swapaxes(-1, -2)
    return joined.view(f"<u{word}")[..., 0].astype(f"=u{word}", copy=False)


def id_width(vocab_size: int | None) -> int:
    """q64's bytes per stored id delta: 2 when every ``id + 1`` fits a uint16, else 4."""
    return 2 if vocab_size is not None and 0 < vocab_size <= 0xFFFF else 4


def delta_width(vocab_size: int | None, coding: str = Q64V2) -> int:
    """Bytes per stored id delta: the fewest that hold ``vocab_size`` (every ``id + 1``) for
    q64v2 and q64v3 (1 up to 255 ids, 3 up to 2^24 − 1), 4 when unknown (any id < 2^31); q64's
    :func:`id_width` for q64."""
    if coding == Q64:
        return id_width(vocab_size)
    if vocab_size is None or not 0 < vocab_size < 1 << 31:
        return 4
    return min(4, -(-int(vocab_size).bit_length() // 8))


def _check_ids(ids: np.ndarray, width: int, vocab_size: int | None) -> None:
    """Refuse ids a delta of ``width`` bytes cannot hold (−1 is padding)."""
    if ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    top = min(2 ** (8 * width) - 2, 2**31 - 1)
    if ids.size and (ids.min() < -1 or ids.max() > top):
        raise ValueError(f"ids in [{ids.min()}, {ids.max()}] outside [-1, {top}] "
                         f"(vocab_size {vocab_size})")


def encode(ids: np.ndarray, logprobs: np.ndarray, *, vocab_size: int | None = None,
           coding: str = Q64) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows ``ids [n, k]`` (−1 = padding) and ``logprobs [n, k]`` → the stored
    ``(topk_ids, topk_logprobs)`` byte planes; raises ValueError on values it cannot hold."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape != np.shape(logprobs):
        raise ValueError(f"ids {ids.shape} and logprobs {np.shape(logprobs)} must both be [n, k]")
    width = delta_width(vocab_size, coding)
    _check_ids(ids, width, vocab_size)
    # one sort of (id + 1, code) keys puts both columns in id order (faster than argsort)
    keys = np.sort((ids.astype(np.int64) + 1) << 16 | quantise(logprobs), axis=1)
    deltas = np.diff(keys >> 16, axis=1, prepend=0)
    codes = keys & 0xFFFF
    if coding == Q64V2:  # the row's floor, then each code's distance to it
        floor = codes.max(axis=1, initial=0, keepdims=True)
        codes = np.concatenate([floor, floor - codes], axis=1)
    return to_planes(deltas, width), to_planes(codes, CODE_WIDTH)


def _codes(code_planes: np.ndarray, coding: str) -> np.ndarray:
    """The stored codes in stored order (q64v3's, else id order), as int64 ``[n, k]``."""
    codes = from_planes(code_planes)
    if coding in FLOOR_CODINGS:
        codes = codes[:, :1] - codes[:, 1:]  # the floor ≥ every distance: no wrap in uint16
    return codes.astype(np.int64)


def decode(id_planes: np.ndarray, code_planes: np.ndarray, coding: str = Q64
           ) -> tuple[np.ndarray, np.ndarray]:
    """Stored planes → ``ids int32 [n, k]`` and ``logprobs float32 [n, k]`` in rank order
    (descending log-prob; tied codes in ascending id order)."""
    shifted = np.cumsum(from_planes(id_planes), axis=1, dtype=np.uint32)  # id + 1 ≤ 2^31
    # one sort of (code, id + 1) keys: rank order, tied codes in id order
    keys = np.sort(_codes(code_planes, coding) << 32 | shifted, axis=1)
    return (((keys & 0xFFFFFFFF) - 1).astype(np.int32), dequantise(keys >> 32))


def _referenced(ids: np.ndarray, logprobs: np.ndarray, lengths: np.ndarray,
                vocab_size: int | None, tail_step: int = 1
                ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Top-k rows of sequences of ``lengths`` rows, checked → q64v3's stored arrays (in
    ``RAW_ORDER``) and the values they hold: stored ids, packed recurrence bits and codes in
    stored order (``reference_codec``; on a ``tail_step`` grid, as levels)."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape != np.shape(logprobs):
        raise ValueError(f"ids {ids.shape} and logprobs {np.shape(logprobs)} must both be [n, k]")
    if int(np.sum(lengths)) != len(ids):
        raise ValueError(f"sequence lengths sum to {int(np.sum(lengths))}, not {len(ids)} rows")
    width = delta_width(vocab_size, Q64V3)
    _check_ids(ids, width, vocab_size)
    levels = tail_levels(quantise(logprobs, tail_step), tail_step)
    stored_ids, recur, codes = reference_codec.encode(ids, levels, lengths)
    floor = codes.max(axis=1, initial=0, keepdims=True)
    arrays = dict(zip(RAW_ORDER, (to_planes(stored_ids, width), recur, to_planes(
        np.concatenate([floor, floor - codes], axis=1), CODE_WIDTH)), strict=True))
    return arrays, stored_ids, recur, codes


def encode_referenced(ids: np.ndarray, logprobs: np.ndarray, lengths: np.ndarray, *,
                      vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """Top-k rows of sequences of ``lengths`` rows → their q64v3 arrays (``reference_codec``):
    ids, recurrence bits and floor-relative codes; raises ValueError on values it cannot hold."""
    return _referenced(ids, logprobs, lengths, vocab_size)[0]


def decode_referenced(arrays: Mapping[str, np.ndarray], offsets: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """q64v3 arrays of whole sequences (row ``offsets``) → ``ids int32`` and ``logprobs
    float32`` ``[n, k]`` in rank order (tied codes in ascending id order)."""
    ids, codes = reference_codec.decode(from_planes(arrays[IDS]), arrays[RECUR],
                                        _codes(arrays[LOGPROBS], Q64V3), offsets)
    return ids.astype(np.int32), dequantise(codes)


def encode_streamed(ids: np.ndarray, logprobs: np.ndarray, lengths: np.ndarray, *,
                    vocab_size: int, tail_step: int = 1, by_count: bool = True
                    ) -> dict[str, np.ndarray]:
    """Top-k rows of sequences of ``lengths`` rows → q64r's ``topk_stream``
    (``stream_codec``: q64v3's values range-coded, the tail on a ``tail_step`` grid, seen ids
    numbered ``by_count`` or by first sight)."""
    ids = np.asarray(ids)
    if ids.size and ids.max() >= vocab_size:
        raise ValueError(f"ids up to {ids.max()} outside vocab_size {vocab_size}")
    raw, stored_ids, recur, codes = _referenced(ids, logprobs, lengths, vocab_size, tail_step)
    k = codes.shape[1]
    recur_bits = np.unpackbits(recur, axis=1, count=k, bitorder="little").astype(np.bool_)
    return {STREAM: stream_codec.encode(raw, stored_ids, recur_bits, codes,
                                        np.concatenate([[0], np.cumsum(lengths)]),
                                        stream_codec.row_width(k, delta_width(vocab_size)),
                                        vocab_size, ranked=by_count)}


def decode_streamed(stream: np.ndarray, offsets: np.ndarray, *, k: int, vocab_size: int,
                    tail_step: int = 1, by_count: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """q64r's ``topk_stream`` of whole sequences (row ``offsets``) → ``ids int32`` and
    ``logprobs float32`` ``[n, k]`` in rank order (tied codes in ascending id order)."""
    ids, levels = _decode_streamed_levels(stream, offsets, k, vocab_size, by_count)
    return ids, level_logprobs(levels, tail_step)


def _decode_streamed_levels(stream: np.ndarray, offsets: np.ndarray, k: int, vocab_size: int,
                            by_count: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`decode_streamed`'s ids, and its log-probs as the levels they were coded as."""
    shapes = stored_arrays(k, vocab_size, Q64V3)
    raw_shapes = {name: shapes[name] for name in RAW_ORDER}
    (stored_ids, recur, codes), raw, is_raw = stream_codec.decode(
        stream, offsets, k, vocab_size, raw_shapes, ranked=by_count)
    if is_raw.any():  # sequences stored as q64v3's bytes
        stored_ids[is_raw] = from_planes(raw[IDS][is_raw])
        recur[is_raw] = np.unpackbits(raw[RECUR][is_raw], axis=1, count=k, bitorder="little")
        codes[is_raw] = _codes(raw[LOGPROBS][is_raw], Q64R)
    ids, levels = reference_codec.decode(stored_ids, np.packbits(recur, axis=1,
                                                                 bitorder="little"),
                                         codes, offsets)
    return ids.astype(np.int32), levels


def decode_logprobs(code_planes: np.ndarray, coding: str = Q64) -> np.ndarray:
    """The log-probs alone, in rank order (what :func:`decode` returns without the ids)."""
    return dequantise(np.sort(_codes(code_planes, coding), axis=1))


# --------------------------------------------------------------------------- sampled rows


def count_dtype(num_samples: int) -> str:
    """Stored dtype of ``sample_counts`` under q64v2: one byte while every count fits."""
    return "uint8" if num_samples <= 0xFF else "uint16"


def encode_samples(ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray, *,
                   vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """Sampled rows ``[n, m]`` (unique ids ascending, then padding −1) → their q64v2 arrays:
    id deltas (padding 0) and codes as byte planes, counts narrowed; ValueError if unfit."""
    ids, counts = np.asarray(ids), np.asarray(counts)
    deltas = _check_samples(ids, counts, logprobs)
    width = delta_width(vocab_size)
    _check_ids(ids, width, vocab_size)
    dtype = np.dtype(count_dtype(ids.shape[1]))
    return {SAMPLE_IDS: to_planes(deltas, width),
            SAMPLE_COUNTS: counts.astype(dtype),
            SAMPLE_LOGPROBS: to_planes(quantise(logprobs), CODE_WIDTH)}


def _check_samples(ids: np.ndarray, counts: np.ndarray, logprobs: Any) -> np.ndarray:
    """Refuse sampled rows that are not ``[n, m]`` integer ids (unique ascending, then padding
    −1) with counts in ``count_dtype(m)``'s range; their id deltas (padding 0)."""
    if ids.ndim != 2 or not ids.shape == counts.shape == np.shape(logprobs):
        raise ValueError(f"sample ids {ids.shape}, counts {counts.shape} and logprobs "
                         f"{np.shape(logprobs)} must all be [n, m]")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"sample ids must be integers, got {ids.dtype}")
    real = ids >= 0
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("sample ids: padding (-1) must come after the ids")
    deltas = np.where(real, np.diff(ids.astype(np.int64) + 1, axis=1, prepend=0), 0)
    if (deltas[real] <= 0).any():
        raise ValueError("sample ids must be unique and ascending in each row")
    top = np.iinfo(np.dtype(count_dtype(ids.shape[1]))).max
    if counts.size and (counts.min() < 0 or counts.max() > top):
        raise ValueError(f"sample counts outside [0, {top}]")
    return deltas


def decode_samples(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sampled arrays present in ``arrays`` as stored → ``sample_ids`` int32 (padding −1),
    ``sample_counts`` uint16 and ``sample_logprobs`` float32; each decodes on its own."""
    out = {}
    if SAMPLE_IDS in arrays:
        deltas = from_planes(arrays[SAMPLE_IDS])
        ids = np.cumsum(deltas, axis=1, dtype=np.int32)  # id + 1 < 2^31
        ids -= 1
        ids[deltas == 0] = -1  # padding
        out[SAMPLE_IDS] = ids
    if SAMPLE_COUNTS in arrays:
        out[SAMPLE_COUNTS] = arrays[SAMPLE_COUNTS].astype(np.uint16)
    if SAMPLE_LOGPROBS in arrays:
        out[SAMPLE_LOGPROBS] = dequantise(from_planes(arrays[SAMPLE_LOGPROBS]))
    return out


def encode_sample_stream(rows: Mapping[str, Any], streams: np.ndarray, vocab_size: int,
                         step: int, top_levels: np.ndarray) -> np.ndarray:
    """q64r's ``sample_stream`` of ``rows`` (top-k and sampled columns, ids as written; the
    top-k's ``top_levels`` on the ``step`` grid) in streams of ``streams`` rows; ValueError
    for rows q64v2 would refuse too, or ids outside ``vocab_size``. Padding reads back as
    −inf whatever log-prob it was written with."""
    ids, counts = np.asarray(rows[SAMPLE_IDS]), np.asarray(rows[SAMPLE_COUNTS])
    _check_samples(ids, counts, rows[SAMPLE_LOGPROBS])
    if len(ids) != len(rows[IDS]):
        raise ValueError(f"{len(ids)} sampled rows for {len(rows[IDS])} top-k rows")
    if ids.size and ids.max() >= vocab_size:
        raise ValueError(f"sample ids up to {ids.max()} outside vocab_size {vocab_size}")
    top = neg_inf_level(step)
    levels = np.where(ids >= 0, tail_levels(quantise(rows[SAMPLE_LOGPROBS], step), step), top)
    return sample_stream.encode(rows[IDS], top_levels, ids, counts, levels,
                                np.concatenate([[0], np.cumsum(streams)]), top)


def decode_sample_stream(stream: np.ndarray, offsets: np.ndarray, top_ids: np.ndarray,
                         top_levels: np.ndarray, attrs: Mapping[str, Any]
                         ) -> dict[str, np.ndarray]:
    """The sampled columns of q64r's ``sample_stream`` (whole streams at row ``offsets``),
    given the decoded top-k rows of the same rows (ids as written, and levels)."""
    step = tail_step(attrs)
    ids, counts, levels = sample_stream.decode(stream, offsets, top_ids, top_levels,
                                               neg_inf_level(step), int(attrs["vocab_size"]))
    return {SAMPLE_IDS: ids, SAMPLE_COUNTS: counts,
            SAMPLE_LOGPROBS: level_logprobs(levels, step)}


# --------------------------------------------------------------------------- store rows


def coding(attrs: Mapping[str, Any]) -> str | None:
    """The coding a store's attrs name (None: plain arrays); refuses unknown ones, and an id
    table (``id_table``) that is not q64v2's or not a set of ids below ``vocab_size``."""
    name = attrs.get(CODING_ATTR)
    if name is not None and name not in CODINGS:
        raise ValueError(f"unknown {CODING_ATTR} {name!r} (this mtkd reads {list(CODINGS)}; "
                         "a newer mtkd wrote it)")
    if attrs.get(ID_TABLE_ATTR) and name not in FLOOR_CODINGS:
        raise ValueError(f"{ID_TABLE_ATTR} needs {CODING_ATTR} in {list(FLOOR_CODINGS)}, "
                         f"not {name!r}")
    step = attrs.get(TAIL_STEP_ATTR, 1)
    if step not in TAIL_STEPS or (step != 1 and name != Q64R):
        raise ValueError(f"{TAIL_STEP_ATTR} {step!r}: one of {list(TAIL_STEPS)}, and other "
                         f"than 1 only with {CODING_ATTR} {Q64R!r}")
    rows = attrs.get(STREAM_ROWS_ATTR, 0)
    if not isinstance(rows, numbers.Integral) or isinstance(rows, bool) or rows < 0 \
            or (rows and name != Q64R):
        raise ValueError(f"{STREAM_ROWS_ATTR} {rows!r}: a non-negative int, and other than 0 "
                         f"only with {CODING_ATTR} {Q64R!r}")
    ranking = attrs.get(ID_RANKING_ATTR)
    if ranking is not None and (ranking != BY_COUNT or name != Q64R):
        raise ValueError(f"{ID_RANKING_ATTR} {ranking!r}: {BY_COUNT!r} or absent, and only with "
                         f"{CODING_ATTR} {Q64R!r}")
    if name == Q64R and not attrs.get("vocab_size"):
        raise ValueError(f"{CODING_ATTR} {Q64R!r} needs attrs.vocab_size")
    for attr in (SAMPLE_CODING_ATTR, SCALAR_CODING_ATTR):  # what q64r codes against the top-k
        if attrs.get(attr, Q64R) != Q64R or (attr in attrs and name != Q64R):
            raise ValueError(f"{attr} {attrs[attr]!r}: {Q64R!r} or absent, and only with "
                             f"{CODING_ATTR} {Q64R!r}")
    lookups(attrs)
    return name


def streams_samples(attrs: Mapping[str, Any]) -> bool:
    """Whether q64r codes the sampled columns against the top-k (``sample_stream``)."""
    return attrs.get(SAMPLE_CODING_ATTR) == Q64R and bool(attrs.get("num_samples"))


def codes_scalars(attrs: Mapping[str, Any]) -> bool:
    """Whether q64r codes the actual token's log-prob and the tail against the top-k."""
    return attrs.get(SCALAR_CODING_ATTR) == Q64R


def ranked(attrs: Mapping[str, Any]) -> bool:
    """Whether q64r numbers seen ids by count (else by first sight)."""
    return attrs.get(ID_RANKING_ATTR) == BY_COUNT


def stream_rows(attrs: Mapping[str, Any]) -> int:
    """Rows q64r gathers into one stream (0: a stream per sequence)."""
    return int(attrs.get(STREAM_ROWS_ATTR, 0))


def tail_step(attrs: Mapping[str, Any]) -> int:
    """The tail grid of a store's codes, in coarse steps (1: q64's)."""
    return int(attrs.get(TAIL_STEP_ATTR, 1))


def stored_arrays(k: int, vocab_size: int | None, name: str = Q64, num_samples: int = 0, *,
                  stream_samples: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Stored dtype and row shape of the arrays coding ``name`` codes (for a store's header):
    the top-k columns, and the ``num_samples`` sampled ones (q64r: in ``sample_stream`` if
    ``stream_samples``, else as q64v2 codes them)."""
    width = delta_width(vocab_size, name)
    floor = 1 if name in FLOOR_CODINGS else 0
    arrays = {IDS: ("uint8", (width, k)), LOGPROBS: ("uint8", (CODE_WIDTH, k + floor))}
    if name == Q64V3:  # the top-1 id first; which of the reference's ids recur
        arrays = {IDS: ("uint8", (width, k + 1)),
                  RECUR: ("uint8", (reference_codec.recur_bytes(k),)), LOGPROBS: arrays[LOGPROBS]}
    if name == Q64R:  # one stream per sequence (or run of them), spread over its rows
        arrays = {STREAM: ("uint8", (stream_codec.row_width(k, width),))}
    if name == Q64R and stream_samples and num_samples:
        arrays[SAMPLE_STREAM] = ("uint8", (sample_stream.row_width(num_samples),))
    elif name in SAMPLE_CODINGS and num_samples:
        arrays |= {SAMPLE_IDS: ("uint8", (width, num_samples)),
                   SAMPLE_COUNTS: (count_dtype(num_samples), (num_samples,)),
                   SAMPLE_LOGPROBS: ("uint8", (CODE_WIDTH, num_samples))}
    return arrays


def internal_arrays(attrs: Mapping[str, Any]) -> tuple[str, ...]:
    """The stored arrays the coding makes itself (q64v3's ``topk_recur``, q64r's
    ``topk_stream``): a writer's caller never gives them and a read never returns them
    (``Header.written_arrays``)."""
    if coding(attrs) == Q64R:
        samples = (SAMPLE_STREAM,) if streams_samples(attrs) else ()
        samples += (TARGET_LEVEL, TAIL_RESIDUAL) if codes_scalars(attrs) else ()
        return (STREAM, STREAM_START, *samples) if stream_rows(attrs) else (STREAM, *samples)
    return (RECUR,) if coding(attrs) == Q64V3 else ()


def virtual_arrays(attrs: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The arrays a caller gives and reads that the coding does not store as such (q64r's
    top-k columns, in its stream): their dtype and row shape."""
    if coding(attrs) != Q64R:
        return {}
    k, m = int(attrs["k"]), int(attrs.get("num_samples", 0))
    samples = {SAMPLE_IDS: ("int32", (m,)), SAMPLE_COUNTS: ("uint16", (m,)),
               SAMPLE_LOGPROBS: ("float32", (m,))} if streams_samples(attrs) else {}
    if codes_scalars(attrs):
        samples |= {TARGET_LOGPROB: ("float32", ()), TAIL_LOGMASS: ("float32", ())}
    return {IDS: ("int32", (k,)), LOGPROBS: ("float32", (k,)), **samples}


def encode_rows(rows: Mapping[str, Any], attrs: Mapping[str, Any],
                lengths: np.ndarray | None = None) -> Mapping[str, Any]:
    """``rows`` (of sequences of ``lengths`` rows: q64v3 needs them) with the columns coded
    as ``attrs`` say (unchanged for a plain store)."""
    name = coding(attrs)
    if name is None:
        return rows
    vocab, table = attrs.get("vocab_size"), lookups(attrs)
    ids = rows[IDS] if table is None else renumber(rows[IDS], table[0])
    if name in REFERENCE_CODINGS and lengths is None:
        raise ValueError(f"{name} codes whole sequences: their lengths are needed")
    if name == Q64V3:
        coded = encode_referenced(ids, rows[LOGPROBS], lengths, vocab_size=vocab)
    elif name == Q64R:  # a stream per sequence, or per run of them (flagged at its start)
        grouped = stream_rows(attrs)
        streams = stream_lengths(lengths, grouped) if grouped else lengths
        coded = encode_streamed(ids, rows[LOGPROBS], streams, vocab_size=vocab,
                                tail_step=tail_step(attrs), by_count=ranked(attrs))
        step = tail_step(attrs)
        samples = streams_samples(attrs) and SAMPLE_IDS in rows
        scalars = codes_scalars(attrs) and TARGET_LOGPROB in rows
        if samples or scalars:  # both coded against the top-k's levels (ids as written)
            levels = tail_levels(quantise(rows[LOGPROBS], step), step)
        if samples:
            coded[SAMPLE_STREAM] = encode_sample_stream(rows, streams, vocab, step, levels)
        if scalars:
            coded |= scalar_codec.encode(rows, levels, step)
        if grouped:
            coded[STREAM_START] = np.zeros(len(ids), dtype=np.uint8)
            coded[STREAM_START][np.cumsum(streams) - streams] = 1
    else:
        id_planes, code_planes = encode(ids, rows[LOGPROBS], vocab_size=vocab, coding=name)
        coded = {IDS: id_planes, LOGPROBS: code_planes}
    if name in SAMPLE_CODINGS and SAMPLE_IDS in rows and SAMPLE_STREAM not in coded:
        coded |= encode_samples(rows[SAMPLE_IDS], rows[SAMPLE_COUNTS], rows[SAMPLE_LOGPROBS],
                                vocab_size=vocab)
    return {**rows, **coded}


def stored_names(names: Iterable[str], attrs: Mapping[str, Any]) -> list[str]:
    """The arrays to read for ``names``: decoding the ids needs the log-prob codes too (and
    q64v3's recurrence bits); q64r's columns are read as its stream."""
    names = list(names)
    name = coding(attrs)
    if name == Q64R:  # both columns live in the stream (and the draws are coded against it)
        samples = [n for n in names if n in SAMPLE_COLUMNS] if streams_samples(attrs) else []
        scalars = [n for n in names if n in (TARGET_LOGPROB, TAIL_LOGMASS)
                   ] if codes_scalars(attrs) else []
        top = [n for n in names if n in (IDS, LOGPROBS)]
        stream = [STREAM, STREAM_START] if stream_rows(attrs) else [STREAM]
        rest = [n for n in names if n not in top + samples + scalars]
        return (rest + (stream if top or samples or scalars else [])
                + ([SAMPLE_STREAM] if samples else [])
                + ([TARGET_LEVEL, TAIL_RESIDUAL] + [TARGET_RANK] * (TARGET_RANK not in rest)
                   if scalars else []))
    if name is not None and IDS in names and LOGPROBS not in names:
        names.append(LOGPROBS)
    if name == Q64V3 and IDS in names and RECUR not in names:
        names.append(RECUR)
    return names


def decode_rows(arrays: dict[str, np.ndarray], attrs: Mapping[str, Any],
                offsets: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Arrays as read from a store (whole sequences at row ``offsets``: q64v3 needs them) →
    ``topk_ids`` int32 and ``topk_logprobs`` float32 in rank order, sampled columns as written
    (unchanged for a plain store); every read goes through this."""
    name = coding(attrs)
    if name is None:
        return arrays
    out = dict(arrays)
    if STREAM in arrays:
        if offsets is None:
            raise ValueError("q64r rows decode by whole sequences: their offsets are needed")
        if STREAM_START in out:  # whole streams of several sequences each
            offsets = stream_offsets(out.pop(STREAM_START))
        out[IDS], levels = _decode_streamed_levels(
            out.pop(STREAM), offsets, int(attrs["k"]), int(attrs["vocab_size"]), ranked(attrs))
        out[LOGPROBS] = level_logprobs(levels, tail_step(attrs))
        table = lookups(attrs)
        if table is not None:
            out[IDS] = renumber(out[IDS], table[1])
        if SAMPLE_STREAM in out:  # the draws, against the top-k rows as written
            out |= decode_sample_stream(out.pop(SAMPLE_STREAM), offsets, out[IDS], levels,
                                        attrs)
        if TARGET_LEVEL in out:  # the actual token's log-prob and the tail, against the rows
            stored = {n: out.pop(n) for n in (TARGET_LEVEL, TAIL_RESIDUAL)}
            out |= scalar_codec.decode(stored, out[TARGET_RANK], levels, out[LOGPROBS],
                                       tail_step(attrs))
    elif IDS in arrays:
        if name != Q64V3:
            out[IDS], out[LOGPROBS] = decode(arrays[IDS], arrays[LOGPROBS], name)
        elif offsets is None:
            raise ValueError("q64v3 rows decode by whole sequences: their offsets are needed")
        else:
            out[IDS], out[LOGPROBS] = decode_referenced(arrays, offsets)
            del out[RECUR]
        table = lookups(attrs)
        if table is not None:
            out[IDS] = renumber(out[IDS], table[1])
    elif LOGPROBS in arrays:
        out[LOGPROBS] = decode_logprobs(arrays[LOGPROBS], name)
    if name in SAMPLE_CODINGS:
        out |= decode_samples(arrays)
    return out
