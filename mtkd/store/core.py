"""A part-based store of ragged arrays with atomic, verifiable commits.

A store is a directory::

    store.json              header: kind, schema version, attributes, number of parts
    parts/00000/            a committed part: one Zarr v3 group written by one writer
        zarr.json, <array>/ Zarr v3 arrays; row-level arrays share a leading "rows" axis
        seq_offsets/        int64 [S+1] row offsets of the part's sequences
        seq_ids/            int64 [S] global sequence ids
        meta.parquet        optional per-sequence metadata
        COMMIT.json         counts and sha256 of every file, written last
    parts/.tmp-00001-<host>-<pid>-<random>/   a part being written (never read)
    manifest.json           written once every part is committed; its presence means complete

A part is written into a temporary directory and renamed into place only after its
``COMMIT.json`` is on disk, so a killed writer leaves nothing that reads as committed, and any
number of workers may write disjoint parts of one store at once (a lost race for the same part
is harmless: the rename fails and the loser discards its copy). A rerun skips committed parts
and removes temp parts whose writer is dead. docs/FORMAT.md is the full specification.

Arrays are written either ``raw`` (one uncompressed chunk per part: the chunk file *is* the
little-endian C-order buffer, memory-mapped by the reader for fast shuffled access) or ``zstd``
(sharded and compressed, read through zarr; for stores read sequentially).  Both are plain
Zarr v3 that any zarr client opens. A teacher store may code its top-k columns
(``attrs.topk_coding``, see ``topk_codec``): ``PartWriter.append`` encodes them and every read
decodes them, so callers see plain ids and log-probs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

from mtkd.store.topk_codec import coding, decode_rows, encode_rows, stored_names

FORMAT_NAME = "mtkd-store"
#: The newest schema version this mtkd reads; a store is written with the oldest version that
#: describes it (``Header.schema_version``), so older readers keep reading what they can.
SCHEMA_VERSION = 2
HEADER_FILE = "store.json"
MANIFEST_FILE = "manifest.json"
COMMIT_FILE = "COMMIT.json"
META_FILE = "meta.parquet"
PARTS_DIR = "parts"
TMP_PREFIX = ".tmp-"
SHARD_ROWS = 1 << 17
CHUNK_ROWS = 1 << 13
STALE_TMP_SECONDS = 3600  # a temp part of another host untouched this long is abandoned
#: Environment variable choosing how much ``open_store`` checks when its caller does not say:
#: ``full`` (default: sizes and sha256 of every file) or ``size`` (sizes only; for stores too
#: large to hash at every open, once ``mtkd verify`` has checked them).
VERIFY_ENV = "MTKD_VERIFY"

Codec = Literal["raw", "zstd"]
Verify = Literal["none", "size", "full"]


class StoreError(Exception):
    """A store cannot be used as asked; the message names the store and the reason."""


class IncompleteStoreError(StoreError):
    """The store is not fully committed."""


class CorruptStoreError(StoreError):
    """Files of a committed store do not match their recorded counts or checksums."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store's schema: rows × ``row_shape`` of ``dtype``, stored with ``codec``."""

    name: str
    dtype: str
    row_shape: tuple[int, ...] = ()
    codec: Codec = "raw"

    def __post_init__(self) -> None:
        # Plain numbers only: raw chunks are memory-mapped, and an object dtype would turn the
        # file's bytes into Python object pointers (a crafted store could crash the reader).
        try:
            dt = np.dtype(self.dtype)
        except TypeError as e:
            raise StoreError(f"array {self.name!r}: unknown dtype {self.dtype!r}") from e
        if dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
            raise StoreError(f"array {self.name!r}: dtype {self.dtype!r} is not allowed "
                             "(booleans, integers and floats only)")
        if any(not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0
               for n in self.row_shape):
            raise StoreError(f"array {self.name!r}: bad row shape {list(self.row_shape)}")

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "row_shape": list(self.row_shape), "codec": self.codec}

    @classmethod
    def from_json(cls, name: str, spec: Mapping[str, Any]) -> ArraySpec:
        return cls(name, spec["dtype"], tuple(spec["row_shape"]), spec["codec"])


RESERVED_ARRAYS = ("seq_offsets", "seq_ids")


@dataclass(frozen=True)
class Header:
    """What every writer of a store must agree on; compared field by field on reopen.

    ``schema_version``: 1, or 2 for a teacher store whose top-k columns are coded
    (``attrs.topk_coding``, see ``topk_codec``), which a version-1 reader would misread.
    """

    kind: str
    num_parts: int
    arrays: tuple[ArraySpec, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "kind": self.kind,
            "num_parts": self.num_parts,
            "arrays": {a.name: a.to_json() for a in self.arrays},
            "attrs": _jsonable(self.attrs),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: Path) -> Header:
        if obj.get("format") != FORMAT_NAME:
            raise StoreError(f"{where}: not an mtkd store (format={obj.get('format')!r})")
        version = obj.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) \
                or not 1 <= version <= SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema version {version} is not supported "
                f"(this mtkd reads versions 1 to {SCHEMA_VERSION})"
            )
        try:
            arrays = tuple(ArraySpec.from_json(n, s) for n, s in obj["arrays"].items())
            attrs = obj.get("attrs", {})
            coding(attrs)
        except (StoreError, ValueError) as e:
            raise StoreError(f"{where / HEADER_FILE}: {e}") from e
        return cls(obj["kind"], int(obj["num_parts"]), arrays, attrs, version)

    def spec(self, name: str) -> ArraySpec:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(name)


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so that headers compare equal however they were built."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_MISSING = object()


def _diff_fields(found: Any, wanted: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted names of the fields where two JSON objects differ (``attrs.k``, ``num_parts``)."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(found) | set(wanted)):
            a, b = found.get(key, _MISSING), wanted.get(key, _MISSING)
            if a != b:
                out += _diff_fields(a, b, f"{prefix}{key}.")
        return out
    return [(prefix.rstrip("."), None if found is _MISSING else found,
             None if wanted is _MISSING else wanted)]


def _short_json(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1, default=_json_default).encode()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` via a temporary file, fsync and rename."""
    tmp = _tmp_file(path)
    try:
        with open(tmp, "wb") as f:
            _write_synced(f, canonical_json(obj))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tmp_file(path: Path) -> Path:
    """``.tmp-<name>-<host>-<pid>-<random>`` next to ``path``: a killed writer's leftover is
    recognised as stale like a temp part (see :func:`_tmp_is_stale`)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")


def _io_error(what: str, e: OSError) -> StoreError:
    """An OSError (disk full, file too large, quota, permissions) as a one-line StoreError."""
    where = f" ({e.filename})" if e.filename else ""
    return StoreError(f"{what}: {e.strerror or e}{where}")


def _create_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        _write_synced(f, data)


def _write_synced(f: BinaryIO, data: bytes) -> None:
    """Write ``data`` and make it durable before the caller renames or links the file."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CorruptStoreError(f"{path}: unreadable JSON ({e})") from e


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def part_name(part: int) -> str:
    return f"{part:05d}"


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _tmp_part_dir(parts_dir: Path, part: int) -> Path:
    """``.tmp-<part>-<host>-<pid>-<random>``: who writes it, so reruns can tell dead from live."""
    return parts_dir / f"{TMP_PREFIX}{part_name(part)}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_is_stale(tmp: Path) -> bool:
    """A temp part is abandoned if its writer (this host) is dead or nothing in it changed
    for ``STALE_TMP_SECONDS`` (writers on other hosts cannot be asked)."""
    fields = tmp.name[len(TMP_PREFIX):].rsplit("-", 3)
    if len(fields) == 4 and fields[1] == _HOST and fields[2].isdigit() \
            and not _pid_alive(int(fields[2])):
        return True
    try:
        newest = max(q.lstat().st_mtime for q in [tmp, *tmp.rglob("*")])
    except OSError:  # vanished meanwhile (its writer committed or cleaned up)
        return False
    return time.time() - newest > STALE_TMP_SECONDS


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- writing


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
        try:
            (self.root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error(f"{self.root}: cannot create the store", e) from e
        self._claim_header()

    def _claim_header(self) -> None:
        path = self.root / HEADER_FILE
        wanted = _jsonable(self.header.to_json())
        if not path.exists():
            tmp = _tmp_file(path)
            try:
                with open(tmp, "wb") as f:
                    _write_synced(f, canonical_json(wanted))
                try:
                    os.link(tmp, path)  # atomic and never overwrites: concurrent creators agree
                except FileExistsError:
                    pass
                except OSError:  # a file system without hard links: exclusive create instead
                    _create_exclusive(path, canonical_json(wanted))
            except OSError as e:
                raise _io_error(f"{self.root}: cannot create {HEADER_FILE}", e) from e
            finally:
                tmp.unlink(missing_ok=True)
        found = read_json(path)
        if found != wanted:
            diff = _diff_fields(found, wanted)
            shown = "; ".join(f"{name}: stored {_short_json(a)}, asked {_short_json(b)}"
                              for name, a, b in diff[:5])
            raise StoreError(
                f"{self.root} already holds a store with a different "
                f"{', '.join(name for name, _, _ in diff)} ({shown}); "
                "use a new output directory or the same settings"
            )

    def part_dir(self, part: int) -> Path:
        return self.root / PARTS_DIR / part_name(part)

    def is_committed(self, part: int) -> bool:
        return (self.part_dir(part) / COMMIT_FILE).exists()

    def parts_for_worker(self, worker_index: int = 0, num_workers: int = 1) -> list[int]:
        """This worker's share of the parts (round robin), committed or not."""
        if not 0 <= worker_index < num_workers:
            raise StoreError(f"worker index {worker_index} is not in [0, {num_workers})")
        return list(range(worker_index, self.header.num_parts, num_workers))

    def pending_parts(self, worker_index: int = 0, num_workers: int = 1) -> list[int]:
        """This worker's parts that are not yet committed."""
        parts = self.parts_for_worker(worker_index, num_workers)
        return [p for p in parts if not self.is_committed(p)]

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
            if tmp.is_dir() and _tmp_is_stale(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        if part is None:  # store.json / manifest.json temp files of killed writers
            for tmp in self.root.glob(f"{TMP_PREFIX}*"):
                if tmp.is_file() and _tmp_is_stale(tmp):
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
        if current != _jsonable(manifest):
            try:
                write_json_atomic(path, manifest)
                _fsync_dir(self.root)
            except OSError as e:
                raise _io_error(f"{self.root}: cannot write {MANIFEST_FILE}", e) from e
        self.remove_stale_temps()
        return True


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


class PartWriter:
    """Buffers one part's sequences and commits them atomically.

    Use as a context manager: leaving the block normally commits, an exception discards.
    """

    def __init__(self, store: StoreWriter, part: int) -> None:
        self.store = store
        self.part = part
        self.tmp = _tmp_part_dir(store.root / PARTS_DIR, part)
        self._rows: dict[str, list[np.ndarray]] = {a.name: [] for a in store.header.arrays}
        self._lengths: list[np.ndarray] = []
        self._seq_ids: list[np.ndarray] = []
        self._meta: list[pa.Table] = []
        self.stats: dict[str, Any] = {}  # free-form counts kept in the commit record
        self.won: bool | None = None  # after commit: False if another writer committed first

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def discard(self) -> None:
        """Drop what was appended and any temp files."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        for chunks in self._rows.values():
            chunks.clear()
        self._lengths.clear()
        self._seq_ids.clear()
        self._meta.clear()

    def append(
        self,
        rows: Mapping[str, np.ndarray],
        seq_lengths: Sequence[int] | np.ndarray,
        seq_ids: Sequence[int] | np.ndarray,
        meta: pa.Table | None = None,
    ) -> None:
        """Add sequences: ``rows`` holds every schema array with Σ ``seq_lengths`` rows."""
        lengths = np.asarray(seq_lengths, dtype=np.int64)
        ids = np.asarray(seq_ids, dtype=np.int64)
        if lengths.shape != ids.shape or lengths.ndim != 1:
            raise StoreError("seq_lengths and seq_ids must be 1-D and of equal length")
        if (lengths < 0).any():
            raise StoreError("sequence lengths must be non-negative")
        n = int(lengths.sum())
        header = self.store.header
        missing = {a.name for a in header.arrays} - set(rows)
        extra = set(rows) - {a.name for a in header.arrays}
        if missing or extra:
            raise StoreError(f"rows do not match the schema: missing {missing}, unknown {extra}")
        if meta is not None and meta.num_rows != len(ids):
            raise StoreError(f"meta has {meta.num_rows} rows for {len(ids)} sequences")
        if meta is not None and "seq_id" in meta.column_names \
                and meta.column("seq_id").to_pylist() != ids.tolist():
            raise StoreError("meta's seq_id column differs from seq_ids")
        mixed = self._meta if meta is None else (self._lengths and not self._meta)
        if mixed:
            raise StoreError("meta must be given with every append of a part or with none")
        try:  # coded top-k columns (topk_codec): the checks below apply to what is stored
            rows = encode_rows(rows, header.attrs)
        except ValueError as e:
            raise StoreError(f"top-k rows cannot be coded: {e}") from e
        checked = {}
        for spec in header.arrays:  # check everything before keeping anything
            arr = np.asarray(rows[spec.name])
            want = (n, *spec.row_shape)
            if arr.shape != want:
                raise StoreError(f"array {spec.name}: shape {arr.shape}, expected {want}")
            _check_values(spec, arr)
            checked[spec.name] = arr
        for name, arr in checked.items():
            # a copy: callers may reuse their buffers once append returns
            self._rows[name].append(np.array(arr, dtype=header.spec(name).dtype, order="C"))
        if meta is not None:
            self._meta.append(meta)
        self._lengths.append(lengths)
        self._seq_ids.append(ids)

    def commit(self) -> None:
        """Write arrays and checksums into the temp dir, then rename it into place.

        On any error the temp dir is removed and nothing is committed.
        """
        try:
            self._commit()
        except OSError as e:  # disk full, file too large, quota: say so in one line
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise _io_error(f"{self.store.root}: part {self.part} not committed (nothing of it "
                            "was kept; rerun once the cause is fixed)", e) from e
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _commit(self) -> None:
        header = self.store.header
        lengths = _concat(self._lengths, np.int64, ())
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arrays = {
            "seq_offsets": (offsets, "raw"),
            "seq_ids": (_concat(self._seq_ids, np.int64, ()), "raw"),
        }
        for spec in header.arrays:
            data = _concat(self._rows[spec.name], spec.dtype, spec.row_shape)
            if len(data) != offsets[-1]:  # append keeps this invariant; never commit without it
                raise StoreError(f"array {spec.name}: {len(data)} rows for {offsets[-1]}")
            arrays[spec.name] = (data, spec.codec)
        self.tmp.mkdir(parents=True)
        # "w-": mode "w" would delete and recreate the fresh dir, a window where it is gone
        group = zarr.open_group(self.tmp, mode="w-", zarr_format=3)
        for name, (data, codec) in arrays.items():
            _write_array(group, name, data, codec)
        if self._meta:
            pq.write_table(pa.concat_tables(self._meta), self.tmp / META_FILE)
        files = {}
        for path in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
            files[path.relative_to(self.tmp).as_posix()] = {
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
            _fsync_file(path)
        expected = expected_files(arrays)
        if missing := sorted(expected - set(files)):
            raise StoreError(f"{self.tmp}: files vanished while committing: {missing[:5]}")
        commit = {
            "part": self.part,
            "num_sequences": len(lengths),
            "num_rows": int(offsets[-1]),
            "files": files,
            "stats": _jsonable(self.stats),
        }
        write_json_atomic(self.tmp / COMMIT_FILE, commit)
        for d in sorted((p for p in self.tmp.rglob("*") if p.is_dir()), reverse=True):
            _fsync_dir(d)
        _fsync_dir(self.tmp)
        final = self.store.part_dir(self.part)
        try:
            os.rename(self.tmp, final)  # atomic; fails if another writer's copy is in place
        except OSError:
            if (final / COMMIT_FILE).exists():  # another worker committed this part first
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.won = False
                return
            raise
        _fsync_dir(final.parent)
        self.won = True


def expected_files(arrays: Mapping[str, tuple[np.ndarray, str]]) -> set[str]:
    """Files a part must hold: the group's and each array's zarr.json, raw arrays' one chunk."""
    out = {"zarr.json"}
    for name, (data, codec) in arrays.items():
        out.add(f"{name}/zarr.json")
        if codec == "raw" and len(data):
            out.add(f"{name}/c/" + "/".join("0" for _ in data.shape))
    return out


def _check_values(spec: ArraySpec, arr: np.ndarray) -> None:
    """Refuse values the stored dtype would silently corrupt (NaN/+inf, integer overflow)."""
    target = np.dtype(spec.dtype)
    if (np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all()
            and (np.isnan(arr).any() or np.isposinf(arr).any())):
        raise StoreError(f"array {spec.name}: NaN or +inf values refused")
    if target.kind in "iu" and arr.size:
        if arr.dtype.kind == "f":
            if not np.array_equal(arr, np.round(arr)):
                raise StoreError(f"array {spec.name}: non-integral values for {target}")
        elif arr.dtype.kind not in "iub":
            raise StoreError(f"array {spec.name}: {arr.dtype} values for {target}")
        if not np.can_cast(arr.dtype, target):
            info = np.iinfo(target)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise StoreError(f"array {spec.name}: values in [{lo}, {hi}] overflow {target}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _concat(chunks: list[np.ndarray], dtype: Any, row_shape: tuple[int, ...]) -> np.ndarray:
    if not chunks:
        return np.zeros((0, *row_shape), dtype=dtype)
    if len(chunks) == 1:
        return np.asarray(chunks[0], dtype=dtype)
    return np.concatenate(chunks).astype(dtype, copy=False)


def _write_array(group: zarr.Group, name: str, data: np.ndarray, codec: Codec) -> None:
    rows = max(len(data), 1)
    if codec == "raw":
        chunks = (rows, *data.shape[1:])
        shards = None
        compressors: Any = None
    elif codec == "zstd":
        chunk_rows = min(CHUNK_ROWS, rows)
        shard_rows = min(SHARD_ROWS, -(-rows // chunk_rows) * chunk_rows)
        chunks = (chunk_rows, *data.shape[1:])
        shards = (shard_rows, *data.shape[1:])
        compressors = [ZstdCodec(level=3)]
    else:
        raise StoreError(f"unknown codec {codec!r}")
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=compressors,
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    if len(data):
        arr[...] = data


# --------------------------------------------------------------------------- reading


@dataclass
class Batch:
    """Rows of several sequences, concatenated; ``offsets[i]:offsets[i+1]`` is sequence i."""

    arrays: dict[str, np.ndarray]
    offsets: np.ndarray
    seq_ids: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class _PartReader:
    """Open arrays of one committed part; raw arrays are memory-mapped."""

    def __init__(self, path: Path, header: Header, commit: Mapping[str, Any]) -> None:
        self.path = path
        self.commit = commit
        self._header = header
        self._arrays: dict[str, Any] = {}
        try:
            self.num_rows = int(commit["num_rows"])
            num_sequences = int(commit["num_sequences"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptStoreError(f"{path / COMMIT_FILE}: malformed ({e!r})") from e
        self.offsets = np.array(self._open_array("seq_offsets", "raw", (), "int64"))
        self.seq_ids = np.array(self._open_array("seq_ids", "raw", (), "int64"))
        if (len(self.offsets) != num_sequences + 1 or self.offsets[0] != 0
                or self.offsets[-1] != self.num_rows or len(self.seq_ids) != num_sequences):
            raise CorruptStoreError(f"{path}: seq_offsets/seq_ids disagree with {COMMIT_FILE}")
        if (np.diff(self.offsets) < 0).any():
            raise CorruptStoreError(f"{path}/seq_offsets: offsets are not monotone")

    def array(self, name: str) -> Any:
        """A memory-mapped ndarray (raw codec) or a read-only zarr array (other codecs)."""
        if name not in self._arrays:
            spec = self._header.spec(name)
            arr = self._open_array(name, spec.codec, spec.row_shape, spec.dtype)
            if arr.shape[0] != self.num_rows:
                raise CorruptStoreError(f"{self.path / name}: {arr.shape[0]} rows, "
                                        f"{COMMIT_FILE} says {self.num_rows}")
            self._arrays[name] = arr
        return self._arrays[name]

    def _open_array(self, name: str, codec: str, row_shape: tuple[int, ...], dtype: str) -> Any:
        arr_dir = self.path / name
        if arr_dir.is_symlink() or not arr_dir.resolve().is_relative_to(self.path.resolve()) \
                or _has_links(arr_dir):
            raise CorruptStoreError(f"{arr_dir}: escapes the part (symbolic link)")
        try:
            meta = read_json(arr_dir / "zarr.json")
        except FileNotFoundError:
            raise CorruptStoreError(f"{arr_dir}/zarr.json: missing") from None
        where = f"{arr_dir}/zarr.json"
        if not isinstance(meta, dict) or meta.get("data_type") != dtype:
            got = meta.get("data_type") if isinstance(meta, dict) else meta
            raise CorruptStoreError(f"{where}: dtype {got}, expected {dtype}")
        shape = tuple(meta.get("shape") or ())
        if len(shape) != 1 + len(row_shape) or tuple(shape[1:]) != row_shape:
            raise CorruptStoreError(f"{where}: shape {list(shape)}, "
                                    f"expected [N, *{list(row_shape)}]")
        if codec != "raw":
            return zarr.open_array(arr_dir, mode="r")
        chunk_shape = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        codecs = [c.get("name") for c in meta.get("codecs", [])]
        endian = (meta.get("codecs") or [{}])[0].get("configuration", {}).get("endian", "little")
        if codecs != ["bytes"] or endian != "little" \
                or chunk_shape != [max(shape[0], 1), *row_shape]:
            raise CorruptStoreError(f"{where}: not a raw array (one uncompressed "
                                    "little-endian chunk)")
        if shape[0] == 0:
            return np.zeros(shape, dtype=dtype)
        chunk = arr_dir / "c" / "/".join("0" for _ in shape)
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        size = chunk.stat().st_size if chunk.is_file() else -1
        if size != expected:
            raise CorruptStoreError(f"{chunk}: {size} bytes, expected {expected}")
        little = np.dtype(dtype).newbyteorder("<")
        # a plain ndarray view: slicing a np.memmap subclass costs more than the copy itself
        return np.memmap(chunk, dtype=little, mode="r", shape=shape).view(np.ndarray)

    def slice(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a fresh, writable array."""
        arr = self.array(name)
        if isinstance(arr, np.ndarray):
            return np.array(arr[start:stop], dtype=arr.dtype.newbyteorder("="))
        return np.asarray(arr[start:stop])


class Store:
    """Read access to a committed store: batched random access by sequence, or part by part."""

    def __init__(self, root: str | os.PathLike[str], *, verify: Verify | None = None) -> None:
        self.root = Path(root)
        verify = default_verify() if verify is None else verify
        if not (self.root / HEADER_FILE).exists():
            raise StoreError(f"{self.root}: no {HEADER_FILE}; not an mtkd store")
        try:
            self.header = Header.from_json(read_json(self.root / HEADER_FILE), self.root)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CorruptStoreError(f"{self.root / HEADER_FILE}: malformed ({e!r})") from e
        manifest_path = self.root / MANIFEST_FILE
        if not manifest_path.exists():
            missing = [p for p in range(self.header.num_parts)
                       if not (self.root / PARTS_DIR / part_name(p) / COMMIT_FILE).exists()]
            if not missing:
                raise IncompleteStoreError(
                    f"{self.root} is not complete: every part is committed but {MANIFEST_FILE} "
                    "is missing (no writer finalised it); rerun the job that writes it"
                )
            raise IncompleteStoreError(
                f"{self.root} is not complete: {len(missing)} of {self.header.num_parts} parts "
                f"uncommitted (first: {missing[:5]}); rerun the job that writes it"
            )
        self.manifest = read_json(manifest_path)
        if verify != "none":
            problems = verify_store(self.root, full=verify == "full")
            if problems:
                more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
                raise CorruptStoreError("; ".join(problems[:5]) + more)
        self._parts = [self._open_part(p) for p in range(self.header.num_parts)]
        counts = np.array([len(p.seq_ids) for p in self._parts], dtype=np.int64)
        self._part_start = np.concatenate([[0], np.cumsum(counts)])
        self.seq_ids = np.concatenate([p.seq_ids for p in self._parts])
        self.seq_lengths = np.concatenate([np.diff(p.offsets) for p in self._parts])
        # per sequence (store order): its part and its first row inside the part
        self._seq_part = np.repeat(np.arange(self.num_parts, dtype=np.int64), counts)
        self._seq_start = np.concatenate([p.offsets[:-1] for p in self._parts])

    def verify_part(self, part: int, *, full: bool | None = None) -> None:
        """Recheck one part's files against its commit record and the manifest's record of it
        (sha256 with ``full``, default: unless ``$MTKD_VERIFY`` is ``size``); raise
        ``CorruptStoreError`` naming the files.

        For jobs that open a store with ``verify="size"`` or ``"none"`` and then read only
        some parts: each worker checks what it reads, so a store is hashed once in all.
        """
        full = default_verify() == "full" if full is None else full
        self._check_part(part)
        pdir = self.root / PARTS_DIR / part_name(part)
        problems = _part_escapes(self.root, pdir)
        if not problems:
            recorded = {p["part"]: p for p in self.manifest.get("parts", [])
                        if isinstance(p, dict) and isinstance(p.get("part"), int)}
            commit_path = pdir / COMMIT_FILE
            rec = recorded.get(part)
            if not isinstance(rec, dict) or rec.get("commit_sha256") != file_sha256(commit_path):
                problems.append(f"{commit_path}: does not match the manifest's record")
            problems += _verify_part(pdir, part, self.header, self._parts[part].commit, full)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CorruptStoreError("; ".join(problems[:5]) + more)

    def _open_part(self, part: int) -> _PartReader:
        path = self.root / PARTS_DIR / part_name(part)
        escapes = _part_escapes(self.root, path)
        if escapes:  # checked even with verify="none": never read outside the store
            raise CorruptStoreError("; ".join(escapes))
        try:
            commit = read_json(path / COMMIT_FILE)
        except FileNotFoundError:
            raise CorruptStoreError(f"{path}: part {part} missing or uncommitted") from None
        if not isinstance(commit, dict):
            raise CorruptStoreError(f"{path / COMMIT_FILE}: not a commit record")
        return _PartReader(path, self.header, commit)

    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def attrs(self) -> Mapping[str, Any]:
        return self.header.attrs

    @property
    def num_parts(self) -> int:
        return self.header.num_parts

    @property
    def num_sequences(self) -> int:
        return len(self.seq_ids)

    @property
    def num_rows(self) -> int:
        return int(self.seq_lengths.sum())

    @property
    def array_names(self) -> list[str]:
        return [a.name for a in self.header.arrays]

    def part_sequences(self, part: int) -> range:
        """Store-order indices of the sequences held by ``part``."""
        self._check_part(part)
        return range(int(self._part_start[part]), int(self._part_start[part + 1]))

    def _check_part(self, part: int) -> None:
        if not 0 <= part < self.num_parts:
            raise IndexError(f"part {part} is not in [0, {self.num_parts})")

    def _names(self, names: Iterable[str] | None) -> list[str]:
        if names is None:
            return self.array_names
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.array_names]
        if unknown:
            raise KeyError(f"{self.root}: no array {unknown} (has {self.array_names})")
        return names

    def read(self, indices: Sequence[int] | np.ndarray,
             names: Iterable[str] | None = None) -> Batch:
        """Rows of the sequences at store-order ``indices`` (any order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sequences):
            raise IndexError(f"sequence index out of range [0, {self.num_sequences})")
        names = self._names(names)
        lengths = self.seq_lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        part_of = self._seq_part[idx]
        starts = self._seq_start[idx]
        out = {}
        for n in stored_names(names, self.attrs):
            spec = self.header.spec(n)
            buf = np.empty((int(offsets[-1]), *spec.row_shape), dtype=spec.dtype)
            if spec.codec == "raw":
                self._gather_raw(n, buf, part_of, starts, lengths, offsets)
            else:
                self._gather_chunked(n, buf, part_of, starts, lengths, offsets)
            out[n] = buf
        return self._batch(names, out, offsets, self.seq_ids[idx])

    def _batch(self, names: list[str], stored: dict[str, np.ndarray], offsets: np.ndarray,
               seq_ids: np.ndarray) -> Batch:
        """The arrays asked for, as callers see them: coded top-k columns decoded."""
        arrays = decode_rows(stored, self.attrs)
        return Batch({n: arrays[n] for n in names}, offsets, seq_ids)

    def _gather_raw(self, name: str, buf: np.ndarray, part_of: np.ndarray, starts: np.ndarray,
                    lengths: np.ndarray, offsets: np.ndarray) -> None:
        """Copy each sequence's rows from the memory maps straight into ``buf`` (one copy)."""
        if len(lengths) > 256 and len(buf) < 16 * len(lengths):
            # many short sequences: a vectorised gather beats a Python loop of tiny copies
            for part in np.unique(part_of):
                sel = np.flatnonzero(part_of == part)
                rows = _ranges(starts[sel], starts[sel] + lengths[sel])
                buf[_ranges(offsets[sel], offsets[sel + 1])] = self._parts[part].array(name)[rows]
            return
        arrays = {p: self._parts[p].array(name) for p in np.unique(part_of).tolist()}
        for p, s, o, n in zip(part_of.tolist(), starts.tolist(), offsets[:-1].tolist(),
                              lengths.tolist(), strict=True):
            if n:
                buf[o:o + n] = arrays[p][s:s + n]

    def _gather_chunked(self, name: str, buf: np.ndarray, part_of: np.ndarray,
                        starts: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> None:
        """One zarr call per part: the sorted union of the rows wanted, then scattered."""
        for part in np.unique(part_of):
            sel = np.flatnonzero(part_of == part)
            rows = _ranges(starts[sel], starts[sel] + lengths[sel])
            if not len(rows):
                continue
            wanted = np.unique(rows)
            arr = self._parts[part].array(name)
            if wanted[-1] - wanted[0] + 1 == len(wanted):  # one contiguous run: a slice
                values = arr[int(wanted[0]):int(wanted[-1]) + 1]
            else:
                values = arr.oindex[wanted]
            buf[_ranges(offsets[sel], offsets[sel + 1])] = values[np.searchsorted(wanted, rows)]

    def read_part(self, part: int, names: Iterable[str] | None = None) -> Batch:
        """All rows of one part, in order (the fast path for sequential jobs)."""
        self._check_part(part)
        reader = self._parts[part]
        names = self._names(names)
        stored = {n: reader.slice(n, 0, reader.num_rows) for n in stored_names(names, self.attrs)}
        return self._batch(names, stored, reader.offsets.copy(), reader.seq_ids.copy())

    def part_stats(self, part: int) -> Mapping[str, Any]:
        """The free-form counts its writer kept in a part's commit record."""
        self._check_part(part)
        return self._parts[part].commit.get("stats", {})

    def read_meta(self, part: int | None = None) -> pa.Table | None:
        """Per-sequence metadata (store order), or None if the store has none."""
        parts = range(self.num_parts) if part is None else [part]
        tables = []
        for p in parts:
            self._check_part(p)
            path = self.root / PARTS_DIR / part_name(p) / META_FILE
            if not path.exists():
                return None
            tables.append(pq.read_table(path))
        # "default" promotion: a part without sequences may carry null-typed columns
        return pa.concat_tables(tables, promote_options="default")


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for each pair, without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + shift


# --------------------------------------------------------------------------- verification


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
    except (StoreError, KeyError, TypeError, AttributeError, ValueError) as e:
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
            want = _jsonable(header.to_json())
            if want != {k: body.get(k) for k in want}:
                problems.append(f"{manifest_path}: header fields disagree with {HEADER_FILE}")
            recorded = {int(p["part"]): p for p in manifest.get("parts", [])}
        except (CorruptStoreError, KeyError, TypeError, AttributeError, ValueError) as e:
            problems.append(f"{manifest_path}: unreadable ({e})")
            recorded = {}
    for part in range(header.num_parts):
        pdir = root / PARTS_DIR / part_name(part)
        commit_path = pdir / COMMIT_FILE
        escapes = _part_escapes(root, pdir)
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
            problems.extend(_verify_part(pdir, part, header, commit, full))
        except (CorruptStoreError, KeyError, TypeError, AttributeError, ValueError) as e:
            problems.append(f"{commit_path}: malformed ({e!r})")
    return problems


def _has_links(directory: Path) -> bool:
    """Whether anything under ``directory`` is a symbolic link (parts hold plain files)."""
    for dirpath, dirnames, filenames in os.walk(directory):
        if any(os.path.islink(os.path.join(dirpath, n)) for n in (*dirnames, *filenames)):
            return True
    return False


def _part_escapes(root: Path, pdir: Path) -> list[str]:
    """A part directory that is a symbolic link, or reached through one out of the store."""
    if pdir.is_symlink():
        return [f"{pdir}: a symbolic link (parts are plain directories inside the store)"]
    if pdir.exists() and not pdir.resolve().is_relative_to(root.resolve()):
        return [f"{pdir}: leads out of the store {root} (a symbolic link on the way)"]
    return []


def _verify_part(pdir: Path, part: int, header: Header, commit: Any, full: bool) -> list[str]:
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
            reader = _PartReader(pdir, header, commit)
            for spec in header.arrays:
                reader.array(spec.name)
        except CorruptStoreError as e:
            problems.append(str(e))
        except Exception as e:  # zarr refusing its own metadata, e.g.
            problems.append(f"{pdir}: unreadable ({e!r})")
    return problems


def default_verify() -> Verify:
    """What ``open_store`` checks when its caller does not say: ``$MTKD_VERIFY`` (``full`` or
    ``size``), default ``full``."""
    mode = os.environ.get(VERIFY_ENV, "full") or "full"
    if mode not in ("full", "size"):
        raise StoreError(f"{VERIFY_ENV}={mode!r}: use 'full' (sha256 of every file, the "
                         "default) or 'size' (sizes only)")
    return mode  # type: ignore[return-value]


def open_store(root: str | os.PathLike[str], kind: str | None = None, *,
               verify: Verify | None = None) -> Store:
    """Open a committed store, refusing an incomplete one or one of another ``kind``.

    ``verify``: ``"full"`` rechecks the size and sha256 of every file before anything is read
    (the default, unless ``$MTKD_VERIFY`` is ``size``), ``"size"`` only sizes and metadata,
    ``"none"`` only what opening each part needs. Any finding raises ``CorruptStoreError``
    naming the files.
    """
    store = Store(root, verify=verify)
    if kind is not None and store.kind != kind:
        raise StoreError(f"{root} is a {store.kind} store, expected a {kind} store")
    return store
