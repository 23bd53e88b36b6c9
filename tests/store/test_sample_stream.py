"""q64r's draws coded against the top-k (``sample_stream``): exact round trips of the levels
(hypothesis), raw streams for rows the coding cannot take, stores that read as their q64v2
twins, the tail grid's bound, the size it saves, and damaged streams refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.store import CorruptStoreError, StoreError, StoreWriter, open_store, stream_frames
from mtkd.store import q64_grid as grid
from mtkd.store import sample_stream as ss
from mtkd.store import topk_codec as tc
from mtkd.store.format import PARTS_DIR, Header, part_name
from mtkd.store.schema import TEACHER, teacher_header
from mtkd.store.verify import verify_store

from .stores import flip_byte

TOP_LEVEL = 0xFFFF  #: −inf's level at q64's own tail grid


def draw_rows(rng: np.random.Generator, n: int, k: int, m: int, vocab: int
              ) -> dict[str, np.ndarray]:
    """Teacher rows as a harvest writes them: the top-k of a softmax over ``vocab`` ids (a
    noisy power law over a random order of them, as sharp as a language model's) and ``m``
    draws from the whole softmax (distinct ids ascending, counts, the drawn ids' own
    log-probs, then padding)."""
    ranks = np.stack([rng.permutation(vocab) for _ in range(n)])
    logits = -rng.uniform(1, 2, (n, 1)) * np.log1p(ranks) + rng.normal(0, 0.3, (n, vocab))
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-lp, axis=1)[:, :k]
    ids = np.full((n, m), -1, np.int32)
    counts = np.zeros((n, m), np.uint16)
    drawn = np.full((n, m), -np.inf, np.float32)
    for r in range(n):
        u, c = np.unique(rng.choice(vocab, m, p=np.exp(lp[r]) / np.exp(lp[r]).sum()),
                         return_counts=True)
        ids[r, :len(u)], counts[r, :len(u)], drawn[r, :len(u)] = u, c, lp[r, u]
    top = np.take_along_axis(lp, order, axis=1).astype(np.float32)
    return {"topk_ids": order.astype(np.int32), "topk_logprobs": top,
            "target_logprob": top[:, 0], "target_rank": np.ones(n, np.int32),
            "tail_logmass": np.log1p(-np.exp(top.astype(np.float64)).sum(axis=1)).astype(
                np.float32),
            "sample_ids": ids, "sample_counts": counts, "sample_logprobs": drawn}


@st.composite
def drawn_levels(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    """Top-k rows (levels, padding and −inf entries among them) and draws in the coding's
    layout: hits of drawable top-k entries at their levels, other ids at or below the row's
    last drawable level; streams of random lengths."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n, k, m = draw(st.integers(1, 40)), draw(st.integers(1, 12)), draw(st.integers(1, 10))
    vocab = draw(st.sampled_from([k + m, 300, 70_000, 1 << 24, 1 << 30]))
    top_ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    top_levels = rng.integers(0, 3000, (n, k))
    top_ids[rng.random((n, k)) < 0.1] = -1  # padding
    top_levels[rng.random((n, k)) < 0.1] = TOP_LEVEL  # −inf: never drawn
    ids = np.full((n, m), -1)
    counts = np.zeros((n, m), np.int64)
    levels = np.full((n, m), TOP_LEVEL)
    for i in range(n):
        can = (top_ids[i] >= 0) & (top_levels[i] < TOP_LEVEL)
        last = top_levels[i][can].max(initial=0)
        hits = rng.choice(np.flatnonzero(can), min(can.sum(), rng.integers(0, m + 1)),
                          replace=False)
        row = {int(top_ids[i, r]): int(top_levels[i, r]) for r in hits}
        others = np.setdiff1d(np.arange(min(vocab, 10 * (k + m))), top_ids[i])
        for t in rng.choice(others, min(len(others), rng.integers(0, m - len(row) + 1)),
                            replace=False):
            row[int(t)] = int(last + rng.integers(0, 40))
        for j, t in enumerate(sorted(row)):
            ids[i, j], counts[i, j], levels[i, j] = t, rng.integers(1, 1 << 16), row[t]
    cuts = np.sort(rng.choice(np.arange(1, n), rng.integers(0, n), replace=False))
    offsets = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    return top_ids, top_levels, ids, counts, levels, offsets, vocab


@settings(max_examples=60, deadline=None)
@given(drawn_levels())
def test_draws_round_trip_exactly(case: tuple[np.ndarray, ...]) -> None:
    top_ids, top_levels, ids, counts, levels, offsets, vocab = case
    stream = ss.encode(top_ids, top_levels, ids, counts, levels, offsets, TOP_LEVEL)
    assert stream.shape == (len(ids), ss.row_width(ids.shape[1]))
    got = ss.decode(stream, offsets, top_ids, top_levels, TOP_LEVEL, vocab)
    for a, b in zip(got, (ids, counts, levels), strict=True):
        np.testing.assert_array_equal(a, b)
    # the top-k rows in another order within each row give the same stream
    shuffled = np.random.default_rng(0).permuted(np.arange(top_ids.shape[1])[None].repeat(
        len(ids), 0), axis=1)
    again = ss.encode(np.take_along_axis(top_ids, shuffled, 1),
                      np.take_along_axis(top_levels, shuffled, 1), ids, counts, levels,
                      offsets, TOP_LEVEL)
    np.testing.assert_array_equal(again, stream)


def test_rows_the_coding_cannot_take_are_stored_raw_and_read_back() -> None:
    """A draw of a top-k id at another level, an outside draw above the last top-k level,
    ids out of order, repeated, a count of 0: each row's stream is raw, and exact."""
    top_ids = np.array([[5, 9, 2]] * 6)
    top_levels = np.array([[10, 20, 30]] * 6)
    cases = [([9, -1], [1, 0], [21, TOP_LEVEL]), ([7, -1], [2, 0], [29, TOP_LEVEL]),
             ([9, 5], [1, 1], [20, 10]), ([7, 7], [1, 1], [40, 40]), ([9, -1], [0, 0], [20, 0]),
             ([-1, 9], [0, 1], [TOP_LEVEL, 20])]
    good = ([5, 7], [3, 4], [10, 31])
    for bad in cases:
        rows = np.array([good, bad])
        ids, counts, levels = rows[:, 0], rows[:, 1], rows[:, 2]
        offsets = np.array([0, 1, 2])
        stream = ss.encode(top_ids[:2], top_levels[:2], ids, counts, levels, offsets, TOP_LEVEL)
        assert stream[0, 0] == stream_frames.CODED and stream[1, 0] == stream_frames.RAW, bad
        got = ss.decode(stream, offsets, top_ids[:2], top_levels[:2], TOP_LEVEL, 100)
        for a, b in zip(got, (ids, counts, levels), strict=True):
            np.testing.assert_array_equal(a, b)


def write(root: Path, parts: list[dict[str, np.ndarray]], coding: str, vocab: int,
          lengths: list[int], **kw: object) -> Path:
    k, m = parts[0]["topk_ids"].shape[1], parts[0]["sample_ids"].shape[1]
    header = teacher_header(len(parts), k, {"vocab_size": vocab}, num_samples=m,
                            logprob_dtype=coding, **kw)
    writer = StoreWriter(root, header)
    for p, rows in enumerate(parts):
        with writer.open_part(p) as pw:
            pw.append(rows, lengths, (p << 32) + np.arange(len(lengths)))
    assert writer.finalize() and verify_store(root) == []
    return root


@pytest.mark.parametrize("stream_rows", [0, 9])
def test_a_store_with_draws_reads_as_its_q64v2_twin(tmp_path: Path, stream_rows: int) -> None:
    """Drawn rows written as q64v2 and as q64r: every array the same, read by part, in any
    sequence order with repeats, the draws alone; the draws really coded (not raw)."""
    rng = np.random.default_rng(5)
    vocab, lengths = 3000, [6, 0, 9, 1]
    parts = [draw_rows(rng, sum(lengths), 16, 24, vocab) for _ in range(2)]
    v2 = open_store(write(tmp_path / "v2", parts, tc.Q64V2, vocab, lengths), TEACHER)
    r = open_store(write(tmp_path / "r", parts, tc.Q64R, vocab, lengths,
                         stream_rows=stream_rows, code_scalars=False), TEACHER)
    header = json.loads((tmp_path / "r" / "store.json").read_text())
    assert header["schema_version"] == 6 and header["attrs"][tc.SAMPLE_CODING_ATTR] == tc.Q64R
    assert sorted(r.array_names) == sorted(v2.array_names)
    stream = r._parts[0].slice(tc.SAMPLE_STREAM, 0, r._parts[0].num_rows)
    assert stream[0, 0] == stream_frames.CODED
    for p in range(2):
        a, b = v2.read_part(p), r.read_part(p)
        for name in a.arrays:
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 0, 2, 2, 5]):
        for names in (None, list(tc.SAMPLE_COLUMNS), ["sample_counts", "topk_ids"]):
            a, b = v2.read(order, names), r.read(order, names)
            assert sorted(b.arrays) == sorted(a.arrays)
            for name in a.arrays:
                np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_draws_on_a_coarse_tail_keep_the_bound_and_shrink_the_store(tmp_path: Path) -> None:
    """On the 1/4-nat tail the draws' log-probs are within 1/128 nat where p ≥ 1e-3 and 1/8
    below, a drawn top-k id's the same as its top-k value; the draws take well under half the
    bytes q64v2's sampled columns take."""
    rng = np.random.default_rng(6)
    vocab, lengths = 70_000, [64] * 4
    parts = [draw_rows(rng, sum(lengths), 32, 64, vocab)]
    write(tmp_path / "v2", parts, tc.Q64V2, vocab, lengths)
    r = open_store(write(tmp_path / "r", parts, tc.Q64R, vocab, lengths, tail_step=4), TEACHER)
    got, rows = r.read_part(0), parts[0]
    np.testing.assert_array_equal(got["sample_ids"], rows["sample_ids"])
    np.testing.assert_array_equal(got["sample_counts"], rows["sample_counts"])
    want, lp = rows["sample_logprobs"].astype(np.float64), got["sample_logprobs"]
    real = rows["sample_ids"] >= 0
    err = np.abs(lp[real] - want[real])
    assert err[want[real] >= np.log(1e-3)].max() <= grid.FINE_ERROR
    assert err.max() <= 4 * grid.COARSE_ERROR
    for i in range(len(lp)):
        top = dict(zip(got["topk_ids"][i].tolist(), got["topk_logprobs"][i].tolist(),
                       strict=True))
        for t, v in zip(got["sample_ids"][i][real[i]].tolist(), lp[i][real[i]].tolist(),
                        strict=True):
            assert t not in top or top[t] == v

    def nbytes(root: Path, names: tuple[str, ...]) -> int:
        return sum(f.stat().st_size for n in names
                   for f in (root / PARTS_DIR / part_name(0) / n).rglob("*") if f.is_file())

    sampled = nbytes(tmp_path / "v2", tc.SAMPLE_COLUMNS)
    assert nbytes(tmp_path / "r", (tc.SAMPLE_STREAM,)) < 0.5 * sampled


def test_a_damaged_sample_stream_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    lengths = [20, 20]
    root = write(tmp_path / "t", [draw_rows(rng, 40, 8, 16, 500)], tc.Q64R, 500, lengths)
    chunk = next(p for p in (root / PARTS_DIR / part_name(0) / tc.SAMPLE_STREAM).rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    flip_byte(chunk)
    with pytest.raises(StoreError, match=tc.SAMPLE_STREAM):
        open_store(root, TEACHER, verify="full")


def test_damaged_streams_with_a_valid_crc_are_refused_or_decode_in_bounds() -> None:
    """Streams whose bytes were changed and their CRC re-sealed: every decode refuses them
    or returns draws a row can hold, never reads or writes out of bounds."""
    rng = np.random.default_rng(8)
    rows = draw_rows(rng, 30, 8, 16, 400)
    top_levels = grid.tail_levels(grid.quantise(rows["topk_logprobs"]), 1)
    levels = grid.tail_levels(grid.quantise(rows["sample_logprobs"]), 1)
    offsets = np.array([0, 30])
    stream = ss.encode(rows["topk_ids"], top_levels, rows["sample_ids"], rows["sample_counts"],
                       levels, offsets, TOP_LEVEL)
    length = int(stream.reshape(-1)[1:5].view("<u4")[0])
    refused = 0
    for trial in range(300):
        bad = stream.copy()
        flat = bad.reshape(-1)
        at = stream_frames.HEAD + rng.integers(0, length)
        flat[at] ^= 1 << (trial % 8)
        stream_frames._head(flat[:30 * bad.shape[1]], stream_frames.CODED,
                            flat[stream_frames.HEAD:stream_frames.HEAD + length])
        try:
            ids, counts, _ = ss.decode(bad, offsets, rows["topk_ids"], top_levels, TOP_LEVEL,
                                       400)
        except ValueError:
            refused += 1
            continue
        assert ((ids >= -1) & (ids < 400)).all() and (counts[ids < 0] == 0).all()
    assert refused > 200


def test_the_header_names_the_coding_and_its_version() -> None:
    header = teacher_header(1, 8, {"vocab_size": 100}, num_samples=4, logprob_dtype=tc.Q64R,
                            code_scalars=False)
    assert header.schema_version == 6 and header.attrs[tc.SAMPLE_CODING_ATTR] == tc.Q64R
    assert tc.SAMPLE_STREAM in [a.name for a in header.arrays]
    assert [a.name for a in header.written_arrays if a.name.startswith("sample")] == list(
        tc.SAMPLE_COLUMNS)
    no_draws = teacher_header(1, 8, {"vocab_size": 100}, logprob_dtype=tc.Q64R,
                              code_scalars=False)
    assert no_draws.schema_version == 5 and tc.SAMPLE_CODING_ATTR not in no_draws.attrs
    obj = header.to_json()
    obj["schema_version"] = 5  # what an mtkd that cannot read the coding would take it for
    with pytest.raises(StoreError, match="sample_coding needs schema version 6"):
        Header.from_json(obj, Path("x"))
    obj = teacher_header(1, 8, {"vocab_size": 100}, num_samples=4,
                         logprob_dtype=tc.Q64V2).to_json()
    obj["attrs"][tc.SAMPLE_CODING_ATTR] = tc.Q64R
    obj["schema_version"] = 6
    with pytest.raises(StoreError, match="only with topk_coding 'q64r'"):
        Header.from_json(obj, Path("x"))


def test_the_writer_refuses_draws_q64v2_would_refuse(tmp_path: Path) -> None:
    """Rows of the wrong shape, counts out of range, ids out of order or outside the
    vocabulary: refused before anything is written, as q64v2 refuses them; a top-k id listed
    twice is stored raw by the codec, exactly."""
    rows = draw_rows(np.random.default_rng(9), 4, 4, 6, 50)
    header = teacher_header(1, 4, {"vocab_size": 50}, num_samples=6, logprob_dtype=tc.Q64R)
    bad = {"shape": {"sample_counts": rows["sample_counts"][:, :2]},
           "counts outside": {"sample_counts": np.full((4, 6), 300)},
           "ascending": {"sample_ids": np.tile([[5, 3, -1, -1, -1, -1]], (4, 1))},
           "outside vocab_size": {"sample_ids": np.tile([[2, 60, -1, -1, -1, -1]], (4, 1))},
           "sampled rows for": {k: v[:3] for k, v in rows.items() if k.startswith("sample")}}
    for why, change in bad.items():
        writer = StoreWriter(tmp_path / why, header)
        with pytest.raises(StoreError, match=why if why != "shape" else "must all be"), \
                writer.open_part(0) as pw:
            pw.append(rows | change, [4], [0])
        assert not writer.finalize()
    top_ids, top_levels = np.array([[7, 10, 7]]), np.array([[5, 5, 5]])
    ids, counts, levels = np.array([[7, 10]]), np.array([[1, 2]]), np.array([[5, 5]])
    stream = ss.encode(top_ids, top_levels, ids, counts, levels, np.array([0, 1]), TOP_LEVEL)
    assert stream[0, 0] == stream_frames.RAW
    for a, b in zip(ss.decode(stream, np.array([0, 1]), top_ids, top_levels, TOP_LEVEL, 50),
                    (ids, counts, levels), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("column", [tc.STREAM, tc.SAMPLE_STREAM])
def test_a_damaged_stream_read_unverified_names_its_store_part_and_sequences(
        tmp_path: Path, column: str) -> None:
    """A read that skips the checksums (``verify="size"``, what jobs use) still refuses a
    damaged stream, as a CorruptStoreError naming the store, the part and the sequences."""
    rng = np.random.default_rng(9)
    parts = [draw_rows(rng, 40, 8, 16, 500) for _ in range(2)]
    root = write(tmp_path / "t", parts, tc.Q64R, 500, [20, 20])
    chunk = next(p for p in (root / PARTS_DIR / part_name(1) / column).rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    flip_byte(chunk)
    store = open_store(root, TEACHER, verify="size")
    for read in (lambda: store.read_part(1), lambda: store.read([2, 3])):
        with pytest.raises(CorruptStoreError, match=rf"{root}: part 1, sequence ids \d+\.\.\d+: "
                                                    rf"{column}: stream \d of the read"):
            read()
    assert store.read_part(0)["topk_ids"].shape == (40, 8)  # the other part reads
