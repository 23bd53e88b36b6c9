"""q64v3's rows range-coded, one stream per sequence (coding ``q64r``; numba).

Why: zstd over q64v3's byte planes leaves bytes on the table that a model of the rows can take:
26 per position on SmolLM2 at k = 64 (132.1 → 105.8, ``bench/store_size.py``). This codes the
very same values — q64v3's top-1 ids, recurrence bits, new-id gaps and floor-relative codes
(``reference_codec``) — with ``range_coder``'s adaptive binary models, so decoding gives
q64v3's arrays back and then q64v3's rows exactly. Models start afresh in every sequence:
each sequence decodes alone.

Per row, in this order (the models' contexts in brackets):

* the top-1 id: its index among the distinct top-1 ids of the sequence's earlier rows, most
  recent first, plus one [top-1 index]; 0 when it is not among them, then top-1 id + 1
  [top-1 id] (0: a row of padding). A row has a reference exactly when its top-1 recurs;
* with a reference, its k recurrence bits [reference rank, the previous bit];
* the padding entries among the new ids [padding], then the new ids as a set: numbered in the
  sequence's own order (ids seen among its earlier rows' new ids first, most often seen first
  — or, in stores written before ``attrs.topk_id_ranking``, by first sight —, then the others
  by id: number = number seen + id), the gaps − 1 between their numbers in ascending order
  [the new ids still to come (capped at 8) × the previous number's bit length]. Every id of a
  row is new in some earlier row or this one, so "seen" is "seen in the sequence". The
  sequence's own order puts the ids a teacher keeps proposing first: ≈ 10 bytes per position
  less than id order on SmolLM2 at k = 64, and ranking by count 1.2 less than first sight
  (5.6 on a 262,144-id Zipf teacher, 0.8 more on a 2,048-id one);
* the floor F as a signed change from the previous row's [floor], then F − code in q64v3's
  stored order for the recurring ids [their index, capped at 31], then for the padding and
  the new ids in the order their numbers were coded [one context].

Stored per sequence in its rows' share of ``topk_stream`` (``uint8 [W]`` per row, zstd, so the
unused end costs nothing): a mode byte, the stream's length and the CRC-32 of those and the
stream (uint32 little endian each), the stream. Mode 0 holds q64v3's arrays as bytes instead
(row-major, one after the other), for a sequence whose stream would be no shorter (a very short
one, whose models have had no time to learn): W = 9 + their bytes per row, so both fit.
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
from mtkd.store.range_coder import register_jitable
from mtkd.store.reference_codec import sort_row
from mtkd.store.stream_frames import (
    HEAD,
    compile_kernels,
    damaged,
    frame,
    raw_rows,
    unframe,
    unpack_raw,
)

CODE_CONTEXTS = 32  #: recurring-index contexts of the codes (then one for the new ids)
LEFT_BUCKETS, PREV_BUCKETS = 8, 40
# integer contexts (each rc.UINT_PROBS probabilities), then the recurrence bits' probabilities
TOP1_INDEX, TOP1_ID, PADDING, FLOOR = range(4)
GAPS = 4
CODES = GAPS + LEFT_BUCKETS * PREV_BUCKETS
NEW_CODES = CODES + CODE_CONTEXTS
UINT_CONTEXTS = NEW_CODES + 1
PROBS = UINT_CONTEXTS * rc.UINT_PROBS

_KERNELS: SimpleNamespace | None = None


def row_width(k: int, id_bytes: int) -> int:
    """Bytes per row of ``topk_stream``: enough for a mode-0 sequence of one row."""
    return HEAD + raw_row_bytes(k, id_bytes)


def raw_row_bytes(k: int, id_bytes: int) -> int:
    """Bytes of one row of q64v3's arrays: id planes, recurrence bits, code planes."""
    return (k + 1) * id_bytes + -(-k // 8) + 2 * (k + 1)


@register_jitable
def _bit_length(v):
    e = 0
    while v > 0:
        v >>= 1
        e += 1
    return e


@register_jitable
def _zigzag(v):
    return 2 * v if v >= 0 else -2 * v - 1


@register_jitable
def _unzigzag(z):
    return z >> 1 if z % 2 == 0 else -((z + 1) >> 1)


@register_jitable
def _mtf_find(mtf, used, value):
    """Index of ``value`` in the move-to-front list (−1: absent), moved to the front."""
    at = -1
    for i in range(used):
        if mtf[i] == value:
            at = i
            break
    if at >= 0:
        for i in range(at, 0, -1):
            mtf[i] = mtf[i - 1]
        mtf[0] = value
    return at


@register_jitable
def _mtf_push(mtf, used, value):
    for i in range(used, 0, -1):
        mtf[i] = mtf[i - 1]
    mtf[0] = value
    return used + 1


@register_jitable
def _gap_context(left, prev):
    return GAPS + min(left, LEFT_BUCKETS) - 1 + LEFT_BUCKETS * min(_bit_length(prev + 1),
                                                                      PREV_BUCKETS - 1)


@register_jitable
def _code_context(j, m):
    """The context of a row's j-th code: a recurring id's index (capped), or the new ids'."""
    return CODES + min(j, CODE_CONTEXTS - 1) if j < m else NEW_CODES


@register_jitable
def _recur_at(r, prev_bit):
    return PROBS + 2 * r + prev_bit


@register_jitable
def _slot(table, token):
    """The slot of ``token`` in the open-addressing ``table`` ([capacity, 2]: token, number;
    token −1 is empty), or the empty slot where it would go."""
    mask = len(table) - 1
    # token < 2^31: no overflow. The product's low bits depend on the token's low bits only,
    # so ids below the capacity never share a first slot; others probe on.
    at = (token * 2654435761) & mask
    while table[at, 0] != -1 and table[at, 0] != token:
        at = (at + 1) & mask
    return at


@register_jitable
def _number_of(table, token):
    """``token``'s number among the ids seen in the sequence (by count or first sight), −1 if
    not seen yet."""
    at = _slot(table, token)
    return table[at, 1] if table[at, 0] == token else -1


@register_jitable
def _see(table, seen, count, token):
    """Number ``token`` (if not seen yet); returns the number of ids seen. ``seen[number]``
    holds each seen id and its slot."""
    at = _slot(table, token)
    if table[at, 0] != token:
        table[at, 0] = token
        table[at, 1] = count
        seen[count, 0] = token
        seen[count, 1] = at
        count += 1
    return count


@register_jitable
def _rank(table, seen, counts, first, count, token):
    """Count one sighting of ``token`` among the new ids, keeping ``seen`` ordered by count,
    most counted first (numbers are positions in that order; ties in the order these swaps
    leave, alike on both sides of the coder); returns the number of ids seen.
    ``counts[number]`` is the count of the id numbered so, ``first[c]`` the first number whose
    count is c while any id has count c: a sighting swaps the id with the first of its count's
    block, which then joins the block above. O(1) per sighting."""
    at = _slot(table, token)
    if table[at, 0] != token:  # first sight: the last number, count 1
        table[at, 0] = token
        table[at, 1] = count
        seen[count, 0] = token
        seen[count, 1] = at
        counts[count] = 1
        if count == 0 or counts[count - 1] != 1:
            first[1] = count
        return count + 1
    number = table[at, 1]
    c = counts[number]
    lead = first[c]
    if lead != number:
        other, other_at = seen[lead, 0], seen[lead, 1]
        seen[lead, 0], seen[lead, 1] = token, at
        table[at, 1] = lead
        seen[number, 0], seen[number, 1] = other, other_at
        table[other_at, 1] = number
    counts[lead] = c + 1
    if lead == 0 or counts[lead - 1] != c + 1:
        first[c + 1] = lead
    first[c] = lead + 1
    return count


@register_jitable
def _number(table, seen, counts, first, count, token, ranked):
    """A new id of a row, once the row is coded: numbered by first sight or ranked by count."""
    if ranked:
        return _rank(table, seen, counts, first, count, token)
    return _see(table, seen, count, token)


@register_jitable
def _forget(table, seen, count):
    for j in range(count):
        table[seen[j, 1], 0] = -1


def table_capacity(max_rows: int, k: int, vocab_size: int) -> int:
    """Slots of the seen-id table: a power of two ≥ twice the most ids a sequence of
    ``max_rows`` rows can see."""
    return 1 << max(4, (2 * min(vocab_size, max_rows * k)).bit_length())


@register_jitable
def _sequence_state(k, max_rows, capacity):
    """One thread's working arrays, reused sequence after sequence: the probabilities, which
    integer contexts are fresh, the top-1 move-to-front list, the seen-id table and its
    numbering, a row's sort keys, the counts by number and their blocks' first numbers
    (:func:`_rank`)."""
    return (np.empty(PROBS + 2 * k, dtype=np.int32), np.zeros(UINT_CONTEXTS, dtype=np.bool_),
            np.empty(max_rows + 1, dtype=np.int64), np.full((capacity, 2), -1, dtype=np.int64),
            np.empty((capacity, 2), dtype=np.int64), np.empty(k, dtype=np.int64),
            np.empty(capacity, dtype=np.int64), np.empty(max_rows + 2, dtype=np.int64))


@register_jitable
def _encode_sequence(stored_ids, recur, floor, dist, lo, hi, vocab, ranked, buf, enc, probs,
                     ready, mtf, table, seen, keys, counts, first):
    """Range-code rows ``lo:hi`` (one sequence) into ``buf``; returns the stream's length."""
    k = dist.shape[1]
    rc.encoder_init(enc)
    ready[:] = False  # each integer context is reset on first use (rc.fresh)
    probs[PROBS:] = rc.PROB_INIT
    used = 0
    seen_count = 0
    last_floor = 0
    for i in range(lo, hi):
        top = stored_ids[i, 0]
        at = _mtf_find(mtf, used, top) if top > 0 else -1
        rc.encode_uint(enc, buf, probs, rc.fresh(probs, ready, TOP1_INDEX), at + 1)
        if at < 0:
            rc.encode_uint(enc, buf, probs, rc.fresh(probs, ready, TOP1_ID), top)
            if top > 0:
                used = _mtf_push(mtf, used, top)
        m = 0
        if at >= 0:
            prev_bit = 1
            for r in range(k):
                bit = 1 if recur[i, r] else 0
                rc.encode_bit(enc, buf, probs, _recur_at(r, prev_bit), bit)
                prev_bit = bit
                m += bit
        new = k - m
        pad = 0
        while pad < new and stored_ids[i, 1 + pad] == 0:
            pad += 1
        rc.encode_uint(enc, buf, probs, rc.fresh(probs, ready, PADDING), pad)
        count = new - pad
        token = -1
        for j in range(count):  # (number, code) of each new id, in number order
            token += stored_ids[i, 1 + pad + j]
            number = _number_of(table, token)
            if number < 0:
                number = seen_count + token
            keys[j] = number << 16 | dist[i, m + pad + j]
        sort_row(keys[:count])
        prev = -1
        for j in range(count):
            number = keys[j] >> 16
            ctx = rc.fresh(probs, ready, _gap_context(count - j, prev))
            rc.encode_uint(enc, buf, probs, ctx, number - prev - 1)
            prev = number
        rc.encode_uint(enc, buf, probs, rc.fresh(probs, ready, FLOOR),
                       _zigzag(floor[i] - last_floor))
        last_floor = floor[i]
        for j in range(m + pad + count):
            d = keys[j - m - pad] & 0xFFFF if j >= m + pad else dist[i, j]
            rc.encode_uint(enc, buf, probs, rc.fresh(probs, ready, _code_context(j, m)), d)
        token = -1
        for j in range(count):
            token += stored_ids[i, 1 + pad + j]
            seen_count = _number(table, seen, counts, first, seen_count, token, ranked)
    _forget(table, seen, seen_count)
    return rc.encoder_flush(enc, buf)


@register_jitable
def _decode_sequence(buf, lo, hi, k, vocab, ranked, stored_ids, recur, floor, dist, dec, probs,
                     ready, mtf, table, seen, keys, counts, first, numbers):
    """Inverse of :func:`_encode_sequence`; False if the stream decodes to values q64v3
    cannot hold (a damaged stream)."""
    rc.decoder_init(dec, buf, 0)
    ready[:] = False  # each integer context is reset on first use (rc.fresh)
    probs[PROBS:] = rc.PROB_INIT
    used = 0
    seen_count = 0
    last_floor = 0
    ok = True
    for i in range(lo, hi):
        at = rc.decode_uint(dec, buf, probs, rc.fresh(probs, ready, TOP1_INDEX)) - 1
        if at >= used:
            ok = False
            break
        if at >= 0:
            top = mtf[at]
            _mtf_find(mtf, used, top)
        else:
            top = rc.decode_uint(dec, buf, probs, rc.fresh(probs, ready, TOP1_ID))
            if top > vocab:
                ok = False
                break
            if top > 0:
                used = _mtf_push(mtf, used, top)
        stored_ids[i, 0] = top
        m = 0
        if at >= 0:
            prev_bit = 1
            for r in range(k):
                bit = rc.decode_bit(dec, buf, probs, _recur_at(r, prev_bit))
                recur[i, r] = bit == 1
                prev_bit = bit
                m += bit
        new = k - m
        pad = rc.decode_uint(dec, buf, probs, rc.fresh(probs, ready, PADDING))
        if pad > new:
            ok = False
            break
        count = new - pad
        prev = -1
        for j in range(count):
            ctx = rc.fresh(probs, ready, _gap_context(count - j, prev))
            prev += rc.decode_uint(dec, buf, probs, ctx) + 1
            numbers[j] = prev
        f = last_floor + _unzigzag(rc.decode_uint(dec, buf, probs, rc.fresh(probs, ready, FLOOR)))
        if f < 0 or f > 0xFFFF:
            ok = False
            break
        floor[i] = f
        last_floor = f
        for j in range(m + pad + count):
            d = rc.decode_uint(dec, buf, probs, rc.fresh(probs, ready, _code_context(j, m)))
            if d > f:
                ok = False
                break
            if j < m + pad:
                dist[i, j] = d
                continue
            number = numbers[j - m - pad]
            token = seen[number, 0] if number < seen_count else number - seen_count
            if token >= vocab or (number >= seen_count and _number_of(table, token) >= 0):
                ok = False
                break
            keys[j - m - pad] = token << 16 | d
        if not ok:
            break
        sort_row(keys[:count])  # back to q64v3's order: ascending ids
        token = -1
        for j in range(count):
            gap = (keys[j] >> 16) - token
            token += gap
            stored_ids[i, 1 + pad + j] = gap
            dist[i, m + pad + j] = keys[j] & 0xFFFF
            seen_count = _number(table, seen, counts, first, seen_count, token, ranked)
    _forget(table, seen, seen_count)
    return ok


def _kernels(deps: str) -> tuple[Any, Any]:
    """The encode and decode kernels (plain Python), closures over ``deps``, the digest that
    keys numba's cache (``stream_frames.compile_kernels``)."""

    def encode_kernel(stored_ids, recur, floor, dist, offsets, groups, width, vocab, ranked,
                      max_rows, capacity, out, lengths):
        """Each sequence range-coded into its share of ``out`` (after its head), groups of
        sequences in parallel; its stream's length in ``lengths`` (> its share: did not fit)."""
        if len(deps) == 0:  # (never: binds the digest, which keys numba's cache)
            return
        k = dist.shape[1]
        for g in prange(len(groups) - 1):
            enc = np.zeros(rc.ENC_STATE, dtype=np.int64)
            probs, ready, mtf, table, seen, keys, counts, first = _sequence_state(
                k, max_rows, capacity)
            for s in range(groups[g], groups[g + 1]):
                lo, hi = offsets[s], offsets[s + 1]
                lengths[s] = _encode_sequence(stored_ids, recur, floor, dist, lo, hi, vocab,
                                              ranked, out[lo * width + HEAD:hi * width], enc,
                                              probs, ready, mtf, table, seen, keys, counts, first)

    def decode_kernel(streams, starts, sizes, offsets, groups, k, vocab, ranked, max_rows,
                      capacity, stored_ids, recur, floor, dist, bad):
        """Each range-coded sequence (``sizes[s]`` ≥ 0 bytes at ``starts[s]``) decoded, groups in
        parallel; ``bad[s]`` set for a stream that decodes to values q64v3 cannot hold or does not
        end where its length says."""
        if len(deps) == 0:
            return
        for g in prange(len(groups) - 1):
            dec = np.zeros(rc.DEC_STATE, dtype=np.int64)
            probs, ready, mtf, table, seen, keys, counts, first = _sequence_state(
                k, max_rows, capacity)
            numbers = np.empty(k, dtype=np.int64)
            for s in range(groups[g], groups[g + 1]):
                if sizes[s] < 0:
                    continue
                buf = streams[starts[s]:starts[s] + sizes[s]]
                ok = _decode_sequence(buf, offsets[s], offsets[s + 1], k, vocab, ranked,
                                      stored_ids, recur, floor, dist, dec, probs, ready, mtf,
                                      table, seen, keys, counts, first, numbers)
                # the encoder's first byte is 0, and the decoder reads exactly what it wrote
                bad[s] = not ok or len(buf) == 0 or buf[0] != 0 or dec[rc.D_POS] != sizes[s]

    return encode_kernel, decode_kernel


def _compiled() -> SimpleNamespace:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = compile_kernels(_kernels)
    return _KERNELS


def groups_of(offsets: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Sequence boundaries splitting ``offsets``' sequences into about 4 groups per thread
    of similar row counts (the kernels' unit of parallel work)."""
    if threads is None:
        import numba

        threads = numba.get_num_threads()
    n_seq = len(offsets) - 1
    want = max(1, min(n_seq, 4 * threads))
    cuts = np.searchsorted(offsets[:-1], np.linspace(0, offsets[-1], want + 1)[1:-1])
    return np.unique(np.concatenate([[0], cuts, [n_seq]])).astype(np.int64)


def encode(raw: dict[str, np.ndarray], stored_ids: np.ndarray, recur: np.ndarray,
           codes: np.ndarray, offsets: np.ndarray, width: int, vocab_size: int, *,
           ranked: bool) -> np.ndarray:
    """Each sequence (rows at ``offsets``) range-coded into its share of ``uint8 [n, width]``,
    mode 0 where the stream would be no shorter than q64v3's bytes. ``stored_ids``
    ``[n, k + 1]``, ``recur`` (bool ``[n, k]``) and ``codes`` (stored order) are q64v3's values
    (``reference_codec.encode``) of ids below ``vocab_size``; ``raw`` its stored arrays (in
    :func:`decode`'s ``raw_shapes`` order), for mode 0. ``ranked``: seen ids numbered by
    count, else by first sight."""
    n, k = codes.shape
    offsets = np.asarray(offsets, dtype=np.int64)
    out = np.zeros((n, width), dtype=np.uint8)
    flat = out.reshape(-1)
    floor = codes.max(axis=1, initial=0)
    lengths = np.zeros(len(offsets) - 1, dtype=np.int64)
    max_rows = int(np.diff(offsets).max(initial=0))
    if n and k:
        _compiled().encode(stored_ids.astype(np.int64), recur, floor, floor[:, None] - codes,
                           offsets, groups_of(offsets), width, vocab_size, ranked, max_rows,
                           table_capacity(max_rows, k, vocab_size), flat, lengths)
    row_bytes = sum(a[0].nbytes for a in raw.values()) if n else 0
    if not k:
        lengths[:] = -1
    frame(flat, offsets, width, lengths, row_bytes, lambda lo, hi: raw_rows(raw, lo, hi))
    return out


def decode(streams: np.ndarray, offsets: np.ndarray, k: int, vocab_size: int,
           raw_shapes: dict[str, tuple], *, ranked: bool
           ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray],
                      np.ndarray]:
    """Inverse of :func:`encode` over whole sequences at row ``offsets``: the stored ids,
    recurrence bits (bool) and codes in stored order of the range-coded rows; q64v3's stored
    arrays of the mode-0 rows (``raw_shapes``: each array's dtype and row shape, in
    :func:`encode`'s order); which rows are mode 0. ValueError names a damaged stream (a
    sequence, or a run of them) and its rows in the read."""
    n, width = streams.shape
    flat = np.ascontiguousarray(streams).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64)
    raw = {name: np.zeros((n, *shape), dtype) for name, (dtype, shape) in raw_shapes.items()}
    row_bytes = sum(a[0].nbytes for a in raw.values()) if n else 0
    is_raw = np.zeros(n, dtype=np.bool_)
    starts, sizes, raw_streams = unframe(flat, offsets, width, row_bytes, "topk_stream")
    for lo, hi, body in raw_streams:
        is_raw[lo:hi] = True
        unpack_raw(raw, lo, hi, body)
    stored_ids = np.zeros((n, k + 1), dtype=np.int64)
    recur = np.zeros((n, k), dtype=np.bool_)
    floor = np.zeros(n, dtype=np.int64)
    dist = np.zeros((n, k), dtype=np.int64)
    bad = np.zeros(len(offsets) - 1, dtype=np.bool_)
    max_rows = int(np.diff(offsets).max(initial=0))
    if n and k:
        _compiled().decode(flat, starts, sizes, offsets, groups_of(offsets), k, vocab_size,
                           ranked, max_rows, table_capacity(max_rows, k, vocab_size), stored_ids,
                           recur, floor, dist, bad)
    if bad.any():
        raise damaged("topk_stream", bad, offsets)
    return (stored_ids, recur, floor[:, None] - dist), raw, is_raw
