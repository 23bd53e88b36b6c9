"""Reading a committed store: batched random access by sequence, or part by part.

Opening checks what ``verify`` says (by default the sha256 of every file, see
:func:`default_verify`) and refuses an incomplete store; a teacher store's coded top-k columns
(``topk_codec``) are decoded by every read, so callers see plain ids and log-probs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtkd.store.errors import (
    CorruptStoreError,
    DamagedRowsError,
    IncompleteStoreError,
    StoreError,
)
from mtkd.store.format import (
    COMMIT_FILE,
    HEADER_FILE,
    MANIFEST_FILE,
    META_FILE,
    PARTS_DIR,
    Header,
    part_name,
    read_json,
)
from mtkd.store.fs import file_sha256
from mtkd.store.part_reader import PartReader, part_escapes
from mtkd.store.target_codec import decode_rows as decode_target_rows
from mtkd.store.target_codec import stored_names as target_names
from mtkd.store.topk_codec import (
    STREAM,
    STREAM_START,
    decode_rows,
    stored_names,
    stream_offsets,
    stream_rows,
)
from mtkd.store.verify import verify_part, verify_store

#: Environment variable choosing how much ``open_store`` checks when its caller does not say:
#: ``full`` (default: sizes and sha256 of every file) or ``size`` (sizes only; for stores too
#: large to hash at every open, once ``mtkd verify`` has checked them).
VERIFY_ENV = "MTKD_VERIFY"

Verify = Literal["none", "size", "full"]


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
                f"uncommitted (part{'s' * (len(missing) > 1)} "
                f"{', '.join(map(str, missing[:5]))}{', …' * (len(missing) > 5)}); rerun the "
                "job that writes it (it writes only the parts missing)"
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
        self._stream_bounds: dict[int, tuple[np.ndarray, np.ndarray]] = {}

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
        problems = part_escapes(self.root, pdir)
        if not problems:
            recorded = {p["part"]: p for p in self.manifest.get("parts", [])
                        if isinstance(p, dict) and isinstance(p.get("part"), int)}
            commit_path = pdir / COMMIT_FILE
            rec = recorded.get(part)
            if not isinstance(rec, dict) or rec.get("commit_sha256") != file_sha256(commit_path):
                problems.append(f"{commit_path}: does not match the manifest's record")
            problems += verify_part(pdir, part, self.header, self._parts[part].commit, full)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CorruptStoreError("; ".join(problems[:5]) + more)

    def _open_part(self, part: int) -> PartReader:
        path = self.root / PARTS_DIR / part_name(part)
        escapes = part_escapes(self.root, path)
        if escapes:  # checked even with verify="none": never read outside the store
            raise CorruptStoreError("; ".join(escapes))
        try:
            commit = read_json(path / COMMIT_FILE)
        except FileNotFoundError:
            raise CorruptStoreError(f"{path}: part {part} missing or uncommitted") from None
        if not isinstance(commit, dict):
            raise CorruptStoreError(f"{path / COMMIT_FILE}: not a commit record")
        return PartReader(path, self.header, commit)

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
        """The arrays a read returns (a coding's own arrays, q64v3's ``topk_recur``, are not
        among them)."""
        return [a.name for a in self.header.written_arrays]

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
        if not stream_rows(self.attrs) or STREAM not in stored_names(names, self.attrs):
            return self._read(idx, names)
        # q64r streams over several sequences: read whole streams, keep the sequences asked for
        whole, at = self._whole_streams(idx)
        batch = self._read(whole, names)
        rows = _ranges(batch.offsets[at], batch.offsets[at + 1])
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(self.seq_lengths[idx], out=offsets[1:])
        return Batch({n: a[rows] for n, a in batch.arrays.items()}, offsets, self.seq_ids[idx])

    def _whole_streams(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store-order indices of every sequence of the streams holding ``idx``'s (each stream
        once, whole, in order), and where each of ``idx`` sits among them."""
        first, stop = np.empty_like(idx), np.empty_like(idx)
        part_of = self._seq_part[idx]
        for part in np.unique(part_of).tolist():
            at = part_of == part
            local = idx[at] - self._part_start[part]
            part_first, part_stop = self._part_streams(part)
            first[at], stop[at] = part_first[local], part_stop[local]
        uniq, inverse = np.unique(first, return_inverse=True)
        ends = np.empty_like(uniq)
        ends[inverse] = stop  # every sequence of a stream has its stop
        base = np.concatenate([[0], np.cumsum(ends - uniq)[:-1]]).astype(np.int64)
        return _ranges(uniq, ends), base[inverse] + (idx - first)

    def _part_streams(self, part: int) -> tuple[np.ndarray, np.ndarray]:
        """Per sequence of ``part``: the store-order indices of the first and past the last
        sequence of its stream (from the part's ``topk_stream_start`` flags, read once)."""
        if part not in self._stream_bounds:
            reader = self._parts[part]
            try:
                starts = stream_offsets(reader.slice(STREAM_START, 0, reader.num_rows))[:-1]
            except ValueError as e:
                raise CorruptStoreError(f"{self.root}: part {part}: {e}") from None
            stream = np.searchsorted(starts, reader.offsets[:-1], side="right") - 1
            base = self._part_start[part]
            self._stream_bounds[part] = (base + np.searchsorted(stream, stream, side="left"),
                                         base + np.searchsorted(stream, stream, side="right"))
        return self._stream_bounds[part]

    def _read(self, idx: np.ndarray, names: list[str]) -> Batch:
        """Rows of the sequences at ``idx``, gathered in that order, then decoded."""
        lengths = self.seq_lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        part_of = self._seq_part[idx]
        starts = self._seq_start[idx]
        out = {}
        for n in target_names(stored_names(names, self.attrs), self.attrs):
            spec = self.header.spec(n)
            buf = np.empty((int(offsets[-1]), *spec.row_shape), dtype=spec.dtype)
            if spec.codec == "raw":
                self._gather_raw(n, buf, part_of, starts, lengths, offsets)
            else:
                self._gather_chunked(n, buf, part_of, starts, lengths, offsets)
            out[n] = buf
        return self._batch(names, out, offsets, self.seq_ids[idx], part_of)

    def _batch(self, names: list[str], stored: dict[str, np.ndarray], offsets: np.ndarray,
               seq_ids: np.ndarray, parts: np.ndarray) -> Batch:
        """The arrays asked for, as callers see them: coded top-k columns decoded. Damaged
        rows are named by the store, part and sequences that hold them (``parts``: each
        sequence's part)."""
        try:
            arrays = decode_target_rows(decode_rows(stored, self.attrs, offsets), self.attrs)
        except DamagedRowsError as e:
            where = ""
            if e.rows is not None:
                first = int(np.searchsorted(offsets, e.rows[0], side="right")) - 1
                last = max(first, int(np.searchsorted(offsets, e.rows[1], side="left")) - 1)
                held = sorted(set(parts[first:last + 1].tolist()))
                where = (f" part{'s' * (len(held) > 1)} {', '.join(map(str, held))}, sequence "
                         f"ids {seq_ids[first]}..{seq_ids[last]}:")
            raise DamagedRowsError(f"{self.root}:{where} {e} (`mtkd verify {self.root}` "
                                   "checks every chunk)", e.rows) from None
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
        stored = {n: reader.slice(n, 0, reader.num_rows)
                  for n in target_names(stored_names(names, self.attrs), self.attrs)}
        return self._batch(names, stored, reader.offsets.copy(), reader.seq_ids.copy(),
                           np.full(len(reader.seq_ids), part))

    def part_stats(self, part: int) -> Mapping[str, Any]:
        """The free-form counts its writer kept in a part's commit record."""
        self._check_part(part)
        return self._parts[part].commit.get("stats", {})

    def read_meta(self, part: int | None = None,
                  columns: Sequence[str] | None = None) -> pa.Table | None:
        """Per-sequence metadata (store order; only ``columns`` when given), or None if the
        store has none, or lacks one of ``columns``."""
        parts = range(self.num_parts) if part is None else [part]
        tables = []
        for p in parts:
            self._check_part(p)
            path = self.root / PARTS_DIR / part_name(p) / META_FILE
            if not path.exists() or (columns and not set(columns) <= set(
                    pq.read_schema(path).names)):
                return None
            tables.append(pq.read_table(path, columns=list(columns) if columns else None))
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
