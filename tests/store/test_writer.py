"""Writing a store: what append accepts, atomic commits, header agreement, worker shares,
resume; writers killed mid-part and writers racing for one part."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mtkd.store import (
    ArraySpec,
    CorruptStoreError,
    Header,
    IncompleteStoreError,
    StoreError,
    StoreWriter,
    open_store,
    verify_store,
)
from mtkd.store.fs import HOST, STALE_TMP_SECONDS
from mtkd.store.schema import teacher_header
from mtkd.store.writer import pending_parts

from .stores import REPO, cli_verify, write_store

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
    StoreWriter(tmp_path / "t2", teacher_header(4, 64, {"teacher_revision": "1"}))
    with pytest.raises(StoreError, match=r"attrs\.teacher_revision.*stored \"1\", asked \"2\""):
        StoreWriter(tmp_path / "t2", teacher_header(4, 64, {"teacher_revision": "2"}))
    with pytest.raises(StoreError, match=r"arrays\.topk_ids\.codec"):
        StoreWriter(tmp_path / "t", teacher_header(4, 64, {"teacher": "a"}, codec="raw"))
    StoreWriter(tmp_path / "t", teacher_header(4, 64, {"teacher": "a"}))  # same: accepted


def test_a_worker_that_finds_the_makers_elsewhere_joins_the_store(tmp_path: Path) -> None:
    """A tokenizer's or teacher's path (another mount, a node-local copy) is where it was
    found, not what it is (its hash or revision is compared): such a worker joins the store,
    which keeps its creator's header, manifest and all; another identity is still refused."""
    made = {"teacher": "/mnt/a/model", "teacher_revision": "r1", "tokenizer_hash": "h"}
    first = StoreWriter(tmp_path / "t", teacher_header(2, 8, made))
    other = StoreWriter(tmp_path / "t", teacher_header(2, 8, {**made, "teacher": "/local/m"}))
    assert other.header.attrs["teacher"] == "/mnt/a/model" == first.header.attrs["teacher"]
    with pytest.raises(StoreError, match=r"attrs\.tokenizer_hash"):
        StoreWriter(tmp_path / "t", teacher_header(2, 8, {**made, "tokenizer_hash": "g"}))


def test_a_store_of_another_kind_is_named_first(tmp_path: Path) -> None:
    """A tokens store asked where a teacher store lies: one short line naming both kinds, not
    every field that differs."""
    StoreWriter(tmp_path / "t", teacher_header(4, 64, {"teacher": "a"}))
    with pytest.raises(StoreError) as err:
        StoreWriter(tmp_path / "t", Header("tokens", 4, (ArraySpec("token_ids", "int32"),)))
    assert "already holds a teacher store, not a tokens store" in str(err.value)
    assert "arrays." not in str(err.value) and len(str(err.value)) < 200


def test_a_store_is_not_written_into_other_files(tmp_path: Path) -> None:
    """--out naming a directory of other files, or a file, is refused before anything is
    written there; an empty directory, or one a killed creator left, is used."""
    header = Header("t", 1, (ArraySpec("x", "int64"),))
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"not an mtkd store \(it holds notes\.txt\)"):
        StoreWriter(home, header)
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file, not an mtkd store"):
        StoreWriter(tmp_path / "file", header)
    (tmp_path / "empty").mkdir()
    StoreWriter(tmp_path / "empty", header)
    (tmp_path / "begun" / "parts").mkdir(parents=True)  # a creator killed before store.json
    (tmp_path / "begun" / ".tmp-store.json.host-1-ab").write_text("")
    StoreWriter(tmp_path / "begun", header)


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


def test_pending_parts_of_a_store_that_may_not_exist_yet(tmp_path: Path) -> None:
    """What a worker would run, before it creates the store (harvest: the engine first)."""
    root = tmp_path / "s"
    assert pending_parts(root, 5, 1, 2) == [1, 3] and not root.exists()
    with pytest.raises(StoreError, match=r"worker index 2 is not in \[0, 2\)"):
        pending_parts(root, 5, 2, 2)
    writer = StoreWriter(root, Header("t", 5, (ArraySpec("x", "int64"),)))
    with writer.open_part(3) as pw:
        pw.append({"x": np.arange(2)}, [2], [0])
    assert pending_parts(root, 5, 1, 2) == writer.pending_parts(1, 2) == [1]
    assert writer.pending_parts() == [0, 1, 2, 4]


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
    dead = parts / f".tmp-00000-{HOST}-{proc.pid}-abc"
    live = parts / f".tmp-00000-{HOST}-{os.getpid()}-abc"
    foreign_old = parts / ".tmp-00000-otherhost-123-abc"
    foreign_new = parts / ".tmp-00001-otherhost-123-abc"
    for d in (dead, live, foreign_old, foreign_new):
        (d / "x").mkdir(parents=True)
        (d / "x" / "zarr.json").write_text("{}")
    old = time.time() - 2 * STALE_TMP_SECONDS
    for path in (foreign_old, foreign_old / "x", foreign_old / "x" / "zarr.json"):
        os.utime(path, (old, old))
    writer.open_part(0)
    assert not dead.exists() and not foreign_old.exists()
    assert live.exists() and foreign_new.exists()


# --------------------------------------------------------------------------- crashes


KILL_SCRIPT = textwrap.dedent("""
    import sys
    import time
    import numpy as np
    from mtkd.store import ArraySpec, Header, StoreWriter
    from mtkd.store import part_writer

    root, rows, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
    if slow:  # widen the window between the temp dir appearing and the rename
        fsync = part_writer.fsync
        part_writer.fsync = lambda path: (time.sleep(0.05), fsync(path))
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
