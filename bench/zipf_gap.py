"""Where q64r's bytes on the synthetic 262,144-id Zipf teacher go, against the oracle's floor.

``bench/store_size.py`` prints ``zipf262k_bytes_per_position`` (q64r with the 1/4-nat tail,
streams of 2,048 rows) and the floor of any coding told the generator
(``store_size_inputs.zipf_floor_bytes``). This splits the gap between them. The rows
(:func:`store_size_inputs.zipf_rows`) are independent: a row's ids are ``k`` draws without
replacement from a fixed Zipf law over a noisy id map, and its log-probs a chain of gaps with a
per-row scale β. Any coding stores (ids as a set) + (log-probs given the set), or equivalently
(ids in rank order) + (sorted log-probs) − (the order of tied entries). Printed, in bytes per
position:

* ``oracle_ordered_ids``: −log₂ of the ids' draw probabilities in rank order, Π p(xⱼ) / (1 −
  Σ_{i<j} p(xᵢ)), under the generator's law and id map;
* ``oracle_order_given_set``: −log₂ P(rank order | the set of ids), by Monte Carlo over
  ``--perms`` random orders of ``--mc-rows`` rows (P(set) = k! · mean over orders);
* ``oracle_set_ids``: their difference, what an oracle pays for the set;
* ``adaptive_ordered_ids``: a plain adaptive model of the ids in rank order, learned afresh in
  each stream of ``MAX_LEN`` rows as q64r's are: a seen id at its count ÷ (ids coded + ids
  seen), a new one at the escape (ids seen ÷ the same) times its bit length's adaptive
  frequency (a model per rank bucket) times uniform below the leading bit;
  ``adaptive_set_ids``: less ``oracle_order_given_set`` (the order such a coder could leave
  out), an estimate of what learning the law costs a coder that knows nothing of it;
* ``q64r_set_ids``: q64r's bytes for the rows with every log-prob but the top one equal (the
  same top-1 and references, codes nearly free), ``q64r_codes``: the full rows' bytes less it;
* ``codes_sorted_chain``: the sorted levels' plug-in entropy H(first) + Σⱼ H(gapⱼ) — what a
  coder that does not know β pays for sorted log-probs at best with a context per rank —
  and ``tied_orders``: log₂ Π g! over the groups of equal levels; ``uniform_assignment``:
  log₂ k! − ``tied_orders``, the levels' assignment to the set's ids when the ids' frequencies
  say nothing about it (``oracle_order_given_set`` says how little they do);
* ``floor``: ``zipf_floor_bytes`` at the same grid, which also knows each row's β.

Headline last: ``q64r_gap_to_floor=`` with its parts ``gap_learning_ids=`` (q64r's set against
the oracle's) and ``gap_codes=`` (q64r's codes against the floor's, given the set).

    .venv/bin/python bench/zipf_gap.py   # ≈ 1 min
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from store_size_inputs import MAX_LEN, zipf_floor_bytes, zipf_law, zipf_rank_to_id, zipf_rows

from mtkd.store import q64_grid as grid
from mtkd.store import topk_codec as tc
from mtkd.store.stream_frames import HEAD

VOCAB, K, TAIL_STEP = 1 << 18, 64, 4  # the headline's 1/4-nat tail: 4 coarse steps


def _stream_bytes(ids: np.ndarray, logprobs: np.ndarray) -> float:
    """q64r's ``topk_stream`` bytes per row, a stream per ``MAX_LEN`` rows (streams2048)."""
    n = len(ids)
    lengths = np.full(n // MAX_LEN, MAX_LEN)
    stream = tc.encode_streamed(ids, logprobs, lengths, vocab_size=VOCAB,
                                tail_step=TAIL_STEP)[tc.STREAM]
    starts = np.arange(0, n, MAX_LEN)
    sizes = stream[starts, 1:5].copy().view("<u4")[:, 0]  # each stream's length (its header)
    return float(sizes.sum() + HEAD * len(starts)) / n


def _log_pl(p: np.ndarray) -> np.ndarray:
    """ln of the draws' probability in order, Π p(xⱼ) / (1 − Σ_{i<j} p(xᵢ)), per row."""
    before = np.concatenate([np.zeros((len(p), 1)), np.cumsum(p, axis=1)[:, :-1]], axis=1)
    return (np.log(p) - np.log1p(-before)).sum(axis=1)


def _adaptive_ordered_bits(ids: np.ndarray) -> float:
    """Bits of ``adaptive_ordered_ids`` (module doc) over every stream of ``MAX_LEN`` rows."""
    total = 0.0
    buckets = np.zeros((8, 32))  # rank bucket (bit length of the rank in the row) × bit length
    for lo in range(0, len(ids), MAX_LEN):
        counts: dict[int, int] = {}
        coded = 0
        buckets[:] = 0.4  # add-0.4 counts, afresh in each stream
        for row in ids[lo:lo + MAX_LEN].tolist():
            for j, x in enumerate(row):
                seen = counts.get(x, 0)
                if seen:
                    total -= math.log2(seen / (coded + len(counts)))
                else:
                    if coded:
                        total -= math.log2(len(counts) / (coded + len(counts)))
                    width, at = (x + 1).bit_length(), min(j.bit_length(), 7)
                    total += width - 1 - math.log2(buckets[at, width] / buckets[at].sum())
                    buckets[at, width] += 1
                counts[x] = seen + 1
                coded += 1
    return total


def _entropy(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    q = counts / counts.sum()
    return float(-(q * np.log2(q)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10 * MAX_LEN, help="rows of the Zipf teacher")
    ap.add_argument("--mc-rows", type=int, default=300, help="rows for the order's Monte Carlo")
    ap.add_argument("--perms", type=int, default=4000, help="random orders per such row")
    args = ap.parse_args()
    n = args.rows - args.rows % MAX_LEN
    rows = zipf_rows(n, K, VOCAB, seed=0)
    ids, logprobs = rows["topk_ids"], rows["topk_logprobs"]
    bits = 8.0  # bits per byte; every figure below is bytes per position

    id_to_rank = np.argsort(zipf_rank_to_id(VOCAB, np.random.default_rng(0)))  # zipf_rows' map
    p = zipf_law(VOCAB)[id_to_rank[ids]]  # each id's probability under the law
    ordered = -_log_pl(p).mean() / math.log(2) / bits
    rng = np.random.default_rng(1)
    given_set = []
    for row in p[:args.mc_rows]:
        orders = np.argsort(rng.random((args.perms, K)), axis=1)
        logs = _log_pl(row[orders])
        top = logs.max()
        log_set = math.lgamma(K + 1) + top + math.log(np.exp(logs - top).mean())
        given_set.append(log_set - _log_pl(row[None])[0])
    order_given_set = float(np.mean(given_set)) / math.log(2) / bits
    oracle_set = ordered - order_given_set

    adaptive = _adaptive_ordered_bits(ids) / n / bits

    full = _stream_bytes(ids, logprobs)
    flat = np.repeat(logprobs[:, 1:2], K, axis=1)  # every entry as the second: the top-1 kept
    flat[:, 0] = logprobs[:, 0]
    q64r_set = _stream_bytes(ids, flat)

    levels = np.sort(grid.tail_levels(grid.quantise(logprobs, TAIL_STEP), TAIL_STEP), axis=1)
    chain = _entropy(levels[:, 0]) + sum(_entropy(np.diff(levels, axis=1)[:, j])
                                         for j in range(K - 1))
    ties = np.mean([sum(math.lgamma(g + 1) for g in np.unique(row, return_counts=True)[1])
                    for row in levels]) / math.log(2)
    floor = zipf_floor_bytes(k=K, vocab=VOCAB, tail_step=TAIL_STEP)
    floor_codes = floor - math.log2(K) / bits - oracle_set  # the floor's log-probs given the set

    print(f"rows={n} k={K} vocab_size={VOCAB} tail_step={TAIL_STEP}")
    print(f"oracle_ordered_ids={ordered:.1f}")
    print(f"oracle_order_given_set={order_given_set:.1f} (log2 k! = "
          f"{math.lgamma(K + 1) / math.log(2) / bits:.1f})")
    print(f"oracle_set_ids={oracle_set:.1f}")
    print(f"adaptive_ordered_ids={adaptive:.1f}")
    print(f"adaptive_set_ids={adaptive - order_given_set:.1f}")
    print(f"q64r_set_ids={q64r_set:.1f}")
    print(f"q64r_codes={full - q64r_set:.1f}")
    print(f"codes_sorted_chain={chain / bits:.1f}")
    print(f"tied_orders={ties / bits:.1f}")
    print(f"uniform_assignment={(math.lgamma(K + 1) / math.log(2) - ties) / bits:.1f}")
    print(f"floor_codes_given_set={floor_codes:.1f}")
    print(f"floor={floor:.1f}")
    print(f"q64r_topk_stream={full:.1f}")
    print(f"gap_learning_ids={q64r_set - oracle_set:.1f}")
    print(f"gap_ids_q64r_vs_adaptive={q64r_set - adaptive + order_given_set:.1f}")
    print(f"gap_codes={full - q64r_set - floor_codes:.1f}")
    print(f"q64r_gap_to_floor={full + math.log2(K) / bits - floor:.1f} (topk_stream + the actual "
          "token's rank, against the floor; the other scalars are outside both)")


if __name__ == "__main__":
    main()
