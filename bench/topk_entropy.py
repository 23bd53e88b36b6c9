"""How small can a top-k teacher store get? Order-0 entropy bounds on the real teacher's rows.

``bench/store_size.py`` measures what zstd makes of each coding; this measures what any coder
that models each entry independently could reach, so a coding's gap to the goal can be split
into what better entropy coding would win and what only dropping information would. Input: the
same cached SmolLM2 harvest (``store_size_inputs.real_teacher_store``; ``--store`` takes any
teacher store). Bounds, in bytes per position:

* ``ids``: the top-k id *set* under a static unigram model of the ids that reach the top-k
  (learned on the first half of the rows, charged on the second; add-½ smoothing): Σ −log₂ f(id)
  − log₂ k! (a set's order is free);
* ``codes``: q64's log-prob codes as distances to the row's floor (q64v2's symbols), their
  empirical order-0 entropy; ``codes_coarse_tail``: the same with entries below p = 1e-3 on a
  ``--tail-step``-nat grid (lossy there, still exact to 1/128 nat where p ≥ 1e-3);
* ``ids_given_input``: the same id set under a model conditioned on the position's input token
  x (the context a decoder has from the tokens store): each id seen with x in the first half
  costs its membership bit under P(id in the top-k | x), any other id the unigram price;
* ``ids_given_reference``: the id set coded against a reference row as q64v3 does (the latest
  earlier row of the same ``--chunk`` rows whose top-1 id is this row's;
  ``mtkd.store.reference_codec``): the top-1 id (unigram of top-1s), which of the reference's
  ids recur (one bit per reference rank, P(recur | rank)), the new ids as a set at the unigram
  price plus log₂(k + 1) for their number. ``q64v3_zstd_topk`` is what zstd (level 3,
  ``--chunk``-row chunks) makes of q64v3's arrays, against ``q64v2_zstd_topk``;
* ``scalars``: what q64v2 stores besides the top-k columns (measured by store_size.py: 8.0).

Prints ``name=value`` lines, the headline ``entropy_bound_bytes_per_position=`` (ids + codes +
scalars at the exact q64 grid) last.

    .venv/bin/python bench/topk_entropy.py
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numcodecs import Zstd
from store_size_inputs import real_teacher_store

from mtkd.store import open_store
from mtkd.store import q64_grid as grid
from mtkd.store import topk_codec as tc

#: q64v2's bytes per position outside topk_ids / topk_logprobs on this input (store_size.py:
#: target_logprob 3.7, tail_logmass 3.6, target_rank 0.7).
SCALAR_BYTES = 8.0


def entropy_bits(symbols: np.ndarray) -> float:
    """Empirical order-0 entropy of non-negative integer symbols, bits per symbol."""
    counts = np.bincount(symbols.ravel())
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum())


def id_set_bits(ids: np.ndarray, vocab: int) -> float:
    """Mean bits per row of each row's id set under a unigram model learned on the first
    half of the rows, charged on the second."""
    half = len(ids) // 2
    freq = np.bincount(ids[:half].ravel(), minlength=vocab) + 0.5
    logp = np.log2(freq / freq.sum())
    k = ids.shape[1]
    return float(-logp[ids[half:]].sum(1).mean() - math.lgamma(k + 1) / math.log(2))


def id_set_bits_given_input(ids: np.ndarray, inputs: np.ndarray, vocab: int) -> float:
    """Mean bits per row of each row's id set given its input token x: ids seen with x in the
    first half of the rows cost −log₂ P(id | x) if present and −log₂(1 − P) if absent
    (P = (count + 0.1) / (rows with x + 0.2)); others the unigram price of ``id_set_bits``,
    less log₂ m! for their order, plus log₂(k + 1) for their number m."""
    half, k = len(ids) // 2, ids.shape[1]
    freq = np.bincount(ids[:half].ravel(), minlength=vocab) + 0.5
    unigram = -np.log2(freq / freq.sum())
    keys, counts = np.unique((inputs[:half, None] * vocab + ids[:half]).ravel(),
                             return_counts=True)
    context = keys // vocab
    rows_with = np.bincount(inputs[:half], minlength=int(inputs.max()) + 1)
    p = (counts + 0.1) / (rows_with[context] + 0.2)
    absent = np.bincount(context, weights=-np.log2(1 - p), minlength=len(rows_with))
    test = inputs[half:, None] * vocab + ids[half:]
    at = np.minimum(np.searchsorted(keys, test), len(keys) - 1)
    seen = keys[at] == test
    present = np.where(seen, np.log2(1 - p[at]) - np.log2(p[at]), unigram[ids[half:]]).sum(1)
    new = (~seen).sum(1)
    order = np.array([math.lgamma(m + 1) / math.log(2) for m in range(k + 1)])[new]
    return float((absent[inputs[half:]] + present - order).mean() + math.log2(k + 1))


def chunk_lengths(n: int, chunk: int) -> np.ndarray:
    """``n`` rows cut into units of ``chunk`` rows (the last one shorter)."""
    return np.diff(np.append(np.arange(0, n, chunk), n))


def reference_layout(arrays: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """q64v3's stored arrays (``topk_codec.encode_referenced``) → each row's top-1 id, its
    recurrence bits, its new ids (flat, ascending within a row, with their ``row``, their
    predecessor ``prev`` and the new ids ``left`` to come, this one included), its codes in
    stored order and its number ``m`` of recurring ids."""
    stored = tc.from_planes(arrays[tc.IDS]).astype(np.int64)
    recur = np.unpackbits(arrays[tc.RECUR], axis=1, count=k, bitorder="little").astype(bool)
    m = recur.sum(axis=1)
    slot = np.arange(k)[None, :]
    is_new = slot < (k - m)[:, None]
    ids = np.cumsum(stored[:, 1:], axis=1) - 1
    prev = np.concatenate([np.full((len(ids), 1), -1), ids[:, :-1]], axis=1)
    left = (k - m)[:, None] - slot
    coded = tc.from_planes(arrays[tc.LOGPROBS]).astype(np.int64)
    return {"top1": stored[:, 0] - 1, "recur": recur, "new": ids[is_new],
            "row": np.nonzero(is_new)[0], "prev": prev[is_new], "left": left[is_new],
            "codes": coded[:, :1] - coded[:, 1:], "m": m}


def id_set_bits_given_reference(ids: np.ndarray, rows: dict[str, np.ndarray], vocab: int
                                ) -> dict[str, float]:
    """Mean bits per row, by part, of each row's ids coded against its reference row
    (``reference_layout``; models learned on the first half of the rows, charged on the
    second; add-½ smoothing): the top-1 id, the recurrence bits by reference rank, the new ids
    as a set at the unigram price of ``id_set_bits`` plus log₂(k + 1) for their number."""
    n, k = ids.shape
    half = n // 2
    freq = np.bincount(ids[:half].ravel(), minlength=vocab) + 0.5
    unigram = -np.log2(freq / freq.sum())
    top1 = np.bincount(rows["top1"][:half], minlength=vocab) + 0.5
    recur = rows["recur"]
    has = recur[:, 0]  # with a reference, its top-1 id (this row's) always recurs
    p_recur = (recur[:half][has[:half]].sum(0) + 0.5) / (has[:half].sum() + 1)
    mask = np.where(recur, -np.log2(p_recur), -np.log2(1 - p_recur)).sum(1) * has
    log_fact = np.array([math.lgamma(m + 1) / math.log(2) for m in range(k + 1)])
    new = (np.bincount(rows["row"], weights=unigram[rows["new"]], minlength=n)
           - log_fact[k - rows["m"]] + has * math.log2(k + 1))
    return {"top1": float(-np.log2(top1 / top1.sum())[rows["top1"][half:]].mean()),
            "recur": float(mask[half:].mean()), "new": float(new[half:].mean())}


def zstd_bytes(arrays: Iterable[np.ndarray], chunk: int) -> float:
    """Bytes per row of stored arrays (row-major, first axis rows), zstd level 3 per chunk."""
    codec, total, n = Zstd(level=3), 0, 0
    for a in arrays:
        n = len(a)
        total += sum(len(codec.encode(np.ascontiguousarray(a[s:s + chunk])))
                     for s in range(0, n, chunk))
    return total / n


def row_inputs(store_root: Path, tokens_root: Path) -> np.ndarray | None:
    """The input token of every row of a teacher store (row i of a sequence follows token i),
    from the tokens store it was harvested over; None if that store is not there."""
    if not (tokens_root / "store.json").exists():
        return None
    tokens = open_store(tokens_root, verify="none")
    batch = tokens.read(np.arange(tokens.num_sequences), ["token_ids"])
    t = batch["token_ids"].astype(np.int64)
    return np.concatenate([t[a:b - 1] for a, b in zip(batch.offsets[:-1], batch.offsets[1:],
                                                        strict=True)])


def floor_distances(codes: np.ndarray) -> np.ndarray:
    """q64v2's symbols: each code's distance to its row's floor (largest code)."""
    return codes.max(1, keepdims=True) - codes


def coarse_tail(codes: np.ndarray, step_nats: float) -> np.ndarray:
    """Codes with every entry below p = 1e-3 (code > FINE_MAX) moved to a coarser grid."""
    fine = np.asarray(codes, dtype=np.int64)
    top = grid.FINE_MAX
    units = np.where(fine <= top, fine, top + (fine - top) * grid.COARSE)
    step = max(1, round(step_nats * grid.FINE))
    tail = grid.FINE_MAX + 1 + (units - grid.FINE_MAX - 1) // step
    return np.where(fine <= grid.FINE_MAX, fine, tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=None,
                    help="a teacher store (default: the SmolLM2 harvest, built once and cached)")
    ap.add_argument("--tokens", type=Path, default=None,
                    help="the tokens store the teacher was harvested over (default: the "
                         "store's sibling 'tokens'), for the bound given the input token")
    ap.add_argument("--tail-step", type=float, default=0.25,
                    help="grid step in nats of the coarse tail (entries with p < 1e-3)")
    ap.add_argument("--chunk", type=int, default=8192,
                    help="rows a reference may reach back over (a decodable unit)")
    args = ap.parse_args()
    root = args.store or real_teacher_store()
    store = open_store(root, verify="none")
    inputs = row_inputs(root, args.tokens or root.parent / "tokens")
    rows = store.read(np.arange(store.num_sequences), ["topk_ids", "topk_logprobs"])
    ids = rows["topk_ids"].astype(np.int64)
    lp = rows["topk_logprobs"].astype(np.float64)
    ok = np.isfinite(lp).all(1)
    ids, lp = ids[ok], lp[ok]
    if inputs is not None:
        inputs = inputs[ok] if len(inputs) == len(ok) else None
    n, k = ids.shape
    vocab = int(store.attrs.get("vocab_size") or ids.max() + 1)
    codes = grid.quantise(lp).astype(np.int64)
    head = float((codes <= grid.FINE_MAX).sum(1).mean())
    id_bytes = id_set_bits(ids, vocab) / 8
    code_bytes = entropy_bits(floor_distances(codes)) * k / 8
    coarse_bytes = entropy_bits(floor_distances(coarse_tail(codes, args.tail_step))) * k / 8
    print(f"input: positions={n} k={k} vocab_size={vocab} head_entries_p_ge_1e-3={head:.1f}")
    print(f"ids_bits_per_id={id_set_bits(ids, vocab) / k:.3f}")
    print(f"ids_bytes_per_position={id_bytes:.1f}")
    if inputs is not None:
        given = id_set_bits_given_input(ids, inputs, vocab) / 8
        print(f"ids_given_input_bytes_per_position={given:.1f}")
        print("entropy_bound_given_input_coarse_tail_bytes_per_position="
              f"{given + coarse_bytes + SCALAR_BYTES:.1f}")
    print(f"codes_bits_per_entry={code_bytes * 8 / k:.3f}")
    print(f"codes_bytes_per_position={code_bytes:.1f}")
    print(f"codes_coarse_tail_bytes_per_position={coarse_bytes:.1f} "
          f"(tail step {args.tail_step:g} nat, |error| <= {args.tail_step / 2:g} where p < 1e-3)")
    v3 = tc.encode_referenced(ids, lp, chunk_lengths(n, args.chunk), vocab_size=vocab)
    parts = id_set_bits_given_reference(ids, reference_layout(v3, k), vocab)
    ref_bytes = sum(parts.values()) / 8
    for name, bits in parts.items():
        print(f"ids_given_reference_{name}_bytes_per_position={bits / 8:.1f}")
    print(f"ids_given_reference_bytes_per_position={ref_bytes:.1f}")
    v2 = tc.encode(ids, lp, vocab_size=vocab, coding=tc.Q64V2)
    print(f"q64v2_zstd_topk_bytes_per_position={zstd_bytes(v2, args.chunk):.1f}")
    print(f"q64v3_zstd_topk_bytes_per_position={zstd_bytes(v3.values(), args.chunk):.1f}")
    print(f"scalars_bytes_per_position={SCALAR_BYTES:.1f}")
    print("entropy_bound_given_reference_bytes_per_position="
          f"{ref_bytes + code_bytes + SCALAR_BYTES:.1f}")
    print("entropy_bound_given_reference_coarse_tail_bytes_per_position="
          f"{ref_bytes + coarse_bytes + SCALAR_BYTES:.1f}")
    print("entropy_bound_coarse_tail_bytes_per_position="
          f"{id_bytes + coarse_bytes + SCALAR_BYTES:.1f}")
    print(f"entropy_bound_bytes_per_position={id_bytes + code_bytes + SCALAR_BYTES:.1f}")


if __name__ == "__main__":
    main()
