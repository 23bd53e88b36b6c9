"""Writing one part: rows buffered, checked, then committed atomically.

The part's arrays, metadata and ``COMMIT.json`` (sizes and sha256 of every file) are written
into a temporary directory that is renamed into place last: a killed writer leaves nothing that
reads as committed, and two writers racing for one part leave one sound copy (the loser's
rename fails and it discards its copy).

Arrays are written either ``raw`` (one uncompressed chunk per part: the chunk file *is* the
little-endian C-order buffer, memory-mapped by the reader for fast shuffled access) or ``zstd``
(sharded and compressed, read through zarr; for stores read sequentially). Both are plain
Zarr v3 that any zarr client opens. A teacher store may code its top-k columns
(``attrs.topk_coding``, see ``topk_codec``): :meth:`PartWriter.append` encodes them; where
q64r gathers sequences into streams of ``attrs.topk_stream_rows`` rows, appends are held back
(uncoded, at most a stream's rows and one append's) until they fill one, so that a stream's
length does not depend on how the rows were appended (a harvest's engine calls).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

from mtkd.store.errors import StoreError, io_error
from mtkd.store.format import COMMIT_FILE, META_FILE, PARTS_DIR, ArraySpec, Codec, jsonable
from mtkd.store.fs import file_sha256, fsync, remove_settled, tmp_part_dir, write_json_atomic
from mtkd.store.stream_frames import stream_lengths
from mtkd.store.target_codec import encode_rows as encode_target_rows
from mtkd.store.topk_codec import Q64R, coding, encode_rows, stream_rows

if TYPE_CHECKING:
    from mtkd.store.writer import StoreWriter

SHARD_ROWS = 1 << 17
CHUNK_ROWS = 1 << 13
#: Header attribute setting a store's zstd chunk rows (default :data:`CHUNK_ROWS`)
CHUNK_ROWS_ATTR = "chunk_rows"


class PartWriter:
    """Buffers one part's sequences and commits them atomically.

    Use as a context manager: leaving the block normally commits, an exception discards.
    """

    def __init__(self, store: StoreWriter, part: int) -> None:
        self.store = store
        self.part = part
        self.tmp = tmp_part_dir(store.root / PARTS_DIR, part)
        self._rows: dict[str, list[np.ndarray]] = {a.name: [] for a in store.header.arrays}
        self._lengths: list[np.ndarray] = []
        self._seq_ids: list[np.ndarray] = []
        self._meta: list[pa.Table] = []
        self._with_meta: bool | None = None  # whether appends give meta (all or none do)
        attrs = store.header.attrs
        self._stream_rows = stream_rows(attrs) if coding(attrs) == Q64R else 0
        #: appends held back for a q64r stream: (rows, lengths, seq ids, meta) of each
        self._held: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, pa.Table | None]]
        self._held = []
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
        self._held.clear()

    def append(
        self,
        rows: Mapping[str, np.ndarray],
        seq_lengths: Sequence[int] | np.ndarray,
        seq_ids: Sequence[int] | np.ndarray,
        meta: pa.Table | None = None,
    ) -> None:
        """Add sequences: ``rows`` holds every schema array with Σ ``seq_lengths`` rows.
        Rows that fail to code raise StoreError here or, held back for a q64r stream (module
        doc), at a later append or the commit; nothing of the part is committed either way."""
        lengths = np.asarray(seq_lengths, dtype=np.int64)
        ids = np.asarray(seq_ids, dtype=np.int64)
        if lengths.shape != ids.shape or lengths.ndim != 1:
            raise StoreError("seq_lengths and seq_ids must be 1-D and of equal length")
        if (lengths < 0).any():
            raise StoreError("sequence lengths must be non-negative")
        written = {a.name for a in self.store.header.written_arrays}
        missing, extra = written - set(rows), set(rows) - written
        if missing or extra:
            raise StoreError(f"rows do not match the schema: missing {missing}, unknown {extra}")
        if meta is not None and meta.num_rows != len(ids):
            raise StoreError(f"meta has {meta.num_rows} rows for {len(ids)} sequences")
        if meta is not None and "seq_id" in meta.column_names \
                and meta.column("seq_id").to_pylist() != ids.tolist():
            raise StoreError("meta's seq_id column differs from seq_ids")
        if self._with_meta is not None and self._with_meta != (meta is not None):
            raise StoreError("meta must be given with every append of a part or with none")
        self._with_meta = meta is not None
        if not self._stream_rows:
            self._keep(rows, lengths, ids, meta)
            return
        # a copy: callers may reuse their buffers once append returns
        self._held.append(({name: np.array(a) for name, a in rows.items()}, lengths, ids, meta))
        self._release(whole_streams=True)

    def _release(self, whole_streams: bool = False) -> None:
        """Code and keep the appends held back for q64r streams: all of them, or with
        ``whole_streams`` the sequences of the streams they fill (the rest stay held)."""
        if not self._held:
            return
        held, self._held = self._held, []
        rows = {name: np.concatenate([h[0][name] for h in held]) for name in held[0][0]}
        lengths = np.concatenate([h[1] for h in held])
        ids = np.concatenate([h[2] for h in held])
        metas = [h[3] for h in held if h[3] is not None]
        meta = pa.concat_tables(metas) if metas else None
        cut = len(lengths)
        if whole_streams:
            streams = stream_lengths(lengths, self._stream_rows)
            filled = int(streams.sum()) - (int(streams[-1]) if len(streams) and
                                           streams[-1] < self._stream_rows else 0)
            cut = int(np.searchsorted(np.cumsum(lengths), filled, side="right"))
            if cut < len(lengths):  # the sequences of a stream not yet filled
                first = int(lengths[:cut].sum())
                self._held.append(({name: a[first:] for name, a in rows.items()},
                                   lengths[cut:], ids[cut:],
                                   None if meta is None else meta.slice(cut)))
                rows = {name: a[:first] for name, a in rows.items()}
                lengths, ids = lengths[:cut], ids[:cut]
                meta = None if meta is None else meta.slice(0, cut)
        if cut:
            self._keep(rows, lengths, ids, meta)

    def _keep(self, rows: Mapping[str, np.ndarray], lengths: np.ndarray, ids: np.ndarray,
              meta: pa.Table | None) -> None:
        """Code ``rows`` (whole sequences) and keep them, checked, for the commit."""
        header = self.store.header
        n = int(lengths.sum())
        try:  # coded sparse columns (topk_codec, target_codec): the checks below apply to
            rows = encode_rows(rows, header.attrs, lengths)  # what is stored
            rows = encode_target_rows(rows, header.attrs)
        except ValueError as e:
            raise StoreError(f"sparse rows cannot be coded: {e}") from e
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
            remove_settled(self.tmp)  # (writes of the same array may still be in flight)
            raise io_error(f"{self.store.root}: part {self.part} not committed (nothing of it "
                           "was kept; rerun once the cause is fixed)", e) from e
        except BaseException:
            remove_settled(self.tmp)
            raise

    def _commit(self) -> None:
        self._release()
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
        chunk_rows = int(header.attrs.get(CHUNK_ROWS_ATTR, CHUNK_ROWS))
        for name, (data, codec) in arrays.items():
            _write_array(group, name, data, codec, chunk_rows)
        if self._meta:
            pq.write_table(pa.concat_tables(self._meta), self.tmp / META_FILE)
        files = {}
        for path in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
            files[path.relative_to(self.tmp).as_posix()] = {
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
            fsync(path)
        expected = expected_files(arrays)
        if missing := sorted(expected - set(files)):
            raise StoreError(f"{self.tmp}: files vanished while committing: {missing[:5]}")
        commit = {
            "part": self.part,
            "num_sequences": len(lengths),
            "num_rows": int(offsets[-1]),
            "files": files,
            "stats": jsonable(self.stats),
        }
        write_json_atomic(self.tmp / COMMIT_FILE, commit)
        for d in sorted((p for p in self.tmp.rglob("*") if p.is_dir()), reverse=True):
            fsync(d)
        fsync(self.tmp)
        final = self.store.part_dir(self.part)
        try:
            os.rename(self.tmp, final)  # atomic; fails if another writer's copy is in place
        except OSError:
            if (final / COMMIT_FILE).exists():  # another worker committed this part first
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.won = False
                return
            raise
        fsync(final.parent)
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


def _concat(chunks: list[np.ndarray], dtype: Any, row_shape: tuple[int, ...]) -> np.ndarray:
    if not chunks:
        return np.zeros((0, *row_shape), dtype=dtype)
    if len(chunks) == 1:
        return np.asarray(chunks[0], dtype=dtype)
    return np.concatenate(chunks).astype(dtype, copy=False)


def _write_array(group: zarr.Group, name: str, data: np.ndarray, codec: Codec,
                 chunk_rows: int = CHUNK_ROWS) -> None:
    rows = max(len(data), 1)
    if codec == "raw":
        chunks = (rows, *data.shape[1:])
        shards = None
        compressors: Any = None
    elif codec == "zstd":
        chunk_rows = min(chunk_rows, rows)
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
