"""The q64v2 coding: top-k rows (codes as distances to the row's floor, ids in as few bytes as
the vocabulary needs) and random-sampling rows; round trips, the error bound, refused input,
and teacher stores using it (old q64 stores still read; a damaged coded chunk is caught)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtkd.store import StoreError, StoreWriter, id_table, open_store, verify_store
from mtkd.store import q64_grid as grid
from mtkd.store import topk_codec as tc
from mtkd.store.format import PARTS_DIR, part_name
from mtkd.store.schema import TEACHER, teacher_header

from .stores import flip_byte
from .test_topk_codec import (
    assert_decoded,
    bound,
    by_id,
    logprob_values,
    teacher_rows,
    topk_rows,
)

# vocabularies around every id width, up to 2^24 and beyond
VOCABS = [1, 5, 255, 256, 65535, 65536, 131072, 131073, 262144, 2**24 - 1, 2**24, 2**31]


@given(rows=topk_rows(vocabs=tuple(VOCABS)))
def test_round_trip_same_as_q64_bound_and_rank_order(rows) -> None:
    ids, lp, vocab = rows
    id_planes, code_planes = tc.encode(ids, lp, vocab_size=vocab, coding=tc.Q64V2)
    width = tc.delta_width(vocab)
    assert id_planes.shape == (len(ids), width, ids.shape[1])
    assert code_planes.shape == (len(ids), 2, ids.shape[1] + 1)  # the floor, then distances
    got_ids, got_lp = tc.decode(id_planes, code_planes, tc.Q64V2)
    assert_decoded(ids, lp, got_ids, got_lp)
    # exactly what q64 gives back: same grid, same rank order, same tie rule
    want_ids, want_lp = tc.decode(*tc.encode(ids, lp, vocab_size=vocab))
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_lp, want_lp)
    np.testing.assert_array_equal(tc.decode_logprobs(code_planes, tc.Q64V2), got_lp)
    again = tc.encode(got_ids, got_lp, vocab_size=vocab, coding=tc.Q64V2)
    assert np.array_equal(again[0], id_planes) and np.array_equal(again[1], code_planes)


def test_widths_the_floor_and_large_ids() -> None:
    widths = {v: tc.delta_width(v) for v in VOCABS}
    assert widths == {1: 1, 5: 1, 255: 1, 256: 2, 65535: 2, 65536: 3, 131072: 3, 131073: 3,
                      262144: 3, 2**24 - 1: 3, 2**24: 4, 2**31: 4}
    assert tc.delta_width(None) == 4 and tc.delta_width(70000, tc.Q64) == 4
    # a row: the floor is the least likely entry's code; the others are distances to it
    ids = np.array([[2**24 - 2, 0, 131072, 70000]])
    lp = np.array([[-0.5, -1.0, -2.0, -3.0]])
    id_planes, code_planes = tc.encode(ids, lp, vocab_size=2**24 - 1, coding=tc.Q64V2)
    assert id_planes.shape == (1, 3, 4)
    deltas = [[0 + 1, 70000 - 0, 131072 - 70000, 2**24 - 2 - 131072]]
    np.testing.assert_array_equal(tc.from_planes(id_planes), deltas)
    np.testing.assert_array_equal(tc.from_planes(code_planes), [[192, 128, 0, 64, 160]])
    got_ids, got_lp = tc.decode(id_planes, code_planes, tc.Q64V2)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_lp, lp)
    with pytest.raises(ValueError, match="outside"):
        tc.encode(np.array([[2**24 - 1]]), np.zeros((1, 1)), vocab_size=2**24 - 1,
                  coding=tc.Q64V2)


# --------------------------------------------------------------------------- sampled rows


@st.composite
def sampled_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Unique ids ascending then padding −1 / 0 / −inf, as both engines write them."""
    vocab = draw(st.sampled_from(VOCABS))
    m = draw(st.integers(1, 300))
    n = draw(st.integers(0, 5))
    ids = np.full((n, m), -1, np.int64)
    counts = np.zeros((n, m), np.int64)
    lp = np.full((n, m), -np.inf)
    for r in range(n):
        real = sorted(draw(st.sets(st.integers(0, vocab - 1), max_size=min(m, 12))))
        ids[r, :len(real)] = real
        counts[r, :len(real)] = draw(st.lists(st.integers(1, min(m, 0xFFFF)),
                                              min_size=len(real), max_size=len(real)))
        lp[r, :len(real)] = draw(hnp.arrays(np.float64, len(real), elements=logprob_values))
    with np.errstate(over="ignore"):  # −1e300 is −inf in float32
        return ids.astype(np.int32), counts.astype(np.uint16), lp.astype(np.float32), vocab


@given(rows=sampled_rows())
def test_sampled_round_trip(rows) -> None:
    ids, counts, lp, vocab = rows
    stored = tc.encode_samples(ids, counts, lp, vocab_size=vocab)
    assert stored[tc.SAMPLE_COUNTS].dtype == np.dtype(tc.count_dtype(ids.shape[1]))
    got = tc.decode_samples(stored)
    assert got[tc.SAMPLE_IDS].dtype == np.int32 and got[tc.SAMPLE_COUNTS].dtype == np.uint16
    np.testing.assert_array_equal(got[tc.SAMPLE_IDS], ids)
    np.testing.assert_array_equal(got[tc.SAMPLE_COUNTS], counts)
    np.testing.assert_array_equal(got[tc.SAMPLE_LOGPROBS], grid.dequantise(grid.quantise(lp)))
    want = np.minimum(lp.astype(np.float64), 0)
    ok = np.isfinite(want) & (want >= grid.MIN_LOGPROB)
    assert (np.abs(got[tc.SAMPLE_LOGPROBS][ok] - want[ok]) <= bound(want[ok])).all()
    # each array decodes on its own
    alone = tc.decode_samples({tc.SAMPLE_IDS: stored[tc.SAMPLE_IDS]})
    assert list(alone) == [tc.SAMPLE_IDS]


def test_sampled_refused() -> None:
    lp = np.zeros((1, 3))
    with pytest.raises(ValueError, match="padding"):
        tc.encode_samples(np.array([[4, -1, 7]]), np.ones((1, 3)), lp, vocab_size=10)
    with pytest.raises(ValueError, match="ascending"):
        tc.encode_samples(np.array([[4, 2, -1]]), np.ones((1, 3)), lp, vocab_size=10)
    with pytest.raises(ValueError, match="ascending"):
        tc.encode_samples(np.array([[4, 4, -1]]), np.ones((1, 3)), lp, vocab_size=10)
    with pytest.raises(ValueError, match="counts outside"):
        tc.encode_samples(np.array([[4, 5, -1]]), np.array([[1, 256, 0]]), lp, vocab_size=10)
    with pytest.raises(ValueError, match="outside"):
        tc.encode_samples(np.array([[4, 300, -1]]), np.ones((1, 3)), lp, vocab_size=255)
    with pytest.raises(ValueError, match="must all be"):
        tc.encode_samples(np.zeros((1, 3)), np.zeros((1, 2)), lp)


# --------------------------------------------------------------------------- in a store


def sampled_teacher_rows(rng: np.random.Generator, n: int, k: int, m: int,
                         vocab: int) -> dict[str, np.ndarray]:
    rows = teacher_rows(rng, n, k, vocab)
    ids = np.full((n, m), -1, np.int32)
    counts = np.zeros((n, m), np.uint16)
    lp = np.full((n, m), -np.inf, np.float32)
    for r in range(n):
        u, c = np.unique(rng.integers(0, vocab, m), return_counts=True)
        ids[r, :len(u)], counts[r, :len(u)] = u, c
        lp[r, :len(u)] = -rng.exponential(3, len(u))
    return rows | {"sample_ids": ids, "sample_counts": counts, "sample_logprobs": lp}


def write_teacher(root: Path, coding: str, vocab: int = 70_000, m: int = 6,
                  lengths: tuple[int, ...] = (5, 0, 7), stream_rows: int = 0,
                  rank_ids: bool = True, stream_samples: bool = True,
                  code_scalars: bool = True) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    k = 8
    header = teacher_header(2, k, {"vocab_size": vocab}, num_samples=m, logprob_dtype=coding,
                            stream_rows=stream_rows, rank_ids=rank_ids,
                            stream_samples=stream_samples, code_scalars=code_scalars)
    writer = StoreWriter(root, header)
    parts = []
    for p in range(2):
        rows = sampled_teacher_rows(rng, sum(lengths), k, m, vocab)
        parts.append(rows)
        with writer.open_part(p) as pw:
            pw.append(rows, list(lengths), (p << 32) + np.arange(len(lengths)))
    assert writer.finalize() and verify_store(root) == []
    return parts


@pytest.mark.parametrize("coding", [tc.Q64V2, tc.Q64])
def test_teacher_store_reads_as_written(coding: str, tmp_path: Path) -> None:
    """A q64v2 store (and an old q64 one) reads back as plain rows through every read path."""
    parts = write_teacher(tmp_path / "t", coding)
    stored = json.loads((tmp_path / "t" / "store.json").read_text())
    assert stored["schema_version"] == 2 and stored["attrs"]["topk_coding"] == coding
    arrays = stored["arrays"]
    if coding == tc.Q64V2:
        assert arrays["topk_ids"]["row_shape"] == [3, 8]  # 70,000 ids: 3 bytes
        assert arrays["topk_logprobs"]["row_shape"] == [2, 9]
        assert arrays["sample_ids"] == {"codec": "zstd", "dtype": "uint8", "row_shape": [3, 6]}
        assert arrays["sample_counts"]["dtype"] == "uint8"
    else:  # q64 leaves the sampled columns plain
        assert arrays["topk_ids"]["row_shape"] == [4, 8]
        assert arrays["sample_ids"]["dtype"] == "int32"
    store = open_store(tmp_path / "t", TEACHER)
    for p, rows in enumerate(parts):
        batch = store.read_part(p)
        assert by_id(batch["topk_ids"], batch["topk_logprobs"]) == by_id(
            rows["topk_ids"], grid.dequantise(grid.quantise(rows["topk_logprobs"])))
        for name in ("sample_ids", "sample_counts"):
            assert batch[name].dtype == rows[name].dtype
            np.testing.assert_array_equal(batch[name], rows[name])
        np.testing.assert_allclose(batch["sample_logprobs"], rows["sample_logprobs"],
                                   atol=grid.COARSE_ERROR, rtol=0)
        np.testing.assert_array_equal(batch["tail_logmass"], rows["tail_logmass"])
        for name in ("topk_logprobs", "sample_ids", "sample_logprobs"):  # one array alone
            alone = store.read_part(p, [name])
            assert list(alone.arrays) == [name]
            np.testing.assert_array_equal(alone[name], batch[name])
    shuffled = store.read([5, 0, 2], ["sample_ids", "topk_ids"])
    np.testing.assert_array_equal(shuffled["sample_ids"][:7], store.read_part(1)["sample_ids"][5:])
    np.testing.assert_array_equal(shuffled["topk_ids"][7:12], store.read_part(0)["topk_ids"][:5])


def test_unknown_coding_is_refused_by_name(tmp_path: Path) -> None:
    write_teacher(tmp_path / "t", tc.Q64V2)
    path = tmp_path / "t" / "store.json"
    header = json.loads(path.read_text())
    header["attrs"]["topk_coding"] = "q64v9"
    path.write_text(json.dumps(header))
    with pytest.raises(StoreError, match=r"unknown topk_coding 'q64v9'.*'q64', 'q64v2'"):
        open_store(tmp_path / "t", TEACHER, verify="none")


@pytest.mark.parametrize("name", ["topk_logprobs", "topk_ids", "sample_ids"])
def test_a_damaged_coded_chunk_is_caught_by_reads(name: str, tmp_path: Path) -> None:
    """A flipped byte in a coded chunk: opening (the default full check) refuses the store, and
    a store opened unchecked refuses the part when the part's own check runs."""
    write_teacher(tmp_path / "t", tc.Q64V2)
    chunk = next(p for p in (tmp_path / "t" / PARTS_DIR / part_name(1) / name).rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    flip_byte(chunk)
    with pytest.raises(StoreError, match=name):
        open_store(tmp_path / "t", TEACHER, verify="full")
    store = open_store(tmp_path / "t", TEACHER, verify="size")
    store.read_part(0)  # the undamaged part still reads
    with pytest.raises(StoreError, match=name):
        store.verify_part(1, full=True)


# --------------------------------------------------------------------------- id table


@given(rows=topk_rows(vocabs=(5, 300, 70_000)), seed=st.integers(0, 2**32 - 1))
def test_id_table_renumbers_and_restores_every_id(rows, seed: int) -> None:
    ids, lp, vocab = rows
    rng = np.random.default_rng(seed)
    table = rng.permutation(vocab)[: rng.integers(1, min(vocab, 50) + 1)].tolist()
    attrs = {"vocab_size": vocab, "topk_coding": tc.Q64V2, "topk_id_table": table}
    coded = tc.encode_rows({"topk_ids": ids, "topk_logprobs": lp}, attrs)
    got = tc.decode_rows(dict(coded), attrs)
    assert got["topk_ids"].dtype == np.int32
    assert by_id(got["topk_ids"], got["topk_logprobs"]) == by_id(
        ids, grid.dequantise(grid.quantise(lp)))
    assert (got["topk_logprobs"][:, 1:] <= got["topk_logprobs"][:, :-1]).all()
    # the table's ids are stored as 0, 1, 2, ...: in a row without padding, the first one's
    # delta is 1
    first = np.isin(ids, table[:1]).any(axis=1) & (ids >= 0).all(axis=1)
    assert (tc.from_planes(coded["topk_ids"])[first, 0] == 1).all()


def test_id_table_in_a_store_and_refused_tables(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vocab, k = 200, 8
    header = teacher_header(1, k, {"vocab_size": vocab}, logprob_dtype=tc.Q64V2,
                            id_table=[7, 3, 150])
    assert header.attrs["topk_id_table"] == [7, 3, 150]
    rows = teacher_rows(rng, 9, k, vocab)
    writer = StoreWriter(tmp_path / "t", header)
    with writer.open_part(0) as pw:
        pw.append(rows, [4, 5], [0, 1])
    assert writer.finalize()
    batch = open_store(tmp_path / "t", TEACHER).read_part(0)
    assert by_id(batch["topk_ids"], batch["topk_logprobs"]) == by_id(
        rows["topk_ids"], grid.dequantise(grid.quantise(rows["topk_logprobs"])))
    for bad, why in (([3, 3], "distinct"), ([200], "distinct ids in"), ([-1], "distinct")):
        with pytest.raises(ValueError, match=why):
            teacher_header(1, k, {"vocab_size": vocab}, logprob_dtype=tc.Q64V2, id_table=bad)
    with pytest.raises(ValueError, match="needs logprob dtype in"):
        teacher_header(1, k, {"vocab_size": vocab}, id_table=[1])
    with pytest.raises(ValueError, match=r"needs attrs\.vocab_size"):
        teacher_header(1, k, {}, logprob_dtype=tc.Q64V2, id_table=[1])
    with pytest.raises(ValueError, match=r"needs topk_coding in \['q64v2'"):
        tc.coding({"topk_coding": tc.Q64, "vocab_size": 9, "topk_id_table": [1]})
    assert id_table.frequency_table(np.array([0, 5, 2, 5, 0]), size=2) == [1, 3]
