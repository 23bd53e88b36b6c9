"""Reading a store: round trips (random schemas, codecs, parts), batched random access, plain
zarr underneath, properties and errors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st

from mtkd.store import ArraySpec, Header, StoreError, open_store, verify_store
from mtkd.store.schema import TEACHER

from .stores import FAST_TMP, SMALL_SPECS, assert_equal_arrays, expected_sequence, write_store

array_specs = st.lists(
    st.builds(
        lambda name, dtype, shape, codec: ArraySpec(name, dtype, shape, codec),
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from(["float16", "int32", "uint16", "float32"]),
        st.sampled_from([(), (1,), (3,), (2, 3)]),
        st.sampled_from(["raw", "zstd"]),
    ),
    min_size=1, max_size=4, unique_by=lambda s: s.name,
)
part_lengths = st.lists(st.lists(st.integers(0, 12), max_size=6), min_size=1, max_size=3)


@given(specs=array_specs, parts=part_lengths, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_round_trip(specs: list[ArraySpec], parts: list[list[int]], seed: int,
                    data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        root = Path(tmp) / "s"
        header = Header("test", len(parts), tuple(specs), {"seed": seed})
        written = write_store(root, header, parts, seed)
        store = open_store(root, "test", verify="full")
        total = sum(len(p) for p in parts)
        assert store.num_sequences == total
        assert store.num_rows == sum(map(sum, parts))
        assert verify_store(root) == []

        for p, part in enumerate(written):
            batch = store.read_part(p)
            np.testing.assert_array_equal(batch.seq_ids, part["ids"])
            np.testing.assert_array_equal(batch.lengths, part["lengths"])
            for spec in specs:
                assert_equal_arrays(batch[spec.name], part["rows"][spec.name])
            assert store.read_meta(p).equals(part["meta"])

        indices = data.draw(st.lists(st.integers(0, total - 1), max_size=20)) if total else []
        names = data.draw(st.sets(st.sampled_from([s.name for s in specs]), min_size=1))
        batch = store.read(indices, names)
        assert set(batch.arrays) == names
        assert len(batch.offsets) == len(indices) + 1
        for i, index in enumerate(indices):
            seq_id, rows = expected_sequence(written, index)
            assert batch.seq_ids[i] == seq_id
            for name in names:
                got = batch[name][batch.offsets[i]:batch.offsets[i + 1]]
                assert_equal_arrays(got, rows[name])


def test_many_short_sequences_take_the_vectorised_path(tmp_path: Path) -> None:
    header = Header("test", 2, (ArraySpec("x", "int32", (2,)), ArraySpec("y", "float16")))
    rng = np.random.default_rng(1)
    parts = [list(rng.integers(0, 4, 700)), list(rng.integers(0, 4, 500))]
    written = write_store(tmp_path / "s", header, parts)
    store = open_store(tmp_path / "s")
    indices = rng.integers(0, store.num_sequences, 1000)
    batch = store.read(indices)
    for i, index in enumerate(indices):
        _, rows = expected_sequence(written, index)
        for name in ("x", "y"):
            assert_equal_arrays(batch[name][batch.offsets[i]:batch.offsets[i + 1]], rows[name])


def test_arrays_are_plain_zarr(small_store: tuple[Path, list[dict]]) -> None:
    root, written = small_store
    for p, part in enumerate(written):
        group = zarr.open_group(root / "parts" / f"{p:05d}", mode="r")
        for name, values in part["rows"].items():
            np.testing.assert_array_equal(group[name][...], values)
        np.testing.assert_array_equal(group["seq_ids"][...], part["ids"])
        offsets = np.concatenate([[0], np.cumsum(part["lengths"])])
        np.testing.assert_array_equal(group["seq_offsets"][...], offsets)


def test_store_properties_and_errors(small_store: tuple[Path, list[dict]]) -> None:
    root, _ = small_store
    store = open_store(root)
    assert store.kind == "test" and store.attrs["answer"] == 42
    assert store.num_parts == 3 and store.array_names == sorted(s.name for s in SMALL_SPECS)
    assert list(store.part_sequences(1)) == [4, 5]
    assert store.part_stats(2) == {"note": "part 2"}
    assert store.read_meta().num_rows == 7
    with pytest.raises(IndexError):
        store.read([7])
    with pytest.raises(IndexError):
        store.read([-1])
    with pytest.raises(IndexError):
        store.read_part(3)
    with pytest.raises(KeyError):
        store.read([0], ["nope"])
    with pytest.raises(StoreError, match="expected a teacher store"):
        open_store(root, TEACHER)
    # batches are fresh, writable arrays, not views of the files
    batch = store.read_part(0)
    batch["ids"][:] = 0
    assert store.read_part(0)["ids"].any()
