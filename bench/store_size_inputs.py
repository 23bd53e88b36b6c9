"""The inputs of ``bench/store_size.py``, built from nothing made by hand.

* :func:`real_teacher_store`: the real teacher SmolLM2-135M (vocabulary 49,152; ``mtkd
  setup-teacher``) harvested over a slice of the demo corpus (the standard library's own
  sources) tokenised with SmolLM2's tokenizer, with float32 log-probs (the exact input a coding
  re-encodes), k = 64 and 64 random-sampling draws (or, ``hybrid``, the exact top-8 and 64
  draws from the rest), by the ``mtkd`` commands themselves. Cached
  under ``~/.cache/mtkd/bench/`` (``$MTKD_CACHE``) in a directory named by a hash of what made
  it; built in a temporary directory and renamed into place when complete.
* :func:`zipf_teacher_store`: a synthetic teacher of 262,144 ids, rows generated in numpy
  (ids drawn from a Zipf law, log-probs descending), for the id-width figure.
* :func:`zipf_floor_bytes`: what any coding of those rows must store at least, for the figure's
  honest reading.
* :func:`spread_teacher_store`: a teacher store's rows with their ids spread over a larger
  vocabulary (id i → the i-th of a sorted random subset of 262,144 ids, or of the subset in
  random order): a real teacher's rows, with their structure, at a large vocabulary's id width.
* :func:`recut_teacher_store`: a teacher store's rows cut into shorter sequences.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mtkd.recipes.real_teacher import cache_root, ensure_smollm2
from mtkd.recipes.stdlib_corpus import stdlib_texts
from mtkd.store import StoreWriter, open_store
from mtkd.store import q64_grid as grid
from mtkd.store.schema import TEACHER, teacher_header

#: ≈ 104k SmolLM2 tokens of the standard library's top-level sources (≈ 1 min of harvest on
#: 2 idle cores; more when the machine is shared).
CORPUS_CHARS = 400_000
MAX_LEN = 2048
HARVEST_ARGS = ("--engine", "vllm", "--dtype", "float32", "--logprob-dtype", "float32",
                "--k", "64", "--num-samples", "64", "--enforce-eager")
#: The hybrid that ``mtkd demo --experiments all`` distils its best teacher from: the exact
#: top-8 and 64 draws from the rest of the softmax.
HYBRID_ARGS = ("--engine", "vllm", "--dtype", "float32", "--logprob-dtype", "float32",
               "--k", "8", "--num-samples", "64", "--sample-rest", "--enforce-eager")
#: The synthetic teacher's law (:func:`zipf_rows`): Zipf exponent of the ids, mean of the top
#: log-prob's exponential, range of the per-row spacing scale β.
ZIPF_EXPONENT, TOP_MEAN, BETA_RANGE = 1.1, 0.8, (1.0, 2.5)


def run_mtkd(*args: object) -> None:
    """Run an ``mtkd`` command in a subprocess (vLLM's engine wants its own process)."""
    cmd = [sys.executable, "-m", "mtkd", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def real_teacher_store(cache: Path | None = None, *, hybrid: bool = False) -> Path:
    """The SmolLM2 teacher store over the demo corpus slice, built once (see module doc);
    ``hybrid``: harvested as the hybrid (:data:`HYBRID_ARGS`) instead."""
    teacher = ensure_smollm2()
    harvest = HYBRID_ARGS if hybrid else HARVEST_ARGS
    made_by = {"teacher": teacher.name, "corpus_chars": CORPUS_CHARS, "max_len": MAX_LEN,
               "harvest": harvest, "python": platform.python_version()}
    key = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:16]
    root = (cache or cache_root() / "bench") / f"store-size-smollm2-{key}"
    if (root / "teacher" / "manifest.json").exists():
        return root / "teacher"
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        with open(tmp / "corpus.jsonl", "w") as f:
            for text in stdlib_texts(max_files=None, max_chars=CORPUS_CHARS):
                f.write(json.dumps({"text": text}) + "\n")
        run_mtkd("tokenize", tmp / "corpus.jsonl", "--tokenizer", teacher, "--out", tmp / "tokens",
              "--max-len", MAX_LEN, "--no-byte-offsets")
        run_mtkd("harvest", tmp / "tokens", "--model", teacher, "--out", tmp / "teacher", *harvest)
        (tmp / "made_by.json").write_text(json.dumps(made_by, indent=1))
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "teacher"


def zipf_rows(n: int, k: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` teacher rows of a synthetic ``vocab``-id teacher, shaped like a real one.

    Ids: k distinct draws of a Zipf law (exponent ``ZIPF_EXPONENT``, 1.1) over frequency ranks,
    in the order they are first drawn (likelier tokens tend to rank higher), mapped to ids by a
    fixed noisy sort (frequent tokens tend to have small ids, as in BPE vocabularies).
    Log-probs: the top one −Exp(0.8); then the spacings of exponential order statistics,
    β·Exp(1)/i with β ~ U(1, 2.5) per row (the gaps between the largest of many Gumbel
    logits), so a row spans ≈ 5–12 nats.
    """
    rng = np.random.default_rng(seed)
    rank_to_id = zipf_rank_to_id(vocab, rng)
    cdf = np.cumsum(zipf_law(vocab))
    ids = np.empty((n, k), np.int32)
    for r in range(n):
        draws = np.searchsorted(cdf, rng.random(8 * k))
        _, first = np.unique(draws, return_index=True)
        while len(first) < k:  # rare: too few distinct draws
            draws = np.concatenate([draws, np.searchsorted(cdf, rng.random(8 * k))])
            _, first = np.unique(draws, return_index=True)
        ids[r] = rank_to_id[draws[np.sort(first)[:k]]]
    beta = rng.uniform(*BETA_RANGE, (n, 1))
    top = -rng.exponential(TOP_MEAN, (n, 1))
    lp = np.concatenate([top, top - np.cumsum(beta * rng.exponential(1.0, (n, k - 1))
                                              / np.arange(1, k), axis=1)], axis=1)
    mass = np.exp(lp).sum(axis=1)
    lp -= np.log(np.maximum(mass, 1.0))[:, None]  # a row's top-k never hold more than all mass
    with np.errstate(divide="ignore"):  # all mass in the top-k: the tail is −inf
        tail = np.log1p(-np.minimum(np.exp(lp).sum(axis=1), 1.0))
    pick = rng.integers(0, k, n)  # the actual next token: one of the top-k
    return {"topk_ids": ids, "topk_logprobs": lp.astype(np.float32),
            "target_logprob": lp[np.arange(n), pick].astype(np.float32),
            "target_rank": (pick + 1).astype(np.int32),
            "tail_logmass": tail.astype(np.float32)}


def zipf_rank_to_id(vocab: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`zipf_rows`' id map (its first use of ``rng``): frequency rank → id, a noisy
    sort that gives frequent tokens small ids."""
    return np.argsort(np.log1p(np.arange(vocab)) + rng.normal(0, 1, vocab))


def zipf_law(vocab: int) -> np.ndarray:
    """The synthetic teacher's law over frequency ranks (exponent ``ZIPF_EXPONENT``)."""
    p = 1.0 / np.arange(1, vocab + 1) ** ZIPF_EXPONENT
    return p / p.sum()


def _level_edges(tail_step: int, units: float) -> np.ndarray:
    """Edges, in fine steps of −log p, of q64's levels up to ``units`` with a ``tail_step``
    tail: fine levels up to ``FINE_MAX`` (whose level reaches half a coarse step further),
    then levels ``COARSE · tail_step`` fine steps wide (``q64_grid.quantise``)."""
    width = grid.COARSE * tail_step
    fine = np.arange(-0.5, grid.FINE_MAX - 0.5 + 1e-9)
    coarse = grid.FINE_MAX + width / 2 + width * np.arange(int((units - grid.FINE_MAX) / width) + 2)
    return np.concatenate([fine, coarse])


def _level_entropy(start: float, mean: float, edges: np.ndarray) -> float:
    """Entropy (bits) of the level of ``start + mean · Exp(1)`` (fine steps)."""
    above = edges[edges > start]
    cdf = np.concatenate([[0.0], 1.0 - np.exp(-(above - start) / mean), [1.0]])
    p = np.diff(cdf)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def zipf_floor_bytes(k: int = 64, vocab: int = 1 << 18, tail_step: int = 1, n: int = 2000,
                     seed: int = 7) -> float:
    """The least bytes per row that *any* coding of :func:`zipf_rows` at q64's grid with a
    ``tail_step`` tail can store, even one told the generator (its Zipf law, its id map, β),
    estimated over ``n`` rows (± ≈ 0.1).

    Ids: −log₂ of the ordered draws' probability, Π p(xⱼ) / (1 − Σ_{i<j} p(xᵢ)), less log₂ g!
    for each group of g entries with equal codes (their order need not be kept). Log-probs:
    H(codes) ≥ H(code₁) + Σᵢ H(codeᵢ | log-prob i−1, β), each an exponential's levels, exactly;
    a row whose top-k mass would pass 1 is shifted down as :func:`zipf_rows` does, and its
    exponentials start from the shifted values (the shift's pull on the gaps' law is neglected:
    an estimate there, ≈ 0.5 B below the unshifted bound). The actual token's rank: log₂ k
    bits. The other scalars are not counted."""
    rng = np.random.default_rng(seed)
    law = zipf_law(vocab)
    cdf = np.cumsum(law)
    edges = _level_edges(tail_step, 80 * grid.FINE * BETA_RANGE[1])
    bits = 0.0
    for _ in range(n):
        beta = rng.uniform(*BETA_RANGE)
        units = grid.FINE * np.cumsum(np.concatenate(
            [[rng.exponential(TOP_MEAN)], beta * rng.exponential(1.0, k - 1) / np.arange(1, k)]))
        shift = grid.FINE * math.log(max(np.exp(-units / grid.FINE).sum(), 1.0))
        units += shift
        bits += _level_entropy(shift, grid.FINE * TOP_MEAN, edges)
        bits += sum(_level_entropy(units[i - 1], grid.FINE * beta / i, edges) for i in range(1, k))
        ties = np.unique(grid.quantise(-units / grid.FINE, tail_step), return_counts=True)[1]
        bits -= sum(math.lgamma(g + 1) for g in ties) / math.log(2)
        draws = np.searchsorted(cdf, rng.random(8 * k))
        _, first = np.unique(draws, return_index=True)
        p = law[draws[np.sort(first)[:k]]]
        bits -= np.log2(p / (1.0 - np.concatenate([[0.0], np.cumsum(p)[:-1]]))).sum()
        bits += math.log2(k)
    return bits / n / 8


def _cut(n: int, rows: int) -> np.ndarray:
    """Lengths of ``n`` rows cut into sequences of ``rows`` (the last one shorter)."""
    lengths = np.full(math.ceil(n / rows), rows)
    lengths[-1] = n - rows * (len(lengths) - 1)
    return lengths


def zipf_teacher_store(out: Path, n: int = 50_000, k: int = 64, vocab: int = 1 << 18) -> Path:
    """A one-part float32 teacher store of :func:`zipf_rows` (sequences of ``MAX_LEN`` rows)."""
    rows = zipf_rows(n, k, vocab)
    lengths = _cut(n, MAX_LEN)
    header = teacher_header(1, k, {"vocab_size": vocab, "teacher": "zipf"},
                            logprob_dtype="float32")
    writer = StoreWriter(out, header)
    with writer.open_part(0) as pw:
        pw.append(rows, lengths, np.arange(len(lengths)))
    assert writer.finalize()
    open_store(out, TEACHER, verify="full")
    return out


def _rewrite_teacher_store(src: Path, out: Path, teacher: str, vocab: int | None = None,
                           ids: np.ndarray | None = None, rows: int | None = None) -> Path:
    """``src``'s top-k rows and scalars (float32) as a new store: ids sent through the lookup
    ``ids`` (index id + 1, so padding −1 stays −1), each part re-cut into sequences of ``rows``
    rows (the last one shorter)."""
    store = open_store(src, TEACHER)
    k = int(store.attrs["k"])
    header = teacher_header(store.num_parts, k,
                            {"vocab_size": vocab or int(store.attrs["vocab_size"]),
                             "teacher": teacher}, logprob_dtype="float32")
    writer = StoreWriter(out, header)
    names = [a.name for a in header.written_arrays]
    for part in range(store.num_parts):
        batch = store.read_part(part, names)
        arrays, lengths, seq_ids = dict(batch.arrays), batch.lengths, batch.seq_ids
        if ids is not None:
            arrays["topk_ids"] = ids[arrays["topk_ids"] + 1]
        if rows is not None:
            n = int(lengths.sum())
            lengths = _cut(n, rows)
            seq_ids = part * n + np.arange(len(lengths))  # unique across parts (≤ n each)
        with writer.open_part(part) as pw:
            pw.append(arrays, lengths, seq_ids)
    assert writer.finalize()
    return out


def spread_teacher_store(src: Path, out: Path, vocab: int = 1 << 18, seed: int = 0, *,
                         ordered: bool = True) -> Path:
    """``src``'s top-k rows and scalars (float32) with every id i sent to the i-th smallest of
    a random subset of ``vocab`` ids: order kept, gaps ≈ vocab / src vocabulary times wider;
    not ``ordered``: to the subset's i-th draw, so that nearby ids land anywhere (a vocabulary
    whose frequent tokens are not its small ids)."""
    small = int(open_store(src, TEACHER, verify="none").attrs["vocab_size"])  # (checked below)
    subset = np.random.default_rng(seed).choice(vocab, small, replace=False)
    lookup = np.concatenate([[-1], np.sort(subset) if ordered else subset]).astype(np.int32)
    return _rewrite_teacher_store(src, out, "spread" if ordered else "scattered", vocab,
                                  ids=lookup)


def recut_teacher_store(src: Path, out: Path, rows: int) -> Path:
    """``src``'s rows cut into sequences of ``rows`` rows: what a harvest of shorter windows
    (``mtkd tokenize --max-len``) gives a coding whose models start afresh in each sequence."""
    return _rewrite_teacher_store(src, out, f"recut{rows}", rows=rows)
