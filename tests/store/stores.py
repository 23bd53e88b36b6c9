"""Helpers of the store tests: random stores written and read back, files damaged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.store import ArraySpec, Header, StoreWriter
from mtkd.store import q64_grid as grid

REPO = Path(__file__).resolve().parents[2]
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


#: What q64r codes against the top-k since schema version 7, within the top-k's bound
CODED_SCALARS = ("target_logprob", "tail_logmass")


def assert_reads_alike(got: np.ndarray, want: np.ndarray, name: str,
                       scalars_coded: bool = False) -> None:
    """``got`` (a q64r read) is ``want`` (its q64v2 twin's) exactly; with ``scalars_coded``
    the actual token's log-prob and the tail within their bound (1/128 nat where p ≥ 1e-3 and
    for the tail; q64's 1/32 below)."""
    if not (scalars_coded and name in CODED_SCALARS):
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
    finite = np.isfinite(want)
    bound = np.where((want >= -grid.FINE_MAX / grid.FINE) | (name == "tail_logmass"),
                     grid.FINE_ERROR, grid.COARSE_ERROR)
    assert (np.abs(got[finite] - want[finite]) <= bound[finite] + 1e-6).all(), name


def random_rows(rng: np.random.Generator, specs: tuple[ArraySpec, ...],
                n: int) -> dict[str, np.ndarray]:
    rows = {}
    for spec in specs:
        shape = (n, *spec.row_shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            values = rng.normal(size=shape) * 10
            values[rng.random(shape) < 0.05] = -np.inf  # −inf is a legal log-prob
            rows[spec.name] = values.astype(dtype)
        else:
            info = np.iinfo(dtype)
            rows[spec.name] = rng.integers(info.min, info.max, size=shape, endpoint=True,
                                           dtype=dtype)
    return rows


def write_store(root: Path, header: Header, parts: list[list[int]], seed: int = 0,
                meta: bool = True) -> list[dict]:
    """Write ``parts`` (sequence lengths per part); return per part its rows, lengths, ids."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root, header)
    written = []
    for p, lengths in enumerate(parts):
        lengths = np.asarray(lengths, dtype=np.int64)
        rows = random_rows(rng, header.arrays, int(lengths.sum()))
        ids = (np.int64(p) << 32) | np.arange(len(lengths), dtype=np.int64)
        table = pa.table({"seq_id": ids, "tag": [f"p{p}s{i}" for i in range(len(ids))]})
        with writer.open_part(p) as pw:
            pw.stats = {"note": f"part {p}"}
            # appended in two calls, to exercise concatenation
            half = len(lengths) // 2
            cut = int(lengths[:half].sum())
            for sl, rsl in ((slice(0, half), slice(0, cut)), (slice(half, None), slice(cut, None))):
                pw.append({k: v[rsl] for k, v in rows.items()}, lengths[sl], ids[sl],
                          table.slice(sl.start, len(lengths[sl])) if meta else None)
        written.append({"rows": rows, "lengths": lengths, "ids": ids, "meta": table})
    assert writer.finalize()
    return written


def expected_sequence(written: list[dict], store_index: int) -> tuple[int, dict[str, np.ndarray]]:
    """(seq_id, rows) of the sequence at ``store_index`` (parts in order, sequences in order)."""
    for part in written:
        if store_index < len(part["lengths"]):
            offsets = np.concatenate([[0], np.cumsum(part["lengths"])])
            lo, hi = offsets[store_index], offsets[store_index + 1]
            return int(part["ids"][store_index]), {k: v[lo:hi] for k, v in part["rows"].items()}
        store_index -= len(part["lengths"])
    raise IndexError(store_index)


def assert_equal_arrays(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


SMALL_SPECS = (
    ArraySpec("ids", "int32", (3,), "raw"),
    ArraySpec("logp", "float16", (3,), "zstd"),
    ArraySpec("grid", "float32", (2, 2), "raw"),
    ArraySpec("count", "uint16", (), "zstd"),
)


def cli_verify(root: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["verify", str(root), *extra])
    return result.exit_code, result.output


def flip_byte(path: Path) -> bytes:
    data = path.read_bytes()
    pos = len(data) // 2
    flipped = bytearray(data)
    flipped[pos] ^= 0x5A
    path.write_bytes(bytes(flipped))
    return data
