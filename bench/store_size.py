"""Teacher-store size per position on a real harvest: float, q64 and q64v2 codings of the
top-k columns, the random-sampling columns, and a 262,144-id teacher.

Input (built by ``store_size_inputs``, nothing made by hand; cached under
``~/.cache/mtkd/bench/``): the real teacher SmolLM2-135M (vocabulary 49,152) harvested over
≈ 104k positions of the demo corpus (the standard library's sources, SmolLM2's tokenizer) with
``mtkd harvest --engine vllm --dtype float32 --logprob-dtype float32 --k 64 --num-samples 64
--enforce-eager``; ``--store PATH`` takes any teacher store instead. For each candidate the
rows are re-encoded, written with ``StoreWriter`` as a teacher store of the same parts and
sequences in a temp dir, read back part by part, and one line printed::

    <name>: bytes_per_position=… max_abs_logprob_err_p_ge_1e-3=… max_abs_logprob_err_all=…
            max_abs_scalar_err=… read_positions_s=… sampled_bytes_per_position=…

* ``bytes_per_position``: every file of the written store (chunks, ``zarr.json``s, commit
  records, header, manifest) but the random-sampling arrays ÷ positions;
  ``sampled_bytes_per_position``: those arrays (``sample_ids``, ``sample_counts``,
  ``sample_logprobs``; q64v2 and q64v3 code them, q64r codes them against the top-k in
  ``sample_stream``, the others keep them plain) ÷ positions;
* ``max_abs_logprob_err_*``: |read back − input| of the top-k log-probs, matched by id (codings
  may reorder entries whose values tie), over the input's entries with p ≥ 1e-3 and over all
  finite ones; ids must come back exactly and in descending log-prob order (checked); sampled
  ids and counts must come back exactly (checked), their log-probs within q64's bound;
* ``max_abs_scalar_err``: the same for ``target_logprob`` and ``tail_logmass`` (exact but in
  q64r, which codes them against the top-k within its bound: since schema version 7);
  ``max_abs_scalar_err_p_ge_1e-3``: the same over actual tokens with p ≥ 1e-3, and every tail;
* ``read_positions_s``: a sequential read of every part including decoding (best of 3; the
  machine is shared, so this moves between runs); ``read_topk_positions_s``: the same of the
  top-k columns alone.

Candidates (zstd unless said):

* ``float32-raw``: int32 ids + float32 log-probs, uncompressed: the reference;
* ``float32``: the same with zstd; ``float16``: float16 log-probs (the default before q64);
* ``q64-rank-planes``: q64's grid, rank order kept: ids as byte planes (int32 above 65536
  ids), codes delta-coded along the row (first one absolute) as byte planes;
* ``q64``: ids in id order as deltas, codes as they are (``mtkd.store.topk_codec``);
* ``q64v2``: the chosen coding: q64 with codes as distances to the row's floor, ids in as few
  bytes as the vocabulary needs, the sampled columns coded too;
* ``q64v2-tail1/8nat``: q64v2 with entries below p = 1e-3 on a 1/8-nat grid (what a coarser
  tail would save; not taken);
* ``q64v3``: q64v2's values, each row's ids coded against the latest earlier row of its
  sequence with the same top-1 id (``mtkd.store.reference_codec``; opt-in);
* ``q64r``: q64v3's values range-coded, one stream per sequence (``mtkd.store.stream_codec``;
  opt-in); ``q64r-tail1/8nat``, ``q64r-tail1/4nat``: with the tail (p < 1e-3) on that grid
  (``mtkd harvest --logprob-dtype q64r --tail-nats 0.125 / 0.25 --stream-rows 0``);
  ``q64r-tail1/4nat-streams2048``: the 1/4-nat tail, consecutive sequences coded as one
  stream of ≥ 2,048 rows (what ``mtkd harvest --logprob-dtype q64r --tail-nats 0.25`` writes);
  ``…-streams65536``: of ≥ 65,536 rows (models that learn over a whole part);
  ``q64r-tail1nat-streams2048``: the coarsest tail a harvest allows (``--tail-nats 1``);
  ``q64r-streams2048``: q64's own tail grid, streams of ≥ 2,048 rows (what ``mtkd harvest``
  writes by default for a vocabulary of ≥ 16,384 ids, ``harvest_default_bytes_per_position=``);
* ``q64v2+id-table{1024,4096,16384}``, ``q64v3+id-table4096``, ``q64r-tail1/4nat+id-table4096``
  (the default input only): the
  coding with the id table of the tokens store's N most frequent ids in the header, what
  ``mtkd harvest --id-table N`` writes.

With ``--hybrid``, SmolLM2 harvested once more as the hybrid that ``mtkd demo --experiments
all`` trains (``--k 8 --num-samples 64 --sample-rest``: the exact top-8 and 64 draws from the
rest) through q64v2:
``hybrid_sampled_bytes_per_position=`` (the draws) and ``hybrid_bytes_per_position=`` (the whole
store). With ``--spread``, the input's own rows with their ids spread over 262,144 ids (id i →
the i-th of a sorted random subset; ``store_size_inputs.spread_teacher_store``) through the
Zipf candidates: ``<coding>_spread262k_bytes_per_position=``, and scattered over them (id i →
the subset's i-th random draw: neighbouring ids land anywhere, the frequent ones too):
``<coding>_scatter262k_bytes_per_position=``; with ``--sequence-rows 128,512``,
the input's rows cut into sequences of that many rows through them:
``<coding>_seq<rows>_bytes_per_position=``. Then the synthetic Zipf teacher
of 262,144 ids (``--zipf-positions`` rows) through q64, q64v2, q64v3, q64r, q64r-tail1/4nat
and its streams2048 and streams65536 twins (seen ids ranked by count, as the harvest writes
them), ``q64r-tail1/4nat-streams2048-first-sight`` (numbered by first sight, as before) and
``q64r-tail1nat-streams2048``.
Each candidate's line holds its bytes, errors, read speeds and, for the store's codings,
``encode_topk_positions_s`` (the writer's coding of the top-k columns). The last lines give
q64v2's bytes by array (the harvest's coding below 16,384 ids), ``max_abs_logprob_err=``
(p ≥ 1e-3), ``read_positions_s=``, ``zipf262k_bytes_per_position=``,
``sampled_bytes_per_position=``, the opt-in codings' bytes, and the headline
``teacher_bytes_per_position=`` last: q64r with the 1/4-nat tail and streams of ≥ 2,048 rows
where it was measured (the smallest coding within the goal's bound, as a harvest writes it),
else what the harvest writes by default for the input's vocabulary, else q64v2. Beside the
headline's Zipf figure,
``zipf262k_floor_bytes_per_position_<grid>=``: what no coding of those independent rows can
beat at q64's grid and at the headline's tail, even one told the generator
(``store_size_inputs.zipf_floor_bytes``). Each line also gives
``mean_kl_vs_written_nats``: the mean KL from each written row (top-k plus tail mass) to the
read one.

    .venv/bin/python bench/store_size.py
    .venv/bin/python bench/store_size.py --store /path/to/teacher-store --only float16,q64v2
    .venv/bin/python bench/store_size.py --hybrid --only q64v2 --zipf-positions 0
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
from store_size_inputs import (
    real_teacher_store,
    recut_teacher_store,
    spread_teacher_store,
    zipf_floor_bytes,
    zipf_teacher_store,
)

from mtkd.harvest.config import LARGE_VOCAB
from mtkd.harvest.job import read_id_table
from mtkd.store import ArraySpec, Batch, Header, Store, StoreWriter, bytes_on_disk, open_store
from mtkd.store import q64_grid as grid
from mtkd.store import topk_codec as tc
from mtkd.store.format import PARTS_DIR, Codec, part_name
from mtkd.store.schema import (
    SAMPLE_COUNTS,
    SAMPLE_IDS,
    SAMPLE_LOGPROBS,
    TAIL_LOGMASS,
    TARGET_LOGPROB,
    TARGET_RANK,
    TEACHER,
    teacher_header,
)

#: q64v2, the harvest's coding of small vocabularies: bytes by array, read speeds, the draws
CHOSEN = tc.Q64V2
#: the headline: the smallest coding within the goal's bound, as a harvest writes it
COMPACT = "q64r-tail1/4nat-streams2048"
#: what ``mtkd harvest`` writes with no coding flag for a vocabulary of ``LARGE_VOCAB`` ids or
#: more (``--logprob-dtype auto``: q64r, q64's own tail grid, streams of ≥ 2,048 rows)
HARVEST_DEFAULT = "q64r-streams2048"
HOW = {COMPACT: "mtkd harvest --logprob-dtype q64r --tail-nats 0.25",
       "q64r-tail1/4nat": "mtkd harvest --logprob-dtype q64r --tail-nats 0.25 --stream-rows 0",
       HARVEST_DEFAULT: "mtkd harvest, no coding flag: --logprob-dtype auto",
       CHOSEN: "mtkd harvest --logprob-dtype q64v2"}
#: the headline as session 18 wrote it: seen ids numbered by first sight, not by count
FIRST_SIGHT = "q64r-tail1/4nat-streams2048-first-sight"
COARSEST = "q64r-tail1nat-streams2048"
ZIPF_CANDIDATES = (tc.Q64, tc.Q64V2, tc.Q64V3, tc.Q64R, "q64r-tail1/4nat",
                   "q64r-tail1/4nat-streams2048", "q64r-tail1/4nat-streams65536", FIRST_SIGHT,
                   COARSEST)
GOAL_BYTES, GOAL_ERR, GOAL_ZIPF_BYTES, GOAL_SAMPLED_BYTES = 100.0, 0.0079, 112.0, 64.0
LOG_P_MIN = math.log(1e-3)
SCALARS = (TARGET_LOGPROB, TAIL_LOGMASS)
SAMPLED = (SAMPLE_IDS, SAMPLE_COUNTS, SAMPLE_LOGPROBS, tc.SAMPLE_STREAM)

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
    logprob_dtype: str = tc.Q64V2  # teacher_header's (a layout replaces its top-k arrays)
    codec: Codec = "zstd"
    layout: Layout | None = None
    scalar_dtype: str = "float32"
    id_table: tuple[int, ...] = ()  # q64v2's id table (teacher_header)
    tail_step: int = 1  # q64r's tail grid (teacher_header)
    stream_rows: int = 0  # q64r's rows per stream (teacher_header; 0: one per sequence)
    rank_ids: bool = True  # q64r numbers seen ids by count, else by first sight (teacher_header)


def _rank_id_dtype(vocab: int | None) -> str:
    return "uint16" if vocab is not None and vocab <= 1 << 16 else "int32"


def _rank_layout(planes: bool) -> Layout:
    """Rank order kept: ids as they are (narrow dtype), q64 codes delta-coded along the row."""

    def specs(k: int, vocab: int | None) -> dict[str, tuple[str, tuple[int, ...]]]:
        dt = _rank_id_dtype(vocab)
        if planes:
            return {tc.IDS: ("uint8", (np.dtype(dt).itemsize, k)),
                    tc.LOGPROBS: ("uint8", (grid.CODE_WIDTH, k))}
        return {tc.IDS: (dt, (k,)), tc.LOGPROBS: ("uint16", (k,))}

    def encode(ids: np.ndarray, lp: np.ndarray, vocab: int | None) -> dict[str, np.ndarray]:
        deltas = np.diff(grid.quantise(lp).astype(np.int64), axis=1, prepend=0) & 0xFFFF
        ids = ids.astype(_rank_id_dtype(vocab))
        if planes:
            return {tc.IDS: tc.to_planes(ids.view(f"u{ids.itemsize}"), ids.itemsize),
                    tc.LOGPROBS: tc.to_planes(deltas, grid.CODE_WIDTH)}
        return {tc.IDS: ids, tc.LOGPROBS: deltas.astype(np.uint16)}

    def decode(arrays: dict[str, np.ndarray]) -> TopK:
        ids, deltas = arrays[tc.IDS], arrays[tc.LOGPROBS]
        if planes:
            ids, deltas = tc.from_planes(ids), tc.from_planes(deltas)
        codes = np.cumsum(deltas, axis=1, dtype=np.int64) & 0xFFFF  # wraps back exactly
        return ids.astype(np.int32), grid.dequantise(codes)

    return Layout(specs, encode, decode)


def _coarse_tail_layout(steps: int) -> Layout:
    """q64v2 with the entries below the fine grid (p < 1e-3) rounded to ``steps`` coarse steps
    (1/16 nat each): what a coarser tail would save, and cost in accuracy."""

    def specs(k: int, vocab: int | None) -> dict[str, tuple[str, tuple[int, ...]]]:
        return dict(tc.stored_arrays(k, vocab, tc.Q64V2))

    def encode(ids: np.ndarray, lp: np.ndarray, vocab: int | None) -> dict[str, np.ndarray]:
        codes = grid.quantise(lp).astype(np.int64)
        tail = (codes > grid.FINE_MAX) & (codes < grid.NEG_INF)
        coarse = grid.FINE_MAX + steps * np.rint((codes - grid.FINE_MAX) / steps)
        codes = np.where(tail, np.minimum(coarse, grid.MAX_CODE), codes).astype(np.int64)
        id_planes, code_planes = tc.encode(ids, grid.dequantise(codes), vocab_size=vocab,
                                           coding=tc.Q64V2)
        return {tc.IDS: id_planes, tc.LOGPROBS: code_planes}

    def decode(arrays: dict[str, np.ndarray]) -> TopK:
        return tc.decode(arrays[tc.IDS], arrays[tc.LOGPROBS], tc.Q64V2)

    return Layout(specs, encode, decode)


#: q64r with a coarser tail: name → tail step (``topk_codec.TAIL_STEPS``)
TAIL_CANDIDATES = {"q64r-tail1/8nat": 2, "q64r-tail1/4nat": 4}
#: q64r with the 1/4-nat tail and streams over several sequences: name → rows per stream
STREAM_CANDIDATES = {"q64r-tail1/4nat-streams2048": 2048, "q64r-tail1/4nat-streams65536": 1 << 16}
#: id-table candidates (the default input only): name → (candidate, table size)
ID_TABLE_CANDIDATES = {f"{name}+id-table{n}": (name, n) for name, n in (
    (tc.Q64V2, 1024), (tc.Q64V2, 4096), (tc.Q64V2, 16384), (tc.Q64V3, 4096),
    ("q64r-tail1/4nat", 4096))}
ID_TABLES = tuple(ID_TABLE_CANDIDATES)


def id_table_candidates(teacher: Path, names: list[str]) -> list[Candidate]:
    """The wanted id-table candidates when the teacher's tokens store lies beside it (the
    default input), each table what ``mtkd harvest --id-table N`` writes; else none."""
    tokens = teacher.parent / "tokens"
    if not (tokens / "manifest.json").exists():
        return []
    store = open_store(tokens, "tokens")
    base = {c.name: c for c in CANDIDATES}
    return [dataclasses.replace(base[of], name=name,
                                id_table=tuple(read_id_table(store, None, size)))
            for name, (of, size) in ID_TABLE_CANDIDATES.items() if name in names]


CANDIDATES = (
    Candidate("float32-raw", "float32", codec="raw"),
    Candidate("float32", "float32"),
    Candidate("float16", "float16"),
    Candidate("q64-rank-planes", layout=_rank_layout(planes=True)),
    Candidate(tc.Q64, tc.Q64),
    Candidate("q64v2-tail1/8nat", layout=_coarse_tail_layout(2)),
    Candidate(tc.Q64V2),
    Candidate(tc.Q64V3, tc.Q64V3),
    Candidate(tc.Q64R, tc.Q64R),
    *(Candidate(name, tc.Q64R, tail_step=step) for name, step in TAIL_CANDIDATES.items()),
    *(Candidate(name, tc.Q64R, tail_step=4, stream_rows=rows)
      for name, rows in STREAM_CANDIDATES.items()),
    Candidate(HARVEST_DEFAULT, tc.Q64R, stream_rows=2048),
    Candidate(FIRST_SIGHT, tc.Q64R, tail_step=4, stream_rows=2048, rank_ids=False),
    Candidate(COARSEST, tc.Q64R, tail_step=16, stream_rows=2048),
)


def candidate_header(src: Store, cand: Candidate) -> Header:
    """``src``'s teacher header with the candidate's top-k arrays, scalar dtype and codec."""
    attrs = dict(src.attrs)
    k, vocab = int(attrs["k"]), attrs.get("vocab_size")
    header = teacher_header(src.num_parts, k, attrs, temperatures=attrs.get("temperatures", ()),
                            num_samples=int(attrs.get("num_samples", 0)),
                            logprob_dtype=cand.logprob_dtype if cand.layout is None
                            else "float32", codec=cand.codec, id_table=cand.id_table,
                            tail_step=cand.tail_step, stream_rows=cand.stream_rows,
                            rank_ids=cand.rank_ids)
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


def read_topk(store: Store, part: int, cand: Candidate,
              names: list[str] | None = None) -> tuple[Batch, TopK]:
    """A part as a reader sees it (``names``: those arrays only): the store decodes its own
    coding, a bench layout here."""
    batch = store.read_part(part, names)
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


def mean_kl(ref: TopK, got: TopK, tail_logmass: np.ndarray, read_tail: np.ndarray) -> float:
    """Mean KL(written ‖ read) in nats of each row's top-k plus its tail mass as one more
    entry (both renormalised): what the coding's error does to a distillation target."""
    (ids_a, lp_a), (ids_b, lp_b) = ref, got
    a = np.take_along_axis(lp_a, np.argsort(ids_a, axis=1, kind="stable"), 1)
    b = np.take_along_axis(lp_b, np.argsort(ids_b, axis=1, kind="stable"), 1)
    p = np.concatenate([np.exp(a.astype(np.float64)),
                        np.exp(tail_logmass.astype(np.float64))[:, None]], axis=1)
    q = np.concatenate([np.exp(b.astype(np.float64)),
                        np.exp(read_tail.astype(np.float64))[:, None]], axis=1)
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return float(terms.sum(1).mean())


def scalar_error(ref: Batch, got: Batch) -> tuple[float, float]:
    """Worst |read − written| of the actual token's log-prob and the tail: over actual tokens
    with p ≥ 1e-3 and every tail, and over everything finite."""
    fine = worst = 0.0
    for name in SCALARS:
        a, b = ref[name].astype(np.float64), got[name].astype(np.float64)
        assert np.array_equal(np.isneginf(a), np.isneginf(b)), f"{name}: -inf entries differ"
        finite = np.isfinite(a)
        err = np.abs(a[finite] - b[finite])
        worst = max(worst, float(err.max(initial=0)))
        kept = a[finite] >= LOG_P_MIN if name == TARGET_LOGPROB else slice(None)
        fine = max(fine, float(err[kept].max(initial=0)))
    return fine, worst


def read_speed(store: Store, cand: Candidate, names: list[str] | None = None,
               repeats: int = 3) -> float:
    """Positions per second of a sequential read of every part (best of ``repeats``)."""
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for part in range(store.num_parts):
            read_topk(store, part, cand, names)
        best = min(best, time.perf_counter() - t)
    return store.num_rows / best


def encode_speed(src: Store, store: Store, names: tuple[str, ...] = (tc.IDS, tc.LOGPROBS),
                 repeats: int = 3) -> float:
    """Positions per second of the store's own coding of ``src``'s columns ``names`` (the
    top-k ones), part 0 (``topk_codec.encode_rows``, what ``PartWriter.append`` runs; best of
    ``repeats``)."""
    batch = src.read_part(0, list(names))
    rows, lengths = dict(batch.arrays), np.diff(batch.offsets)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        tc.encode_rows(rows, store.attrs, lengths)
        best = min(best, time.perf_counter() - t)
    return len(rows[tc.IDS]) / best


def bytes_by_array(store: Store) -> dict[str, float]:
    """Bytes on disk per position of each array (its chunks and ``zarr.json`` in every part)."""
    return {name: sum(bytes_on_disk(store.root / PARTS_DIR / part_name(p) / name)
                      for p in range(store.num_parts)) / store.num_rows
            for name in (a.name for a in store.header.arrays)}


def sampled_errors(ref: Batch, got: Batch) -> float:
    """Max |error| of the sampled log-probs; asserts that ids and counts come back exactly."""
    for name in (SAMPLE_IDS, SAMPLE_COUNTS):
        assert got[name].dtype == ref[name].dtype, f"{name}: dtype {got[name].dtype}"
        assert np.array_equal(got[name], ref[name]), f"{name} differ"
    a, b = ref[SAMPLE_LOGPROBS].astype(np.float64), got[SAMPLE_LOGPROBS].astype(np.float64)
    assert np.array_equal(np.isneginf(a), np.isneginf(b)), "sampled -inf entries differ"
    finite = np.isfinite(a)
    return float(np.abs(a[finite] - b[finite]).max(initial=0))


def measure(src: Store, cand: Candidate, out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The candidate's figures (one line of output) and its bytes per position by array."""
    store = write_candidate(src, cand, out)
    sampled = SAMPLE_IDS in src.array_names
    fine = coarse = scalars = scalars_fine = sampled_err = kl = 0.0
    for part in range(src.num_parts):
        ref = src.read_part(part)
        got, topk = read_topk(store, part, cand)
        f, c = topk_errors((ref[tc.IDS], ref[tc.LOGPROBS]), topk)
        s_fine, s_all = scalar_error(ref, got)
        fine, coarse = max(fine, f), max(coarse, c)
        scalars, scalars_fine = max(scalars, s_all), max(scalars_fine, s_fine)
        tail = ref[TAIL_LOGMASS]
        kl += mean_kl((ref[tc.IDS], ref[tc.LOGPROBS]), topk, tail, got[TAIL_LOGMASS]) * len(tail)
        if sampled:
            sampled_err = max(sampled_err, sampled_errors(ref, got))
    by_array = bytes_by_array(store)
    sampled_bytes = sum(by_array.get(name, 0.0) for name in SAMPLED)
    figures = {
        "bytes_per_position": bytes_on_disk(out) / src.num_rows - sampled_bytes,
        "max_abs_logprob_err_p_ge_1e-3": fine,
        "max_abs_logprob_err_all": coarse,
        "max_abs_scalar_err": scalars,
        "max_abs_scalar_err_p_ge_1e-3": scalars_fine,
        "mean_kl_vs_written_nats": kl / src.num_rows,
        "read_positions_s": read_speed(store, cand),
        "read_topk_positions_s": read_speed(store, cand, [tc.IDS, tc.LOGPROBS]),
    }
    if cand.layout is None and tc.coding(store.attrs) is not None:
        figures["encode_topk_positions_s"] = encode_speed(src, store)
    if sampled:
        figures |= {"sampled_bytes_per_position": sampled_bytes,
                    "max_abs_sampled_logprob_err": sampled_err}
        if "encode_topk_positions_s" in figures:  # every column (q64r codes them with the top-k)
            figures["encode_positions_s"] = encode_speed(src, store, (
                tc.IDS, tc.LOGPROBS, *SAMPLED[:3], *SCALARS, TARGET_RANK))
    return figures, by_array


def run_candidates(src: Store, names: list[str], root: Path,
                   candidates: tuple[Candidate, ...] = CANDIDATES,
                   ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Measure the candidates named, printing one line each; figures and bytes by array."""
    results, by_array = {}, {}
    for cand in candidates:
        if cand.name not in names:
            continue
        out = root / cand.name.replace("/", "_")
        shutil.rmtree(out, ignore_errors=True)
        results[cand.name], by_array[cand.name] = measure(src, cand, out)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{cand.name}: " + " ".join(
            f"{k}={v:.1f}" if "bytes" in k else f"{k}={v:.4g}"
            for k, v in results[cand.name].items()), flush=True)
    return results, by_array


def describe(src: Store, what: str) -> None:
    print(f"input: {what} positions={src.num_rows} parts={src.num_parts} k={src.attrs['k']} "
          f"vocab_size={src.attrs.get('vocab_size')} "
          f"num_samples={src.attrs.get('num_samples', 0)} "
          f"topk_coding={src.attrs.get(tc.CODING_ATTR, 'plain')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=None,
                    help="a teacher store (default: the SmolLM2 harvest, built once and cached)")
    ap.add_argument("--only", default="", help="comma-separated candidate names (default all)")
    ap.add_argument("--zipf-positions", type=int, default=50_000,
                    help="rows of the synthetic 262,144-id teacher (0: skip it)")
    ap.add_argument("--spread", action="store_true",
                    help="also the input's rows with their ids spread over 262,144 ids, "
                         "order kept, and scattered over them (a real teacher's rows at a "
                         "large vocabulary's id width)")
    ap.add_argument("--sequence-rows", default="",
                    help="comma-separated lengths: also the input's rows cut into sequences of "
                         "that many rows (shorter windows; q64r's models start afresh in each)")
    ap.add_argument("--hybrid", action="store_true",
                    help="also SmolLM2 harvested as the hybrid (exact top-8 + 64 "
                         "draws from the rest; one more harvest, ≈ 4 min): its bytes in q64v2")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to write the candidates' stores (default: a temp dir)")
    args = ap.parse_args()
    wanted = [n for n in args.only.split(",") if n] or [c.name for c in CANDIDATES] + [*ID_TABLES]
    unknown = set(wanted) - {c.name for c in CANDIDATES} - set(ID_TABLES)
    if unknown:
        ap.error(f"unknown candidates {sorted(unknown)}")

    t = time.perf_counter()
    path = args.store or real_teacher_store()
    src = open_store(path, TEACHER, verify="full")
    describe(src, f"store={path} (ready in {time.perf_counter() - t:.0f} s)")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mtkd-bench-size-", dir=args.dir))
    try:
        results, by_array = run_candidates(src, wanted, root)
        extra = id_table_candidates(path, wanted)
        run_candidates(src, [c.name for c in extra], root, tuple(extra))
        hybrid = {}
        if args.hybrid:
            hsrc = open_store(real_teacher_store(hybrid=True), TEACHER, verify="full")
            describe(hsrc, "SmolLM2 harvested as the hybrid")
            hybrid, _ = run_candidates(hsrc, [CHOSEN], root / "hybrid")
        zipf = {}
        if args.zipf_positions:
            zsrc = open_store(zipf_teacher_store(root / "zipf-input", args.zipf_positions),
                              TEACHER)
            describe(zsrc, "synthetic Zipf teacher")
            zipf, _ = run_candidates(zsrc, [n for n in ZIPF_CANDIDATES if n in wanted], root)
        spread: dict[str, dict[str, dict[str, float]]] = {}
        for kind, ordered in (("spread", True), ("scatter", False)) if args.spread else ():
            ssrc = open_store(spread_teacher_store(path, root / f"{kind}-input",
                                                   ordered=ordered), TEACHER)
            describe(ssrc, f"the same rows, ids {'spread' if ordered else 'scattered'} over "
                           "262,144")
            spread[kind], _ = run_candidates(ssrc, [n for n in ZIPF_CANDIDATES if n in wanted],
                                             root)
        recut = {}
        for rows in (int(r) for r in args.sequence_rows.split(",") if r):
            rsrc = open_store(recut_teacher_store(path, root / f"recut{rows}", rows), TEACHER)
            describe(rsrc, f"the same rows in sequences of {rows}")
            recut[rows], _ = run_candidates(rsrc, [n for n in ZIPF_CANDIDATES if n in wanted],
                                            root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if CHOSEN not in results:
        return
    best = results[CHOSEN]
    print(f"{CHOSEN} bytes_per_position by array: "
          + " ".join(f"{n}={v:.1f}" for n, v in by_array[CHOSEN].items()))
    for name in (tc.Q64, "float32"):
        if name in results:
            print(f"{CHOSEN}_vs_{name}_bytes="
                  f"{best['bytes_per_position'] / results[name]['bytes_per_position']:.3f}")
    met = (best["bytes_per_position"] <= GOAL_BYTES
           and best["max_abs_logprob_err_p_ge_1e-3"] <= GOAL_ERR)
    print(f"{CHOSEN}_goal_met={met} (<= {GOAL_BYTES:g} bytes, <= {GOAL_ERR} nat)")
    print(f"max_abs_logprob_err={best['max_abs_logprob_err_p_ge_1e-3']:.6g}")
    print(f"read_positions_s={best['read_positions_s']:.4g}")
    print(f"read_topk_positions_s={best['read_topk_positions_s']:.4g}")
    if tc.Q64 in results:
        print(f"{CHOSEN}_vs_{tc.Q64}_read_topk_speed="
              f"{best['read_topk_positions_s'] / results[tc.Q64]['read_topk_positions_s']:.3f}")
    if CHOSEN in zipf:
        zipf_bytes = zipf[CHOSEN]["bytes_per_position"]
        print(f"zipf262k_goal_met={zipf_bytes <= GOAL_ZIPF_BYTES} (<= {GOAL_ZIPF_BYTES:g} bytes)")
        print(f"zipf262k_bytes_per_position={zipf_bytes:.1f}")
    if "sampled_bytes_per_position" in best:
        if "float32" in results:
            print("sampled_bytes_per_position_plain="
                  f"{results['float32']['sampled_bytes_per_position']:.1f}")
        sampled = best["sampled_bytes_per_position"]
        print(f"sampled_goal_met={sampled <= GOAL_SAMPLED_BYTES} (<= {GOAL_SAMPLED_BYTES:g} bytes)")
        print(f"sampled_bytes_per_position={sampled:.1f}")
    if CHOSEN in hybrid:  # the whole hybrid store: its top-8 columns and the rest's draws
        h = hybrid[CHOSEN]
        print(f"hybrid_sampled_bytes_per_position={h['sampled_bytes_per_position']:.1f}")
        print("hybrid_bytes_per_position="
              f"{h['bytes_per_position'] + h['sampled_bytes_per_position']:.1f}")
    for name in (tc.Q64V3, tc.Q64R, *TAIL_CANDIDATES, *STREAM_CANDIDATES, COARSEST):  # opt-in
        if name in results:
            r = results[name]
            print(f"{name}_bytes_per_position={r['bytes_per_position']:.1f} "
                  f"(max_abs_logprob_err p >= 1e-3 {r['max_abs_logprob_err_p_ge_1e-3']:.6g}, "
                  f"all {r['max_abs_logprob_err_all']:.6g}; "
                  f"read_topk_positions_s={r['read_topk_positions_s']:.4g})")
            if "sampled_bytes_per_position" in r:  # the draws, coded against the top-k
                print(f"{name}_sampled_bytes_per_position={r['sampled_bytes_per_position']:.1f} "
                      f"(max_abs_sampled_logprob_err {r['max_abs_sampled_logprob_err']:.4g}; "
                      f"read_positions_s={r['read_positions_s']:.4g})")
        if name in zipf:
            print(f"{name}_zipf262k_bytes_per_position={zipf[name]['bytes_per_position']:.1f}")
    for kind, by_name in spread.items():
        for name, r in by_name.items():
            print(f"{name}_{kind}262k_bytes_per_position={r['bytes_per_position']:.1f}")
    for rows, by_name in recut.items():
        for name, r in by_name.items():
            print(f"{name}_seq{rows}_bytes_per_position={r['bytes_per_position']:.1f}")
    # what a harvest writes for this teacher when no coding is asked for
    auto = HARVEST_DEFAULT if int(src.attrs["vocab_size"]) >= LARGE_VOCAB else CHOSEN
    if auto in results:
        r = results[auto]
        print(f"harvest_default_coding={auto} (mtkd harvest --logprob-dtype auto, "
              f"{src.attrs['vocab_size']:,} ids) harvest_default_bytes_per_position="
              f"{r['bytes_per_position']:.1f} (max_abs_logprob_err p >= 1e-3 "
              f"{r['max_abs_logprob_err_p_ge_1e-3']:.6g}, all {r['max_abs_logprob_err_all']:.6g})")
    # the headline: the smallest coding a harvest can write within the goal's error bound
    # (q64r with a 1/4-nat tail) where it was measured, else the default's
    name = next(n for n in (COMPACT, auto, CHOSEN) if n in results)
    head, head_zipf = results[name], zipf.get(name)
    print(f"headline_coding={name} ({HOW[name]})")
    if head_zipf is not None:
        print(f"headline_zipf262k_bytes_per_position={head_zipf['bytes_per_position']:.1f}")
        # what no coding of those independent rows can beat: q64's grid, the headline's tail
        steps = {c.name: c.tail_step for c in CANDIDATES}
        for floor_name, step in (("q64", 1), (name, steps.get(name, 1))):
            print(f"zipf262k_floor_bytes_per_position_{floor_name}="
                  f"{zipf_floor_bytes(tail_step=step):.1f}")
    met = (head["bytes_per_position"] <= GOAL_BYTES
           and head["max_abs_logprob_err_p_ge_1e-3"] <= GOAL_ERR)
    print(f"headline_goal_met={met} (<= {GOAL_BYTES:g} bytes, <= {GOAL_ERR} nat where "
          f"p >= 1e-3; max |error| elsewhere {head['max_abs_logprob_err_all']:.4g} nat, "
          f"mean KL {head['mean_kl_vs_written_nats']:.2e} nat)")
    if "sampled_bytes_per_position" in head:
        print(f"headline_sampled_bytes_per_position={head['sampled_bytes_per_position']:.1f}")
    print(f"teacher_bytes_per_position={head['bytes_per_position']:.1f}")


if __name__ == "__main__":
    main()
