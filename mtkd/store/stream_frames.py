"""Range-coded streams laid out over the rows they code (q64r's ``topk_stream`` and
``sample_stream``).

Why: a store reads rows, not blobs, so each stream (a sequence, or a run of them) is spread over
its rows' share of a ``uint8 [n, width]`` column, and zstd makes the share's unused end free.
A share starts with a head of ``HEAD`` bytes: the mode (``CODED``: the range coder's bytes;
``RAW``: the values as plain bytes, for a stream the coder could not make shorter), the body's
length and the CRC-32 of those and the body (uint32 little endian each). ``width`` must hold
a one-row raw body after the head, so every stream fits one way or the other.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mtkd.store.errors import DamagedRowsError

HEAD = 9  #: bytes before a stream's body: mode, length, CRC-32
RAW, CODED = 0, 1


def frame(flat: np.ndarray, offsets: np.ndarray, width: int, lengths: np.ndarray,
          raw_row_bytes: int, raw_body: Callable[[int, int], np.ndarray]) -> None:
    """Head each stream's share of ``flat`` (``uint8 [n · width]``) whose coded body of
    ``lengths[s]`` bytes already follows the head; a stream whose body is no shorter than its
    rows' ``raw_row_bytes`` (or that has ``lengths[s]`` < 0: could not be coded) is replaced by
    ``raw_body(lo, hi)``, its rows as plain bytes."""
    for s, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        if hi == lo:
            continue
        share = flat[lo * width:hi * width]
        if 0 <= lengths[s] < (hi - lo) * raw_row_bytes:
            _head(share, CODED, share[HEAD:HEAD + lengths[s]])
            continue
        share[:] = 0
        body = raw_body(lo, hi)
        share[HEAD:HEAD + len(body)] = body
        _head(share, RAW, body)


def _head(share: np.ndarray, mode: int, body: np.ndarray) -> None:
    share[0] = mode
    share[1:5] = np.array([len(body)], dtype="<u4").view(np.uint8)
    crc = zlib.crc32(body, zlib.crc32(share[:5]))
    share[5:9] = np.array([crc], dtype="<u4").view(np.uint8)


def unframe(flat: np.ndarray, offsets: np.ndarray, width: int, raw_row_bytes: int, what: str
            ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """Check every stream's head and CRC: the coded bodies' ``starts`` and ``sizes`` in
    ``flat`` (size −1: a raw or empty stream) and the raw streams as (lo, hi, body).
    ValueError names a damaged stream of ``what`` (a column) and its rows in the read."""
    starts = np.zeros(len(offsets) - 1, dtype=np.int64)
    sizes = np.full(len(offsets) - 1, -1, dtype=np.int64)
    raw = []
    for s, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        if hi == lo:
            continue
        share = flat[lo * width:hi * width]
        mode, length = int(share[0]), int(share[1:5].view("<u4")[0])
        body = share[HEAD:HEAD + length]
        if mode not in (RAW, CODED) or HEAD + length > len(share) \
                or (mode == RAW and length != (hi - lo) * raw_row_bytes) \
                or zlib.crc32(body, zlib.crc32(share[:5])) != int(share[5:9].view("<u4")[0]):
            raise DamagedRowsError(f"{what}: stream {s} of the read (rows {lo}:{hi}) is "
                                   "damaged (its mode, length or CRC-32)", (lo, hi))
        if mode == CODED:
            starts[s], sizes[s] = lo * width + HEAD, length
        else:
            raw.append((lo, hi, body))
    return starts, sizes, raw


def damaged(what: str, bad: np.ndarray, offsets: np.ndarray) -> DamagedRowsError:
    """The error for the first stream ``bad`` flags (it decoded to impossible values)."""
    s = int(np.argmax(bad))
    lo, hi = int(offsets[s]), int(offsets[s + 1])
    return DamagedRowsError(f"{what}: stream {s} of the read (rows {lo}:{hi}) decodes to "
                            "values its coding cannot hold", (lo, hi))


def raw_rows(arrays: dict[str, np.ndarray], lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of ``arrays`` as one raw body: each array's rows, one after the other."""
    return np.concatenate([np.ascontiguousarray(a[lo:hi]).reshape(-1).view(np.uint8)
                           for a in arrays.values()])


def unpack_raw(arrays: dict[str, np.ndarray], lo: int, hi: int, body: np.ndarray) -> None:
    """Inverse of :func:`raw_rows`: ``body`` into rows ``lo:hi`` of ``arrays``."""
    at = 0
    for arr in arrays.values():
        end = at + (hi - lo) * arr[0].nbytes
        arr[lo:hi] = body[at:end].view(arr.dtype).reshape(hi - lo, *arr.shape[1:])
        at = end


def compile_kernels(make_kernels: Callable[[str], tuple[Any, Any]]) -> SimpleNamespace:
    """A stream coder's ``encode`` and ``decode`` kernels, jitted (cached on disk, parallel).
    numba checks a cached kernel against its own file only, not against the functions it
    inlines from ``range_coder`` and ``reference_codec``, but keys its cache on closure values
    too: ``make_kernels`` gets a digest of those files and returns closures over it, so a
    stale cached kernel is a miss."""
    import numba

    from mtkd.store import range_coder, reference_codec

    deps = hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                   for m in (range_coder, reference_codec))).hexdigest()
    jit = numba.njit(cache=True, nogil=True, parallel=True)
    encode_kernel, decode_kernel = make_kernels(deps)
    return SimpleNamespace(encode=jit(encode_kernel), decode=jit(decode_kernel))


def stream_lengths(lengths: np.ndarray, rows: int) -> np.ndarray:
    """Row counts of q64r's streams over sequences of ``lengths`` rows: consecutive sequences
    until a stream holds ≥ ``rows`` rows (the last may hold fewer; no empty stream)."""
    out, held = [], 0
    for n in np.asarray(lengths, dtype=np.int64).tolist():
        held += n
        if held >= max(rows, 1):
            out.append(held)
            held = 0
    if held:
        out.append(held)
    return np.asarray(out, dtype=np.int64)


def stream_offsets(starts: np.ndarray) -> np.ndarray:
    """Row offsets of the streams that q64r's ``topk_stream_start`` flags (rows of whole
    streams)."""
    first = np.flatnonzero(starts)
    if len(starts) and (len(first) == 0 or first[0] != 0):
        raise DamagedRowsError("topk_stream_start: the rows read do not begin a stream "
                               "(damaged)")
    return np.concatenate([first, [len(starts)]]).astype(np.int64)
