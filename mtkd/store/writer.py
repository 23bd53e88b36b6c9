"""Writing a store: parts committed atomically, the manifest once every part is in.

A part is written into a temporary directory and renamed into place only after its
``COMMIT.json`` is on disk, so a killed writer leaves nothing that reads as committed, and any
number of workers may write disjoint parts of one store at once (a lost race for the same part
is harmless: the rename fails and the loser discards its copy). A rerun skips committed parts
and removes temp parts whose writer is dead.

Arrays are written either ``raw`` (one uncompressed chunk per part: the chunk file *is* the
little-endian C-order buffer, memory-mapped by the reader for fast shuffled access) or ``zstd``
(sharded and compressed, read through zarr; for stores read sequentially). Both are plain
Zarr v3 that any zarr client opens. A teacher store may code its top-k columns
(``attrs.topk_coding``, see ``topk_codec``): ``PartWriter.append`` encodes them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from mtkd.store.errors import CorruptStoreError, StoreError, io_error
from mtkd.store.format import (
    COMMIT_FILE,
    HEADER_FILE,
    MANIFEST_FILE,
    PARTS_DIR,
    RESERVED_ARRAYS,
    TMP_PREFIX,
    Header,
    canonical_json,
    diff_fields,
    identity,
    jsonable,
    part_name,
    read_json,
    short_json,
)
from mtkd.store.fs import (
    create_exclusive,
    file_sha256,
    fsync,
    tmp_file,
    tmp_is_stale,
    unfit_output_dir,
    write_json_atomic,
    write_synced,
)
from mtkd.store.part_writer import PartWriter
from mtkd.store.topk_codec import coding


def worker_parts(num_parts: int, worker_index: int = 0, num_workers: int = 1) -> list[int]:
    """A worker's share of a store's parts (round robin), committed or not."""
    if not 0 <= worker_index < num_workers:
        raise StoreError(f"worker index {worker_index} is not in [0, {num_workers})")
    return list(range(worker_index, num_parts, num_workers))


def is_committed(root: str | os.PathLike[str], part: int) -> bool:
    """Whether ``part`` of the store at ``root`` is committed (its commit record is there)."""
    return (Path(root) / PARTS_DIR / part_name(part) / COMMIT_FILE).exists()


def pending_parts(root: str | os.PathLike[str], num_parts: int, worker_index: int = 0,
                  num_workers: int = 1) -> list[int]:
    """A worker's parts not yet committed in the store at ``root`` (which may not exist yet)."""
    return [p for p in worker_parts(num_parts, worker_index, num_workers)
            if not is_committed(root, p)]


class StoreWriter:
    """Creates a store (or reopens one with an identical header) and hands out part writers."""

    def __init__(self, root: str | os.PathLike[str], header: Header) -> None:
        self.root = Path(root)
        self.header = header
        if header.num_parts < 1:
            raise StoreError(f"{self.root}: a store needs at least one part")
        for a in header.arrays:
            if a.name in RESERVED_ARRAYS:
                raise StoreError(f"array name {a.name!r} is reserved")
        try:
            coding(header.attrs)
        except ValueError as e:
            raise StoreError(f"{self.root}: {e}") from e
        check_store_dir(self.root)
        try:
            (self.root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise io_error(f"{self.root}: cannot create the store", e) from e
        self._claim_header()

    def _claim_header(self) -> None:
        path = self.root / HEADER_FILE
        wanted = jsonable(self.header.to_json())
        if not path.exists():
            tmp = tmp_file(path)
            try:
                with open(tmp, "wb") as f:
                    write_synced(f, canonical_json(wanted))
                try:
                    os.link(tmp, path)  # atomic and never overwrites: concurrent creators agree
                except FileExistsError:
                    pass
                except OSError:  # a file system without hard links: exclusive create instead
                    create_exclusive(path, canonical_json(wanted))
            except OSError as e:
                raise io_error(f"{self.root}: cannot create {HEADER_FILE}", e) from e
            finally:
                tmp.unlink(missing_ok=True)
        found = read_json(path)
        kind = found.get("kind") if isinstance(found, dict) else None
        if kind != wanted["kind"]:  # say so first: every other field differs too
            held = f"a {kind} store" if isinstance(kind, str) else f"a {HEADER_FILE} of no kind"
            raise StoreError(f"{self.root} already holds {held}, not a {wanted['kind']} store; "
                             "use a new output directory")
        if identity(found) != identity(wanted):
            diff = diff_fields(identity(found), identity(wanted))
            shown = "; ".join(f"{name}: stored {short_json(a)}, asked {short_json(b)}"
                              for name, a, b in diff[:5])
            raise StoreError(
                f"{self.root} already holds a store with a different "
                f"{', '.join(name for name, _, _ in diff)} ({shown}); "
                "use a new output directory or the same settings"
            )
        if found != wanted:  # the same store, its makers found elsewhere: the creator's header
            self.header = Header.from_json(found, path)

    def part_dir(self, part: int) -> Path:
        return self.root / PARTS_DIR / part_name(part)

    def is_committed(self, part: int) -> bool:
        return is_committed(self.root, part)

    def commit_record(self, part: int) -> dict[str, Any]:
        """Part ``part``'s commit record (counts and ``stats``); the part must be committed."""
        return read_json(self.part_dir(part) / COMMIT_FILE)

    def parts_for_worker(self, worker_index: int = 0, num_workers: int = 1) -> list[int]:
        """This worker's share of the parts (round robin), committed or not."""
        return worker_parts(self.header.num_parts, worker_index, num_workers)

    def pending_parts(self, worker_index: int = 0, num_workers: int = 1) -> list[int]:
        """This worker's parts that are not yet committed."""
        return pending_parts(self.root, self.header.num_parts, worker_index, num_workers)

    def open_part(self, part: int) -> PartWriter:
        """A writer for ``part``; abandoned temp copies of it (dead writers) are removed first.

        Temp copies of live writers are left alone: two writers of one part may race, the
        first rename wins and the other discards its copy.
        """
        if not 0 <= part < self.header.num_parts:
            raise StoreError(f"part {part} is not in [0, {self.header.num_parts})")
        self.remove_stale_temps(part)
        return PartWriter(self, part)

    def remove_stale_temps(self, part: int | None = None) -> list[Path]:
        """Delete temp parts whose writer is dead (this host) or silent for an hour (others)."""
        pattern = f"{TMP_PREFIX}{part_name(part)}-*" if part is not None else f"{TMP_PREFIX}*"
        removed = []
        for tmp in (self.root / PARTS_DIR).glob(pattern):
            if tmp.is_dir() and tmp_is_stale(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        if part is None:  # store.json / manifest.json temp files of killed writers
            for tmp in self.root.glob(f"{TMP_PREFIX}*"):
                if tmp.is_file() and tmp_is_stale(tmp):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed

    def finalize(self) -> bool:
        """Write the manifest if every part is committed; return whether the store is complete.

        An existing manifest is rebuilt and replaced if a part was recommitted since (a deleted
        part redone by a rerun), so the manifest always describes the committed parts.
        """
        if not all(self.is_committed(p) for p in range(self.header.num_parts)):
            return False
        manifest = build_manifest(self.root, self.header)
        path = self.root / MANIFEST_FILE
        try:
            current = read_json(path)
        except (FileNotFoundError, CorruptStoreError):
            current = None
        if current != jsonable(manifest):
            try:
                write_json_atomic(path, manifest)
                fsync(self.root)
            except OSError as e:
                raise io_error(f"{self.root}: cannot write {MANIFEST_FILE}", e) from e
        self.remove_stale_temps()
        return True


def check_store_dir(root: str | os.PathLike[str]) -> None:
    """Refuse to create a store in a file, or in a directory of other files (an ``--out``
    mistyped as the user's own directory): the store would mix with them. ``StoreWriter``
    calls it; a job that starts something slow first (an engine) may call it before.

    A directory with no ``store.json`` may hold only what a creator killed before writing it
    leaves (``parts/``, temp files), so a rerun or a concurrent worker still goes on.
    """
    why = unfit_output_dir(Path(root), "an mtkd store", lambda names: HEADER_FILE in names or all(
        n == PARTS_DIR or n.startswith(TMP_PREFIX) for n in names))
    if why:
        raise StoreError(why)


def build_manifest(root: Path, header: Header) -> dict[str, Any]:
    """The manifest: header, per-part counts and the checksum of each part's commit record."""
    parts = []
    for p in range(header.num_parts):
        commit_path = root / PARTS_DIR / part_name(p) / COMMIT_FILE
        commit = read_json(commit_path)
        parts.append(
            {
                "part": p,
                "num_sequences": commit["num_sequences"],
                "num_rows": commit["num_rows"],
                "commit_sha256": file_sha256(commit_path),
            }
        )
    body = header.to_json() | {
        "num_sequences": sum(p["num_sequences"] for p in parts),
        "num_rows": sum(p["num_rows"] for p in parts),
        "parts": parts,
    }
    return body | {"checksum": hashlib.sha256(canonical_json(body)).hexdigest()}
