"""Verification: every flipped byte, truncation, missing or extra file, hand-edited manifest,
renamed part and path escape is found and named, by ``verify_store`` and ``mtkd verify``."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest

from mtkd.store import ArraySpec, CorruptStoreError, Header, StoreError, open_store, verify_store

from .stores import cli_verify, flip_byte, write_store


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

    stray = root / "parts" / "00099"  # a part this store's header does not have
    shutil.copytree(part, stray)
    live = root / "parts" / ".tmp-00001-host-1-ab"  # a live writer's temp copy: not a problem
    live.mkdir()
    assert verify_store(root) == [f"{stray}: not a part of this store (3 parts); never read"]
    shutil.rmtree(stray)
    live.rmdir()


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
