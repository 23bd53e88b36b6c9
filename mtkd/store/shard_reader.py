"""Rows of a sharded zstd array read straight from its shard files, without zarr's machinery.

A store's zstd arrays are zarr v3 arrays with one ``sharding_indexed`` codec: each shard file
holds the zstd-compressed inner chunks one after the other and, at its end, an index of
(offset, nbytes) pairs (little-endian uint64) with a crc32c. Reading a batch of random
sequences through zarr costs ≈ 50 ms per array in its async per-chunk pipeline whatever the
bytes; here a read decodes just the inner chunks it touches (index checked, then ``zstd``
decompress and a view), which makes the trainer's shuffled reads of a compact target store
several times faster. Arrays written any other way are read by zarr (:func:`open_sharded`
returns None for them).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mtkd.store.errors import CorruptStoreError

_EMPTY = np.uint64(2**64 - 1)  # an index entry of a chunk never written
_CACHED_CHUNKS = 8  # decoded inner chunks kept: a sequential scan decodes each once


def open_sharded(arr_dir: Path, meta: dict[str, Any], dtype: str,
                 row_shape: tuple[int, ...]) -> ShardedArray | None:
    """A :class:`ShardedArray` for an array whose metadata is exactly what the store writes
    (one sharding codec: inner bytes + zstd, index bytes + crc32c at the end), else None."""
    codecs = meta.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0].get("configuration") or {}
    inner = [c.get("name") for c in conf.get("codecs", [])]
    index = [c.get("name") for c in conf.get("index_codecs", [])]
    endian = [(c.get("configuration") or {}).get("endian", "little")
              for c in (*conf.get("codecs", []), *conf.get("index_codecs", []))
              if c.get("name") == "bytes"]
    outer = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    chunk = conf.get("chunk_shape")
    shape = meta.get("shape")
    if (inner != ["bytes", "zstd"] or index != ["bytes", "crc32c"] or conf.get("index_location",
            "end") != "end" or any(e != "little" for e in endian) or not outer or not chunk
            or list(outer[1:]) != list(row_shape) or list(chunk[1:]) != list(row_shape)
            or outer[0] % chunk[0] or meta.get("fill_value", 0) != 0
            or (meta.get("chunk_key_encoding") or {}).get("configuration", {}).get(
                "separator", "/") != "/"):
        return None
    return ShardedArray(arr_dir, int(shape[0]), int(outer[0]), int(chunk[0]), dtype, row_shape)


class ShardedArray:
    """Read-only rows of one sharded zstd array (``arr[a:b]``, ``arr.oindex[rows]``)."""

    def __init__(self, arr_dir: Path, num_rows: int, shard_rows: int, chunk_rows: int,
                 dtype: str, row_shape: tuple[int, ...]) -> None:
        self.dir, self.shard_rows, self.chunk_rows = arr_dir, shard_rows, chunk_rows
        self.shape = (num_rows, *row_shape)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._chunk_bytes = chunk_rows * row_bytes
        self._indexes: dict[int, np.ndarray] = {}
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.oindex = _OIndex(self)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise IndexError("only contiguous row slices")
        return self.rows(np.arange(start, max(start, stop)))

    def rows(self, wanted: np.ndarray) -> np.ndarray:
        """Rows at ascending indices ``wanted``, as a fresh native-endian array."""
        out = np.empty((len(wanted), *self.shape[1:]), self.dtype.newbyteorder("="))
        if not len(wanted):
            return out
        if wanted[0] < 0 or wanted[-1] >= self.shape[0]:
            raise IndexError(f"rows outside [0, {self.shape[0]})")
        chunk_of = wanted // self.chunk_rows
        cuts = np.flatnonzero(np.diff(chunk_of)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(wanted)], strict=True):
            c = int(chunk_of[lo])
            out[lo:hi] = self._chunk(c)[wanted[lo:hi] - c * self.chunk_rows]
        return out

    def _chunk(self, c: int) -> np.ndarray:
        """Inner chunk ``c`` decoded (a few kept for the next read)."""
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        from numcodecs import Zstd

        per_shard = self.shard_rows // self.chunk_rows
        shard, inner = divmod(c, per_shard)
        path = self.dir / "c" / "/".join([str(shard)] + ["0"] * (len(self.shape) - 1))
        index = self._index(shard, path, per_shard)
        offset, nbytes = index[inner]
        if offset == _EMPTY and nbytes == _EMPTY:
            data = np.zeros((self.chunk_rows, *self.shape[1:]), self.dtype)
        else:
            with open(path, "rb") as f:
                f.seek(int(offset))
                blob = f.read(int(nbytes))
            try:
                if len(blob) != int(nbytes):
                    raise ValueError(f"{len(blob)} of {int(nbytes)} bytes")
                raw = Zstd().decode(blob)
            except (ValueError, RuntimeError) as e:
                raise CorruptStoreError(f"{path}: inner chunk {inner} unreadable ({e})") from e
            if len(raw) != self._chunk_bytes:
                raise CorruptStoreError(f"{path}: inner chunk {inner} decodes to {len(raw)} "
                                        f"bytes, expected {self._chunk_bytes}")
            data = np.frombuffer(raw, self.dtype).reshape(self.chunk_rows, *self.shape[1:])
        self._chunks[c] = data
        if len(self._chunks) > _CACHED_CHUNKS:
            self._chunks.popitem(last=False)
        return data

    def _index(self, shard: int, path: Path, per_shard: int) -> np.ndarray:
        """A shard's (offset, nbytes) pairs, their crc32c checked."""
        if shard not in self._indexes:
            import google_crc32c

            size = per_shard * 16 + 4
            try:
                with open(path, "rb") as f:
                    f.seek(-size, 2)
                    tail = f.read(size)
            except OSError as e:
                raise CorruptStoreError(f"{path}: cannot read its shard index ({e})") from e
            if len(tail) != size or google_crc32c.value(tail[:-4]).to_bytes(4, "little") \
                    != tail[-4:]:
                raise CorruptStoreError(f"{path}: shard index fails its crc32c")
            self._indexes[shard] = np.frombuffer(tail[:-4], "<u8").reshape(per_shard, 2)
        return self._indexes[shard]


class _OIndex:
    """``arr.oindex[rows]`` (zarr's orthogonal indexing) for ascending unique rows."""

    def __init__(self, arr: ShardedArray) -> None:
        self.arr = arr

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.arr.rows(np.asarray(rows, dtype=np.int64))
