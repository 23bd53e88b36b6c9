"""Random-sampling KD draws from full-vocabulary logits, reproducible by position.

Draw ``d`` of row ``j`` (the distribution of token ``j + 1``) of a sequence is the inverse CDF
of ``softmax(logits / T)`` at a uniform ``u = h(key, j, d) / 2^32``, where ``key`` is the
sequence's 63-bit key (:func:`sequence_key`: a keyed BLAKE2b of the harvest seed and the
sequence's tokens) and ``h`` a counter-based 32-bit hash (murmur3's finaliser, chained over the
key's two halves, ``j`` and ``d``). So a draw depends on nothing but (seed, sequence, position,
draw index): not on the batch, the worker split or the step's other requests. On a GPU every
operation is a torch op over whole ``[rows, V]`` blocks (:func:`draw_torch`, no per-position
Python); on the CPU a numba kernel walks each row's CDF where its log-probs are in cache
(:mod:`mtkd.harvest.draw_kernel`): the same draws but where a target falls within float64
rounding, or the last bit of float32 ``exp`` (numpy's, torch's), of a CDF boundary. 32-bit
products are formed from 16-bit halves so that no int64 product overflows. The uniforms
resolve 2^-32: a token with probability below ≈ 2.3e-10 is never drawn (its share of 64 draws
would be < 1.5e-8).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
CHUNK_ELEMENTS = 1 << 18  #: log-probs per chunk of :func:`draw` on the CPU (in cache)
_GOLDEN = 0x9E3779B9  # spreads the draw index before hashing


def sequence_key(seed: int, tokens: np.ndarray) -> int:
    """The 63-bit key of a sequence: keyed BLAKE2b of its int64 tokens under ``seed``."""
    digest = hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=8,
                             key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def _mul32(a: Tensor, c: int) -> Tensor:
    """``(a · c) mod 2^32`` for int64 ``a`` in [0, 2^32) without int64 overflow."""
    low = (a & 0xFFFF) * c
    high = (((a >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser (a bijection of [0, 2^32) with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniforms(keys: Tensor, positions: Tensor, num_samples: int) -> Tensor:
    """``[R, num_samples]`` float64 uniforms in [0, 1) for rows with int64 ``keys`` ``[R]``
    (sequence keys) at ``positions`` ``[R]``; the grid is 2^-32."""
    lo = (keys & _MASK32).unsqueeze(1)
    hi = ((keys >> 32) & _MASK32).unsqueeze(1)
    pos = (positions & _MASK32).unsqueeze(1)
    d = torch.arange(num_samples, device=keys.device, dtype=torch.int64).unsqueeze(0)
    h = _fmix32(_mul32(d, _GOLDEN) ^ lo)
    h = _fmix32(h ^ hi)
    h = _fmix32(h ^ pos)
    return h.to(torch.float64) * (1.0 / 4294967296.0)


def weights(logprobs: Tensor, temperature: float) -> Tensor:
    """The draws' unnormalised float32 weights exp(log p / T) from float32 log-probs; at
    T ≠ 1 relative to the row's top, exp((log p − max log p) / T), which float32 holds where
    log p / T underflows (below −103: a flat row at a low T; at T = 1, log p ≥ −log V)."""
    if temperature == 1.0:
        return torch.exp(logprobs)
    return torch.exp((logprobs - logprobs.amax(dim=-1, keepdim=True)) / temperature)


class ChunkDraws:
    """Draws made chunk by chunk, as a hook of
    :func:`~mtkd.harvest.prompt_logprobs.prompt_logprobs_fast` (the CPU path: the weights come
    from a chunk's log-probs while they are in cache) or over any log-probs (:func:`draw`).

    ``targets [n, M]``: each row's uniforms, ascending; ``rest``: the hybrid (the top-k ids the
    hook is given weigh nothing); ``exclude [n, h]``: ids of weight 0 given directly.
    """

    def __init__(self, targets: np.ndarray, temperature: float, rest: bool = False,
                 exclude: np.ndarray | None = None) -> None:
        self.targets, self.temperature = targets, temperature
        self.rest, self.exclude = rest, exclude
        self.ids = np.empty(targets.shape, np.int64)
        self.logprobs = np.empty(targets.shape, np.float32)

    def __call__(self, rows: slice | np.ndarray, logprobs: Tensor,
                 top_ids: np.ndarray | None) -> None:
        from mtkd.harvest.draw_kernel import walk_rows

        lp = logprobs.numpy()
        if self.exclude is not None:
            excluded = self.exclude[rows]
        elif self.rest and top_ids is not None:
            excluded = top_ids[:, 1:]  # column 0: the target
        else:
            excluded = np.empty((len(lp), 0), np.int64)
        excluded = np.sort(excluded.astype(np.int64), axis=1)
        out = np.empty((len(lp), self.targets.shape[1]), np.int64)
        # numpy's SIMD exp (several times torch's on a CPU here); at T ≠ 1 relative to each
        # row's top, as :func:`weights` (else a flat row at a low T underflows to 0)
        w = np.exp(lp if self.temperature == 1.0 else
                   (lp - lp.max(axis=1, keepdims=True)) / np.float32(self.temperature))
        walk_rows(w, np.ascontiguousarray(self.targets[rows]), excluded, out)
        self.ids[rows] = out
        self.logprobs[rows] = np.take_along_axis(lp, out, axis=1)


def sorted_uniforms(keys: Tensor, positions: Tensor, num_samples: int) -> np.ndarray:
    """:func:`uniforms` ascending per row, as numpy (the CPU walk's order)."""
    return np.sort(uniforms(keys, positions, num_samples).numpy(), axis=1)


def draw(logits: Tensor, keys: Tensor, positions: Tensor, num_samples: int,
         temperature: float = 1.0, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``num_samples`` draws per row of ``softmax(logits / temperature)``, ascending, and their
    temperature-1 log-probs: int64 ``[R, M]`` and float32 ``[R, M]``.

    The distribution is the weights exp(log p / T) of the float32 log-softmax, renormalised;
    ``exclude [R, h]``: ids never drawn (the hybrid: the rest outside an exact head). Inverse
    CDF in float64 at the uniforms of :func:`uniforms`: on the CPU by
    :mod:`mtkd.harvest.draw_kernel`, elsewhere by :func:`draw_torch`.
    """
    if logits.device.type != "cpu":
        return draw_torch(logits, keys, positions, num_samples, temperature, exclude)
    u = sorted_uniforms(keys, positions, num_samples)
    hook = ChunkDraws(u, temperature, exclude=None if exclude is None else exclude.numpy())
    step = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    for a in range(0, len(logits), step):
        rows = slice(a, min(a + step, len(logits)))
        hook(rows, logits[rows].log_softmax(dim=-1, dtype=torch.float32), None)
    return torch.from_numpy(hook.ids), torch.from_numpy(hook.logprobs)


def draw_torch(logits: Tensor, keys: Tensor, positions: Tensor, num_samples: int,
               temperature: float = 1.0, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`draw` in torch ops over whole ``[rows, V]`` blocks (a GPU's path): ``cumsum`` of
    the weights in float64, ``searchsorted`` of ``u · total`` (right side, so an entry of
    weight 0 is never drawn)."""
    lp = logits.log_softmax(dim=-1, dtype=torch.float32)
    w = weights(lp, temperature)
    if exclude is not None:
        w.scatter_(1, exclude.to(torch.int64), 0.0)
    cdf = torch.cumsum(w, dim=-1, dtype=torch.float64)
    del w
    u = uniforms(keys.to(logits.device), positions.to(logits.device), num_samples)
    draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(lp.shape[-1] - 1)
    del cdf
    draws, _ = torch.sort(draws, dim=-1)
    return draws, lp.gather(-1, draws)


def unique_counts(draws: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted draws ``[R, M]`` (and their log-probs) → unique ids int32, counts int32 and
    log-probs float32 ``[R, M]``: ids ascending, then padding (id −1, count 0, −inf)."""
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = torch.cumsum(first, dim=-1) - 1
    ids = torch.full_like(draws, -1).scatter_(-1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    lps = torch.full_like(logprobs, -torch.inf).scatter_(-1, slot, logprobs)
    return ids.to(torch.int32), counts.to(torch.int32), lps.to(torch.float32)
