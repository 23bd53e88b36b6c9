"""Benchmark of the fusion of random-sampling targets (``fuse_samples``) on real vocabularies.

K teachers' draws per position (``--draws`` each, from a Zipf-like distribution over the
vocabulary, as a language model's), fused linearly with per-row weights into ``--k-out``
entries. ``fuse_samples`` works on the union of the rows' drawn ids, so its cost does not grow
with the vocabulary; the baseline is the same mixture on dense ``[rows, V]`` rows (a scatter,
a weighted sum and the top-k cut, without the diagnostics ``fuse_samples`` also computes),
timed on a slice. Prints ``name=value`` lines per vocabulary, the headline
``union_vs_dense_speedup=`` (at the first vocabulary) last.

    .venv/bin/python bench/fuse_samples.py
    .venv/bin/python bench/fuse_samples.py --vocab 32000,262144 --positions 50000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples
from mtkd.distill.aggregate.targets import top_k


def zipf_draws(rng: np.random.Generator, n: int, draws: int, vocab: int) -> SampledRows:
    """``draws`` ids per row from a Zipf(1.1) law over a per-row permutation of the top ids,
    as distinct ids and counts."""
    ranks = np.minimum(rng.zipf(1.1, size=(n, draws)) - 1, vocab - 1)
    ids = (ranks * 7919 + rng.integers(0, vocab, size=(n, 1))) % vocab  # a row's own order
    ids.sort(axis=1)
    new = np.ones_like(ids, bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    where = (np.arange(n)[:, None].repeat(draws, 1), np.cumsum(new, axis=1) - 1)
    counts = np.zeros_like(ids)
    np.add.at(counts, where, 1)
    out = np.full_like(ids, -1)
    out[where] = ids  # a run of equal ids writes the same place
    return SampledRows(out.astype(np.int32), counts, draws)


def dense_fusion(teachers: list[SampledRows], w: np.ndarray, k_out: int, vocab: int) -> None:
    """The baseline: dense rows, their weighted sum, the top-k cut."""
    n = teachers[0].n
    q = np.zeros((n, vocab + 1))
    rows = np.arange(n)[:, None]
    for j, t in enumerate(teachers):
        p = np.zeros((n, vocab + 1))
        p[rows, np.where(t.counts > 0, t.ids, vocab)] = t.counts / t.num_samples
        q += w[:, j:j + 1] * p
    top_k(q[:, :vocab], np.broadcast_to(np.arange(vocab), (n, vocab)), k_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", default="49152,262144", help="comma-separated sizes")
    ap.add_argument("--positions", type=int, default=100_000)
    ap.add_argument("--dense-positions", type=int, default=2_000)
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--k-out", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    speedups = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        teachers = [zipf_draws(rng, args.positions, args.draws, vocab)
                    for _ in range(args.teachers)]
        w = rng.dirichlet(np.ones(args.teachers), size=args.positions)
        t0 = time.perf_counter()
        fuse_samples(teachers, w, args.k_out, vocab)
        union = args.positions / (time.perf_counter() - t0)
        m = args.dense_positions
        part = [SampledRows(t.ids[:m], t.counts[:m], t.num_samples) for t in teachers]
        t0 = time.perf_counter()
        dense_fusion(part, w[:m], args.k_out, vocab)
        dense = m / (time.perf_counter() - t0)
        print(f"v{vocab}.union_positions_per_s={union:.4g}")
        print(f"v{vocab}.dense_positions_per_s={dense:.4g}")
        speedups.append(union / dense)
    print(f"union_vs_dense_speedup={speedups[0]:.1f}")


if __name__ == "__main__":
    main()
