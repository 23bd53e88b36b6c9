"""A part-based store of ragged arrays with atomic, verifiable commits.

A store is a directory::

    store.json              header: kind, schema version, attributes, number of parts
    parts/00000/            a committed part: one Zarr v3 group written by one writer
        zarr.json, <array>/ Zarr v3 arrays; row-level arrays share a leading "rows" axis
        seq_offsets/        int64 [S+1] row offsets of the part's sequences
        seq_ids/            int64 [S] global sequence ids
        meta.parquet        optional per-sequence metadata
        COMMIT.json         counts and sha256 of every file, written last
    parts/.tmp-00001-*/     a part being written (never read)
    manifest.json           written once every part is committed; its presence means complete

A part is written into a temporary directory and renamed into place only after its
``COMMIT.json`` is on disk, so a killed writer leaves nothing that reads as committed, and any
number of workers may write disjoint parts of one store at once (a lost race for the same part
is harmless: the rename fails and the loser discards its copy).

Arrays are written either ``raw`` (one uncompressed chunk per part: the chunk file *is* the
little-endian C-order buffer, memory-mapped by the reader for fast shuffled access) or ``zstd``
(sharded and compressed, read through zarr; for stores read sequentially).  Both are plain
Zarr v3 that any zarr client opens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

FORMAT_NAME = "mtkd-store"
SCHEMA_VERSION = 1
HEADER_FILE = "store.json"
MANIFEST_FILE = "manifest.json"
COMMIT_FILE = "COMMIT.json"
META_FILE = "meta.parquet"
PARTS_DIR = "parts"
TMP_PREFIX = ".tmp-"
SHARD_ROWS = 1 << 17
CHUNK_ROWS = 1 << 13

Codec = Literal["raw", "zstd"]


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

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "row_shape": list(self.row_shape), "codec": self.codec}

    @classmethod
    def from_json(cls, name: str, spec: Mapping[str, Any]) -> ArraySpec:
        return cls(name, spec["dtype"], tuple(spec["row_shape"]), spec["codec"])


RESERVED_ARRAYS = ("seq_offsets", "seq_ids")


@dataclass(frozen=True)
class Header:
    """What every writer of a store must agree on; compared field by field on reopen."""

    kind: str
    num_parts: int
    arrays: tuple[ArraySpec, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "num_parts": self.num_parts,
            "arrays": {a.name: a.to_json() for a in self.arrays},
            "attrs": _jsonable(self.attrs),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: Path) -> Header:
        if obj.get("format") != FORMAT_NAME:
            raise StoreError(f"{where}: not an mtkd store (format={obj.get('format')!r})")
        if obj.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema version {obj.get('schema_version')} is not supported "
                f"(this mtkd reads version {SCHEMA_VERSION})"
            )
        arrays = tuple(ArraySpec.from_json(n, s) for n, s in obj["arrays"].items())
        return cls(obj["kind"], int(obj["num_parts"]), arrays, obj.get("attrs", {}))

    def spec(self, name: str) -> ArraySpec:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(name)


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so that headers compare equal however they were built."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1, default=_json_default).encode()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` via a temporary file, fsync and rename."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(canonical_json(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        (self.root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        self._claim_header()

    def _claim_header(self) -> None:
        path = self.root / HEADER_FILE
        wanted = _jsonable(self.header.to_json())
        if not path.exists():
            tmp = path.with_name(f"{TMP_PREFIX}{HEADER_FILE}.{uuid.uuid4().hex}")
            tmp.write_bytes(canonical_json(wanted))
            try:
                os.link(tmp, path)  # atomic and never overwrites: concurrent creators agree
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        found = read_json(path)
        if found != wanted:
            diff = sorted(
                k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k)
            )
            raise StoreError(
                f"{self.root} already holds a store with a different {', '.join(diff)}; "
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
        if not 0 <= part < self.header.num_parts:
            raise StoreError(f"part {part} is not in [0, {self.header.num_parts})")
        for stale in (self.root / PARTS_DIR).glob(f"{TMP_PREFIX}{part_name(part)}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return PartWriter(self, part)

    def finalize(self) -> bool:
        """Write the manifest if every part is committed; return whether the store is complete."""
        if (self.root / MANIFEST_FILE).exists():
            return True
        if not all(self.is_committed(p) for p in range(self.header.num_parts)):
            return False
        write_json_atomic(self.root / MANIFEST_FILE, build_manifest(self.root, self.header))
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
        self.tmp = store.root / PARTS_DIR / f"{TMP_PREFIX}{part_name(part)}-{uuid.uuid4().hex}"
        self._rows: dict[str, list[np.ndarray]] = {a.name: [] for a in store.header.arrays}
        self._lengths: list[np.ndarray] = []
        self._seq_ids: list[np.ndarray] = []
        self._meta: list[pa.Table] = []
        self.stats: dict[str, Any] = {}  # free-form counts kept in the commit record

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

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
        for spec in header.arrays:
            arr = np.asarray(rows[spec.name])
            want = (n, *spec.row_shape)
            if arr.shape != want:
                raise StoreError(f"array {spec.name}: shape {arr.shape}, expected {want}")
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                arr_f = arr.astype(np.float64)
                if np.isnan(arr_f).any() or np.isposinf(arr_f).any():
                    raise StoreError(f"array {spec.name}: NaN or +inf values refused")
            self._rows[spec.name].append(arr.astype(spec.dtype, copy=False))
        if meta is not None:
            if meta.num_rows != len(ids):
                raise StoreError(f"meta has {meta.num_rows} rows for {len(ids)} sequences")
            self._meta.append(meta)
        self._lengths.append(lengths)
        self._seq_ids.append(ids)

    def commit(self) -> None:
        """Write arrays and checksums into the temp dir, then rename it into place."""
        header = self.store.header
        lengths = _concat(self._lengths, np.int64, ())
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arrays = {
            "seq_offsets": (offsets, "raw"),
            "seq_ids": (_concat(self._seq_ids, np.int64, ()), "raw"),
        }
        for spec in header.arrays:
            arrays[spec.name] = (_concat(self._rows[spec.name], spec.dtype, spec.row_shape),
                                 spec.codec)
        self.tmp.mkdir(parents=True)
        group = zarr.open_group(self.tmp, mode="w", zarr_format=3)
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
        commit = {
            "part": self.part,
            "num_sequences": int(len(lengths)),
            "num_rows": int(offsets[-1]),
            "files": files,
            "stats": _jsonable(self.stats),
        }
        write_json_atomic(self.tmp / COMMIT_FILE, commit)
        final = self.store.part_dir(self.part)
        try:
            os.rename(self.tmp, final)
        except OSError:
            if (final / COMMIT_FILE).exists():  # another worker committed this part first
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            raise
        _fsync_dir(final.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _concat(chunks: list[np.ndarray], dtype: Any, row_shape: tuple[int, ...]) -> np.ndarray:
    if not chunks:
        return np.zeros((0, *row_shape), dtype=dtype)
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
        self.num_rows = int(commit["num_rows"])
        self._arrays: dict[str, Any] = {}
        self.offsets = np.asarray(self._open_array("seq_offsets", "raw", (), "int64"))
        self.seq_ids = np.asarray(self._open_array("seq_ids", "raw", (), "int64"))
        if len(self.offsets) != commit["num_sequences"] + 1 or self.offsets[-1] != self.num_rows:
            raise CorruptStoreError(f"{path}: seq_offsets disagree with {COMMIT_FILE}")
        if (np.diff(self.offsets) < 0).any():
            raise CorruptStoreError(f"{path}/seq_offsets: offsets are not monotone")
        self._header = header

    def array(self, name: str) -> Any:
        if name not in self._arrays:
            spec = self._header.spec(name)
            self._arrays[name] = self._open_array(name, spec.codec, spec.row_shape, spec.dtype)
        return self._arrays[name]

    def _open_array(self, name: str, codec: str, row_shape: tuple[int, ...], dtype: str) -> Any:
        arr_dir = self.path / name
        meta = read_json(arr_dir / "zarr.json")
        if meta.get("data_type") != dtype:
            raise CorruptStoreError(f"{arr_dir}/zarr.json: dtype {meta.get('data_type')}, "
                                    f"expected {dtype}")
        n = meta["shape"][0]
        shape = (n, *row_shape)
        if codec != "raw":
            return zarr.open_array(arr_dir, mode="r")
        if n == 0:
            return np.zeros(shape, dtype=dtype)
        chunk = arr_dir / "c" / "/".join("0" for _ in shape)
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        size = chunk.stat().st_size if chunk.exists() else -1
        if size != expected:
            raise CorruptStoreError(f"{chunk}: {size} bytes, expected {expected}")
        return np.memmap(chunk, dtype=dtype, mode="r", shape=shape)

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        arr = self.array(name)
        if isinstance(arr, np.ndarray):
            return arr[rows]
        return arr.oindex[rows] if len(rows) else np.zeros((0, *arr.shape[1:]), arr.dtype)

    def slice(self, name: str, start: int, stop: int) -> np.ndarray:
        return np.array(self.array(name)[start:stop])


class Store:
    """Read access to a committed store: batched random access by sequence, or part by part."""

    def __init__(self, root: str | os.PathLike[str], *, verify: Literal["none", "size", "full"]
                 = "size") -> None:
        self.root = Path(root)
        if not (self.root / HEADER_FILE).exists():
            raise StoreError(f"{self.root}: no {HEADER_FILE}; not an mtkd store")
        self.header = Header.from_json(read_json(self.root / HEADER_FILE), self.root)
        manifest_path = self.root / MANIFEST_FILE
        if not manifest_path.exists():
            missing = [p for p in range(self.header.num_parts)
                       if not (self.root / PARTS_DIR / part_name(p) / COMMIT_FILE).exists()]
            raise IncompleteStoreError(
                f"{self.root} is not complete: {len(missing)} of {self.header.num_parts} parts "
                f"uncommitted (first: {missing[:5]}); rerun the job that writes it"
            )
        self.manifest = read_json(manifest_path)
        if verify != "none":
            problems = verify_store(self.root, full=verify == "full")
            if problems:
                raise CorruptStoreError("; ".join(problems[:5]))
        self._parts = [self._open_part(p) for p in range(self.header.num_parts)]
        counts = np.array([len(p.seq_ids) for p in self._parts], dtype=np.int64)
        self._part_start = np.concatenate([[0], np.cumsum(counts)])
        self.seq_ids = (np.concatenate([p.seq_ids for p in self._parts])
                        if self._parts else np.zeros(0, np.int64))
        self.seq_lengths = np.concatenate([np.diff(p.offsets) for p in self._parts])

    def _open_part(self, part: int) -> _PartReader:
        path = self.root / PARTS_DIR / part_name(part)
        return _PartReader(path, self.header, read_json(path / COMMIT_FILE))

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
        return range(int(self._part_start[part]), int(self._part_start[part + 1]))

    def read(self, indices: Sequence[int] | np.ndarray,
             names: Iterable[str] | None = None) -> Batch:
        """Rows of the sequences at store-order ``indices`` (any order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sequences):
            raise IndexError(f"sequence index out of range [0, {self.num_sequences})")
        names = list(names) if names is not None else self.array_names
        part_of = np.searchsorted(self._part_start, idx, side="right") - 1
        lengths = self.seq_lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out = {n: None for n in names}
        pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
        for part in np.unique(part_of):
            sel = np.flatnonzero(part_of == part)
            reader = self._parts[part]
            local = idx[sel] - self._part_start[part]
            starts, stops = reader.offsets[local], reader.offsets[local + 1]
            rows = _ranges(starts, stops)
            dest = _ranges(offsets[sel], offsets[sel + 1])
            for n in names:
                pieces[n].append((dest, reader.take(n, rows)))
        total = int(offsets[-1])
        for n in names:
            spec = self.header.spec(n)
            buf = np.empty((total, *spec.row_shape), dtype=spec.dtype)
            for dest, values in pieces[n]:
                buf[dest] = values
            out[n] = buf
        return Batch(out, offsets, self.seq_ids[idx])

    def read_part(self, part: int, names: Iterable[str] | None = None) -> Batch:
        """All rows of one part, in order (the fast path for sequential jobs)."""
        reader = self._parts[part]
        names = list(names) if names is not None else self.array_names
        arrays = {n: reader.slice(n, 0, reader.num_rows) for n in names}
        return Batch(arrays, reader.offsets.copy(), reader.seq_ids.copy())

    def part_stats(self, part: int) -> Mapping[str, Any]:
        """The free-form counts its writer kept in a part's commit record."""
        return self._parts[part].commit.get("stats", {})

    def read_meta(self, part: int | None = None) -> pa.Table | None:
        """Per-sequence metadata (store order), or None if the store has none."""
        parts = range(self.num_parts) if part is None else [part]
        tables = []
        for p in parts:
            path = self.root / PARTS_DIR / part_name(p) / META_FILE
            if not path.exists():
                return None
            tables.append(pq.read_table(path))
        return pa.concat_tables(tables)


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
    """Recheck a store; return one message per problem (empty when sound).

    ``full`` recomputes every checksum; otherwise only file sizes and commit records are checked.
    """
    root = Path(root)
    problems: list[str] = []
    try:
        header = Header.from_json(read_json(root / HEADER_FILE), root)
    except (FileNotFoundError, StoreError, KeyError) as e:
        return [f"{root / HEADER_FILE}: {e}"]
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.exists():
        problems.append(f"{manifest_path}: missing (store not complete)")
        manifest = None
    else:
        try:
            manifest = read_json(manifest_path)
        except CorruptStoreError as e:
            return [str(e)]
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        if hashlib.sha256(canonical_json(body)).hexdigest() != manifest.get("checksum"):
            problems.append(f"{manifest_path}: checksum mismatch (edited by hand?)")
        if _jsonable(header.to_json()) != {k: body.get(k) for k in header.to_json()}:
            problems.append(f"{manifest_path}: header fields disagree with {HEADER_FILE}")
    recorded = {p["part"]: p for p in manifest.get("parts", [])} if manifest else {}
    for part in range(header.num_parts):
        pdir = root / PARTS_DIR / part_name(part)
        commit_path = pdir / COMMIT_FILE
        if not commit_path.exists():
            problems.append(f"{pdir}: part {part} missing or uncommitted")
            continue
        if manifest is not None:
            rec = recorded.get(part)
            if rec is None or rec.get("commit_sha256") != file_sha256(commit_path):
                problems.append(f"{commit_path}: does not match the manifest's record")
        try:
            commit = read_json(commit_path)
            problems.extend(_verify_part(pdir, commit, full))
        except (CorruptStoreError, KeyError, TypeError) as e:
            problems.append(f"{commit_path}: {e}")
    return problems


def _verify_part(pdir: Path, commit: Mapping[str, Any], full: bool) -> list[str]:
    problems = []
    listed = set()
    for rel, rec in commit["files"].items():
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts:
            problems.append(f"{pdir}/{COMMIT_FILE}: file path {rel!r} escapes the part")
            continue
        listed.add(rel_path.as_posix())
        path = pdir / rel_path
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != rec["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {rec['bytes']}")
        elif full and file_sha256(path) != rec["sha256"]:
            problems.append(f"{path}: checksum mismatch")
    for path in pdir.rglob("*"):
        rel = path.relative_to(pdir).as_posix()
        if path.is_file() and rel != COMMIT_FILE and rel not in listed:
            problems.append(f"{path}: not listed in {COMMIT_FILE}")
    return problems


def open_store(root: str | os.PathLike[str], kind: str | None = None, *,
               verify: Literal["none", "size", "full"] = "size") -> Store:
    """Open a committed store, refusing an incomplete one or one of another ``kind``."""
    store = Store(root, verify=verify)
    if kind is not None and store.kind != kind:
        raise StoreError(f"{root} is a {store.kind} store, expected a {kind} store")
    return store
