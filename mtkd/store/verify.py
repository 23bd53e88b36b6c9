"""Rechecking a store against its records: what ``mtkd verify`` and every full open run."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mtkd.store.errors import CorruptStoreError, StoreError
from mtkd.store.format import (
    COMMIT_FILE,
    HEADER_FILE,
    MANIFEST_FILE,
    PARTS_DIR,
    TMP_PREFIX,
    Header,
    canonical_json,
    jsonable,
    part_name,
    read_json,
)
from mtkd.store.fs import file_sha256
from mtkd.store.part_reader import PartReader, part_escapes


def verify_store(root: str | os.PathLike[str], *, full: bool = True) -> list[str]:
    """Recheck a store; return one message per problem, each naming the file (empty: sound).

    Checks the manifest's checksum and its record of every part's commit; in every part, that
    each file its ``COMMIT.json`` lists is present with the recorded size (and, with ``full``,
    sha256), that no unlisted file or link is there, that no listed path leaves the part, and
    that the arrays' metadata and counts agree with the header and the commit record.
    """
    root = Path(root)
    problems: list[str] = []
    try:
        header = Header.from_json(read_json(root / HEADER_FILE), root)
    except FileNotFoundError:
        return [f"{root / HEADER_FILE}: missing; not an mtkd store"]
    except StoreError as e:  # names the header already
        return [str(e)]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        return [f"{root / HEADER_FILE}: {e}"]
    manifest_path = root / MANIFEST_FILE
    recorded: dict[int, Any] | None = None
    if not manifest_path.exists():
        problems.append(f"{manifest_path}: missing (store not complete)")
    else:
        try:
            manifest = read_json(manifest_path)
            if not isinstance(manifest, dict):
                raise CorruptStoreError(f"{manifest_path}: not a JSON object")
            body = {k: v for k, v in manifest.items() if k != "checksum"}
            if hashlib.sha256(canonical_json(body)).hexdigest() != manifest.get("checksum"):
                problems.append(f"{manifest_path}: checksum mismatch (edited by hand?)")
            want = jsonable(header.to_json())
            if want != {k: body.get(k) for k in want}:
                problems.append(f"{manifest_path}: header fields disagree with {HEADER_FILE}")
            recorded = {int(p["part"]): p for p in manifest.get("parts", [])}
        except (CorruptStoreError, KeyError, TypeError, AttributeError, ValueError) as e:
            problems.append(f"{manifest_path}: unreadable ({e})")
            recorded = {}
    for part in range(header.num_parts):
        pdir = root / PARTS_DIR / part_name(part)
        commit_path = pdir / COMMIT_FILE
        escapes = part_escapes(root, pdir)
        if escapes:  # never read: a part must not make a reader touch files outside the store
            problems.extend(escapes)
            continue
        if not commit_path.is_file():
            problems.append(f"{pdir}: part {part} missing or uncommitted")
            continue
        if recorded is not None:
            rec = recorded.get(part)
            if not isinstance(rec, dict) or rec.get("commit_sha256") != file_sha256(commit_path):
                problems.append(f"{commit_path}: does not match the manifest's record")
        try:
            commit = read_json(commit_path)
            problems.extend(verify_part(pdir, part, header, commit, full))
        except (CorruptStoreError, KeyError, TypeError, AttributeError, ValueError) as e:
            problems.append(f"{commit_path}: malformed ({e!r})")
    problems.extend(stray_parts(root, header))
    return problems


def stray_parts(root: Path, header: Header) -> list[str]:
    """Entries of ``parts/`` that are neither a part of the header nor a writer's temp copy:
    never read, so their data is in no reader's hands (a store copied over another, say)."""
    known = {part_name(p) for p in range(header.num_parts)}
    try:
        entries = sorted((root / PARTS_DIR).iterdir())
    except FileNotFoundError:
        return []
    return [f"{path}: not a part of this store ({header.num_parts} parts); never read"
            for path in entries if path.name not in known and not path.name.startswith(TMP_PREFIX)]


def verify_part(pdir: Path, part: int, header: Header, commit: Any, full: bool) -> list[str]:
    """Problems of one part's files against its commit record (sha256 too with ``full``)."""
    where = pdir / COMMIT_FILE
    real_pdir = pdir.resolve()
    if not isinstance(commit, dict) or not isinstance(commit.get("files"), dict):
        return [f"{where}: not a commit record"]
    problems = []
    if commit.get("part") != part:
        problems.append(f"{where}: records part {commit.get('part')!r}, found as part {part}")
    listed = set()
    for rel, rec in commit["files"].items():
        rel_path = Path(rel)
        if not rel or rel_path.is_absolute() or ".." in rel_path.parts or "\\" in rel:
            # never opened: a commit record must not make a reader touch files outside the part
            problems.append(f"{where}: file path {rel!r} escapes the part")
            continue
        listed.add(rel_path.as_posix())
        path = pdir / rel_path
        if path.is_symlink():
            problems.append(f"{path}: a symbolic link (parts hold plain files)")
        elif not path.resolve().is_relative_to(real_pdir):  # a linked directory on the way
            problems.append(f"{where}: file path {rel!r} escapes the part (symbolic link)")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != rec["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {rec['bytes']}")
        elif full and file_sha256(path) != rec["sha256"]:
            problems.append(f"{path}: checksum mismatch")
    for path in sorted(pdir.rglob("*")):
        rel = path.relative_to(pdir).as_posix()
        if (path.is_file() or path.is_symlink()) and rel != COMMIT_FILE and rel not in listed:
            problems.append(f"{path}: not listed in {COMMIT_FILE}")
    num_rows = commit.get("num_rows")
    required = {"zarr.json", "seq_offsets/zarr.json", "seq_offsets/c/0", "seq_ids/zarr.json"}
    for spec in header.arrays:
        required.add(f"{spec.name}/zarr.json")
        if spec.codec == "raw" and num_rows:
            required.add(f"{spec.name}/c/" + "/".join("0" for _ in range(1 + len(spec.row_shape))))
    for rel in sorted(required - listed):
        problems.append(f"{pdir / rel}: required but not listed in {COMMIT_FILE}")
    if not problems:  # files sound: check that metadata and counts agree with the header
        try:
            reader = PartReader(pdir, header, commit)
            for spec in header.arrays:
                reader.array(spec.name)
        except CorruptStoreError as e:
            problems.append(str(e))
        except Exception as e:  # zarr refusing its own metadata, e.g.
            problems.append(f"{pdir}: unreadable ({e!r})")
    return problems
