"""Prompt log-prob rows in vLLM's layout, computed cheaply on CPU.

vLLM 0.32 computes prompt log-probs (``Sampler.compute_logprobs`` then
``Sampler.gather_logprobs``) as: a float32 ``log_softmax`` over the whole ``[n, V]`` logits,
``torch.topk`` on it, the target's log-prob, and its rank as a count over the full row.
:func:`prompt_logprobs_reference` is that computation; :func:`prompt_logprobs_fast` returns the
same tensors: the same dtypes and layout (``[n, k+1]`` ids and log-probs, the target in column 0,
then the top-k in descending order; ``[n]`` ranks = the number of entries ``>=`` the target's
log-prob), bit-identical log-probs and ranks, and ids that differ only in the order of equal
log-probs (here: ascending id; ``torch.topk`` leaves it unspecified).

What changes (CPU only):

* the rows are split into contiguous ranges, one per thread of torch's intra-op pool (the
  worker's cores; vLLM's top-k path is single-threaded per row), and each range is done in
  chunks that stay in cache: log-softmax, selection, key sort and decode in turn, so the
  ``[n, V]`` float32 log-probs never exist at once (the log-softmax is the same ATen kernel row
  by row, hence bit-identical; its exponentials are the remaining cost, which a one-pass
  logsumexp does not reduce);
* the top-k is a numba kernel instead of ``torch.topk``'s per-row partial sort: per row it
  takes strided group maxima (vectorised), bisects a threshold on them that at least k entries
  pass, collects the candidates from the groups that reach it (about k to 2k), and writes them
  as packed int64 sort keys that numpy's vectorised sort orders for a chunk's rows at once;
* the rank counts among the candidates when the target is one of them (every entry ``>=`` the
  target is then a candidate), and over the full row only otherwise.

Rows the kernel cannot settle (NaN rows, more than ``capacity`` entries tied at the threshold,
mostly ``-inf`` rows) are recomputed by the reference, as is everything when ``k`` is large
against ``V`` or the tensors are not on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from mtkd.harvest.threads import over_rows

#: Rows per chunk (log-softmax, selection, sort, decode in turn): about this many float32
#: log-probs (1 MiB, a core's L2), and at least ``_MIN_CHUNK_ROWS``.
CHUNK_ELEMENTS = 1 << 18
_MIN_CHUNK_ROWS = 16
#: Largest k the kernel takes (vLLM's max_logprobs default is 20; mtkd caps k at 256).
MAX_FAST_K = 1024


_PAD_KEY = np.iinfo(np.int64).min  # sorts before every real key
_LOW = 0xFFFFFFFF  # the low 32 bits of a key hold _LOW − id (equal log-probs → smaller id first)


def prompt_logprobs_reference(
    logits: torch.Tensor, k: int, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM 0.32's prompt log-probs: ``Sampler.compute_logprobs`` + ``gather_logprobs``.

    Returns ids int32 ``[n, k+1]``, log-probs float32 ``[n, k+1]`` (target first, then the
    top-k) and the target's rank int64 ``[n]`` (entries ``>=`` its log-prob).
    """
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1)
    tgt = targets.to(torch.int64).unsqueeze(-1)
    tgt_lp = logprobs.gather(-1, tgt)
    ranks = (logprobs >= tgt_lp).sum(-1)
    ids = torch.cat((tgt, top_ids), dim=1).to(torch.int32)
    return ids, torch.cat((tgt_lp, top_lp), dim=1), ranks


def capacity(k: int) -> int:
    """Candidates per row the fast kernel keeps (a power of two ≥ 2k)."""
    return 1 << max(1, math.ceil(math.log2(2 * k)))


def group_size(vocab: int, k: int) -> int:
    """Entries per strided group, about 1.5·sqrt(V/k) (measured: the group maxima cost V/B, the
    scan of the groups that reach the threshold about 1.25·k·B), leaving at least 2k groups."""
    return max(1, min(int(1.5 * math.sqrt(vocab / k)), vocab // (2 * k)))


def fast_supported(logits: torch.Tensor, k: int) -> bool:
    """Whether :func:`prompt_logprobs_fast` runs its kernel (else it runs the reference)."""
    return (
        logits.device.type == "cpu"
        and logits.dim() == 2
        and 1 <= k <= MAX_FAST_K
        and logits.shape[1] >= 2 * capacity(k)
    )


#: ``on_chunk(rows, log_probs, ids)``: rows (a slice or indices) of the call, their float32
#: log-probs ``[r, V]`` and their finished ``[r, k+1]`` ids (target, then the top-k)
ChunkHook = Callable[[slice | np.ndarray, torch.Tensor, np.ndarray], None]


def prompt_logprobs_fast(
    logits: torch.Tensor, k: int, targets: torch.Tensor, stats: dict[str, float] | None = None,
    on_chunk: ChunkHook | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of :func:`prompt_logprobs_reference`, computed as the module docstring says.

    ``stats`` (optional) is incremented: ``calls``, ``rows``, ``reference_rows`` (rows the
    reference recomputed) and ``reference_calls`` (calls that ran the reference entirely).
    ``on_chunk`` sees every row's log-probs once, while a chunk of them is in cache (the
    draws are made there), from the thread that computed them.
    """
    n = logits.shape[0] if logits.dim() == 2 else 0
    if n == 0 or not fast_supported(logits, k):
        if stats is not None:
            _bump(stats, calls=1, rows=n, reference_calls=1, reference_rows=n)
        out = prompt_logprobs_reference(logits, k, targets)
        if on_chunk is not None and n:
            on_chunk(slice(0, n), logits.log_softmax(dim=-1, dtype=torch.float32),
                     out[0].numpy())
        return out
    vocab = logits.shape[1]
    cap = capacity(k)
    groups = vocab // group_size(vocab, k)
    kern = _kernels()
    targets64 = targets.to(torch.int64).contiguous()
    tgt_np = targets64.numpy()
    ids = np.empty((n, k + 1), dtype=np.int32)
    vals = np.empty((n, k + 1), dtype=np.float32)
    ranks = np.empty(n, dtype=np.int64)
    tgt_lp = np.empty(n, dtype=np.float32)
    step = max(_MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)

    def rows(lo: int, hi: int) -> None:
        """Rows [lo, hi) chunk by chunk, each chunk's log-probs and keys staying in cache."""
        keys = np.empty((min(step, hi - lo), cap), dtype=np.int64)
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            lp_t = logits[a:b].log_softmax(dim=-1, dtype=torch.float32)
            lp = lp_t.numpy()
            kk = keys[: b - a]
            kern.select(lp, lp.view(np.int32), tgt_np[a:b], k, groups, kk, ranks[a:b],
                        tgt_lp[a:b])
            kk.sort(axis=1)
            kern.decode(kk, tgt_np[a:b], tgt_lp[a:b], ids[a:b], vals[a:b].view(np.int32))
            if on_chunk is not None:
                on_chunk(slice(a, b), lp_t, ids[a:b])

    over_rows(0, n, rows)
    ids_t, vals_t, ranks_t = torch.from_numpy(ids), torch.from_numpy(vals), torch.from_numpy(ranks)
    redo = np.flatnonzero(ranks < 0)
    if len(redo):
        rows = torch.from_numpy(redo)
        r_ids, r_vals, r_ranks = prompt_logprobs_reference(logits[rows], k, targets64[rows])
        ids_t[rows], vals_t[rows], ranks_t[rows] = r_ids, r_vals, r_ranks
        if on_chunk is not None:  # again, with the rows' right top-k
            on_chunk(redo, logits[rows].log_softmax(dim=-1, dtype=torch.float32),
                     r_ids.numpy())
    if stats is not None:
        _bump(stats, calls=1, rows=n, reference_rows=len(redo))
    return ids_t, vals_t, ranks_t


def _bump(stats: dict[str, float], **counts: int) -> None:
    for key, value in counts.items():
        stats[key] = stats.get(key, 0) + value


# --------------------------------------------------------------------------- numba kernel
#
# Per row of log-probs (float32; a row is either NaN-free or all NaN: one NaN or +inf logit
# makes the whole log-softmax row NaN):
# 1. acc[g] = max of the strided group {g, g+G, g+2G, …} over the first B·G entries (B = V // G):
#    element-wise maxima of contiguous chunks, which LLVM vectorises (so are the min/max over
#    acc, folded into 16 lanes first);
# 2. bisection of a threshold t on acc (``_raise_threshold``): the largest t tried with
#    #{g: acc[g] >= t} >= k, stopping once that count is at most 1.25 k. Every group that
#    reaches t holds an entry >= t, so at least k entries pass, and all of them sit in those
#    groups or in the tail [B·G, V);
# 3. those groups and the tail are scanned into candidates (value, id) without branches; if
#    there are more than the capacity, the same bisection over the candidates raises t (still
#    >= k of them);
# 4. candidates become int64 keys: high 32 bits the order-preserving integer image of the
#    float's bits (``_sortable_bits``), low 32 bits _LOW − id; padding sorts first (numpy sorts
#    them, and ``_decode_kernel`` turns the last k of each row back into ids and exact
#    log-probs);
# 5. rank: if the target's log-prob is >= t every entry >= it is a candidate, so count there;
#    otherwise count the full row (vectorised).
# A row it cannot settle gets rank −1 and is recomputed by the reference.

_KERNELS: SimpleNamespace | None = None
_LANES = 16


def _count_at_least(
    values: np.ndarray, n: int, t: float
) -> int:  # pragma: no cover - compiled by numba
    """#{i < n: values[i] >= t}, without branches (LLVM vectorises it)."""
    count = 0
    for i in range(n):
        count += np.int64(values[i] >= t)
    return count


def _raise_threshold(
    values: np.ndarray, n: int, k: int, most: int, lo: float, hi: float, count: int
) -> tuple[float, int]:  # pragma: no cover - compiled by numba
    """Raise the float32 threshold ``lo``, which ``count`` of ``values[:n]`` reach, while more
    than ``most`` reach it: the float32 midpoint of ``lo`` and ``hi`` becomes ``lo`` if at least
    k reach it, else ``hi``; stops when no float32 lies strictly between them. Returns the last
    ``lo`` and its count (still at least k when the given one was)."""
    while count > most:
        mid = np.float32(lo + (hi - lo) * np.float32(0.5))
        if not (lo < mid and mid < hi):
            break
        c = _count_at_least(values, n, mid)
        if c >= k:
            lo = mid
            count = c
        else:
            hi = mid
    return lo, count


def _sortable_bits(o: int) -> int:  # pragma: no cover - compiled by numba
    """A float32's bits (int32) → an integer of the same order, and back (its own inverse):
    negative floats get their 31 lower bits flipped."""
    return o ^ ((o >> 31) & 0x7FFFFFFF)


def _select_kernel(
    lp: np.ndarray,
    bits: np.ndarray,
    targets: np.ndarray,
    k: int,
    groups: int,
    keys: np.ndarray,
    ranks: np.ndarray,
    tgt_lp: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Per row: the candidates' sort keys, the target's log-prob and rank (steps 1–5 above)."""
    n, vocab = lp.shape
    cap = keys.shape[1]
    full = vocab // groups
    head = full * groups
    folds = groups // _LANES
    acc = np.empty(groups, np.float32)
    lo16 = np.empty(_LANES, np.float32)
    hi16 = np.empty(_LANES, np.float32)
    hits = np.empty(groups + 1, np.int64)
    cand_v = np.empty(vocab + 1, np.float32)
    cand_i = np.empty(vocab + 1, np.int64)
    stop = k + k // 4
    for r in range(n):
        row = lp[r]
        t_lp = row[targets[r]]
        tgt_lp[r] = t_lp
        # 1. strided group maxima, and their min and max
        grid = row[:head].reshape(full, groups)
        for g in range(groups):
            acc[g] = grid[0, g]
        for c in range(1, full):
            for g in range(groups):
                acc[g] = max(acc[g], grid[c, g])
        lo = acc[0]
        hi = acc[0]
        if folds:
            lanes = acc[: folds * _LANES].reshape(folds, _LANES)
            for i in range(_LANES):
                lo16[i] = lanes[0, i]
                hi16[i] = lanes[0, i]
            for c in range(1, folds):
                for i in range(_LANES):
                    lo16[i] = min(lo16[i], lanes[c, i])
                    hi16[i] = max(hi16[i], lanes[c, i])
            for i in range(_LANES):
                lo = min(lo, lo16[i])
                hi = max(hi, hi16[i])
        for g in range(folds * _LANES, groups):
            lo = min(lo, acc[g])
            hi = max(hi, acc[g])
        if acc[0] != acc[0] or hi == -np.inf:  # NaN row, or all -inf
            ranks[r] = -1
            continue
        # 2. threshold on the group maxima
        hit = groups
        if lo == -np.inf:
            lo = hi
            for g in range(groups):
                if acc[g] > -np.inf:
                    lo = min(lo, acc[g])
            hit = _count_at_least(acc, groups, lo)
            if hit < k:
                ranks[r] = -1
                continue
        lo, hit = _raise_threshold(acc, groups, k, stop, lo, hi, hit)
        # 3. candidates: entries >= lo, in the groups that reach lo and in the tail
        nh = 0
        for g in range(groups):
            hits[nh] = g
            nh += np.int64(acc[g] >= lo)
        nc = 0
        for h in range(nh):
            g = hits[h]
            for c in range(full):
                v = grid[c, g]
                cand_v[nc] = v
                cand_i[nc] = c * groups + g
                nc += np.int64(v >= lo)
        for j in range(head, vocab):
            v = row[j]
            cand_v[nc] = v
            cand_i[nc] = j
            nc += np.int64(v >= lo)
        if nc > cap:
            top = cand_v[0]
            for i in range(nc):
                top = max(top, cand_v[i])
            lo, kept = _raise_threshold(cand_v, nc, k, cap, lo, top, nc)
            if kept > cap:
                ranks[r] = -1
                continue
            m = 0
            for i in range(nc):
                v = cand_v[i]
                cand_v[m] = v
                cand_i[m] = cand_i[i]
                m += np.int64(v >= lo)
            nc = m
        # 4. sort keys
        krow = keys[r]
        brow = bits[r]
        for i in range(nc):
            j = cand_i[i]
            krow[i] = (np.int64(_sortable_bits(brow[j])) << 32) | (_LOW - j)
        for i in range(nc, cap):
            krow[i] = _PAD_KEY
        # 5. the target's rank
        if t_lp >= lo:
            ranks[r] = _count_at_least(cand_v, nc, t_lp)
        else:
            ranks[r] = _count_at_least(row, vocab, t_lp)


def _decode_kernel(
    keys: np.ndarray,
    targets: np.ndarray,
    tgt_lp: np.ndarray,
    ids: np.ndarray,
    val_bits: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Rows ``[target, top-k…]`` from ascending sorted keys: ids, and the log-probs' bits."""
    n, cap = keys.shape
    k = ids.shape[1] - 1
    tgt_bits = tgt_lp.view(np.int32)
    for r in range(n):
        ids[r, 0] = targets[r]
        val_bits[r, 0] = tgt_bits[r]
        for i in range(k):
            key = keys[r, cap - 1 - i]
            ids[r, i + 1] = _LOW - (key & _LOW)
            val_bits[r, i + 1] = _sortable_bits(np.int32(key >> 32))


def _kernels() -> SimpleNamespace:
    """The jitted kernels (compiled on first use, cached on disk by numba).

    numba is imported only here, not with the module; the helpers the kernels call are
    registered with it first, so that they compile into the kernels.
    """
    global _KERNELS
    if _KERNELS is None:
        import numba
        from numba.extending import register_jitable

        options = {"error_model": "numpy", "boundscheck": False}
        for helper in (_count_at_least, _raise_threshold, _sortable_bits):
            register_jitable(**options)(helper)
        jit = numba.njit(cache=True, nogil=True, **options)
        _KERNELS = SimpleNamespace(select=jit(_select_kernel), decode=jit(_decode_kernel))
    return _KERNELS
