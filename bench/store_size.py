"""Teacher-store size per position on a real harvest: float32, float16 and quantised top-k codings.

Reads a teacher store (default ``/tmp/storesize-input``: the trained demo teacher t0-deep over
the demo's student tokens, 104,045 positions, k=64, vocabulary 2048, float32 log-probs from
``mtkd harvest --engine hf --dtype float32 --logprob-dtype float32``) and, for each candidate,
re-encodes its rows, writes them with ``StoreWriter`` as a teacher store of the same parts and
sequences in a temp dir, reads that back part by part and prints one line::

    <name>: bytes_per_position=… max_abs_logprob_err_p_ge_1e-3=… max_abs_logprob_err_all=…
            max_abs_scalar_err=… read_positions_s=…

* ``bytes_per_position``: every file of the written store (chunks, ``zarr.json``s, commit
  records, header, manifest) ÷ positions;
* ``max_abs_logprob_err_*``: |read back − input| of the top-k log-probs, matched by id (codings
  may reorder entries whose values tie), over the input's entries with p ≥ 1e-3 and over all
  finite ones; ids must come back exactly and in descending log-prob order (checked);
* ``max_abs_scalar_err``: the same for ``target_logprob`` and ``tail_logmass``;
* ``read_positions_s``: a sequential read of every part including decoding (best of 3; the
  machine is shared, so this moves between runs).

Candidates (zstd unless said):

* ``float32-raw``: int32 ids + float32 log-probs, uncompressed: the reference;
* ``float32``: the same with zstd; ``float16``: float16 log-probs (the default before q64);
* ``q64-rank``: q64's grid, rank order kept: ids in uint16 (int32 above 65536 ids), codes
  delta-coded along the row (first one absolute) in uint16; ``q64-rank-planes``: the same as
  byte planes;
* ``q64-idorder``: q64's id order (delta-coded ids, codes) in plain uint16/uint32, no planes;
* ``q64``: the chosen coding (``mtkd.store.topk_codec``), written and read through the store's
  own path (``teacher_header(logprob_dtype="q64")``);
* ``q64+f16-scalars``: q64 with ``target_logprob`` and ``tail_logmass`` in float16.

The last lines give the chosen coding's bytes per position by array, then
``max_abs_logprob_err=`` (entries with p ≥ 1e-3, against the input) and the headline
``bytes_per_position=`` last. Goal: ≤ 128 bytes per
position with an error ≤ 0.01 nats.

    .venv/bin/python bench/store_size.py
    .venv/bin/python bench/store_size.py --store /path/to/teacher-store --only float16,q64
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtkd.store import ArraySpec, Batch, Header, Store, StoreWriter, bytes_on_disk, open_store
from mtkd.store import topk_codec as tc
from mtkd.store.format import PARTS_DIR, Codec, part_name
from mtkd.store.schema import TAIL_LOGMASS, TARGET_LOGPROB, TEACHER, teacher_header

DEFAULT_STORE = Path("/tmp/storesize-input")
CHOSEN = "q64"
GOAL_BYTES, GOAL_ERR = 128.0, 0.01
LOG_P_MIN = math.log(1e-3)
SCALARS = (TARGET_LOGPROB, TAIL_LOGMASS)

TopK = tuple[np.ndarray, np.ndarray]  # ids [n, k], log-probs [n, k]


@dataclass(frozen=True)
class Layout:
    """A bench-only coding of the top-k columns: stored (dtype, row shape) per array, and the
    conversions. The store keeps these arrays as they are (its header names no coding)."""

    specs: Callable[[int, int | None], dict[str, tuple[str, tuple[int, ...]]]]
    encode: Callable[[np.ndarray, np.ndarray, int | None], dict[str, np.ndarray]]
    decode: Callable[[dict[str, np.ndarray]], TopK]


@dataclass(frozen=True)
class Candidate:
    name: str
    logprob_dtype: str = tc.Q64  # teacher_header's choice (a layout replaces its top-k arrays)
    codec: Codec = "zstd"
    layout: Layout | None = None
    scalar_dtype: str = "float32"


def _rank_id_dtype(vocab: int | None) -> str:
    return "uint16" if vocab is not None and vocab <= 1 << 16 else "int32"


def _rank_layout(planes: bool) -> Layout:
    """Rank order kept: ids as they are (narrow dtype), q64 codes delta-coded along the row."""

    def specs(k: int, vocab: int | None) -> dict[str, tuple[str, tuple[int, ...]]]:
        dt = _rank_id_dtype(vocab)
        if planes:
            return {tc.IDS: ("uint8", (np.dtype(dt).itemsize, k)),
                    tc.LOGPROBS: ("uint8", (tc.CODE_WIDTH, k))}
        return {tc.IDS: (dt, (k,)), tc.LOGPROBS: ("uint16", (k,))}

    def encode(ids: np.ndarray, lp: np.ndarray, vocab: int | None) -> dict[str, np.ndarray]:
        deltas = np.diff(tc.quantise(lp).astype(np.int64), axis=1, prepend=0) & 0xFFFF
        ids = ids.astype(_rank_id_dtype(vocab))
        if planes:
            return {tc.IDS: tc.to_planes(ids.view(f"u{ids.itemsize}"), ids.itemsize),
                    tc.LOGPROBS: tc.to_planes(deltas, tc.CODE_WIDTH)}
        return {tc.IDS: ids, tc.LOGPROBS: deltas.astype(np.uint16)}

    def decode(arrays: dict[str, np.ndarray]) -> TopK:
        ids, deltas = arrays[tc.IDS], arrays[tc.LOGPROBS]
        if planes:
            ids, deltas = tc.from_planes(ids), tc.from_planes(deltas)
        codes = np.cumsum(deltas, axis=1, dtype=np.int64) & 0xFFFF  # wraps back exactly
        return ids.astype(np.int32), tc.dequantise(codes)

    return Layout(specs, encode, decode)


def _idorder_plain_layout() -> Layout:
    """q64 without byte planes: the same values as plain uint16 / uint32 columns."""

    def specs(k: int, vocab: int | None) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {tc.IDS: (f"uint{8 * tc.id_width(vocab)}", (k,)), tc.LOGPROBS: ("uint16", (k,))}

    def encode(ids: np.ndarray, lp: np.ndarray, vocab: int | None) -> dict[str, np.ndarray]:
        id_planes, code_planes = tc.encode(ids, lp, vocab_size=vocab)
        return {tc.IDS: tc.from_planes(id_planes), tc.LOGPROBS: tc.from_planes(code_planes)}

    def decode(arrays: dict[str, np.ndarray]) -> TopK:
        ids = arrays[tc.IDS]
        return tc.decode(tc.to_planes(ids, ids.itemsize),
                         tc.to_planes(arrays[tc.LOGPROBS], tc.CODE_WIDTH))

    return Layout(specs, encode, decode)


CANDIDATES = (
    Candidate("float32-raw", "float32", codec="raw"),
    Candidate("float32", "float32"),
    Candidate("float16", "float16"),
    Candidate("q64-rank", layout=_rank_layout(planes=False)),
    Candidate("q64-rank-planes", layout=_rank_layout(planes=True)),
    Candidate("q64-idorder", layout=_idorder_plain_layout()),
    Candidate(CHOSEN),
    Candidate("q64+f16-scalars", scalar_dtype="float16"),
)


def candidate_header(src: Store, cand: Candidate) -> Header:
    """``src``'s teacher header with the candidate's top-k arrays, scalar dtype and codec."""
    attrs = dict(src.attrs)
    k, vocab = int(attrs["k"]), attrs.get("vocab_size")
    header = teacher_header(src.num_parts, k, attrs, temperatures=attrs.get("temperatures", ()),
                            num_samples=int(attrs.get("num_samples", 0)),
                            logprob_dtype=cand.logprob_dtype if cand.layout is None
                            else "float32", codec=cand.codec)
    specs = cand.layout.specs(k, vocab) if cand.layout else {}
    specs |= {name: (cand.scalar_dtype, ()) for name in SCALARS}
    arrays = tuple(ArraySpec(a.name, *specs[a.name], a.codec) if a.name in specs else a
                   for a in header.arrays)
    return dataclasses.replace(header, arrays=arrays)


def write_candidate(src: Store, cand: Candidate, out: Path) -> Store:
    header = candidate_header(src, cand)
    writer = StoreWriter(out, header)
    vocab = src.attrs.get("vocab_size")
    for part in range(src.num_parts):
        batch = src.read_part(part)
        rows = dict(batch.arrays)
        if cand.layout is not None:
            rows |= cand.layout.encode(rows[tc.IDS], rows[tc.LOGPROBS], vocab)
        with writer.open_part(part) as pw:
            pw.append(rows, batch.lengths, batch.seq_ids, src.read_meta(part))
    assert writer.finalize()
    return open_store(out, TEACHER, verify="full")


def read_topk(store: Store, part: int, cand: Candidate) -> tuple[Batch, TopK]:
    """A part as a reader sees it: the store decodes its own coding, a bench layout here."""
    batch = store.read_part(part)
    if cand.layout is None:
        return batch, (batch[tc.IDS], batch[tc.LOGPROBS])
    return batch, cand.layout.decode(batch.arrays)


def topk_errors(ref: TopK, got: TopK) -> tuple[float, float]:
    """Max |error| of the log-probs matched by id, over p ≥ 1e-3 and over all finite entries;
    asserts that the ids are the same per row and that ``got`` is in descending order."""
    (ids_a, lp_a), (ids_b, lp_b) = ref, got
    by_id_a = np.argsort(ids_a, axis=1, kind="stable")
    by_id_b = np.argsort(ids_b, axis=1, kind="stable")
    assert np.array_equal(np.take_along_axis(ids_a, by_id_a, 1),
                          np.take_along_axis(ids_b, by_id_b, 1)), "ids differ"
    assert (lp_b[:, 1:] <= lp_b[:, :-1]).all(), "not in rank order"
    a = np.take_along_axis(lp_a, by_id_a, 1).astype(np.float64)
    b = np.take_along_axis(lp_b, by_id_b, 1).astype(np.float64)
    assert np.array_equal(np.isneginf(a), np.isneginf(b)), "-inf entries differ"
    finite = np.isfinite(a)
    err = np.where(finite, np.abs(b - np.where(finite, a, 0)), 0)
    return float(err[a >= LOG_P_MIN].max(initial=0)), float(err.max(initial=0))


def scalar_error(ref: Batch, got: Batch) -> float:
    worst = 0.0
    for name in SCALARS:
        a, b = ref[name].astype(np.float64), got[name].astype(np.float64)
        assert np.array_equal(np.isneginf(a), np.isneginf(b)), f"{name}: -inf entries differ"
        finite = np.isfinite(a)
        worst = max(worst, float(np.abs(a[finite] - b[finite]).max(initial=0)))
    return worst


def read_speed(store: Store, cand: Candidate, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for part in range(store.num_parts):
            read_topk(store, part, cand)
        best = min(best, time.perf_counter() - t)
    return store.num_rows / best


def bytes_by_array(store: Store) -> dict[str, float]:
    """Bytes on disk per position of each array (its chunks and ``zarr.json`` in every part)."""
    return {name: sum(bytes_on_disk(store.root / PARTS_DIR / part_name(p) / name)
                      for p in range(store.num_parts)) / store.num_rows
            for name in store.array_names}


def measure(src: Store, cand: Candidate, out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The candidate's figures (one line of output) and its bytes per position by array."""
    store = write_candidate(src, cand, out)
    fine = coarse = scalars = 0.0
    for part in range(src.num_parts):
        ref = src.read_part(part)
        got, topk = read_topk(store, part, cand)
        f, c = topk_errors((ref[tc.IDS], ref[tc.LOGPROBS]), topk)
        fine, coarse, scalars = max(fine, f), max(coarse, c), max(scalars, scalar_error(ref, got))
    return {
        "bytes_per_position": bytes_on_disk(out) / src.num_rows,
        "max_abs_logprob_err_p_ge_1e-3": fine,
        "max_abs_logprob_err_all": coarse,
        "max_abs_scalar_err": scalars,
        "read_positions_s": read_speed(store, cand),
    }, bytes_by_array(store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE, help="a teacher store")
    ap.add_argument("--only", default="", help="comma-separated candidate names (default all)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to write the candidates' stores and keep them (default: temp)")
    args = ap.parse_args()

    src = open_store(args.store, TEACHER, verify="full")
    wanted = [n for n in args.only.split(",") if n] or [c.name for c in CANDIDATES]
    unknown = set(wanted) - {c.name for c in CANDIDATES}
    if unknown:
        ap.error(f"unknown candidates {sorted(unknown)}")
    print(f"input: store={args.store} positions={src.num_rows} parts={src.num_parts} "
          f"k={src.attrs['k']} vocab_size={src.attrs.get('vocab_size')} "
          f"topk_logprobs={src.read_part(0, [tc.LOGPROBS])[tc.LOGPROBS].dtype} "
          f"topk_coding={src.attrs.get(tc.CODING_ATTR, 'plain')}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="mtkd-bench-size-"))
    results, by_array = {}, {}
    try:
        for cand in CANDIDATES:
            if cand.name not in wanted:
                continue
            out = root / cand.name
            shutil.rmtree(out, ignore_errors=True)
            r, by_array[cand.name] = measure(src, cand, out)
            results[cand.name] = r
            print(f"{cand.name}: " + " ".join(
                f"{k}={v:.4g}" if k != "bytes_per_position" else f"{k}={v:.1f}"
                for k, v in r.items()), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if CHOSEN in results:
        best = results[CHOSEN]
        met = (best["bytes_per_position"] <= GOAL_BYTES
               and best["max_abs_logprob_err_p_ge_1e-3"] <= GOAL_ERR)
        print(f"chosen={CHOSEN} goal_met={met} (<= {GOAL_BYTES:g} bytes, <= {GOAL_ERR} nats)")
        print(f"{CHOSEN} bytes_per_position by array: "
              + " ".join(f"{n}={v:.1f}" for n, v in by_array[CHOSEN].items()))
        print(f"max_abs_logprob_err={best['max_abs_logprob_err_p_ge_1e-3']:.6g}")
        print(f"bytes_per_position={best['bytes_per_position']:.1f}")


if __name__ == "__main__":
    main()
