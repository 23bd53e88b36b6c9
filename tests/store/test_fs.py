"""File-system primitives: atomic JSON records, stale temp names, bytes on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from mtkd.store import bytes_on_disk
from mtkd.store.fs import HOST, remove_settled, tmp_file, tmp_is_stale, write_json_atomic


def test_write_json_atomic_leaves_only_the_record(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_json_atomic(path, {"b": [1, 2], "a": (3,)})
    assert json.loads(path.read_text()) == {"a": [3], "b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_temp_names_tell_dead_writers_from_live_ones(tmp_path: Path) -> None:
    live = tmp_file(tmp_path / "store.json")
    assert live.name.startswith(f".tmp-store.json-{HOST}-{os.getpid()}-")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is surely dead now
    dead = tmp_path / f".tmp-store.json-{HOST}-{proc.pid}-abc"
    for path in (live, dead):
        path.write_text("{")
    assert not tmp_is_stale(live) and tmp_is_stale(dead)


def test_bytes_on_disk_counts_every_file_below(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "x").write_bytes(b"12345")
    (tmp_path / "a" / "b" / "y").write_bytes(b"123")
    assert bytes_on_disk(tmp_path) == 8
    assert bytes_on_disk(tmp_path / "missing") == 0


def test_remove_settled_outlasts_writes_still_in_flight(tmp_path: Path) -> None:
    """A writer that keeps recreating files under the tree for a while after the removal
    starts (zarr's sibling chunk writes after one failed): the tree is gone at the end."""
    tree = tmp_path / "tmp-part"
    (tree / "a").mkdir(parents=True)
    stop = time.monotonic() + 0.15

    def late_writes() -> None:
        while time.monotonic() < stop:
            (tree / "a" / "c").mkdir(parents=True, exist_ok=True)
            (tree / "a" / "c" / "0").write_bytes(b"x")
            time.sleep(0.005)

    writer = threading.Thread(target=late_writes)
    writer.start()
    remove_settled(tree)
    writer.join()
    assert not tree.exists()
