"""The q64r coding: q64v3's values range-coded, one stream per sequence or per group of
sequences. Round trips give q64v2's rows exactly whatever the rows, sequences and vocabulary;
a coarser tail keeps the bound where p ≥ 1e-3 and its own below; the range coder decodes what
it coded; stores read back through every read path, streams over several sequences too;
damaged streams are refused; and it is smaller than q64v3."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.store import StoreError, StoreWriter, open_store, stream_frames
from mtkd.store import q64_grid as grid
from mtkd.store import range_coder as rc
from mtkd.store import stream_codec as sc
from mtkd.store import topk_codec as tc
from mtkd.store.format import PARTS_DIR, Header, part_name
from mtkd.store.schema import TEACHER, teacher_header

from .stores import assert_reads_alike, flip_byte
from .test_q64v2 import VOCABS, sampled_teacher_rows, write_teacher
from .test_q64v3 import sequences, teacher_like_sizes
from .test_topk_codec import assert_decoded, topk_rows


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def streamed(ids: np.ndarray, lp: np.ndarray, lengths: np.ndarray, vocab: int,
             tail_step: int = 1, by_count: bool = True
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stream = tc.encode_streamed(ids, lp, lengths, vocab_size=vocab, tail_step=tail_step,
                                by_count=by_count)
    got = tc.decode_streamed(stream[tc.STREAM], offsets_of(lengths), k=ids.shape[1],
                             vocab_size=vocab, tail_step=tail_step, by_count=by_count)
    return stream[tc.STREAM], *got


@given(rows=sequences(), by_count=st.booleans())
def test_round_trip_is_q64v2s_rows(rows, by_count: bool) -> None:
    """Exactly what q64v2 decodes (ids, values, rank order, ties), whether a sequence is
    range-coded or, too short for its stream to fit, stored as q64v3's bytes; seen ids
    numbered by count or, as older stores, by first sight."""
    ids, lp, lengths, vocab = rows
    stream, got_ids, got_lp = streamed(ids, lp, lengths, vocab, by_count=by_count)
    n, k = ids.shape
    assert stream.shape == (n, sc.row_width(k, tc.delta_width(vocab)))
    assert_decoded(ids, lp, got_ids, got_lp)
    want_ids, want_lp = tc.decode(*tc.encode(ids, lp, vocab_size=vocab, coding=tc.Q64V2),
                                  tc.Q64V2)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_lp, want_lp)


@given(rows=sequences(), step=st.sampled_from(tc.TAIL_STEPS))
def test_a_coarse_tail_keeps_the_bound_above_1e_3(rows, step: int) -> None:
    """Each id keeps its value on the fine grid (p ≥ 1e-3: q64's |error| ≤ 1/128) and is
    within step/32 nat of its log-prob below it (down to the grid's last value, ≈ −4075; −inf
    stays −inf)."""
    ids, lp, lengths, vocab = rows
    lp = np.where(lp <= -20, lp * 135.84, lp)  # -30: -4075.2, past the last value
    _, got_ids, got_lp = streamed(ids, lp, lengths, vocab, step)
    for r in range(len(ids)):
        real = ids[r] >= 0
        want = dict(zip(ids[r][real].tolist(), np.asarray(lp[r][real]).tolist(), strict=True))
        got = dict(zip(got_ids[r].tolist(), got_lp[r].tolist(), strict=True))
        assert set(got) - {-1} == set(want)
        for token, value in want.items():
            if value >= -grid.FINE_MAX / grid.FINE:
                assert abs(got[token] - value) <= grid.FINE_ERROR + 1e-9
            elif np.isneginf(value):
                assert np.isneginf(got[token])
            else:
                assert abs(got[token] - max(value, grid.tail_floor(step))) <= step / 32 + 1e-6
        assert (got_lp[r][:-1] >= got_lp[r][1:]).all()  # rank order


@numba.njit(cache=True)
def _code_all(bits, values, out, probs):
    enc = np.zeros(rc.ENC_STATE, np.int64)
    rc.encoder_init(enc)
    for i in range(len(bits)):
        rc.encode_bit(enc, out, probs, bits[i, 0], bits[i, 1])
    for i in range(len(values)):
        rc.encode_uint(enc, out, probs, values[i, 0], values[i, 1])
    return rc.encoder_flush(enc, out)


@numba.njit(cache=True)
def _decode_all(buf, bits, values, probs):
    dec = np.zeros(rc.DEC_STATE, np.int64)
    rc.decoder_init(dec, buf, 0)
    got_bits = np.empty(len(bits), np.int64)
    got_values = np.empty(len(values), np.int64)
    for i in range(len(bits)):
        got_bits[i] = rc.decode_bit(dec, buf, probs, bits[i, 0])
    for i in range(len(values)):
        got_values[i] = rc.decode_uint(dec, buf, probs, values[i, 0])
    return got_bits, got_values


@given(bits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1)), max_size=300),
       values=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**39 - 1)), max_size=200))
def test_the_range_coder_decodes_what_it_coded(bits, values) -> None:
    """Adaptive bits and Elias-gamma integers in any mix of contexts, the carry included."""
    b = np.array(bits, dtype=np.int64).reshape(-1, 2)
    v = np.array(values, dtype=np.int64).reshape(-1, 2)
    out = np.zeros(16 + 8 * len(v) + len(b), np.uint8)
    size = _code_all(b, v, out, rc.new_probs(4))
    assert size <= len(out)
    got_bits, got_values = _decode_all(out[:size], b, v, rc.new_probs(4))
    np.testing.assert_array_equal(got_bits, b[:, 1])
    np.testing.assert_array_equal(got_values, v[:, 1])


@given(rows=topk_rows(vocabs=tuple(VOCABS)), by_count=st.booleans())
def test_any_top_k_rows_round_trip_as_one_sequence(rows, by_count: bool) -> None:
    """Any rows, long ones (k up to 70) included, as one sequence."""
    ids, lp, vocab = rows
    _, got_ids, got_lp = streamed(ids, lp, np.array([len(ids)]), vocab, by_count=by_count)
    assert_decoded(ids, lp, got_ids, got_lp)


@given(sightings=st.lists(st.integers(0, 40), max_size=400))
def test_ranking_keeps_the_seen_ids_in_count_order(sightings: list[int]) -> None:
    """After any sightings, numbers run over the ids seen, most counted first, each id's
    count exact, and the seen-id table, numbers and counts agree (what both sides of the coder
    rebuild alike)."""
    capacity = sc.table_capacity(len(sightings) + 1, 1, 41)
    table = np.full((capacity, 2), -1, np.int64)
    seen = np.full((capacity, 2), 7, np.int64)  # stale values of an earlier sequence
    counts = np.full(capacity, 3, np.int64)
    first = np.full(len(sightings) + 2, 5, np.int64)

    def sight_all(tokens: list[int]) -> int:
        count = 0
        for token in tokens:
            count = sc._rank(table, seen, counts, first, count, token)
        return count

    sc._forget(table, seen, sight_all(sightings[::-1]))  # an earlier sequence's state, reused
    count = sight_all(sightings)
    want = {t: sightings.count(t) for t in set(sightings)}
    assert count == len(want)
    assert {int(seen[n, 0]): int(counts[n]) for n in range(count)} == want
    assert (np.diff(counts[:count]) <= 0).all()
    for n in range(count):
        assert sc._number_of(table, seen[n, 0]) == n and table[seen[n, 1], 0] == seen[n, 0]
        assert first[counts[n]] == np.argmax(counts[:count] == counts[n])


def golden_rows() -> tuple[np.ndarray, np.ndarray, int]:
    """300 rows of 8 distinct draws of a Zipf law over 500 ids (stable across numpy versions:
    only ``random`` and ``exponential`` draws)."""
    rng = np.random.default_rng(5)
    vocab, k, n = 500, 8, 300
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** 1.1)
    ids = np.empty((n, k), np.int32)
    for r in range(n):
        row: list[int] = []
        while len(row) < k:
            token = int(np.searchsorted(cdf, rng.random() * cdf[-1]))
            if token not in row:
                row.append(token)
        ids[r] = row
    return ids, -np.sort(rng.exponential(2.0, (n, k)), axis=1), vocab


@pytest.mark.parametrize(("by_count", "digest"), [
    (False, "4aa0b2bf94ef2a613ad038dd2fc8b424b1779b9a666316dc99ba58089db11a21"),
    (True, "dd6fe329f74859ef605d42b20291fdee23fddbe69a84ac2ae102ec175554514c")])
def test_stream_bytes_are_pinned(by_count: bool, digest: str) -> None:
    """The bytes of both numberings on fixed rows: first sight's as the coder wrote them before
    ranking by count (a956716), so stores of either kind keep reading."""
    ids, lp, vocab = golden_rows()
    stream, got_ids, got_lp = streamed(ids, lp, np.array([120, 180]), vocab, by_count=by_count)
    assert_decoded(ids, lp, got_ids, got_lp)
    assert hashlib.sha256(stream.tobytes()).hexdigest() == digest


@pytest.mark.parametrize("rank_ids", [True, False])
def test_a_store_ranks_ids_as_its_header_says(tmp_path: Path, rank_ids: bool) -> None:
    """A store's stream is the one its header's numbering writes (not only one that reads
    back), and refused as damaged when decoded with the other numbering."""
    ids, lp, vocab = golden_rows()
    header = teacher_header(1, ids.shape[1], {"vocab_size": vocab}, logprob_dtype=tc.Q64R,
                            rank_ids=rank_ids)
    rows = {"topk_ids": ids, "topk_logprobs": lp.astype(np.float32),
            "target_logprob": lp[:, 0].astype(np.float32),
            "target_rank": np.ones(len(ids), np.int32),
            "tail_logmass": np.full(len(ids), -3.0, np.float32)}
    writer = StoreWriter(tmp_path / "t", header)
    with writer.open_part(0) as pw:
        pw.append(rows, [120, 180], np.arange(2))
    assert writer.finalize()
    import zarr

    stored = zarr.open_array(tmp_path / "t" / PARTS_DIR / part_name(0) / tc.STREAM, mode="r")[:]
    want = tc.encode_streamed(ids, lp, np.array([120, 180]), vocab_size=vocab,
                              by_count=rank_ids)[tc.STREAM]
    np.testing.assert_array_equal(stored, want)
    offsets = np.array([0, 120, 300])
    want_ids = tc.decode_streamed(want, offsets, k=8, vocab_size=vocab, by_count=rank_ids)[0]
    np.testing.assert_array_equal(open_store(tmp_path / "t").read([1, 0])["topk_ids"],
                                  np.concatenate([want_ids[120:], want_ids[:120]]))
    try:  # the other numbering reads other ids, or a stream it cannot decode
        other = tc.decode_streamed(want, offsets, k=8, vocab_size=vocab, by_count=not rank_ids)
    except ValueError as e:
        assert "cannot hold" in str(e) or "damaged" in str(e), e
    else:
        assert not np.array_equal(other[0], want_ids)


def test_ranking_by_count_is_smaller_on_zipf_rows() -> None:
    """Rows of distinct draws of a Zipf law over a shuffled vocabulary (a large teacher's
    frequent tokens): numbering seen ids by count costs clearly less than by first sight."""
    rng = np.random.default_rng(4)
    vocab, k, n = 20_000, 32, 3000
    law = 1.0 / np.arange(1, vocab + 1) ** 1.1
    shuffle = rng.permutation(vocab)
    ids = np.stack([shuffle[rng.choice(vocab, k, replace=False, p=law / law.sum())]
                    for _ in range(n)]).astype(np.int32)
    lp = -np.sort(rng.exponential(2.0, ids.shape), axis=1)
    sizes = {}
    for by_count in (False, True):
        stream, got_ids, got_lp = streamed(ids, lp, np.array([n]), vocab, by_count=by_count)
        assert_decoded(ids, lp, got_ids, got_lp)
        sizes[by_count] = int(stream[0, 1:5].view("<u4")[0])
    assert sizes[True] < 0.97 * sizes[False], sizes


@pytest.mark.parametrize(("vocab", "k", "lengths"), [(1, 1, [3, 0, 2]), (5, 0, [2, 1]),
                                                     (7, 3, []), (7, 3, [0, 0])])
def test_tiny_vocabularies_no_columns_and_no_rows(vocab: int, k: int, lengths: list) -> None:
    rng = np.random.default_rng(vocab + k)
    n = sum(lengths)
    ids = np.stack([rng.permutation(vocab)[:k] for _ in range(n)] or [np.zeros(k, int)])[:n]
    lp = -np.sort(rng.exponential(1.0, (n, k)), axis=1)
    _, got_ids, got_lp = streamed(ids.astype(np.int32), lp, np.array(lengths, int), vocab)
    assert_decoded(ids, lp, got_ids, got_lp)


def test_a_long_sequence_is_range_coded_and_a_one_row_sequence_may_not_be() -> None:
    """Rows that share candidates (as a teacher's do) cost far less than q64v3's raw bytes; a
    one-row sequence of 8 ids scattered over 2^24 with log-probs spread to −4000 would cost
    more coded than raw (its models had no time to learn), so it is kept as q64v3's bytes."""
    rng = np.random.default_rng(0)
    vocab, k = 1 << 24, 64
    contexts = [rng.choice(50_000, 96, replace=False) for _ in range(40)]
    ids = np.stack([np.concatenate([c[:1], rng.choice(c[1:], k - 1, replace=False)])
                    for c in (contexts[rng.integers(40)] for _ in range(2048))]).astype(np.int32)
    lp = -np.sort(rng.exponential(3.0, ids.shape), axis=1)
    stream, got_ids, got_lp = streamed(ids, lp, np.array([2048]), vocab)
    assert_decoded(ids, lp, got_ids, got_lp)
    assert stream[0, 0] == stream_frames.CODED
    coded = int(stream[0, 1:5].view("<u4")[0])
    assert coded < 0.6 * 2048 * sc.raw_row_bytes(k, 4), coded
    ids = rng.choice(vocab, (2, 8), replace=False).astype(np.int32)
    lp = -np.sort(rng.uniform(0, 4000, ids.shape), axis=1)
    stream, got_ids, got_lp = streamed(ids, lp, np.array([1, 1]), vocab)
    assert_decoded(ids, lp, got_ids, got_lp)
    assert stream[0, 0] == stream[1, 0] == stream_frames.RAW


def test_a_damaged_stream_is_refused() -> None:
    rng = np.random.default_rng(1)
    ids = np.stack([rng.choice(1000, 16, replace=False) for _ in range(300)]).astype(np.int32)
    lp = -np.sort(rng.exponential(1.0, ids.shape), axis=1)
    stream = tc.encode_streamed(ids, lp, np.array([300]), vocab_size=1000)[tc.STREAM]
    assert stream[0, 0] == stream_frames.CODED
    for at, flip in ((40, 0x5A), (0, 1), (0, 0x5A), (2, 0x5A)):  # stream, mode (1 → 0), length
        bad = stream.copy()
        bad.reshape(-1)[at] ^= flip
        with pytest.raises(ValueError, match=r"stream 0 of the read \(rows 0:\d+\) is damaged"):
            tc.decode_streamed(bad, np.array([0, 300]), k=16, vocab_size=1000)


def test_refused_attrs() -> None:
    with pytest.raises(ValueError, match=r"needs attrs\.vocab_size"):
        teacher_header(1, 8, {}, logprob_dtype=tc.Q64R)
    with pytest.raises(ValueError, match="a tail step needs logprob dtype q64r"):
        teacher_header(1, 8, {"vocab_size": 10}, logprob_dtype=tc.Q64V2, tail_step=4)
    with pytest.raises(ValueError, match="topk_tail_step 3"):
        teacher_header(1, 8, {"vocab_size": 10}, logprob_dtype=tc.Q64R, tail_step=3)
    with pytest.raises(ValueError, match="stream rows need logprob dtype q64r"):
        teacher_header(1, 8, {"vocab_size": 10}, logprob_dtype=tc.Q64V2, stream_rows=64)
    with pytest.raises(ValueError, match="topk_stream_rows -1"):
        teacher_header(1, 8, {"vocab_size": 10}, logprob_dtype=tc.Q64R, stream_rows=-1)
    header = teacher_header(1, 8, {"vocab_size": 10}, logprob_dtype=tc.Q64R,
                            code_scalars=False).to_json()
    assert header["schema_version"] == 5
    with pytest.raises(StoreError, match="topk_id_ranking needs schema version 5, not 4"):
        Header.from_json(header | {"schema_version": 4}, Path("x"))
    for attrs in ({tc.ID_RANKING_ATTR: "frequency"},
                  {tc.ID_RANKING_ATTR: tc.BY_COUNT, tc.CODING_ATTR: tc.Q64V2}):
        with pytest.raises(ValueError, match="topk_id_ranking"):
            tc.coding({tc.CODING_ATTR: tc.Q64R, "vocab_size": 10} | attrs)
    with pytest.raises(ValueError, match="do not begin a stream"):
        tc.stream_offsets(np.array([0, 1, 0], np.uint8))
    with pytest.raises(ValueError, match="outside vocab_size 10"):
        tc.encode_streamed(np.array([[3, 12]]), np.array([[-0.1, -2.0]]), np.array([1]),
                           vocab_size=10)


@pytest.mark.parametrize(("rank_ids", "stream_samples", "code_scalars", "version"),
                         [(True, True, True, 7), (True, True, False, 6),
                          (True, False, False, 5), (False, False, False, 2)])
def test_a_store_reads_as_its_q64v2_twin(tmp_path: Path, rank_ids: bool, stream_samples: bool,
                                         code_scalars: bool, version: int) -> None:
    """The same rows written as q64v2 and q64r: every read path gives the same arrays (the
    actual token's log-prob and the tail within their bound once coded against the top-k),
    in any sequence order, with repeats, and with the log-probs or ids read alone; stores
    written before the scalars and the draws were coded against the top-k, and before seen
    ids were ranked, too."""
    v2 = write_teacher(tmp_path / "v2", tc.Q64V2)
    vr = write_teacher(tmp_path / "r", tc.Q64R, rank_ids=rank_ids, stream_samples=stream_samples,
                       code_scalars=code_scalars)
    header = json.loads((tmp_path / "r" / "store.json").read_text())
    assert header["schema_version"] == version
    assert header["attrs"].get(tc.ID_RANKING_ATTR) == (tc.BY_COUNT if rank_ids else None)
    for a, b in zip(v2, vr, strict=True):
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
    arrays = header["arrays"]
    assert set(arrays) >= {"topk_stream", tc.SAMPLE_STREAM if stream_samples else "sample_ids"}
    assert "topk_ids" not in arrays and "topk_logprobs" not in arrays
    assert arrays["topk_stream"]["codec"] == "zstd"
    s2, sr = open_store(tmp_path / "v2", TEACHER), open_store(tmp_path / "r", TEACHER)
    assert sorted(sr.array_names) == sorted(s2.array_names)
    for order in ([0, 1, 2, 3, 4, 5], [5, 0, 2, 2, 1]):
        r2, r3 = s2.read(order), sr.read(order)
        for name in r2.arrays:
            assert_reads_alike(r3[name], r2[name], name, code_scalars)
    for names in (["topk_logprobs"], ["topk_ids"], ["sample_ids", "topk_ids"],
                  ["tail_logmass"], ["target_logprob", "target_rank"]):
        got = sr.read([4, 1], names)
        assert list(got.arrays) == names
        for name in names:
            assert_reads_alike(got[name], s2.read([4, 1], names)[name], name, code_scalars)


def test_a_damaged_stream_chunk_is_caught(tmp_path: Path) -> None:
    write_teacher(tmp_path / "t", tc.Q64R)
    chunk = next(p for p in (tmp_path / "t" / PARTS_DIR / part_name(1) / tc.STREAM).rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    flip_byte(chunk)
    with pytest.raises(StoreError, match=tc.STREAM):
        open_store(tmp_path / "t", TEACHER, verify="full")


def test_smaller_than_q64v3_on_a_teacher_like_store(tmp_path: Path) -> None:
    sizes = teacher_like_sizes(tmp_path, (tc.Q64V3, tc.Q64R))
    assert sizes[tc.Q64R] < 0.85 * sizes[tc.Q64V3], sizes


@given(lengths=st.lists(st.integers(0, 30), max_size=40), rows=st.integers(0, 100))
def test_streams_gather_whole_sequences(lengths: list[int], rows: int) -> None:
    """Every row in exactly one stream, none empty, each but the last ≥ ``rows`` rows, each
    ending where a sequence ends."""
    got = tc.stream_lengths(np.array(lengths, dtype=np.int64), rows)
    assert got.sum() == sum(lengths) and (got > 0).all() and (got[:-1] >= max(rows, 1)).all()
    assert set(np.cumsum(got).tolist()) <= set(np.cumsum(lengths).tolist())


@settings(max_examples=15, deadline=None)
@given(data=st.data(), stream_rows=st.sampled_from([1, 4, 16, 1000]))
def test_streams_over_several_sequences_read_as_the_q64v2_twin(tmp_path_factory, data,
                                                               stream_rows: int) -> None:
    """Sequences of any lengths (empty ones too) over several appends and parts, written as
    q64v2 and as q64r with streams of ≥ ``stream_rows`` rows: random reads (any order,
    repeats, the top-k columns alone or not at all) and part reads give the same arrays."""
    root = tmp_path_factory.mktemp("streams")
    appends = data.draw(st.lists(st.lists(st.integers(0, 12), max_size=6), min_size=1,
                                 max_size=5))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    k, vocab = 6, 300
    batches = []
    for lengths in appends:
        n = sum(lengths)
        ids = np.argsort(rng.random((n, 40)), axis=1)[:, :k]  # k distinct of 40 ids
        lp = -np.sort(rng.exponential(2.0, (n, k)), axis=1)
        batches.append(({"topk_ids": ids.astype(np.int32), "topk_logprobs": lp.astype(np.float32),
                         "target_logprob": lp[:, 0].astype(np.float32),
                         "target_rank": np.ones(n, np.int32),
                         "tail_logmass": np.full(n, -2.0, np.float32)}, lengths))
    stores = []
    for name, kw in (("v2", {"logprob_dtype": tc.Q64V2}),
                     ("r", {"logprob_dtype": tc.Q64R, "stream_rows": stream_rows})):
        writer = StoreWriter(root / name, teacher_header(2, k, {"vocab_size": vocab}, **kw))
        first = 0
        for part in range(2):
            with writer.open_part(part) as pw:
                for rows, lengths in batches[part::2]:
                    pw.append(rows, lengths, first + np.arange(len(lengths)))
                    first += len(lengths)
        assert writer.finalize()
        stores.append(open_store(root / name, TEACHER, verify="full"))
    s2, sr = stores
    assert sr.attrs[tc.STREAM_ROWS_ATTR] == stream_rows and tc.STREAM_START not in sr.array_names
    for part in range(2):
        a, b = s2.read_part(part), sr.read_part(part)
        for name in a.arrays:
            assert_reads_alike(b[name], a[name], name, scalars_coded=True)
    for _ in range(3):
        order = data.draw(st.lists(st.integers(0, max(s2.num_sequences - 1, 0)), max_size=8)
                          if s2.num_sequences else st.just([]))
        names = data.draw(st.sampled_from([None, ["topk_logprobs"], ["target_rank"],
                                           ["tail_logmass", "target_logprob"]]))
        a, b = s2.read(order, names), sr.read(order, names)
        np.testing.assert_array_equal(b.offsets, a.offsets)
        np.testing.assert_array_equal(b.seq_ids, a.seq_ids)
        assert sorted(b.arrays) == sorted(a.arrays)
        for name in a.arrays:
            assert_reads_alike(b[name], a[name], name, scalars_coded=True)


def test_streams_over_short_sequences_are_smaller(tmp_path: Path) -> None:
    """A teacher-like store in 64 sequences of 64 rows: one stream per ≥ 1,024 rows is
    smaller than one per sequence, because the models keep what they learnt."""
    short = (64,) * 64
    alone = teacher_like_sizes(tmp_path / "alone", (tc.Q64R,), short)[tc.Q64R]
    shared = teacher_like_sizes(tmp_path / "shared", (tc.Q64R,), short, stream_rows=1024)
    assert shared[tc.Q64R] < 0.9 * alone, (shared, alone)


def test_damaged_stream_flags_are_refused_for_their_part_only(tmp_path: Path) -> None:
    """A part whose first row no longer begins a stream: reads of its top-k rows name the part;
    the other part's sequences still read."""
    import zarr

    write_teacher(tmp_path / "t", tc.Q64R, lengths=(3, 0, 4, 2), stream_rows=4,
                  code_scalars=False)
    write_teacher(tmp_path / "v2", tc.Q64V2, lengths=(3, 0, 4, 2))
    flags = zarr.open_array(tmp_path / "t" / PARTS_DIR / part_name(0) / tc.STREAM_START, mode="r+")
    flags[0] = 0
    store = open_store(tmp_path / "t", TEACHER, verify="none")
    with pytest.raises(StoreError, match=f"part 0: {tc.STREAM_START}"):
        store.read([1], ["topk_ids"])
    assert store.read([1], ["target_rank"])["target_rank"].shape == (0,)  # no stream needed
    twin = open_store(tmp_path / "v2", TEACHER)
    for name, values in twin.read([6, 4]).arrays.items():
        np.testing.assert_array_equal(store.read([6, 4])[name], values, err_msg=name)


def test_streams_span_appends(tmp_path: Path) -> None:
    """Sequences appended one at a time (a harvest's engine calls) are held back until they
    fill a stream: the part's files are byte for byte those of one append of them all."""
    lengths = [3, 0, 4, 2, 5, 1, 6, 2]
    rows = sampled_teacher_rows(np.random.default_rng(11), sum(lengths), 8, 6, 3000)
    header = teacher_header(1, 8, {"vocab_size": 3000}, num_samples=6, logprob_dtype=tc.Q64R,
                            stream_rows=6)
    for name, appends in (("whole", [(0, len(lengths))]),
                          ("one-by-one", [(i, i + 1) for i in range(len(lengths))]),
                          ("pairs", [(i, i + 2) for i in range(0, len(lengths), 2)])):
        writer = StoreWriter(tmp_path / name, header)
        with writer.open_part(0) as pw:
            for lo, hi in appends:
                first, last = sum(lengths[:lo]), sum(lengths[:hi])
                pw.append({n: a[first:last] for n, a in rows.items()}, lengths[lo:hi],
                          np.arange(lo, hi), pa.table({"doc": [f"d{i}" for i in range(lo, hi)]}))
        assert writer.finalize()
    part = tmp_path / "whole" / PARTS_DIR / part_name(0)
    files = sorted(p.relative_to(part) for p in part.rglob("*") if p.is_file())
    assert tc.STREAM_START in {f.parts[0] for f in files}
    for other in ("one-by-one", "pairs"):  # (pairs overshoot a stream: the rest waits)
        for f in files:
            assert (part / f).read_bytes() == (tmp_path / other / PARTS_DIR / part_name(0)
                                               / f).read_bytes(), (other, f)
    import zarr

    starts = np.flatnonzero(zarr.open_array(part / tc.STREAM_START, mode="r")[:])
    meta = open_store(tmp_path / "pairs", TEACHER).read_meta()
    assert meta.column("doc").to_pylist() == [f"d{i}" for i in range(len(lengths))]
    assert starts.tolist() == [0, 7, 14, 21]  # streams of 7, 7, 7 and the last 2 rows
