"""The q64 top-k coding: its error bound, exact ids and rank order, and a teacher store using it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtkd.store import Header, StoreError, StoreWriter, open_store, verify_store
from mtkd.store import q64_grid as grid
from mtkd.store import topk_codec as tc
from mtkd.store.format import SCHEMA_VERSION
from mtkd.store.schema import TEACHER, teacher_header

LOG_1E_3 = math.log(1e-3)


@pytest.fixture
def tmp_path(memory_tmp_path: Path) -> Path:
    """Stores in memory where possible (see conftest.memory_tmp_path)."""
    return memory_tmp_path


def bound(logprobs: np.ndarray) -> np.ndarray:
    """The documented bound on |decoded − stored| per entry (finite, ≥ MIN_LOGPROB)."""
    return np.where(logprobs >= -grid.FINE_MAX / grid.FINE, grid.FINE_ERROR, grid.COARSE_ERROR)


# log-probs as engines give them: mostly in [−30, 0], some very negative, some −inf, and the
# tiny positive rounding noise the harvest lets through (≤ 1e-3)
logprob_values = st.one_of(
    st.floats(-30.0, 1e-3, allow_nan=False),
    st.floats(-np.finfo(np.float64).max, -30.0),
    st.sampled_from([-np.inf, 0.0, -grid.FINE_MAX / grid.FINE, LOG_1E_3, grid.MIN_LOGPROB, -1e-45]),
)


@st.composite
def topk_rows(draw: st.DrawFn, vocabs: tuple[int, ...] = (1, 5, 300, 65535, 65536, 2**31)
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """``ids [n, k]`` (distinct per row, or −1 padding at the end), ``logprobs [n, k]``
    descending as an engine returns them, and a vocabulary size of ``vocabs``."""
    vocab = draw(st.sampled_from(vocabs))
    k = draw(st.integers(1, min(vocab, 70)))
    n = draw(st.integers(0, 6))
    ids = np.empty((n, k), dtype=np.int64)
    for r in range(n):
        pad = draw(st.integers(0, k)) if draw(st.booleans()) else 0
        real = draw(st.lists(st.integers(0, vocab - 1), min_size=k - pad, max_size=k - pad,
                             unique=True))
        ids[r] = real + [-1] * pad
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    lp = draw(hnp.arrays(np.float64, (n, k), elements=logprob_values))
    with np.errstate(over="ignore"):  # −1e30 is −inf in float16 and float32
        lp = -np.sort(-lp.astype(dtype), axis=1)  # descending, as stored
    return ids.astype(np.int32), lp, vocab


def by_id(ids: np.ndarray, values: np.ndarray) -> list[list[tuple[int, float]]]:
    """Each row's (id, value) pairs, sorted: what must survive whatever the order."""
    return [sorted(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values,
                                                                           strict=True)]


def assert_decoded(ids: np.ndarray, lp: np.ndarray, got_ids: np.ndarray,
                   got_lp: np.ndarray) -> None:
    """Decoded top-k rows: int32 ids exact, float32 values within the bound, rank order."""
    assert got_ids.dtype == np.int32 and got_lp.dtype == np.float32
    # each id keeps its own (quantised) value, padding included; nothing else changes
    assert by_id(got_ids, got_lp) == by_id(ids, grid.dequantise(grid.quantise(lp)))
    # rank order: descending; entries tied after quantisation may come back in any order
    assert (got_lp[:, 1:] <= got_lp[:, :-1]).all()
    # the error bound, entry by entry (matched through the sorted pairs above)
    want = np.sort(np.minimum(lp.astype(np.float64), 0), axis=1)[:, ::-1]
    finite = np.isfinite(want) & (want >= grid.MIN_LOGPROB)
    err = np.where(finite, np.abs(got_lp - np.where(finite, want, 0)), 0)
    assert (err <= bound(want)).all()
    assert (err[want >= LOG_1E_3] <= 0.01).all()
    assert np.array_equal(np.isneginf(got_lp), np.isneginf(want))
    below = (want < grid.MIN_LOGPROB) & np.isfinite(want)
    assert (got_lp[below] == np.float32(grid.MIN_LOGPROB)).all()


@given(rows=topk_rows())
def test_round_trip_ids_exact_values_bounded_rank_order(rows) -> None:
    ids, lp, vocab = rows
    id_planes, code_planes = tc.encode(ids, lp, vocab_size=vocab)
    assert id_planes.shape == (len(ids), tc.id_width(vocab), ids.shape[1])
    assert code_planes.shape == (len(ids), 2, ids.shape[1])
    got_ids, got_lp = tc.decode(id_planes, code_planes)
    assert_decoded(ids, lp, got_ids, got_lp)
    # the logprobs alone decode the same
    np.testing.assert_array_equal(tc.decode_logprobs(code_planes), got_lp)
    # decoded rows encode to the same bytes (re-writing a store's rows changes nothing)
    again = tc.encode(got_ids, got_lp, vocab_size=vocab)
    assert np.array_equal(again[0], id_planes) and np.array_equal(again[1], code_planes)


@given(lp=hnp.arrays(np.float64, st.integers(1, 50), elements=logprob_values))
def test_quantiser_bound_and_monotone(lp: np.ndarray) -> None:
    lp = np.sort(lp)[::-1]
    codes = grid.quantise(lp)
    assert (np.diff(codes.astype(np.int64)) >= 0).all()  # order preserving
    back = grid.dequantise(codes).astype(np.float64)
    want = np.minimum(lp, 0)
    ok = np.isfinite(want) & (want >= grid.MIN_LOGPROB)
    assert (np.abs(back[ok] - want[ok]) <= bound(want[ok])).all()
    # decoded values are on the grid exactly: decoding is idempotent
    np.testing.assert_array_equal(grid.quantise(back), codes)


def test_grid_edges() -> None:
    """The documented constants, and where the fine grid ends (after every p ≥ 1e-3)."""
    assert grid.FINE_ERROR == 1 / 128 and grid.COARSE_ERROR == 1 / 32
    assert -grid.FINE_MAX / grid.FINE < LOG_1E_3 < -(grid.FINE_MAX - 1) / grid.FINE
    assert grid.MIN_LOGPROB == -(443 + (65534 - 443) * 4) / 64
    lp = np.array([0.0, 1 / 128, -0.0, -1 / 128, LOG_1E_3, -grid.FINE_MAX / grid.FINE, -7.0,
                   grid.MIN_LOGPROB, -1e38, -np.inf])
    np.testing.assert_array_equal(grid.quantise(lp), [0, 0, 0, 0, 442, 443, 444, 65534, 65534,
                                                    65535])
    out = grid.dequantise(grid.quantise(lp))
    assert out[0] == 0 and not np.signbit(out[0])
    assert out[-2] == np.float32(grid.MIN_LOGPROB) and out[-1] == -np.inf


def test_refused_inputs() -> None:
    with pytest.raises(ValueError, match="NaN or above 1/128"):
        grid.quantise(np.array([-1.0, np.nan]))
    with pytest.raises(ValueError, match="NaN or above 1/128"):
        grid.quantise(np.array([0.01]))
    with pytest.raises(ValueError, match="must both be"):
        tc.encode(np.zeros((2, 3), np.int32), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="outside"):
        tc.encode(np.array([[65535]]), np.zeros((1, 1)), vocab_size=65535)
    with pytest.raises(ValueError, match="outside"):
        tc.encode(np.array([[-2]]), np.zeros((1, 1)))
    with pytest.raises(ValueError, match="integers"):
        tc.encode(np.zeros((1, 1)), np.zeros((1, 1)))


def test_widths_and_large_ids() -> None:
    assert tc.id_width(65535) == 2 and tc.id_width(65536) == 4 and tc.id_width(None) == 4
    ids = np.array([[2**31 - 1, 0, 70000, -1]])
    lp = np.array([[-0.1, -0.2, -3.0, -np.inf]])
    got_ids, got_lp = tc.decode(*tc.encode(ids, lp, vocab_size=2**31))
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_lp, lp, atol=grid.FINE_ERROR)


def test_k_4096_full_vocabulary_rows() -> None:
    """Rows holding the whole vocabulary (k = V): id deltas are all 1, values any order."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 4096)) * 3
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-lp, axis=1)
    ids, top = order, np.take_along_axis(lp, order, axis=1)
    got_ids, got_lp = tc.decode(*tc.encode(ids, top, vocab_size=4096))
    assert by_id(got_ids, got_lp) == by_id(ids, grid.dequantise(grid.quantise(top)))


# --------------------------------------------------------------------------- in a store


def teacher_rows(rng: np.random.Generator, n: int, k: int, vocab: int) -> dict[str, np.ndarray]:
    logits = rng.standard_normal((n, vocab)) * 2
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, order, axis=1)
    return {
        "topk_ids": order.astype(np.int32),
        "topk_logprobs": top.astype(np.float32),
        "target_logprob": lp[:, 0].astype(np.float32),
        "target_rank": np.ones(n, np.int32),
        "tail_logmass": np.log1p(-np.exp(top).sum(axis=1)).astype(np.float32),
    }


def test_store_codes_on_write_and_decodes_on_every_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    k, vocab, lengths = 8, 100, [5, 0, 7]
    header = teacher_header(2, k, {"vocab_size": vocab})
    writer = StoreWriter(tmp_path / "t", header)
    parts = []
    for p in range(2):
        rows = teacher_rows(rng, sum(lengths), k, vocab)
        parts.append(rows)
        with writer.open_part(p) as pw:
            pw.append(rows, lengths, (p << 32) + np.arange(3))
    assert writer.finalize() and verify_store(tmp_path / "t") == []
    stored = json.loads((tmp_path / "t" / "store.json").read_text())
    assert stored["schema_version"] == 2 and stored["attrs"]["topk_coding"] == "q64"
    assert stored["arrays"]["topk_ids"] == {"codec": "zstd", "dtype": "uint8",
                                            "row_shape": [2, k]}

    store = open_store(tmp_path / "t", TEACHER)
    for p, rows in enumerate(parts):
        batch = store.read_part(p)
        assert batch["topk_ids"].dtype == np.int32 and batch["topk_ids"].shape == (12, k)
        assert batch["topk_logprobs"].dtype == np.float32
        # each id with its value within the bound; rank order up to quantised ties
        assert by_id(batch["topk_ids"], batch["topk_logprobs"]) == by_id(
            rows["topk_ids"], grid.dequantise(grid.quantise(rows["topk_logprobs"])))
        np.testing.assert_allclose(batch["topk_logprobs"], rows["topk_logprobs"],
                                   atol=grid.FINE_ERROR, rtol=0)
        np.testing.assert_array_equal(batch["tail_logmass"], rows["tail_logmass"])
        # one array alone, and shuffled batched reads, decode the same
        np.testing.assert_array_equal(store.read_part(p, ["topk_ids"])["topk_ids"],
                                      batch["topk_ids"])
        only = store.read_part(p, ["topk_logprobs"])
        assert list(only.arrays) == ["topk_logprobs"]
        np.testing.assert_array_equal(only["topk_logprobs"], batch["topk_logprobs"])
    shuffled = store.read([5, 0, 2], ["topk_ids", "target_rank"])
    assert list(shuffled.arrays) == ["topk_ids", "target_rank"]
    # sequence 5 is part 1's last (rows 5..12), then part 0's first (rows 0..5)
    assert shuffled.offsets.tolist() == [0, 7, 12, 19]
    np.testing.assert_array_equal(shuffled["topk_ids"][:7], store.read_part(1)["topk_ids"][5:])
    np.testing.assert_array_equal(shuffled["topk_ids"][7:12],
                                  store.read_part(0)["topk_ids"][:5])

    # refused rows say why, and nothing is kept
    bad = teacher_rows(rng, 3, k, vocab) | {"topk_ids": np.full((3, k), vocab + 70000)}
    with pytest.raises(StoreError, match="cannot be coded"):
        StoreWriter(tmp_path / "u", header).open_part(0).append(bad, [3], [0])


def test_store_plain_stays_version_1_and_unknown_coding_is_refused(tmp_path: Path) -> None:
    plain = teacher_header(1, 4, {}, logprob_dtype="float16")
    assert plain.to_json()["schema_version"] == 1
    obj = teacher_header(1, 4, {}).to_json()
    obj["attrs"]["topk_coding"] = "q99"
    with pytest.raises(StoreError, match="unknown topk_coding 'q99'"):
        Header.from_json(obj, tmp_path)
    with pytest.raises(StoreError, match="unknown topk_coding"):
        StoreWriter(tmp_path / "x", Header(TEACHER, 1, plain.arrays, {"topk_coding": "q99"}))
    obj["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1} is not supported"):
        Header.from_json(obj, tmp_path)
