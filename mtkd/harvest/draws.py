"""Random-sampling KD draws from full-vocabulary logits, reproducible by position.

Draw ``d`` of row ``j`` (the distribution of token ``j + 1``) of a sequence is the inverse CDF
of ``softmax(logits / T)`` at a uniform ``u = h(key, j, d) / 2^32``, where ``key`` is the
sequence's 63-bit key (:func:`sequence_key`: a keyed BLAKE2b of the harvest seed and the
sequence's tokens) and ``h`` a counter-based 32-bit hash (murmur3's finaliser, chained over the
key's two halves, ``j`` and ``d``). So a draw depends on nothing but (seed, sequence, position,
draw index): not on the batch, the worker split, the step's other requests or the device. Every
operation is a torch op over whole ``[rows, V]`` blocks (no per-position Python), so the same
code runs in vLLM's CUDA worker and on the CPU; 32-bit products are formed from 16-bit halves
so that no int64 product overflows. The uniforms resolve 2^-32: a token with probability below
≈ 2.3e-10 is never drawn (its share of 64 draws would be < 1.5e-8).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
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


def draw(logits: Tensor, keys: Tensor, positions: Tensor, num_samples: int,
         temperature: float = 1.0, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``num_samples`` draws per row of ``softmax(logits / temperature)``, ascending, and their
    temperature-1 log-probs: int64 ``[R, M]`` and float32 ``[R, M]``.

    ``exclude [R, h]``: ids never drawn (the draws follow the distribution renormalised over
    the rest: the hybrid's "exact head + draws from the rest"). Float64 inverse CDF:
    ``cumsum`` of the exponentials, ``searchsorted`` of ``u · total`` (right side, so an entry
    of probability 0 is never drawn).
    """
    x = logits.to(torch.float64)
    top = x.amax(dim=-1, keepdim=True)
    weights = torch.exp((x - top) / temperature)
    if exclude is not None:
        weights.scatter_(1, exclude.to(torch.int64), 0.0)
    cdf = torch.cumsum(weights, dim=-1)
    del weights
    u = uniforms(keys.to(logits.device), positions.to(logits.device), num_samples)
    draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(x.shape[-1] - 1)
    del cdf
    draws, _ = torch.sort(draws, dim=-1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return draws, (x.gather(-1, draws) - lse).to(torch.float32)


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
