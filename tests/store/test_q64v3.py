"""The q64v3 coding: top-k ids coded against the latest earlier row of the sequence with the
same top-1 id. Round trips against q64v2 (same grid, same rank order, same ties) whatever the
rows, sequences and vocabulary; stores written with it read back through every read path; a
damaged recurrence chunk is caught; and on rows that share their candidates it is smaller."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtkd.store import StoreError, StoreWriter, open_store, verify_store
from mtkd.store import q64_grid as grid
from mtkd.store import reference_codec as rc
from mtkd.store import topk_codec as tc
from mtkd.store.format import PARTS_DIR, part_name
from mtkd.store.schema import TEACHER, teacher_header

from .stores import flip_byte
from .test_q64v2 import VOCABS, write_teacher
from .test_topk_codec import assert_decoded, by_id, topk_rows

#: a few log-probs, so that quantised codes tie often (ties are where rank order is subtle)
FEW_VALUES = np.array([0.0, -0.25, -0.25 - 1e-4, -1.0, -3.5, -7.0, -30.0, -np.inf])


@st.composite
def sequences(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows that often share their top-1 id and many candidates (references happen), padding,
    tied codes, −inf; split into sequences: ``ids, logprobs, lengths, vocab``."""
    vocab = draw(st.sampled_from([3, 12, 300, 70_000, 2**24]))
    k = draw(st.integers(1, min(vocab, 12)))
    n = draw(st.integers(0, 14))
    pool = draw(st.lists(st.integers(0, vocab - 1), min_size=k, max_size=k + 6, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = np.full((n, k), -1, dtype=np.int32)
    lp = np.full((n, k), -np.inf)
    for r in range(n):
        real = k - (int(rng.integers(0, k + 1)) if rng.random() < 0.2 else 0)
        ids[r, :real] = rng.choice(pool, real, replace=False)
        lp[r, :real] = -np.sort(-rng.choice(FEW_VALUES[:-1], real)) if rng.random() < 0.5 \
            else -np.sort(rng.exponential(2.0, real))
        if rng.random() < 0.1:  # padding with finite log-probs: a top-1 id may be −1
            lp[r] = -np.sort(rng.exponential(2.0, k))
    cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 4))))
    lengths = np.diff(np.concatenate([[0], cuts, [n]]))
    return ids, lp, lengths, vocab


def round_trip(ids: np.ndarray, lp: np.ndarray, lengths: np.ndarray, vocab: int
               ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    coded = tc.encode_referenced(ids, lp, lengths, vocab_size=vocab)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    got_ids, got_lp = tc.decode_referenced(coded, offsets)
    return coded, got_ids, got_lp


@given(rows=sequences())
def test_round_trip_is_q64v2s_rows(rows) -> None:
    """Exactly what q64v2 decodes (ids, values, rank order, ties), and re-encoding what was
    decoded gives the same bytes."""
    ids, lp, lengths, vocab = rows
    coded, got_ids, got_lp = round_trip(ids, lp, lengths, vocab)
    n, k = ids.shape
    assert coded[tc.IDS].shape == (n, tc.delta_width(vocab), k + 1)
    assert coded[tc.RECUR].shape == (n, rc.recur_bytes(k))
    assert coded[tc.LOGPROBS].shape == (n, 2, k + 1)
    assert_decoded(ids, lp, got_ids, got_lp)
    want_ids, want_lp = tc.decode(*tc.encode(ids, lp, vocab_size=vocab, coding=tc.Q64V2),
                                  tc.Q64V2)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_lp, want_lp)
    np.testing.assert_array_equal(tc.decode_logprobs(coded[tc.LOGPROBS], tc.Q64V3), got_lp)
    again = tc.encode_referenced(got_ids, got_lp, lengths, vocab_size=vocab)
    for name, planes in coded.items():
        np.testing.assert_array_equal(again[name], planes)


@given(rows=topk_rows(vocabs=tuple(VOCABS)))
def test_any_top_k_rows_round_trip_as_one_sequence(rows) -> None:
    """Any rows, long ones (k up to 70) included, as one sequence."""
    ids, lp, vocab = rows
    _, got_ids, got_lp = round_trip(ids, lp, np.array([len(ids)]), vocab)
    assert_decoded(ids, lp, got_ids, got_lp)


@given(rows=sequences(), seed=st.integers(0, 2**32 - 1))
def test_an_id_table_renumbers_and_restores_every_id(rows, seed: int) -> None:
    ids, lp, lengths, vocab = rows
    rng = np.random.default_rng(seed)
    table = rng.permutation(min(vocab, 10_000))[: rng.integers(1, 20)].tolist()
    attrs = {"vocab_size": vocab, "topk_coding": tc.Q64V3, "topk_id_table": table}
    coded = tc.encode_rows({tc.IDS: ids, tc.LOGPROBS: lp}, attrs, lengths)
    got = tc.decode_rows(dict(coded), attrs, np.concatenate([[0], np.cumsum(lengths)]))
    assert set(got) == {tc.IDS, tc.LOGPROBS}
    assert_decoded(ids, lp, got[tc.IDS], got[tc.LOGPROBS])


def test_references_stay_inside_their_sequence_and_follow_the_top_1() -> None:
    top1 = np.array([7, 3, 7, 7, 3, 7, -1, -1])
    np.testing.assert_array_equal(rc.references(top1, np.array([3, 5])),
                                  [-1, -1, 0, -1, -1, 3, -1, -1])
    # rows 1 and 2 share the top-1 id 5 and two more ids: row 2 stores one new id
    ids = np.array([[5, 1, 2, 3], [5, 8, 9, 2], [5, 9, 2, 4]])
    lp = np.log(np.array([[0.4, 0.3, 0.2, 0.1]] * 3))
    coded = tc.encode_referenced(ids, lp, np.array([1, 2]), vocab_size=10)
    stored = tc.from_planes(coded[tc.IDS])
    np.testing.assert_array_equal(stored[:, 0], [6, 6, 6])  # each row's top-1 id + 1
    # row 2 against row 1 (rank order 5, 8, 9, 2): 5, 9 and 2 recur, 4 is new (gap 4 + 1)
    bits = np.unpackbits(coded[tc.RECUR], axis=1, count=4, bitorder="little")
    np.testing.assert_array_equal(bits, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    np.testing.assert_array_equal(stored[2, 1:], [5, 0, 0, 0])
    # row 1 is the first of its sequence: no reference, every id new (2, 5, 8, 9)
    np.testing.assert_array_equal(stored[1, 1:], [3, 3, 3, 1])


def test_refused_input() -> None:
    ids, lp = np.array([[1, 2]]), np.array([[-0.1, -2.0]])
    with pytest.raises(ValueError, match="lengths sum to 2, not 1 rows"):
        tc.encode_referenced(ids, lp, np.array([2]), vocab_size=5)
    with pytest.raises(ValueError, match="distinct in each row"):
        tc.encode_referenced(np.array([[5, 5, 7], [5, 8, 9]]), np.log([[0.5, 0.3, 0.1]] * 2),
                             np.array([2]), vocab_size=10)
    with pytest.raises(ValueError, match=r"outside \[-1, 254\]"):
        tc.encode_referenced(np.array([[1, 300]]), lp, np.array([1]), vocab_size=5)
    attrs = {"topk_coding": tc.Q64V3, "vocab_size": 5}
    with pytest.raises(ValueError, match="lengths are needed"):
        tc.encode_rows({tc.IDS: ids, tc.LOGPROBS: lp}, attrs)
    coded = tc.encode_rows({tc.IDS: ids, tc.LOGPROBS: lp}, attrs, np.array([1]))
    with pytest.raises(ValueError, match="offsets are needed"):
        tc.decode_rows(dict(coded), attrs)


def test_a_store_reads_as_its_q64v2_twin(tmp_path: Path) -> None:
    """The same rows written as q64v2 and q64v3: every read path gives the same arrays, in any
    sequence order, with repeats, and with the log-probs or ids read alone."""
    v2 = write_teacher(tmp_path / "v2", tc.Q64V2)
    v3 = write_teacher(tmp_path / "v3", tc.Q64V3)
    for a, b in zip(v2, v3, strict=True):
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
    arrays = json.loads((tmp_path / "v3" / "store.json").read_text())["arrays"]
    assert arrays["topk_ids"]["row_shape"] == [3, 9]  # 70,000 ids: 3 bytes; k + 1 values
    assert arrays["topk_recur"] == {"codec": "zstd", "dtype": "uint8", "row_shape": [1]}
    s2, s3 = open_store(tmp_path / "v2", TEACHER), open_store(tmp_path / "v3", TEACHER)
    for order in ([0, 1, 2, 3, 4, 5], [5, 0, 2, 2, 1]):
        r2, r3 = s2.read(order), s3.read(order)
        for name in r2.arrays:
            np.testing.assert_array_equal(r3[name], r2[name], err_msg=name)
    for names in (["topk_logprobs"], ["topk_ids"], ["sample_ids", "topk_ids"]):
        got = s3.read([4, 1], names)
        assert list(got.arrays) == names
        for name in names:
            np.testing.assert_array_equal(got[name], s2.read([4, 1], names)[name])


def test_a_damaged_recurrence_chunk_is_caught(tmp_path: Path) -> None:
    write_teacher(tmp_path / "t", tc.Q64V3)
    assert verify_store(tmp_path / "t") == []
    chunk = next(p for p in (tmp_path / "t" / PARTS_DIR / part_name(1) / tc.RECUR).rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    flip_byte(chunk)
    with pytest.raises(StoreError, match=tc.RECUR):
        open_store(tmp_path / "t", TEACHER, verify="full")


def teacher_like_sizes(root: Path, codings: tuple[str, ...], lengths: tuple[int, ...] = (2048,) * 2,
                       stream_rows: int = 0) -> dict[str, int]:
    """Rows drawn around a few 'contexts' (each its own top-1 and candidate set, as a real
    teacher's rows are) in sequences of ``lengths`` written with each coding (checked, read
    back by id; q64r with ``stream_rows``): the bytes of each store's top-k arrays."""
    rng = np.random.default_rng(0)
    vocab, k, n = 50_000, 64, 4096
    contexts = [rng.choice(vocab, 96, replace=False) for _ in range(40)]
    ids = np.empty((n, k), dtype=np.int32)
    for r in range(n):
        c = contexts[rng.integers(len(contexts))]
        ids[r] = np.concatenate([c[:1], rng.choice(c[1:], k - 1, replace=False)])
    lp = -np.sort(rng.exponential(1.5, (n, k)), axis=1).astype(np.float32)
    sizes = {}
    for coding in codings:
        header = teacher_header(1, k, {"vocab_size": vocab}, logprob_dtype=coding,
                                stream_rows=stream_rows if coding == tc.Q64R else 0)
        writer = StoreWriter(root / coding, header)
        rows = {"topk_ids": ids, "topk_logprobs": lp, "target_logprob": lp[:, 0],
                "target_rank": np.ones(n, np.int32),
                "tail_logmass": np.full(n, -3.0, np.float32)}
        with writer.open_part(0) as pw:
            pw.append(rows, list(lengths), np.arange(len(lengths)))
        assert writer.finalize() and verify_store(root / coding) == []
        sizes[coding] = sum(f.stat().st_size for f in (root / coding).rglob("*")
                            if f.is_file() and "topk" in str(f))
        batch = open_store(root / coding, TEACHER).read_part(0)
        assert by_id(batch["topk_ids"], batch["topk_logprobs"]) == by_id(
            ids, grid.dequantise(grid.quantise(lp)))
    return sizes


def test_smaller_than_q64v2_when_rows_share_candidates(tmp_path: Path) -> None:
    """On teacher-like rows q64v3 stores the top-k columns in fewer bytes than q64v2."""
    sizes = teacher_like_sizes(tmp_path, (tc.Q64V2, tc.Q64V3))
    assert sizes[tc.Q64V3] < 0.9 * sizes[tc.Q64V2], sizes
