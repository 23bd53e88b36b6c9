"""What a range coder with per-part static models would store for q64v3's top-k layout.

``bench/topk_entropy.py`` gives bounds (models learned on half the rows, charged on the other).
This prices a coding a store could write: each part carries its own static models, counted on
the part itself, and their tables are paid for (zstd-compressed counts). A range coder with
64-bit arithmetic writes within a few bytes per part of the code lengths priced here (Σ −log₂
of each symbol's count over its context's total). Input: q64v3's arrays
(``topk_codec.encode_referenced``) of the cached SmolLM2 harvest, or ``--store``. Bytes per
position:

* ``top1``: each row's top-1 id, one model;
* ``recur``: the recurrence bits, one binary model per reference rank;
* ``new``: the new ids in ascending order as a set: the next one is the smallest of the ids
  still to come, an order statistic of the part's counts of new ids (its order is free);
* ``codes``: the row's floor, then its floor distances, one model per context (a recurring id's
  index among the recurring ones, capped at 31; the new ids), at q64's grid and with the
  entries below p = 1e-3 on coarser grids (``--tail-steps``, nats);
* ``scalars``: 8.0, as q64v2 stores them (zstd).

Prints ``name=value`` lines, the headline ``range_coded_bytes_per_position=`` (q64's grid) last.
The coding built on this (``q64r``, ``mtkd.store.stream_codec``) uses adaptive models and numbers
the new ids in each sequence's order of first sight instead; ``bench/store_size.py`` measures it
(105.8 B at q64's grid, 97.9 with the 1/4-nat tail).

    .venv/bin/python bench/topk_coder.py   # 7 s on the cached harvest
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from numcodecs import Zstd
from store_size_inputs import real_teacher_store
from topk_entropy import SCALAR_BYTES, coarse_tail, reference_layout

from mtkd.store import open_store
from mtkd.store import topk_codec as tc

CONTEXTS = 32  #: recurring-index contexts of the floor distances (the last one: index ≥ 31)


def table_bytes(counts: np.ndarray) -> int:
    """Bytes of a model's table: its counts as uint32, zstd level 19."""
    return len(Zstd(level=19).encode(np.ascontiguousarray(counts, dtype=np.uint32)))


def static_bits(symbols: np.ndarray, contexts: np.ndarray | None = None) -> tuple[float, int]:
    """Bits of ``symbols`` under one static model per context (counts of the symbols
    themselves), and the tables' bytes (a dense table per context)."""
    contexts = np.zeros(symbols.shape, np.int64) if contexts is None else contexts
    bits, tables = 0.0, 0
    for c in np.unique(contexts):
        s = symbols[contexts == c]
        counts = np.bincount(s)
        bits += float(-(np.log2(counts[s] / s.size)).sum())
        tables += table_bytes(counts)
    return bits, tables


def new_id_bits(new_ids: np.ndarray, prev_ids: np.ndarray, left: np.ndarray, vocab: int
                ) -> tuple[float, int]:
    """Bits of the new ids as a set, and the table's bytes. Each row's ``left`` new ids are j
    draws of the part's unigram f of new ids: the next one (ascending) is the smallest of the j
    still to come above its predecessor, P(s) = (S(s)^j − S(s+1)^j) / S(prev + 1)^j with S(x)
    the mass of the ids ≥ x (an order statistic: the set's order costs nothing). Padding (−1)
    is symbol 0."""
    counts = np.bincount(new_ids + 1, minlength=vocab + 1)
    above = np.concatenate([np.cumsum(counts[::-1])[::-1], [0]]) / counts.sum()  # S(x)
    s, j = new_ids + 1, left.astype(np.float64)
    with np.errstate(divide="ignore"):
        log_p = (np.log2(above[s] ** j - above[s + 1] ** j) - j * np.log2(above[prev_ids + 1]))
    return float(-log_p.sum()), table_bytes(counts)


def code_bits(codes: np.ndarray, m: np.ndarray) -> tuple[float, int]:
    """Bits of each row's floor and floor distances (contexts as the docstring says)."""
    floor = codes.max(axis=1, keepdims=True)
    index = np.broadcast_to(np.arange(codes.shape[1])[None, :], codes.shape)
    context = np.where(index < m[:, None], np.minimum(index, CONTEXTS - 1), CONTEXTS)
    floor_bits, floor_table = static_bits(floor.ravel())
    bits, tables = static_bits((floor - codes).ravel(), context.ravel())
    return floor_bits + bits, floor_table + tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=None,
                    help="a teacher store (default: the SmolLM2 harvest, built once and cached)")
    ap.add_argument("--tail-steps", default="0.125,0.25,1",
                    help="coarser grids (nats) for the entries below p = 1e-3")
    args = ap.parse_args()
    store = open_store(args.store or real_teacher_store(), verify="none")
    k = int(store.attrs["k"])
    vocab = int(store.attrs.get("vocab_size") or 0)
    n = store.num_rows
    parts: dict[str, float] = {}
    tables = 0
    coarse: dict[str, float] = {}
    for p in range(store.num_parts):
        batch = store.read_part(p, [tc.IDS, tc.LOGPROBS])
        ids, lp = batch[tc.IDS], batch[tc.LOGPROBS]
        vocab = vocab or int(ids.max()) + 1
        lengths = np.diff(batch.offsets)
        rows = reference_layout(tc.encode_referenced(ids, lp, lengths, vocab_size=vocab), k)
        top1, t1 = static_bits(rows["top1"] + 1)
        recur, tr = static_bits(rows["recur"].ravel().astype(np.int64),
                                np.broadcast_to(np.arange(k), rows["recur"].shape).ravel())
        new, tn = new_id_bits(rows["new"], rows["prev"], rows["left"], vocab)
        codes, tcodes = code_bits(rows["codes"], rows["m"])
        for name, bits in (("top1", top1), ("recur", recur), ("new", new), ("codes", codes)):
            parts[name] = parts.get(name, 0.0) + bits / 8
        tables += t1 + tr + tn + tcodes
        for step in (float(s) for s in args.tail_steps.split(",") if s):
            grid = coarse_tail(rows["codes"], step)
            bits, t = code_bits(grid, rows["m"])
            coarse[f"{step:g}"] = coarse.get(f"{step:g}", 0.0) + (bits / 8 + t - codes / 8 - tcodes)
    print(f"input: positions={n} parts={store.num_parts} k={k} vocab_size={vocab}")
    for name, total in parts.items():
        print(f"{name}_bytes_per_position={total / n:.1f}")
    print(f"model_tables_bytes_per_position={tables / n:.2f}")
    print(f"scalars_bytes_per_position={SCALAR_BYTES:.1f}")
    exact = (sum(parts.values()) + tables) / n + SCALAR_BYTES
    for step, delta in coarse.items():
        print(f"range_coded_tail{step}nat_bytes_per_position={exact + delta / n:.1f} "
              f"(|error| <= {float(step) / 2:g} nat where p < 1e-3)")
    print(f"range_coded_bytes_per_position={exact:.1f}")


if __name__ == "__main__":
    main()
