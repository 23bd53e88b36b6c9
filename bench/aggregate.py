"""Benchmark of ``mtkd aggregate`` against the I/O it cannot avoid.

Builds a tokens store and K teacher stores (``StoreWriter`` + ``schema.teacher_header``, the
harvest's default top-k coding for ``--vocab`` ids — q64r for the default 32,000, streams of
2,048 rows — unless ``--logprob-dtype`` says otherwise, zstd codec) with
≥ 1M positions over several parts. The teachers are
realistic, not independent: each position has a Zipf-like base distribution over candidate ids
(popular ids more often), every teacher sees it through its own log-normal noise, keeps its
sorted top-k and stores its tail mass and its log-prob/rank of a sampled next token.

Then, alternating, in one run (the median of ``--repeats`` runs each; ratios are taken
within each repeat, then their median):

* ``io``: the job with the computation left out — open the same stores, check and read the same
  arrays part by part (``Store.verify_part`` + ``Store.read_part``), write a target store of the
  same schema and size with ``StoreWriter``, finalise;
* ``aggregate_seq``: ``aggregate(..., pipeline=False)`` — linear operator, token-level adaptive
  weights from the teachers' tempered entropies, k_out = 64 — part after part;
* ``aggregate``: the same with the default pipelining (next part read and previous part
  committed in threads while the current one is fused).

Prints ``name=value`` lines per ``--processes`` value (prefixed ``p<N>.``): wall and CPU
seconds of each (CPU includes child processes), ``positions_per_s`` (pipelined aggregate),
``<run>_cpu_vs_io_cpu`` and ``<run>_vs_io`` = wall ÷ io wall; ``fuse_positions_per_s`` (fuse
alone on part 0, in memory, wall). The lines of the first ``--processes`` value are repeated
last, ``aggregate_vs_io=`` last. Goal: ≤ 1.5 with processes=1. On a shared machine the wall
ratios swing with the load; the CPU ratios are steadier.

    .venv/bin/python bench/aggregate.py                          # 1M positions, processes 1
    .venv/bin/python bench/aggregate.py --positions 262144 --processes 1 --repeats 3
    .venv/bin/python bench/aggregate.py --logprob-dtype float16 # plain float16 teacher stores
    .venv/bin/python bench/aggregate.py --logprob-dtype q64v2   # q64v2 teacher stores
    MTKD_NUMBA=0 .venv/bin/python bench/aggregate.py             # the pure-numpy path
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mtkd.distill.aggregate.fuse import default_backend, fuse
from mtkd.distill.aggregate.job import (
    TEACHER_ARRAYS,
    AggregateConfig,
    aggregate,
    open_teachers,
    target_store_header,
    teacher_rows,
)
from mtkd.harvest.config import AUTO, HarvestConfig
from mtkd.store import Header, StoreWriter, open_store
from mtkd.store.executor import run_parts
from mtkd.store.schema import TEACHER, TOKENS, target_header, teacher_header, tokens_header

GOAL = 1.5
TASKS = ("code", "prose", "math")


def _lse(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=1))


def _gumbel(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    u = rng.random(shape, dtype=np.float32)
    return -np.log(-np.log(np.maximum(u, np.float32(1e-30))))


def synth_position_block(
    rng: np.random.Generator, n: int, n_teachers: int, k: int, vocab: int, perm: np.ndarray,
    candidates: int = 128, noise: float = 1.0,
) -> list[dict[str, np.ndarray]]:
    """K teachers' rows for ``n`` positions that share a base distribution.

    Per position: ``candidates`` distinct ids (Zipf-popular), base logits −b·log(1+rank) with
    b ∈ [0.8, 2.2] plus a Gumbel shuffle; teacher j adds N(0, noise²) to the logits and the
    other V − C ids hold a share of the mass. Each teacher keeps its own sorted top-k.
    """
    c = candidates
    # Zipf(1.6)-like gaps by inverse transform (rng.zipf is slow): ⌊U^{−1/0.6}⌋ ≥ 1
    u = np.maximum(rng.random((n, c), dtype=np.float32), np.float32(1e-6))
    gaps = np.minimum(np.floor(u ** np.float32(-1 / 0.6)), max(1, vocab // (2 * c)))
    ranks = np.cumsum(gaps.astype(np.int64), axis=1) - 1
    cand_ids = perm[np.minimum(ranks, vocab - 1)].astype(np.int32)
    b = rng.uniform(0.8, 2.2, size=(n, 1)).astype(np.float32)
    base = -b * np.log1p(np.arange(c, dtype=np.float32)) + _gumbel(rng, (n, c))
    # the actual next token: a draw from the base distribution over the candidates
    target = np.argmax(base + _gumbel(rng, (n, c)), axis=1)
    rest = np.log(rng.uniform(0.01, 0.25, size=n))  # other ids' share of the base mass
    rows = np.arange(n)
    out = []
    for _ in range(n_teachers):
        logits = base + noise * rng.standard_normal((n, c), dtype=np.float32)
        lse_c = _lse(logits.astype(np.float64))
        log_z = np.logaddexp(lse_c, lse_c + rest - np.log1p(-np.exp(rest)))
        order = np.argsort(-logits, axis=1)[:, :k]
        top = np.take_along_axis(logits, order, axis=1).astype(np.float64) - log_z[:, None]
        tail = np.log1p(-np.exp(top).sum(axis=1))
        t_logit = logits[rows, target]
        out.append({
            "topk_ids": np.take_along_axis(cand_ids, order, axis=1),
            "topk_logprobs": top.astype(np.float16),
            "target_logprob": (t_logit - log_z).astype(np.float32),
            "target_rank": (1 + (logits > t_logit[:, None]).sum(axis=1)).astype(np.int32),
            "tail_logmass": tail.astype(np.float32),
        })
    return out


def build_stores(root: Path, positions: int, parts: int, n_teachers: int, k: int, vocab: int,
                 seq_len: int, seed: int, logprob_dtype: str = "float16", stream_rows: int = 0
                 ) -> tuple[Path, list[Path]]:
    """A tokens store and ``n_teachers`` teacher stores over it (``logprob_dtype``, zstd;
    q64r's ``stream_rows``)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(vocab)
    per_part = -(-positions // parts)
    lengths_all = []
    for _ in range(parts):
        n_seq = max(1, round(per_part / seq_len))
        lengths = np.full(n_seq, per_part // n_seq, dtype=np.int64)
        lengths[: per_part % n_seq] += 1
        lengths_all.append(lengths)
    tokens_dir = root / "tokens"
    attrs = {"tokenizer_hash": "bench", "vocab_size": vocab, "eos_id": None}
    tw = StoreWriter(tokens_dir, tokens_header(parts, attrs))
    for p, lengths in enumerate(lengths_all):
        seq_ids = (np.int64(p) << 32) | np.arange(len(lengths), dtype=np.int64)
        tok = rng.integers(0, vocab, size=int((lengths + 1).sum()), dtype=np.int32)
        meta = pa.table({"seq_id": seq_ids,
                         "task": [TASKS[i % len(TASKS)] for i in range(len(lengths))]})
        with tw.open_part(p) as pw:
            pw.append({"token_ids": tok}, lengths + 1, seq_ids, meta)
    assert tw.finalize()
    tokens = open_store(tokens_dir, TOKENS)
    t_attrs = {"tokenizer_hash": "bench", "vocab_size": vocab,
               "tokens_fingerprint": tokens.manifest["checksum"]}
    teacher_dirs = [root / f"teacher{j}" for j in range(n_teachers)]
    writers = [StoreWriter(d, teacher_header(parts, k, t_attrs | {"teacher": f"t{j}"},
                                             logprob_dtype=logprob_dtype,
                                             stream_rows=stream_rows))
               for j, d in enumerate(teacher_dirs)]
    for p, lengths in enumerate(lengths_all):
        blocks = synth_position_block(rng, int(lengths.sum()), n_teachers, k, vocab, perm)
        seq_ids = (np.int64(p) << 32) | np.arange(len(lengths), dtype=np.int64)
        for w, rows in zip(writers, blocks, strict=True):
            with w.open_part(p) as pw:
                pw.append(rows, lengths, seq_ids)
    for w in writers:
        assert w.finalize()
    return tokens_dir, teacher_dirs


def _io_part(tokens_dir: str, out: str, config: AggregateConfig, header: Header,
             part: int) -> dict[str, Any]:
    """What ``_aggregate_part`` does with the computation left out (its input checks too)."""
    tokens = open_store(tokens_dir, TOKENS, verify="none")
    teachers = [open_store(t, TEACHER, verify="none") for t in config.teachers]
    for store in (tokens, *teachers):
        store.verify_part(part)
    batches = [s.read_part(part, list(TEACHER_ARRAYS)) for s in teachers]
    tokens.read_meta(part)
    ref = batches[0]
    n = len(ref["topk_ids"])
    writer = StoreWriter(out, header)
    plain = target_header(1, config.k_out, len(teachers), {}).arrays  # rows as fuse returns
    rows = {a.name: np.full((n, *a.row_shape), 0.5 / config.k_out, dtype=a.dtype)
            for a in plain}
    rows["ids"] = np.broadcast_to(np.arange(config.k_out, dtype=np.int32), (n, config.k_out))
    with writer.open_part(part) as pw:
        pw.stats = {"positions": n}
        pw.append(rows, np.diff(ref.offsets), ref.seq_ids)
    return pw.stats


def io_baseline(tokens_dir: Path, out: Path, config: AggregateConfig, processes: int) -> None:
    """The I/O of ``aggregate`` with no computation (same opening, reading, writing)."""
    tokens = open_store(tokens_dir, TOKENS, verify="size")
    teachers = open_teachers(tokens, config.teachers)
    header = target_store_header(tokens, teachers, config)  # the job's format, coding included
    writer = StoreWriter(out, header)
    work = partial(_io_part, str(tokens_dir), str(out), config, header)
    run_parts(writer.pending_parts(), work, processes=processes, progress=False)
    assert writer.finalize()


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``; CPU includes finished child processes."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((r0, r1), (c0, c1))
              for f in ("ru_utime", "ru_stime"))
    return wall, cpu


def fuse_alone(tokens_dir: Path, config: AggregateConfig, rows: int | None = None) -> float:
    """Positions/s of ``fuse`` on part 0 (or its first ``rows``) already in memory, weight
    policy included."""
    tokens = open_store(tokens_dir, TOKENS, verify="none")
    stores = [open_store(t, TEACHER, verify="none") for t in config.teachers]
    data = [teacher_rows(s.read_part(0, list(TEACHER_ARRAYS)), s.attrs) for s in stores]
    offsets = stores[0].read_part(0, []).offsets
    n = data[0].n if rows is None else min(rows, int(offsets[1]))
    data = [r.rows(0, n) for r in data]
    policy = config.policy(np.zeros(n, np.int64), np.array([0, n]))
    t0 = time.perf_counter()
    fuse(data, policy, config.teacher_temperatures, config.operator, config.tail_model,
         config.k_out, int(tokens.attrs["vocab_size"]))
    return n / (time.perf_counter() - t0)


def _median(times: dict[str, list[tuple[float, float]]], name: str, field: int) -> float:
    """Median wall (field 0) or CPU (1) seconds of a run."""
    return float(np.median([t[field] for t in times[name]]))


def _median_ratio(times: dict[str, list[tuple[float, float]]], name: str, field: int) -> float:
    """Median over the repeats of a run's time ÷ the io baseline's in the same repeat."""
    return float(np.median([a[field] / b[field]
                            for a, b in zip(times[name], times["io"], strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=1 << 20)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--k-out", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--operator", default="linear")
    ap.add_argument("--tail-model", default="lump")
    ap.add_argument("--temperatures", default="2,2,1", help="one per teacher")
    ap.add_argument("--token", default="entropy", help="token-level weights")
    ap.add_argument("--processes", default="1", help="comma-separated values to measure")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each (alternating); medians reported")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logprob-dtype", default=AUTO,
                    help="teacher stores' top-k coding: auto (the harvest's default for "
                         "--vocab: q64r for 32000 ids), q64v2, q64r, q64, or a float dtype "
                         "(float16); decoded on every read")
    ap.add_argument("--stream-rows", type=int, default=None,
                    help="q64r: rows per stream (default the harvest's; 0: one per sequence)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse complete input stores already in --dir (same arguments)")
    args = ap.parse_args()
    harvest = HarvestConfig(logprob_dtype=args.logprob_dtype).resolved(args.vocab)
    coding = harvest.logprob_dtype
    stream_rows = harvest.q64r_stream_rows if args.stream_rows is None else args.stream_rows
    print(f"teacher_coding={coding} stream_rows={stream_rows} vocab={args.vocab}", flush=True)

    root = args.dir or Path(tempfile.mkdtemp(prefix="mtkd-bench-agg-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        tokens_dir, teacher_dirs = root / "tokens", [root / f"teacher{j}"
                                                     for j in range(args.teachers)]
        if not (args.reuse and all((d / "manifest.json").exists()
                                   for d in [tokens_dir, *teacher_dirs])):
            for d in [tokens_dir, *teacher_dirs]:
                shutil.rmtree(d, ignore_errors=True)
            build_stores(root, args.positions, args.parts, args.teachers, args.k, args.vocab,
                         args.seq_len, args.seed, coding, stream_rows)
        positions = open_store(tokens_dir, TOKENS).num_rows - open_store(
            tokens_dir, TOKENS).num_sequences
        temps = tuple(float(t) for t in args.temperatures.split(","))
        config = AggregateConfig(
            teachers=tuple(str(d) for d in teacher_dirs),
            temperatures=temps if len(temps) == args.teachers else (temps[0],) * args.teachers,
            operator=args.operator, tail_model=args.tail_model, k_out=args.k_out,
            token=args.token,
        )
        print(f"positions={positions}")
        print(f"parts={args.parts}")
        print(f"teachers={args.teachers}")
        print(f"k={args.k}")
        print(f"k_out={args.k_out}")
        print(f"backend={default_backend()}")
        print(f"build_s={time.perf_counter() - t0:.1f}")
        # warm the page cache and compile any kernel before timing anything
        io_baseline(tokens_dir, root / "warm-io", config, 1)
        shutil.rmtree(root / "warm-io")
        fuse_alone(tokens_dir, config, rows=1024)  # numba import + kernel cache load
        print(f"fuse_positions_per_s={fuse_alone(tokens_dir, config):.4g}")
        lines: dict[int, list[str]] = {}
        for procs in [int(p) for p in args.processes.split(",")]:
            times: dict[str, list[tuple[float, float]]] = {}
            runs = {
                "io": lambda out, p=procs: io_baseline(tokens_dir, out, config, p),
                "aggregate": lambda out, p=procs: aggregate(tokens_dir, out, config,
                                                           processes=p, progress=False),
                "aggregate_seq": lambda out, p=procs: aggregate(
                    tokens_dir, out, config, processes=p, progress=False, pipeline=False),
            }
            for _ in range(args.repeats):  # alternate: each repeat times all three
                for name, run in runs.items():
                    out = root / f"out-{name}"
                    shutil.rmtree(out, ignore_errors=True)
                    times.setdefault(name, []).append(timed(partial(run, out)))

            median = partial(_median, times)
            median_ratio = partial(_median_ratio, times)
            lines[procs] = [f"processes={procs}", f"io_wall_s={median('io', 0):.3f}",
                            f"io_cpu_s={median('io', 1):.3f}"]
            for name in ("aggregate_seq", "aggregate"):
                lines[procs] += [f"{name}_wall_s={median(name, 0):.3f}",
                                 f"{name}_cpu_s={median(name, 1):.3f}",
                                 f"{name}_cpu_vs_io_cpu={median_ratio(name, 1):.3f}",
                                 f"{name}_vs_io={median_ratio(name, 0):.3f}"]
            lines[procs].insert(-4, f"positions_per_s={positions / median('aggregate', 0):.4g}")
            for line in lines[procs]:
                print(f"p{procs}.{line}")
        stores = [open_store(root / f"out-{n}", "target") for n in ("aggregate", "aggregate_seq")]
        same = all(np.array_equal(stores[0].read_part(p, [a])[a], stores[1].read_part(p, [a])[a])
                   for p in range(args.parts) for a in ("ids", "probs", "jensen_gap"))
        print(f"pipelined_equals_sequential={same}")
        summary = open_store(root / "out-aggregate", "target", verify="none")
        mean_tail = np.mean([summary.part_stats(p)["sum_tail_mass"]
                             / summary.part_stats(p)["positions"] for p in range(args.parts)])
        print(f"mean_target_tail_mass={mean_tail:.4f}")
        print(f"goal_aggregate_vs_io={GOAL}")
        for line in lines[next(iter(lines))]:
            print(line)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
