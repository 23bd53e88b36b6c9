"""The q64v2 coding of target stores, and sharded zstd arrays read without zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.store import CorruptStoreError, StoreWriter, open_store
from mtkd.store import target_codec as tgc
from mtkd.store.schema import target_header

K = 16
BOUND = 0.5 / 64 + 1e-6  # 1/128 nat where q ≥ 1e-3


def target_rows(rng: np.random.Generator, n: int, vocab: int, k: int = K,
                blocks: int = 0) -> dict[str, np.ndarray]:
    """Fused-target-like rows: distinct ids, descending probs, padding on some rows."""
    out: dict[str, np.ndarray] = {}
    for name in ["", *(f"teacher{j}_" for j in range(blocks))]:
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
        p = rng.dirichlet(np.full(k + 1, 0.4), size=n)
        probs = -np.sort(-p[:, :k], axis=1)
        pad = rng.random(n) < 0.2
        ids[pad, k // 2:] = -1
        probs[pad, k // 2:] = 0.0
        out[f"{name}ids"] = ids
        out[f"{name}probs"] = probs.astype(np.float32)
        out[f"{name}tail_mass"] = (1 - probs.sum(1)).clip(0).astype(np.float32)
    out |= {"weights": rng.random((n, max(blocks, 1))).astype(np.float32),
            "jensen_gap": rng.random(n).astype(np.float32),
            "disagreement": rng.random(n).astype(np.float32)}
    return out


def write(root: Path, rows: dict[str, np.ndarray], lengths: list[int], vocab: int,
          coding: str | None = "q64v2", blocks: int = 0) -> Path:
    header = target_header(1, K, max(blocks, 1), {"vocab_size": vocab},
                           teacher_ks=[K] * blocks, coding=coding)
    writer = StoreWriter(root, header)
    with writer.open_part(0) as pw:
        pw.append(rows, np.asarray(lengths), np.arange(len(lengths)))
    assert writer.finalize()
    return root


def by_id(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's entries in ascending id order (padding −1 first), to compare by id."""
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(probs, order, 1)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([300, 65_535, 65_536, 131_073, 1 << 24]), st.integers(0, 2**31))
def test_round_trip_within_the_bound(tmp_path_factory, vocab: int, seed: int) -> None:
    """Ids come back exactly, log q within 1/128 nat where q ≥ 1e-3, in descending order;
    the stored tail and the other arrays unchanged; any vocabulary up to 2^24 ids."""
    rng = np.random.default_rng(seed)
    rows = target_rows(rng, 40, vocab)
    store = open_store(write(tmp_path_factory.mktemp("t"), rows, [25, 15], vocab))
    got = store.read([0, 1])
    assert got["ids"].dtype == np.int32 and got["probs"].dtype == np.float32
    want_ids, want = by_id(rows["ids"], rows["probs"])
    have_ids, have = by_id(got["ids"], got["probs"])
    np.testing.assert_array_equal(have_ids, want_ids)
    assert np.array_equal(want > 0, have > 0)
    big = want >= 1e-3
    assert np.abs(np.log(have[big]) - np.log(want[big])).max() <= BOUND
    assert np.all(np.diff(got["probs"], axis=1) <= 0)
    for name in ("tail_mass", "weights", "jensen_gap", "disagreement"):
        np.testing.assert_array_equal(got[name], rows[name])


def test_teacher_blocks_and_the_store_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vocab = 49_152
    rows = target_rows(rng, 3000, vocab, blocks=2)
    root = write(tmp_path / "t", rows, [1000, 1200, 800], vocab, blocks=2)
    store = open_store(root)
    assert store.attrs[tgc.CODING_ATTR] == "q64v2" and store.header.schema_version == 2
    assert store.header.spec("ids").dtype == "uint8"  # coded
    got = store.read([2, 0])
    order = np.r_[np.arange(2200, 3000), np.arange(0, 1000)]
    for name in ("ids", "teacher0_ids", "teacher1_ids"):
        np.testing.assert_array_equal(np.sort(got[name], 1), np.sort(rows[name][order], 1))
    plain = open_store(write(tmp_path / "plain", rows, [1000, 1200, 800], vocab, None, 2))
    coded_bytes = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    plain_bytes = sum(f.stat().st_size for f in plain.root.rglob("*") if f.is_file())
    assert coded_bytes < 0.6 * plain_bytes


def test_unknown_coding_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown target_coding 'q99'"):
        tgc.coding({tgc.CODING_ATTR: "q99"})

    with pytest.raises(ValueError, match="unknown target coding"):
        target_header(1, K, 1, {"vocab_size": 10}, coding="q99")


def test_shard_reader_reads_what_zarr_reads(tmp_path: Path) -> None:
    """The direct shard reader and zarr agree on every row (slices, scattered rows)."""
    rng = np.random.default_rng(2)
    rows = target_rows(rng, 5000, 49_152)
    root = write(tmp_path / "t", rows, [2500, 2500], 49_152)
    part = next((root / "parts").iterdir())
    store = open_store(root)
    reader = store._parts[0]
    for name in ("ids", "probs", "tail_mass"):
        mine = reader.array(name)
        theirs = zarr.open_array(part / name, mode="r")
        assert type(mine).__name__ == "ShardedArray"
        np.testing.assert_array_equal(mine[0:5000], theirs[:])
        picks = np.unique(rng.integers(0, 5000, 300))
        np.testing.assert_array_equal(mine.oindex[picks], theirs.oindex[picks])
        np.testing.assert_array_equal(mine[1023:1025], theirs[1023:1025])


def test_a_damaged_chunk_is_caught_by_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = target_rows(rng, 3000, 49_152)
    root = write(tmp_path / "t", rows, [3000], 49_152)
    shard = next((root / "parts").iterdir()) / "ids" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first inner chunk
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError):
        open_store(root)  # sha256 of every file (the default verification)
    store = open_store(root, verify="size")
    with pytest.raises(CorruptStoreError):
        store.read([0])
    data[-2] ^= 0xFF  # the shard index
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="crc32c"):
        open_store(root, verify="size").read([0])
