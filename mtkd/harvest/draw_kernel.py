"""The CPU kernel of the draws: inverse CDF of one row's weights, walked in one pass.

The torch path (:func:`mtkd.harvest.draws.draw_torch`, what a GPU runs) forms the float64 CDF
of a whole ``[rows, V]`` block with ``cumsum`` and ``searchsorted``. On the CPU the weights
w_j = exp(log p_j / T) are computed where the top-k kernel already holds a chunk's float32
log-probs in cache (:func:`mtkd.harvest.prompt_logprobs.prompt_logprobs_fast`), and this
kernel draws from them:

* one pass sums the weights in float64 per block of :data:`BLOCK` ids (excluded ids: 0);
  a block's sum and the walk's running sum inside it differ in rounding only, which the walk
  absorbs (a target past the block's last entry by rounding takes that entry);
* the draws' targets u_d · Σw, ascending, walk the block sums, then inside a block the running
  sum of w_j, resuming where the previous draw stopped: each id is visited at most once, most
  blocks are skipped whole.

An id is drawn when the running sum first exceeds the target (``searchsorted``'s right side),
so an entry of weight 0 is never drawn. The sums are accumulated in another order than
``cumsum``'s, so a draw can differ from the torch path's only where u · Σw falls within
float64 rounding of a boundary (tested equal on ≈ 10⁵ draws).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

BLOCK = 64  #: ids per block of the CDF walk
_KERNELS: SimpleNamespace | None = None


def walk_rows(weights: np.ndarray, targets: np.ndarray, excluded: np.ndarray,
              ids: np.ndarray) -> None:
    """Fill ``ids [R, M]`` with the draws of float32 ``weights [R, V]`` at uniforms
    ``targets [R, M]`` (ascending per row, in [0, 1)); ``excluded [R, h]`` ascending ids of
    weight 0 (h may be 0)."""
    _kernels().walk(weights, targets, excluded, ids)


def _walk_kernel(weights: np.ndarray, targets: np.ndarray, excluded: np.ndarray,
                 ids: np.ndarray) -> None:  # pragma: no cover - compiled by numba
    rows, vocab = weights.shape
    n_blocks = (vocab + BLOCK - 1) // BLOCK
    sums = np.empty(n_blocks, np.float64)
    for r in range(rows):
        w = weights[r]
        ex = excluded[r]
        n_ex = ex.shape[0]
        total = 0.0
        last_row = vocab - 1  # the last id of positive weight
        for b in range(n_blocks):  # four running sums: the adds overlap in the pipeline
            lo, hi = b * BLOCK, min(vocab, (b + 1) * BLOCK)
            s0 = s1 = s2 = s3 = 0.0
            j = lo
            while j + 4 <= hi:
                s0 += w[j]
                s1 += w[j + 1]
                s2 += w[j + 2]
                s3 += w[j + 3]
                j += 4
            while j < hi:
                s0 += w[j]
                j += 1
            sums[b] = (s0 + s1) + (s2 + s3)
        for e in range(n_ex):  # excluded ids weigh nothing
            sums[ex[e] // BLOCK] -= w[ex[e]]
        for b in range(n_blocks):
            total += sums[b]
        for j in range(vocab - 1, -1, -1):
            if w[j] > 0:
                last_row = j
                break
        b, before = 0, 0.0  # the block of the walk and the Σ of the blocks before it
        j, run, last, e_ptr = 0, 0.0, -1, 0  # next id, Σ w over the block's ids < j, ...
        for d in range(targets.shape[1]):
            target = targets[r, d] * total
            moved = d == 0
            while b < n_blocks - 1 and before + sums[b] <= target:
                before += sums[b]
                b += 1
                moved = True
            if moved:
                j, run, last, e_ptr = b * BLOCK, before, -1, 0
            end = min(vocab, (b + 1) * BLOCK)
            found = -1
            while j < end:
                while e_ptr < n_ex and ex[e_ptr] < j:
                    e_ptr += 1
                e = 0.0 if (e_ptr < n_ex and ex[e_ptr] == j) else np.float64(w[j])
                if e > 0.0:
                    if run + e > target:
                        found = j
                        break
                    last = j
                run += e
                j += 1
            if found < 0:  # u · Σw at a block's end by rounding: its last positive entry
                found = last if last >= 0 else last_row
            ids[r, d] = found


def _kernels() -> SimpleNamespace:
    """The jitted kernel (compiled on first use, cached on disk by numba)."""
    global _KERNELS
    if _KERNELS is None:
        import numba

        jit = numba.njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
        _KERNELS = SimpleNamespace(walk=jit(_walk_kernel))
    return _KERNELS
