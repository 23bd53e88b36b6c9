"""Opening one committed part's arrays, refusing anything that is not what its writer made.

Shared by the reader (``Store``) and ``verify_store``: raw arrays are memory-mapped only after
their metadata, size and place inside the part are checked, so a damaged or crafted part never
makes a reader touch memory or files it should not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mtkd.store.errors import CorruptStoreError
from mtkd.store.format import COMMIT_FILE, Header, read_json
from mtkd.store.shard_reader import open_sharded


class PartReader:
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
                or has_links(arr_dir):
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
        if codec != "raw":  # the shard files read directly where their layout is the store's
            sharded = open_sharded(arr_dir, meta, dtype, row_shape)
            return sharded if sharded is not None else zarr.open_array(arr_dir, mode="r")
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


def has_links(directory: Path) -> bool:
    """Whether anything under ``directory`` is a symbolic link (parts hold plain files)."""
    for dirpath, dirnames, filenames in os.walk(directory):
        if any(os.path.islink(os.path.join(dirpath, n)) for n in (*dirnames, *filenames)):
            return True
    return False


def part_escapes(root: Path, pdir: Path) -> list[str]:
    """A part directory that is a symbolic link, or reached through one out of the store."""
    if pdir.is_symlink():
        return [f"{pdir}: a symbolic link (parts are plain directories inside the store)"]
    if pdir.exists() and not pdir.resolve().is_relative_to(root.resolve()):
        return [f"{pdir}: leads out of the store {root} (a symbolic link on the way)"]
    return []
