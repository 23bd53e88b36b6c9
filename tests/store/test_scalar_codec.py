"""q64r's actual-token log-prob and tail coded against the top-k (``scalar_codec``, version 7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtkd.store import Header, StoreError, StoreWriter, open_store, verify_store
from mtkd.store import q64_grid as grid
from mtkd.store import scalar_codec as scalars
from mtkd.store import topk_codec as tc
from mtkd.store.format import PARTS_DIR, part_name
from mtkd.store.schema import TEACHER, teacher_header

from .stores import assert_reads_alike


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 12), n=st.integers(0, 30))
def test_round_trip_gives_the_levels_and_the_tails_within_half_a_step(data, k: int,
                                                                         n: int) -> None:
    """Any top-k levels, ranks (0, inside, beyond k) and actual-token levels come back
    exactly; tails within 1/128 nat, −inf as −inf, whatever order the reader's top-k rows
    tie in."""
    top = np.sort(data.draw(hnp.arrays(np.int64, (n, k), elements=st.integers(0, 2000))), axis=1)
    logprobs = grid.level_logprobs(top, 1)
    ranks = data.draw(hnp.arrays(np.int32, n, elements=st.integers(-1, 3 * k)))
    target = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, 4000)))
    tail = data.draw(hnp.arrays(np.float64, n, elements=st.one_of(
        st.floats(-120, 0), st.just(-np.inf))))
    stored = scalars.encode(scalar_rows(grid.level_logprobs(target, 1), ranks, tail), top, 1)
    assert stored[scalars.TARGET_LEVEL].dtype == stored[scalars.TAIL_RESIDUAL].dtype == np.int32
    got = scalars.decode(stored, ranks, top[:, ::-1], logprobs[:, ::-1], 1)
    np.testing.assert_array_equal(grid.tail_levels(grid.quantise(got["target_logprob"]), 1),
                                  target)
    got_tail = got["tail_logmass"]
    assert got_tail.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got_tail), np.isneginf(tail))
    finite = np.isfinite(tail)
    assert (np.abs(got_tail[finite] - tail[finite]) <= 0.5 / 64 + 1e-5).all()


def scalar_rows(target_logprob: np.ndarray, ranks: np.ndarray, tail: np.ndarray
                ) -> dict[str, np.ndarray]:
    return {"target_logprob": np.asarray(target_logprob), "target_rank": np.asarray(ranks),
            "tail_logmass": np.asarray(tail)}


def test_the_actual_token_in_the_top_k_costs_nothing() -> None:
    """An actual token at its rank's level stores 0; beyond the top-k, its distance below the
    last entry."""
    top = np.array([[0, 64, 200], [10, 20, 30]])
    rows = scalar_rows(grid.level_logprobs(np.array([64, 45]), 1), [2, 7], [-1.0, -2.0])
    np.testing.assert_array_equal(scalars.encode(rows, top, 1)[scalars.TARGET_LEVEL], [0, 15])


@pytest.mark.parametrize("tail", [np.nan, 0.5, -2e6])
def test_tails_the_coding_cannot_hold_are_refused(tail: float) -> None:
    with pytest.raises(ValueError, match="tail_logmass must be"):
        scalars.encode(scalar_rows([-3 / 64], [1], [tail]), np.array([[3, 9]]), 1)


def teacher_rows(rng: np.random.Generator, n: int, k: int, vocab: int) -> dict[str, np.ndarray]:
    """Rows shaped like a real teacher's: the actual token mostly in the top-k (its entry's
    log-prob), now and then beyond it; the tail what the row leaves, now and then −inf."""
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    raw = -np.sort(rng.exponential(2.0, (n, k + 40)), axis=1)
    raw -= np.log(np.exp(raw).sum(axis=1, keepdims=True))
    lp = raw[:, :k].astype(np.float32)
    rank = np.where(rng.random(n) < 0.9, rng.integers(1, k + 1, n), rng.integers(k + 1, k + 40, n))
    target = raw[np.arange(n), rank - 1].astype(np.float32)
    tail = np.log1p(-np.exp(lp.astype(np.float64)).sum(axis=1)).astype(np.float32)
    tail[rng.random(n) < 0.05] = -np.inf
    return {"topk_ids": ids, "topk_logprobs": lp, "target_logprob": target,
            "target_rank": rank.astype(np.int32), "tail_logmass": tail}


def write(root: Path, rows: dict[str, np.ndarray], lengths: list[int], **kw: object) -> Path:
    k = rows["topk_ids"].shape[1]
    writer = StoreWriter(root, teacher_header(1, k, {"vocab_size": 70_000}, **kw))
    with writer.open_part(0) as pw:
        pw.append(rows, lengths, np.arange(len(lengths)))
    assert writer.finalize() and verify_store(root) == []
    return root


@pytest.mark.parametrize("tail_step", [1, 4])
def test_a_store_reads_within_the_bound_and_writes_its_reads_back_unchanged(
        tmp_path: Path, tail_step: int) -> None:
    """The q64r store of version 7 reads as its q64v2 twin but for the two coded columns,
    which hold their bound (on the 1/4-nat tail: half its step below p = 1e-3); read alone,
    in any order, by part; written again from what it reads, it reads the same; it takes
    fewer bytes than the same rows with the scalars stored exactly."""
    rows = teacher_rows(np.random.default_rng(1), 600, 16, 70_000)
    lengths = [200, 0, 150, 250]
    twin = open_store(write(tmp_path / "v2", rows, lengths, logprob_dtype=tc.Q64V2), TEACHER)
    kw = {"logprob_dtype": tc.Q64R, "tail_step": tail_step, "stream_rows": 256}
    store = open_store(write(tmp_path / "r", rows, lengths, **kw), TEACHER)
    header = json.loads((tmp_path / "r" / "store.json").read_text())
    assert header["schema_version"] == 7 and header["attrs"]["scalar_coding"] == tc.Q64R
    assert {"target_level", "tail_residual"} <= set(header["arrays"])
    assert "target_logprob" not in header["arrays"] and "tail_logmass" not in header["arrays"]
    assert sorted(store.array_names) == sorted(twin.array_names)
    got = store.read_part(0)
    for name in twin.array_names:
        want = twin.read_part(0)[name]
        if tail_step == 1 or name not in ("target_logprob", "topk_logprobs"):
            assert_reads_alike(got[name], want, name, scalars_coded=True)
    coarse = rows["target_logprob"] < -grid.FINE_MAX / grid.FINE
    err = np.abs(got["target_logprob"] - rows["target_logprob"])
    assert err[~coarse].max() <= grid.FINE_ERROR
    assert err[coarse].max() <= tail_step * grid.COARSE_ERROR + 1e-6
    for order, names in (([3, 0, 2, 2], None), ([2], ["tail_logmass"]),
                         ([0, 3], ["target_logprob", "topk_ids"])):
        a, b = store.read(order, names), store.read_part(0)
        assert sorted(a.arrays) == sorted(names or store.array_names)
        rows_of = np.concatenate([np.arange(b.offsets[i], b.offsets[i + 1]) for i in order])
        for name in a.arrays:
            np.testing.assert_array_equal(a[name], b[name][rows_of], err_msg=name)
    write(tmp_path / "again", {n: got[n] for n in got.arrays}, lengths, **kw)
    for name in ("target_level", "tail_residual", "topk_stream"):
        files = [sorted(f for f in (root / PARTS_DIR / part_name(0) / name).rglob("*")
                        if f.is_file()) for root in (tmp_path / "r", tmp_path / "again")]
        assert [f.read_bytes() for f in files[0]] == [f.read_bytes() for f in files[1]], name
    write(tmp_path / "exact", rows, lengths, code_scalars=False, **kw)
    sizes = {name: sum(f.stat().st_size for f in (tmp_path / name).rglob("*") if f.is_file())
             for name in ("r", "exact")}
    assert sizes["r"] < sizes["exact"] - 3 * sum(lengths), sizes


def test_rows_the_coding_cannot_hold_are_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    rows = teacher_rows(np.random.default_rng(2), 10, 4, 100)
    for name, value in (("tail_logmass", np.nan), ("tail_logmass", 0.3),
                        ("target_logprob", np.nan), ("target_logprob", 0.5)):
        bad = {n: a.copy() for n, a in rows.items()}
        bad[name][3] = value
        writer = StoreWriter(tmp_path / f"{name}-{value}",
                             teacher_header(1, 4, {"vocab_size": 100}, logprob_dtype=tc.Q64R))
        with pytest.raises(StoreError, match="sparse rows cannot be coded"), \
                writer.open_part(0) as pw:
            pw.append(bad, [10], [0])
        assert not writer.is_committed(0)


def test_a_damaged_level_is_refused_on_read(tmp_path: Path) -> None:
    rows = teacher_rows(np.random.default_rng(3), 50, 8, 1000)
    write(tmp_path / "t", rows, [50], logprob_dtype=tc.Q64R)
    levels = zarr.open_array(tmp_path / "t" / PARTS_DIR / part_name(0) / "target_level",
                             mode="r+")
    levels[7] = -(10 ** 6)
    store = open_store(tmp_path / "t", TEACHER, verify="none")
    assert store.read([0], ["target_rank"])["target_rank"].shape == (50,)
    with pytest.raises((StoreError, ValueError), match="target_level"):
        store.read([0], ["target_logprob"])


def test_the_header_names_the_coding_and_its_version() -> None:
    header = teacher_header(1, 8, {"vocab_size": 100}, logprob_dtype=tc.Q64R)
    assert header.schema_version == 7 and header.attrs["scalar_coding"] == tc.Q64R
    assert [a.name for a in header.written_arrays if a.name.startswith(("target", "tail"))
            ] == ["target_logprob", "tail_logmass", "target_rank"]
    exact = teacher_header(1, 8, {"vocab_size": 100}, logprob_dtype=tc.Q64R,
                           code_scalars=False)
    assert exact.schema_version == 5 and "scalar_coding" not in exact.attrs
    assert teacher_header(1, 8, {"vocab_size": 100}, logprob_dtype=tc.Q64V2).schema_version == 2
    obj = header.to_json()
    obj["schema_version"] = 6  # what an mtkd that cannot read the coding would take it for
    with pytest.raises(StoreError, match="scalar_coding needs schema version 7"):
        Header.from_json(obj, Path("x"))
    obj = teacher_header(1, 8, {"vocab_size": 100}, logprob_dtype=tc.Q64V2).to_json()
    obj["attrs"]["scalar_coding"] = tc.Q64R
    obj["schema_version"] = 7
    with pytest.raises(StoreError, match="only with topk_coding 'q64r'"):
        Header.from_json(obj, Path("x"))


def test_scalars_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    """Neither column is stored as given, so the coding checks their shapes itself (review)."""
    rows = teacher_rows(np.random.default_rng(4), 6, 4, 100)
    for name, value in (("target_logprob", rows["target_logprob"][:1]),
                        ("target_logprob", np.float32(-1.0)),
                        ("tail_logmass", rows["tail_logmass"][:, None])):
        writer = StoreWriter(tmp_path / f"{name}-{np.ndim(value)}",
                             teacher_header(1, 4, {"vocab_size": 100}, logprob_dtype=tc.Q64R))
        with pytest.raises(StoreError, match=f"{name}: shape"), writer.open_part(0) as pw:
            pw.append(rows | {name: value}, [6], [0])


def test_a_tail_never_reads_above_zero() -> None:
    """A tail of 0 the top-k disagree with by more than the grid's rounding reads as 0, not as
    a mass above 1 (review)."""
    top = grid.tail_levels(grid.quantise(np.array([[-4.171875]])), 1)
    logprobs = grid.level_logprobs(top, 1)
    stored = scalars.encode(scalar_rows(logprobs[:, 0], [1], [0.0]), top, 1)
    assert scalars.decode(stored, np.array([1]), top, logprobs, 1)["tail_logmass"][0] == 0.0


@pytest.mark.parametrize("tail_step", tc.TAIL_STEPS)
def test_level_logprobs_is_dequantise_of_level_codes(tail_step: int) -> None:
    """The one-gather table every q64r read uses gives what the two steps give, for every
    level of the grid (and past its last, −inf)."""
    top = grid.FINE_MAX + (grid.MAX_CODE - grid.FINE_MAX) // tail_step + 1
    levels = np.arange(top + 3)
    np.testing.assert_array_equal(grid.level_logprobs(levels, tail_step),
                                  grid.dequantise(grid.level_codes(levels, tail_step)))
