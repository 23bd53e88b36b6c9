"""The generic part-based store: round trips, atomic commits, verification, concurrency."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.store import (
    ArraySpec,
    CorruptStoreError,
    Header,
    IncompleteStoreError,
    StoreError,
    StoreWriter,
    core,
    open_store,
    verify_store,
)
from mtkd.store.schema import (
    TARGET,
    TEACHER,
    TOKENS,
    check_aligned,
    target_header,
    teacher_header,
    tokens_header,
    vocab_fingerprint,
)

REPO = Path(__file__).resolve().parents[2]
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
@pytest.fixture
def tmp_path(memory_tmp_path: Path) -> Path:
    """Stores in memory where possible (see conftest.memory_tmp_path)."""
    return memory_tmp_path

# --------------------------------------------------------------------------- helpers


def random_rows(rng: np.random.Generator, specs: tuple[ArraySpec, ...],
                n: int) -> dict[str, np.ndarray]:
    rows = {}
    for spec in specs:
        shape = (n, *spec.row_shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            values = rng.normal(size=shape) * 10
            values[rng.random(shape) < 0.05] = -np.inf  # −inf is a legal log-prob
            rows[spec.name] = values.astype(dtype)
        else:
            info = np.iinfo(dtype)
            rows[spec.name] = rng.integers(info.min, info.max, size=shape, endpoint=True,
                                           dtype=dtype)
    return rows


def write_store(root: Path, header: Header, parts: list[list[int]], seed: int = 0,
                meta: bool = True) -> list[dict]:
    """Write ``parts`` (sequence lengths per part); return per part its rows, lengths, ids."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root, header)
    written = []
    for p, lengths in enumerate(parts):
        lengths = np.asarray(lengths, dtype=np.int64)
        rows = random_rows(rng, header.arrays, int(lengths.sum()))
        ids = (np.int64(p) << 32) | np.arange(len(lengths), dtype=np.int64)
        table = pa.table({"seq_id": ids, "tag": [f"p{p}s{i}" for i in range(len(ids))]})
        with writer.open_part(p) as pw:
            pw.stats = {"note": f"part {p}"}
            # appended in two calls, to exercise concatenation
            half = len(lengths) // 2
            cut = int(lengths[:half].sum())
            for sl, rsl in ((slice(0, half), slice(0, cut)), (slice(half, None), slice(cut, None))):
                pw.append({k: v[rsl] for k, v in rows.items()}, lengths[sl], ids[sl],
                          table.slice(sl.start, len(lengths[sl])) if meta else None)
        written.append({"rows": rows, "lengths": lengths, "ids": ids, "meta": table})
    assert writer.finalize()
    return written


def expected_sequence(written: list[dict], store_index: int) -> tuple[int, dict[str, np.ndarray]]:
    """(seq_id, rows) of the sequence at ``store_index`` (parts in order, sequences in order)."""
    for part in written:
        if store_index < len(part["lengths"]):
            offsets = np.concatenate([[0], np.cumsum(part["lengths"])])
            lo, hi = offsets[store_index], offsets[store_index + 1]
            return int(part["ids"][store_index]), {k: v[lo:hi] for k, v in part["rows"].items()}
        store_index -= len(part["lengths"])
    raise IndexError(store_index)


def assert_equal_arrays(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


SMALL_SPECS = (
    ArraySpec("ids", "int32", (3,), "raw"),
    ArraySpec("logp", "float16", (3,), "zstd"),
    ArraySpec("grid", "float32", (2, 2), "raw"),
    ArraySpec("count", "uint16", (), "zstd"),
)


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[Path, list[dict]]:
    root = tmp_path / "store"
    header = Header("test", 3, SMALL_SPECS, {"answer": 42})
    written = write_store(root, header, [[3, 0, 5, 2], [4, 1], [6]])
    return root, written


# --------------------------------------------------------------------------- round trips

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


# --------------------------------------------------------------------------- writing rules


def test_append_validates_and_copies(tmp_path: Path) -> None:
    header = Header("test", 1, (ArraySpec("x", "float32", (2,)), ArraySpec("n", "uint16")))
    writer = StoreWriter(tmp_path / "s", header)
    with writer.open_part(0) as pw:
        with pytest.raises(StoreError, match="shape"):
            pw.append({"x": np.zeros((3, 3)), "n": np.zeros(3)}, [3], [0])
        with pytest.raises(StoreError, match="missing"):
            pw.append({"x": np.zeros((3, 2))}, [3], [0])
        with pytest.raises(StoreError, match="NaN"):
            pw.append({"x": np.full((3, 2), np.nan), "n": np.zeros(3)}, [3], [0])
        with pytest.raises(StoreError, match="overflow"):
            pw.append({"x": np.zeros((3, 2)), "n": np.array([1, 2, 70000])}, [3], [0])
        with pytest.raises(StoreError, match="non-negative"):
            pw.append({"x": np.zeros((0, 2)), "n": np.zeros(0)}, [-1, 1], [0, 1])
        with pytest.raises(StoreError, match="seq_id column"):
            pw.append({"x": np.zeros((3, 2)), "n": np.zeros(3)}, [3], [0],
                      pa.table({"seq_id": [5]}))
        buf = np.ones((3, 2), np.float32)
        pw.append({"x": buf, "n": np.arange(3)}, [3], [0])
        buf[:] = 7  # the caller reuses its buffer: the part must not change
    with pytest.raises(IncompleteStoreError, match="every part is committed"):
        open_store(tmp_path / "s")
    assert writer.finalize()
    np.testing.assert_array_equal(open_store(tmp_path / "s").read_part(0)["x"], 1)


def test_exception_in_block_discards(tmp_path: Path) -> None:
    header = Header("test", 1, (ArraySpec("x", "int32"),))
    writer = StoreWriter(tmp_path / "s", header)
    with pytest.raises(RuntimeError), writer.open_part(0) as pw:
        pw.append({"x": np.arange(4)}, [4], [0])
        raise RuntimeError("engine died")
    assert not writer.is_committed(0)
    assert list((tmp_path / "s" / "parts").iterdir()) == []
    assert not writer.finalize()
    with pytest.raises(IncompleteStoreError, match="1 of 1 parts uncommitted"):
        open_store(tmp_path / "s")


def test_header_mismatch_names_the_field(tmp_path: Path) -> None:
    StoreWriter(tmp_path / "t", teacher_header(4, 64, {"teacher": "a"}))
    with pytest.raises(StoreError, match=r"attrs\.k\b") as err:
        StoreWriter(tmp_path / "t", teacher_header(4, 32, {"teacher": "a"}))
    assert "arrays.topk_ids.row_shape" in str(err.value)
    with pytest.raises(StoreError, match="num_parts"):
        StoreWriter(tmp_path / "t", teacher_header(5, 64, {"teacher": "a"}))
    with pytest.raises(StoreError, match=r"attrs\.teacher.*stored \"a\", asked \"b\""):
        StoreWriter(tmp_path / "t", teacher_header(4, 64, {"teacher": "b"}))
    with pytest.raises(StoreError, match=r"arrays\.topk_ids\.codec"):
        StoreWriter(tmp_path / "t", teacher_header(4, 64, {"teacher": "a"}, codec="raw"))
    StoreWriter(tmp_path / "t", teacher_header(4, 64, {"teacher": "a"}))  # same: accepted


def test_writer_rejects_bad_headers_and_parts(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="reserved"):
        StoreWriter(tmp_path / "a", Header("t", 1, (ArraySpec("seq_ids", "int64"),)))
    with pytest.raises(StoreError, match="at least one part"):
        StoreWriter(tmp_path / "b", Header("t", 0, (ArraySpec("x", "int64"),)))
    writer = StoreWriter(tmp_path / "c", Header("t", 2, (ArraySpec("x", "int64"),)))
    with pytest.raises(StoreError, match="not in"):
        writer.open_part(2)
    assert writer.parts_for_worker(1, 2) == [1]
    with pytest.raises(StoreError):
        writer.parts_for_worker(2, 2)


def test_recommitted_part_refreshes_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "s"
    header = Header("test", 2, (ArraySpec("x", "int32"),))
    write_store(root, header, [[2, 3], [4]], seed=1)
    before = json.loads((root / "manifest.json").read_text())
    shutil.rmtree(root / "parts" / "00001")
    with pytest.raises(CorruptStoreError, match="part 1 missing"):
        open_store(root, verify="none")
    writer = StoreWriter(root, header)
    assert writer.pending_parts() == [1]
    with writer.open_part(1) as pw:
        pw.append({"x": np.arange(7)}, [7], [1 << 32])
    assert writer.finalize()
    after = json.loads((root / "manifest.json").read_text())
    assert after["num_rows"] == 12 and after["checksum"] != before["checksum"]
    assert verify_store(root) == []


def test_stale_temps_are_removed_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "s"
    writer = StoreWriter(root, Header("test", 2, (ArraySpec("x", "int32"),)))
    parts = root / "parts"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is surely dead now
    dead = parts / f".tmp-00000-{core._HOST}-{proc.pid}-abc"
    live = parts / f".tmp-00000-{core._HOST}-{os.getpid()}-abc"
    foreign_old = parts / ".tmp-00000-otherhost-123-abc"
    foreign_new = parts / ".tmp-00001-otherhost-123-abc"
    for d in (dead, live, foreign_old, foreign_new):
        (d / "x").mkdir(parents=True)
        (d / "x" / "zarr.json").write_text("{}")
    old = time.time() - 2 * core.STALE_TMP_SECONDS
    for path in (foreign_old, foreign_old / "x", foreign_old / "x" / "zarr.json"):
        os.utime(path, (old, old))
    writer.open_part(0)
    assert not dead.exists() and not foreign_old.exists()
    assert live.exists() and foreign_new.exists()


# --------------------------------------------------------------------------- verification


def cli_verify(root: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["verify", str(root), *extra])
    return result.exit_code, result.output


def flip_byte(path: Path) -> bytes:
    data = path.read_bytes()
    pos = len(data) // 2
    flipped = bytearray(data)
    flipped[pos] ^= 0x5A
    path.write_bytes(bytes(flipped))
    return data


def test_verify_catches_a_flipped_byte_in_every_file(small_store: tuple[Path, list[dict]]
                                                     ) -> None:
    root, _ = small_store
    assert verify_store(root) == [] and cli_verify(root) == (0, f"{root}: OK\n")
    part = root / "parts" / "00000"
    commit = json.loads((part / "COMMIT.json").read_text())
    files = sorted(commit["files"])
    assert {"zarr.json", "meta.parquet", "ids/zarr.json", "ids/c/0/0", "logp/c/0/0",
            "seq_offsets/c/0", "seq_ids/c/0"} <= set(files)
    for rel in [*files, "COMMIT.json"]:
        path = part / rel
        original = flip_byte(path)
        try:
            problems = verify_store(root)
            assert any(str(path) in p for p in problems), (rel, problems)
            code, output = cli_verify(root)
            assert code == 1 and str(path) in output, (rel, output)
            with pytest.raises(StoreError):
                open_store(root, verify="full")
        finally:
            path.write_bytes(original)
    assert verify_store(root) == []


def test_verify_catches_truncation_missing_parts_and_extra_files(
        small_store: tuple[Path, list[dict]]) -> None:
    root, _ = small_store
    part = root / "parts" / "00001"
    for rel in ("ids/c/0/0", "logp/c/0/0"):  # a raw chunk, a zstd shard
        chunk = part / rel
        original = chunk.read_bytes()
        chunk.write_bytes(original[:-7])
        problems = verify_store(root, full=False)  # sizes alone catch it
        assert any(str(chunk) in p and "bytes, expected" in p for p in problems), problems
        with pytest.raises(CorruptStoreError, match=str(chunk)):
            open_store(root)
        assert cli_verify(root, "--quick")[0] == 1
        chunk.write_bytes(original)

    extra = part / "ids" / "c" / "9"
    extra.write_bytes(b"junk")
    problems = verify_store(root)
    assert problems == [f"{extra}: not listed in COMMIT.json"]
    code, output = cli_verify(root)
    assert code == 1 and str(extra) in output
    extra.unlink()

    moved = root / "moved"
    shutil.move(part, moved)
    problems = verify_store(root)
    assert any("part 1 missing" in p for p in problems)
    with pytest.raises(CorruptStoreError, match="part 1 missing"):
        open_store(root)
    assert cli_verify(root)[0] == 1
    shutil.move(moved, part)
    assert verify_store(root) == []


def test_verify_catches_a_hand_edited_manifest(small_store: tuple[Path, list[dict]]) -> None:
    root, _ = small_store
    path = root / "manifest.json"
    original = path.read_text()
    manifest = json.loads(original)
    manifest["num_rows"] += 1
    path.write_text(json.dumps(manifest))
    problems = verify_store(root)
    assert any(str(path) in p and "checksum mismatch" in p for p in problems)
    code, output = cli_verify(root)
    assert code == 1 and "manifest.json" in output
    path.write_text("{not json")
    assert any("manifest.json" in p for p in verify_store(root))
    path.write_text(original)
    assert verify_store(root) == []


def test_commit_paths_outside_the_part_are_reported_never_opened(
        small_store: tuple[Path, list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = small_store
    secret = root.parent / "outside.txt"
    secret.write_text("secret")
    commit_path = root / "parts" / "00000" / "COMMIT.json"
    commit = json.loads(commit_path.read_text())
    rec = {"bytes": 6, "sha256": "0" * 64}
    commit["files"]["../../outside.txt"] = rec
    commit["files"]["ids/../../../outside.txt"] = rec
    commit["files"][str(secret)] = rec
    commit_path.write_text(json.dumps(commit))

    touched: list[str] = []
    real_open = builtins.open

    def spy_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        touched.append(os.path.realpath(file) if isinstance(file, (str, Path)) else str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    problems = verify_store(root)
    with pytest.raises(CorruptStoreError, match="escapes the part"):
        open_store(root)
    monkeypatch.undo()
    escapes = [p for p in problems if "escapes the part" in p]
    assert len(escapes) == 3, problems
    assert str(secret.resolve()) not in touched
    code, output = cli_verify(root)
    assert code == 1 and "escapes the part" in output


def test_verify_reports_a_part_renamed_and_a_missing_header(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_store(root, Header("test", 2, (ArraySpec("x", "int32"),)), [[2], [3]])
    p0, p1 = root / "parts" / "00000", root / "parts" / "00001"
    p0.rename(tmp_path / "tmp")
    p1.rename(p0)
    (tmp_path / "tmp").rename(p1)
    problems = verify_store(root)
    assert any("records part 1, found as part 0" in p for p in problems), problems
    assert verify_store(tmp_path / "nothing") == [f"{tmp_path / 'nothing' / 'store.json'}: "
                                                  "missing; not an mtkd store"]
    assert cli_verify(tmp_path / "nothing")[0] == 1


# --------------------------------------------------------------------------- crashes


KILL_SCRIPT = textwrap.dedent("""
    import sys
    import time
    import numpy as np
    from mtkd.store import ArraySpec, Header, StoreWriter, core

    root, rows, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
    if slow:  # widen the window between the temp dir appearing and the rename
        fsync = core._fsync_file
        core._fsync_file = lambda path: (time.sleep(0.05), fsync(path))
    header = Header("test", 3, (ArraySpec("ids", "int32", (16,)),
                                ArraySpec("logp", "float16", (16,), "zstd")))
    writer = StoreWriter(root, header)
    for part in writer.pending_parts():
        ids = np.arange(rows * 16, dtype=np.int32).reshape(rows, 16) + part
        logp = -np.abs(np.sin(ids)).astype(np.float16)
        lengths = np.full(rows // 1000, 1000)
        with writer.open_part(part) as pw:
            pw.append({"ids": ids, "logp": logp}, lengths,
                      (part << 32) + np.arange(len(lengths)))
        print("committed", part, flush=True)
    print("complete" if writer.finalize() else "incomplete", flush=True)
""")


def run_writer(root: Path, rows: int, slow: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root), str(rows),
                             "slow" if slow else "fast"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_writer_killed_mid_part_leaves_nothing_committed(tmp_path: Path) -> None:
    root = tmp_path / "s"
    rows = 250_000  # 16 MB of ids and 8 MB of log-probs per part
    proc = run_writer(root, rows, slow=True)
    deadline = time.monotonic() + 60
    # part 0 committed, part 1 being written (its group metadata is the first file in it)
    while not list(root.glob("parts/.tmp-00001-*/zarr.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    assert (root / "parts" / "00000" / "COMMIT.json").exists()
    assert not (root / "parts" / "00001").exists()
    assert list((root / "parts").glob(".tmp-00001-*"))  # the debris is there, never read
    with pytest.raises(IncompleteStoreError, match="2 of 3 parts uncommitted"):
        open_store(root)
    problems = verify_store(root)
    assert any("manifest.json: missing" in p for p in problems)
    assert any("part 1 missing or uncommitted" in p for p in problems)
    assert cli_verify(root)[0] == 1

    proc = run_writer(root, rows)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split() == ["committed", "1", "committed", "2", "complete"]
    assert not list((root / "parts").glob(".tmp-*"))  # the dead writer's temp part is gone
    assert verify_store(root) == []
    store = open_store(root, verify="full")
    for part in range(3):
        ids = store.read_part(part, ["ids"])["ids"]
        assert ids.shape == (rows, 16) and ids[0, 0] == part and ids[-1, -1] == rows * 16 - 1 + part


def test_concurrent_writers_of_one_part_leave_one_sound_copy(tmp_path: Path) -> None:
    root = tmp_path / "s"
    header = Header("test", 1, (ArraySpec("x", "int32", (4,)), ArraySpec("y", "float16",
                                                                         (), "zstd")))
    writers = [StoreWriter(root, header).open_part(0) for _ in range(2)]
    for value, pw in enumerate(writers):
        pw.append({"x": np.full((50, 4), value), "y": np.full(50, value)}, [20, 30], [0, 1])
    # the second commits first here; both race in threads below
    writers[1].commit()
    writers[0].commit()
    assert (writers[0].won, writers[1].won) == (False, True)
    assert StoreWriter(root, header).finalize() and verify_store(root) == []
    assert (open_store(root).read_part(0)["x"] == 1).all()
    assert not list((root / "parts").glob(".tmp-*"))

    for attempt in range(3):
        root = tmp_path / f"race{attempt}"
        writers = [StoreWriter(root, header).open_part(0) for _ in range(4)]
        for value, pw in enumerate(writers):
            pw.append({"x": np.full((50, 4), value), "y": np.full(50, value)}, [20, 30], [0, 1])
        barrier = threading.Barrier(len(writers))

        def go(pw, barrier=barrier):  # type: ignore[no-untyped-def]
            barrier.wait()
            pw.commit()

        threads = [threading.Thread(target=go, args=(pw,)) for pw in writers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(pw.won for pw in writers) == [False, False, False, True]
        winner = next(v for v, pw in enumerate(writers) if pw.won)
        assert StoreWriter(root, header).finalize()
        assert verify_store(root) == []
        batch = open_store(root, verify="full").read_part(0)
        assert (batch["x"] == winner).all() and (batch["y"] == winner).all()
        assert not list((root / "parts").glob(".tmp-*"))


def test_concurrent_writer_processes(tmp_path: Path) -> None:
    root = tmp_path / "s"
    procs = [run_writer(root, 20_000) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert verify_store(root) == []
    assert not list((root / "parts").glob(".tmp-*"))
    assert open_store(root, verify="full").num_rows == 60_000


# --------------------------------------------------------------------------- schema


def test_schema_headers() -> None:
    tok = tokens_header(3, {"tokenizer_hash": "h"})
    assert tok.kind == TOKENS and [a.name for a in tok.arrays] == ["token_ids"]
    teacher = teacher_header(2, 8, {"vocab_size": 1000}, temperatures=(1.0, 2.0),
                             num_samples=5)
    assert teacher.kind == TEACHER and teacher.schema_version == 2
    # default: the q64 top-k coding (byte planes; ids in 2 bytes for this vocabulary)
    assert teacher.attrs["topk_coding"] == "q64"
    assert teacher.spec("topk_ids") == ArraySpec("topk_ids", "uint8", (2, 8), "zstd")
    assert teacher.spec("topk_logprobs") == ArraySpec("topk_logprobs", "uint8", (2, 8), "zstd")
    assert teacher_header(2, 8, {}).spec("topk_ids").row_shape == (4, 8)  # no vocab: 4 bytes
    plain = teacher_header(2, 8, {"topk_coding": "q64"}, logprob_dtype="float16")
    assert plain.schema_version == 1 and "topk_coding" not in plain.attrs
    assert plain.spec("topk_ids") == ArraySpec("topk_ids", "int32", (8,), "zstd")
    assert plain.spec("topk_logprobs").dtype == "float16"
    with pytest.raises(ValueError, match="logprob dtype 'int8'"):
        teacher_header(2, 8, {}, logprob_dtype="int8")
    assert teacher.spec("tempered_tail_logmass").row_shape == (2,)
    assert teacher.spec("sample_counts").dtype == "uint16"
    assert teacher.attrs["k"] == 8 and teacher.attrs["temperatures"] == [1.0, 2.0]
    target = target_header(2, 16, 3, {}, teacher_ks=(8, 8))
    assert target.kind == TARGET and all(a.codec == "raw" for a in target.arrays)
    assert target.spec("weights").row_shape == (3,)
    assert target.spec("teacher1_probs").row_shape == (8,)
    assert vocab_fingerprint({"a": 0, "b": 1}) == vocab_fingerprint({"b": 1, "a": 0})
    assert vocab_fingerprint({"a": 0, "b": 1}) != vocab_fingerprint({"a": 1, "b": 0})


def test_check_aligned(tmp_path: Path) -> None:
    write_store(tmp_path / "tok", tokens_header(1, {}), [[3, 4]])
    tokens = open_store(tmp_path / "tok", TOKENS)
    good = Header(TEACHER, 1, (ArraySpec("x", "int32"),),
                  {"tokens_fingerprint": tokens.manifest["checksum"]})
    bad = Header(TEACHER, 1, (ArraySpec("x", "int32"),), {"tokens_fingerprint": "other"})
    write_store(tmp_path / "good", good, [[2, 3]])
    write_store(tmp_path / "bad", bad, [[2, 3]])
    check_aligned(tokens, open_store(tmp_path / "good"))
    with pytest.raises(StoreError, match="different tokens store"):
        check_aligned(tokens, open_store(tmp_path / "bad"))
