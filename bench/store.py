"""Benchmark of the store on teacher-store-shaped data (k=64 top-k ids and log-probs).

Writes ≥ 1M positions in sequences of ~512 positions over several parts with the teacher header
of ``mtkd.store.schema``, once per codec, and prints ``name=value`` lines:

* ``write_mb_s``: uncompressed MB/s through ``StoreWriter`` (append + commit incl. checksums);
* ``bytes_per_position``: bytes on disk ÷ positions;
* ``seq_positions_s`` / ``shuffled_positions_s``: a sequential scan (``read_part`` part by part)
  and shuffled batched reads (batches of 64 random sequences through ``Store.read``), both warm;
* ``shuffled_read_ratio``: shuffled ÷ sequential positions/s, measured in the same run
  (passes alternate; each mode's best of ``--repeats``; zstd's shuffled passes read 512
  random sequences, a quarter of the store, since they are slow).

Lines are prefixed by the codec (``raw.write_mb_s=…``); then the recommended codec's figures
unprefixed. Then target stores (k_out = 64) fused from the real teacher's harvest (SmolLM2,
49,152 ids, over the demo corpus; built once and cached by ``bench/store_size_inputs.py``),
raw and ``q64v2``: ``targets.<codec>.*`` and the coded store's ``target_bytes_per_position=``
and, last, ``target_shuffled_read_ratio=`` (goals ≤ 200 and ≥ 0.5).

    .venv/bin/python bench/store.py                 # both codecs, ≈1M positions
    .venv/bin/python bench/store.py --codec raw --positions 4000000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from mtkd.store import Store, StoreWriter, bytes_on_disk, open_store
from mtkd.store.schema import (
    TAIL_LOGMASS,
    TARGET_LOGPROB,
    TARGET_RANK,
    TOPK_IDS,
    TOPK_LOGPROBS,
    teacher_header,
)

GOAL_RATIO = 0.5


def synth_part(rng: np.random.Generator, num_seqs: int, seq_len: int, k: int,
               vocab: int, perm: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows shaped like a harvested teacher part: Zipf-popular distinct ids, sorted log-probs."""
    lengths = rng.integers(seq_len * 3 // 4, seq_len * 5 // 4 + 1, size=num_seqs)
    n = int(lengths.sum())
    # distinct ranks per row: a Zipf-like first rank, then Zipf-distributed gaps
    gaps = np.minimum(rng.zipf(1.6, size=(n, k)), vocab // (2 * k)).astype(np.int64)
    ranks = np.cumsum(gaps, axis=1) - 1
    ids = perm[np.minimum(ranks, vocab - 1)].astype(np.int32)
    top = np.log(rng.uniform(0.05, 0.98, size=(n, 1)))
    steps = rng.exponential(0.35, size=(n, k - 1)) * np.linspace(2.0, 0.3, k - 1)
    logprobs = np.concatenate([top, top - np.cumsum(steps, axis=1)], axis=1)
    mass = np.exp(logprobs).sum(axis=1)
    scale = np.minimum(1.0, 0.999 / mass)[:, None]
    logprobs = logprobs + np.log(scale)
    tail = np.log1p(-np.exp(logprobs).sum(axis=1))
    rank = np.minimum(rng.geometric(0.35, size=n), vocab).astype(np.int32)
    in_top = rank <= k
    target = np.where(in_top, logprobs[np.arange(n), np.minimum(rank, k) - 1],
                      logprobs[:, -1] - rng.exponential(2.0, size=n))
    rows = {
        TOPK_IDS: ids,
        TOPK_LOGPROBS: logprobs.astype(np.float16),
        TARGET_LOGPROB: target.astype(np.float32),
        TARGET_RANK: rank,
        TAIL_LOGMASS: tail.astype(np.float32),
    }
    return rows, lengths


def read_speeds(store: Store, name: str, batch: int, seed: int, repeats: int,
                max_sequences: int | None = None) -> tuple[float, float]:
    """(sequential, shuffled) positions/s reading every array: part by part, and batches of
    ``batch`` random sequences. The two alternate and each keeps its best: both are warm, and
    a busy machine's noise hits them alike."""

    def sequential() -> float:
        t = time.perf_counter()
        n = sum(len(store.read_part(p)[name]) for p in range(store.num_parts))
        return n / (time.perf_counter() - t)

    def shuffled() -> float:
        order = np.random.default_rng(seed).permutation(store.num_sequences)[:max_sequences]
        t = time.perf_counter()
        n = sum(len(store.read(order[i:i + batch])[name]) for i in range(0, len(order), batch))
        return n / (time.perf_counter() - t)

    seq, shuf = 0.0, 0.0
    for _ in range(repeats):
        seq = max(seq, sequential())
        shuf = max(shuf, shuffled())
    return seq, shuf


def run_targets(root: Path, batch: int, seed: int, repeats: int) -> dict[str, dict[str, float]]:
    """Target stores of the real teacher (SmolLM2, 49,152 ids, harvested over the demo corpus by
    ``bench/store_size_inputs.py``, cached) at k_out = 64, raw and coded: bytes per position
    and read speeds."""
    from store_size_inputs import real_teacher_store

    from mtkd.distill.aggregate.job import AggregateConfig, aggregate

    teacher = real_teacher_store()
    tokens = teacher.parent / "tokens"
    out = {}
    for codec in ("raw", "q64v2"):
        target = root / f"targets-{codec}"
        shutil.rmtree(target, ignore_errors=True)
        aggregate(tokens, target, AggregateConfig(teachers=(str(teacher),), k_out=64,
                                                  codec=codec), progress=False)
        store = open_store(target, "target", verify="size")
        positions = store.num_rows
        seq, shuf = read_speeds(store, "ids", batch, seed, repeats)
        out[codec] = {"bytes_per_position": bytes_on_disk(target) / positions,
                      "seq_positions_s": seq, "shuffled_positions_s": shuf,
                      "shuffled_read_ratio": shuf / seq}
    return out


def run_codec(codec: str, parts_data: list, k: int, root: Path, batch: int,
              seed: int, repeats: int = 7,
              max_sequences: int | None = None) -> dict[str, float]:
    out = root / f"teacher-{codec}"
    shutil.rmtree(out, ignore_errors=True)
    # float16 log-probs: the layout these codec figures were measured with (docs/FORMAT.md §5);
    # bench/store_size.py measures the top-k codings
    header = teacher_header(len(parts_data), k, {"teacher": "bench"}, codec=codec,
                            logprob_dtype="float16")
    raw_bytes = sum(sum(a.nbytes for a in rows.values()) for rows, _ in parts_data)
    positions = sum(int(lengths.sum()) for _, lengths in parts_data)

    t0 = time.perf_counter()
    writer = StoreWriter(out, header)
    for part, (rows, lengths) in enumerate(parts_data):
        seq_ids = (np.int64(part) << 32) | np.arange(len(lengths), dtype=np.int64)
        with writer.open_part(part) as pw:
            pw.append(rows, lengths, seq_ids)
    assert writer.finalize()
    write_s = time.perf_counter() - t0

    store = open_store(out, "teacher", verify="size")
    for p in range(store.num_parts):  # warm the page cache (and the reader's mappings)
        store.read_part(p)

    seq, shuf = read_speeds(store, TOPK_IDS, batch, seed, repeats, max_sequences)
    # correctness spot check: a shuffled batch equals the same rows of a sequential read
    idx = np.random.default_rng(seed + 1).choice(store.num_sequences, size=8)
    got = store.read(idx)
    for i, s in enumerate(idx):
        part = int(np.searchsorted([r.stop for r in map(store.part_sequences,
                                                         range(store.num_parts))], s, "right"))
        whole = store.read_part(part)
        j = s - store.part_sequences(part).start
        lo, hi = whole.offsets[j], whole.offsets[j + 1]
        for name in store.array_names:
            seg = got[name][got.offsets[i]:got.offsets[i + 1]]
            assert np.array_equal(seg, whole[name][lo:hi], equal_nan=True), name
    return {
        "write_mb_s": raw_bytes / 1e6 / write_s,
        "bytes_per_position": bytes_on_disk(out) / positions,
        "seq_positions_s": seq,
        "shuffled_positions_s": shuf,
        "shuffled_read_ratio": shuf / seq,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=1 << 20)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=64, help="sequences per shuffled read")
    ap.add_argument("--codec", choices=["raw", "zstd", "both"], default="both")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7, help="timed passes of each read mode")
    ap.add_argument("--no-targets", dest="targets", action="store_false",
                    help="skip the target stores of the real teacher (builds its harvest once)")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(args.vocab)
    seqs_per_part = -(-args.positions // (args.seq_len * args.parts))
    parts_data = [synth_part(rng, seqs_per_part, args.seq_len, args.k, args.vocab, perm)
                  for _ in range(args.parts)]
    positions = sum(int(lengths.sum()) for _, lengths in parts_data)
    print(f"positions={positions}")
    print(f"sequences={seqs_per_part * args.parts}")
    print(f"parts={args.parts}")
    print(f"k={args.k}")

    codecs = ["raw", "zstd"] if args.codec == "both" else [args.codec]
    root = args.dir or Path(tempfile.mkdtemp(prefix="mtkd-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for codec in codecs:
            # zstd shuffled reads are slow: time them on a subset of the sequences
            results[codec] = run_codec(codec, parts_data, args.k, root, args.batch, args.seed,
                                       args.repeats if codec == "raw" else 2,
                                       None if codec == "raw" else 512)
            for name, value in results[codec].items():
                print(f"{codec}.{name}={value:.4g}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    meets = [c for c in codecs if results[c]["shuffled_read_ratio"] >= GOAL_RATIO]
    best = meets[0] if meets else max(codecs, key=lambda c: results[c]["shuffled_read_ratio"])
    print(f"recommended_codec_for_shuffled_reads={best}")
    for name in ("write_mb_s", "bytes_per_position", "shuffled_read_ratio"):
        print(f"{name}={results[best][name]:.4g}")
    if args.targets:
        with tempfile.TemporaryDirectory(prefix="mtkd-bench-targets-") as tmp:
            targets = run_targets(Path(tmp), args.batch, args.seed, args.repeats)
        for codec, figures in targets.items():
            for name, value in figures.items():
                print(f"targets.{codec}.{name}={value:.4g}")
        coded = targets["q64v2"]
        print(f"target_bytes_per_position={coded['bytes_per_position']:.4g}")
        print(f"target_shuffled_read_ratio={coded['shuffled_read_ratio']:.4g}")


if __name__ == "__main__":
    main()
