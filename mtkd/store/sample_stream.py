"""q64r's random-sampling columns range-coded against the row's top-k (``sample_stream``;
numba).

Why: a teacher harvested with draws beside its top-k (``--num-samples``) draws mostly tokens its
top-k already holds (70 % of SmolLM2's distinct draws at k = 64), and their log-probs are the
top-k's own. Coded on their own (q64v2's sampled columns) the draws cost 53 bytes per position
on SmolLM2, a third of such a store. Against the decoded top-k they cost what they add:

* for each top-k entry that a draw could hit (an id, a finite log-prob), in order of its level
  then id: one bit, drawn or not [its level // 8: 1/8 nat on the fine grid; the chance of a
  draw follows p]; if drawn, its count − 1 [its level // 32]. Its log-prob is the entry's;
* the number of draws outside the top-k [one context], then each one in ascending id order:
  the gap − 1 from the previous id [the draws still to come, capped at 4], its level's distance
  below the top-k's last level [one context], its count − 1 [one context].

Values are q64r's levels (``q64_grid.tail_levels``: q64 codes, the tail on the store's grid),
so a draw's log-prob has the top-k's error bound. Decoded rows list the distinct draws in
ascending id order, then padding (id −1, count 0, −inf), as the harvest writes them. A stream
is each q64r top-k stream's rows (``stream_frames``); one the coder cannot take (a draw of an
id the top-k holds at another level, a draw outside the top-k above its last level or at −inf,
ids not distinct and ascending before the padding, a count of 0) or would not make shorter is
stored raw: ids int32, counts uint16 and levels uint16 of every row.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

try:
    from numba import prange
except ImportError:  # without numba the kernels run as plain Python
    prange = range

from mtkd.store import range_coder as rc
from mtkd.store import stream_frames as frames
from mtkd.store.range_coder import register_jitable
from mtkd.store.reference_codec import sort_row
from mtkd.store.stream_codec import groups_of
from mtkd.store.stream_frames import HEAD

DRAWN_BUCKETS = 64  #: binary contexts of "drawn", by the entry's level // 8 (1/8 nat)
COUNT_BUCKETS = 16  #: integer contexts of an entry's count, by its level // 32 (1/2 nat)
GAP_CONTEXTS = 4
COUNTS, OUT_N = 0, COUNT_BUCKETS
OUT_GAPS = OUT_N + 1
OUT_LEVEL = OUT_GAPS + GAP_CONTEXTS
OUT_COUNT = OUT_LEVEL + 1
UINT_CONTEXTS = OUT_COUNT + 1
DRAWN = UINT_CONTEXTS * rc.UINT_PROBS  #: where the binary probabilities start
PROBS = DRAWN + DRAWN_BUCKETS
MAX_COUNT = 0xFFFF
ID_SHIFT = 16  #: sort keys of a row's draws: id << 16 | slot (ids < 2^31, slots < 2^16)
LEVEL_SHIFT, ID_MASK = 32, 0xFFFFFFFF  #: sort keys of the top-k: level << 32 | id

_KERNELS: SimpleNamespace | None = None


def row_width(num_samples: int) -> int:
    """Bytes per row of ``sample_stream``: enough for a raw stream of one row."""
    return HEAD + raw_row_bytes(num_samples)


def raw_row_bytes(num_samples: int) -> int:
    """A raw row: ids int32, counts uint16, levels uint16."""
    return 8 * num_samples


@register_jitable
def _row_order(top_ids, top_levels, i, top_level, keys):
    """The top-k entries of row ``i`` a draw can hit (an id, a level below −inf's), as
    level << 32 | id sorted: the order both sides visit them in, whatever the rows' order."""
    n = 0
    for r in range(top_ids.shape[1]):
        if top_ids[i, r] >= 0 and top_levels[i, r] < top_level:
            keys[n] = top_levels[i, r] << LEVEL_SHIFT | top_ids[i, r]
            n += 1
    sort_row(keys[:n])
    return n


@register_jitable
def _find(ids, i, used, token):
    for j in range(used):
        if ids[i, j] == token:
            return j
    return -1


@register_jitable
def _encode_stream(top_ids, top_levels, ids, counts, levels, lo, hi, top_level, buf, enc, probs,
                   ready, keys, hit):
    """Range-code the draws of rows ``lo:hi`` into ``buf``: the stream's length, or −1 if a
    row is not one the coding can take."""
    m = ids.shape[1]
    rc.encoder_init(enc)
    ready[:] = False
    probs[DRAWN:] = rc.PROB_INIT
    for i in range(lo, hi):
        used = 0
        while used < m and ids[i, used] >= 0:
            if counts[i, used] < 1 or (used and ids[i, used] <= ids[i, used - 1]):
                return -1  # not distinct ascending ids with counts
            used += 1
        for j in range(used, m):
            if ids[i, j] != -1 or counts[i, j] != 0:
                return -1  # padding is not all after the ids
        hit[:used] = False
        n = _row_order(top_ids, top_levels, i, top_level, keys)
        last = 0
        for t in range(n):
            level, token = keys[t] >> LEVEL_SHIFT, keys[t] & ID_MASK
            last = level
            j = _find(ids, i, used, token)
            rc.encode_bit(enc, buf, probs, DRAWN + min(level >> 3, DRAWN_BUCKETS - 1),
                          1 if j >= 0 else 0)
            if j >= 0:
                if levels[i, j] != level or hit[j]:
                    return -1  # drawn at another level, or a top-k id listed twice
                hit[j] = True
                ctx = rc.fresh(probs, ready, COUNTS + min(level >> 5, COUNT_BUCKETS - 1))
                rc.encode_uint(enc, buf, probs, ctx, counts[i, j] - 1)
        outside = 0
        for j in range(used):
            if not hit[j]:
                outside += 1
        rc.encode_uint(enc, buf, probs, rc.fresh(probs, ready, OUT_N), outside)
        prev = -1
        for j in range(used):
            if hit[j]:
                continue
            for t in range(n):
                if keys[t] & ID_MASK == ids[i, j]:
                    return -1  # an id of the top-k drawn at another level
            if levels[i, j] < last or levels[i, j] >= top_level:
                return -1
            ctx = rc.fresh(probs, ready, OUT_GAPS + min(outside, GAP_CONTEXTS) - 1)
            rc.encode_uint(enc, buf, probs, ctx, ids[i, j] - prev - 1)
            rc.encode_uint(enc, buf, probs, rc.fresh(probs, ready, OUT_LEVEL),
                           levels[i, j] - last)
            rc.encode_uint(enc, buf, probs, rc.fresh(probs, ready, OUT_COUNT), counts[i, j] - 1)
            prev = ids[i, j]
            outside -= 1
    return rc.encoder_flush(enc, buf)


@register_jitable
def _decode_stream(buf, lo, hi, top_ids, top_levels, top_level, vocab, ids, counts, levels, dec,
                   probs, ready, keys, row):
    """Inverse of :func:`_encode_stream`; False if the stream decodes to draws a row cannot
    hold (a damaged stream)."""
    m = ids.shape[1]
    rc.decoder_init(dec, buf, 0)
    ready[:] = False
    probs[DRAWN:] = rc.PROB_INIT
    for i in range(lo, hi):
        n = _row_order(top_ids, top_levels, i, top_level, keys)
        used = 0
        last = 0
        for t in range(n):
            level, token = keys[t] >> LEVEL_SHIFT, keys[t] & ID_MASK
            last = level
            if rc.decode_bit(dec, buf, probs, DRAWN + min(level >> 3, DRAWN_BUCKETS - 1)):
                ctx = rc.fresh(probs, ready, COUNTS + min(level >> 5, COUNT_BUCKETS - 1))
                count = rc.decode_uint(dec, buf, probs, ctx) + 1
                if used >= m or count > MAX_COUNT:
                    return False
                row[used, 0], row[used, 1], row[used, 2] = token, count, level
                used += 1
        outside = rc.decode_uint(dec, buf, probs, rc.fresh(probs, ready, OUT_N))
        if used + outside > m:
            return False
        token = -1
        while outside:
            ctx = rc.fresh(probs, ready, OUT_GAPS + min(outside, GAP_CONTEXTS) - 1)
            token += rc.decode_uint(dec, buf, probs, ctx) + 1
            level = last + rc.decode_uint(dec, buf, probs, rc.fresh(probs, ready, OUT_LEVEL))
            count = rc.decode_uint(dec, buf, probs, rc.fresh(probs, ready, OUT_COUNT)) + 1
            if token >= vocab or level >= top_level or count > MAX_COUNT:
                return False
            for t in range(n):
                if keys[t] & ID_MASK == token:
                    return False
            row[used, 0], row[used, 1], row[used, 2] = token, count, level
            used += 1
            outside -= 1
        for j in range(used):
            keys[j] = row[j, 0] << ID_SHIFT | j
        sort_row(keys[:used])
        for j in range(used):
            at = keys[j] & ((1 << ID_SHIFT) - 1)
            ids[i, j], counts[i, j], levels[i, j] = row[at, 0], row[at, 1], row[at, 2]
    return True


def _kernels(deps: str) -> tuple[Any, Any]:
    """The encode and decode kernels, closures over ``deps``, the digest that keys numba's
    cache (``stream_frames.compile_kernels``)."""

    def encode_kernel(top_ids, top_levels, ids, counts, levels, offsets, groups, width,
                      top_level, out, lengths):
        if len(deps) == 0:  # (never: binds the digest)
            return
        for g in prange(len(groups) - 1):
            enc = np.zeros(rc.ENC_STATE, dtype=np.int64)
            probs = np.empty(PROBS, dtype=np.int32)
            ready = np.zeros(UINT_CONTEXTS, dtype=np.bool_)
            keys = np.empty(top_ids.shape[1], dtype=np.int64)
            hit = np.zeros(ids.shape[1], dtype=np.bool_)
            for s in range(groups[g], groups[g + 1]):
                lo, hi = offsets[s], offsets[s + 1]
                lengths[s] = _encode_stream(top_ids, top_levels, ids, counts, levels, lo, hi,
                                            top_level, out[lo * width + HEAD:hi * width], enc,
                                            probs, ready, keys, hit)

    def decode_kernel(streams, starts, sizes, offsets, groups, top_ids, top_levels, top_level,
                      vocab, ids, counts, levels, bad):
        if len(deps) == 0:
            return
        for g in prange(len(groups) - 1):
            dec = np.zeros(rc.DEC_STATE, dtype=np.int64)
            probs = np.empty(PROBS, dtype=np.int32)
            ready = np.zeros(UINT_CONTEXTS, dtype=np.bool_)
            keys = np.empty(max(top_ids.shape[1], ids.shape[1]), dtype=np.int64)
            row = np.empty((ids.shape[1], 3), dtype=np.int64)
            for s in range(groups[g], groups[g + 1]):
                if sizes[s] < 0:
                    continue
                buf = streams[starts[s]:starts[s] + sizes[s]]
                ok = _decode_stream(buf, offsets[s], offsets[s + 1], top_ids, top_levels,
                                    top_level, vocab, ids, counts, levels, dec, probs, ready,
                                    keys, row)
                bad[s] = not ok or len(buf) == 0 or buf[0] != 0 or dec[rc.D_POS] != sizes[s]

    return encode_kernel, decode_kernel


def _compiled() -> SimpleNamespace:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = frames.compile_kernels(_kernels)
    return _KERNELS


def encode(top_ids: np.ndarray, top_levels: np.ndarray, ids: np.ndarray, counts: np.ndarray,
           levels: np.ndarray, offsets: np.ndarray, top_level: int) -> np.ndarray:
    """The draws (``ids`` ``[n, m]``: distinct ascending, then padding −1; their ``counts`` and
    ``levels``) of each stream (rows at ``offsets``) coded against the top-k rows (``top_ids``,
    ``top_levels``; −inf is ``top_level``) into its share of ``uint8 [n, row_width(m)]``."""
    n, m = ids.shape
    offsets = np.asarray(offsets, dtype=np.int64)
    width = row_width(m)
    out = np.zeros((n, width), dtype=np.uint8)
    flat = out.reshape(-1)
    lengths = np.full(len(offsets) - 1, -1, dtype=np.int64)
    if n and m:
        _compiled().encode(np.asarray(top_ids, np.int64), np.asarray(top_levels, np.int64),
                           np.asarray(ids, np.int64), np.asarray(counts, np.int64),
                           np.asarray(levels, np.int64), offsets, groups_of(offsets), width,
                           top_level, flat, lengths)
    raw = {"ids": np.asarray(ids, np.int32), "counts": np.asarray(counts, np.uint16),
           "levels": np.asarray(levels, np.uint16)}
    frames.frame(flat, offsets, width, lengths, raw_row_bytes(m),
                 lambda lo, hi: frames.raw_rows(raw, lo, hi))
    return out


def decode(streams: np.ndarray, offsets: np.ndarray, top_ids: np.ndarray,
           top_levels: np.ndarray, top_level: int, vocab_size: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode` over whole streams at row ``offsets``, given the same top-k
    rows: ``ids`` int32, ``counts`` uint16 and ``levels`` int64 ``[n, m]``. ValueError names a
    damaged stream and its rows in the read."""
    n, width = streams.shape
    m = (width - HEAD) // 8
    flat = np.ascontiguousarray(streams).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64)
    raw = {"ids": np.full((n, m), -1, np.int32), "counts": np.zeros((n, m), np.uint16),
           "levels": np.full((n, m), top_level, np.uint16)}
    starts, sizes, raw_streams = frames.unframe(flat, offsets, width, raw_row_bytes(m),
                                                "sample_stream")
    for lo, hi, body in raw_streams:
        frames.unpack_raw(raw, lo, hi, body)
    ids, counts, levels = raw["ids"], raw["counts"], raw["levels"].astype(np.int64)
    bad = np.zeros(len(offsets) - 1, dtype=np.bool_)
    if n and m:
        _compiled().decode(flat, starts, sizes, offsets, groups_of(offsets),
                           np.asarray(top_ids, np.int64), np.asarray(top_levels, np.int64),
                           top_level, vocab_size, ids, counts, levels, bad)
    if bad.any():
        raise frames.damaged("sample_stream", bad, offsets)
    return ids, counts, levels
