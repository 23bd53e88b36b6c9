"""The TeacherEngine contract, and the row conversions every engine shares.

Row ``j`` of a sequence is the teacher's distribution of token ``j + 1`` given tokens ``0..j``;
a sequence of ``L`` tokens has ``L - 1`` rows (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from mtkd.harvest.draws import unique_counts
from mtkd.harvest.threads import over_rows

#: Rows per chunk of :func:`tail_logmass` (its float64 exponentials stay in cache).
TAIL_CHUNK_ROWS = 2048

#: Keys every engine returns (optional extras: ``tempered_tail_logmass``, ``sample_*``).
ROW_KEYS = ("topk_ids", "topk_logprobs", "target_logprob", "target_rank", "tail_logmass")


@runtime_checkable
class TeacherEngine(Protocol):
    """A teacher that turns token sequences into sparse per-position log-prob rows."""

    name: str  # e.g. "vllm-fast", "vllm-public", "hf-reference"
    vocab_size: int
    k: int

    def harvest(self, sequences: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Rows for all sequences concatenated in input order (``R = Σ (L_i − 1)``)."""
        ...


def check_k(k: int, cap: int, engine: str, hint: str = "") -> int:
    """Refuse a top-k width outside ``[1, cap]`` with a message that says what to change."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= cap:
        raise ValueError(
            f"{engine}: k={k} is outside [1, {cap}] (the engine's cap on returned log-probs)"
            + (f"; {hint}" if hint else "")
        )
    return int(k)


def check_sequences(sequences: Sequence[np.ndarray], vocab_size: int) -> list[np.ndarray]:
    """Validate token sequences (at least one; 1-D, length ≥ 2, ids in ``[0, vocab_size)``) as
    int64 arrays."""
    if len(sequences) == 0:
        raise ValueError("no sequences to harvest")
    out = []
    for i, seq in enumerate(sequences):
        arr = np.asarray(seq)
        if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"sequence {i}: need a 1-D integer array of length >= 2, "
                f"got shape {arr.shape} dtype {arr.dtype}"
            )
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"sequence {i}: token ids outside [0, {vocab_size})")
        out.append(arr.astype(np.int64, copy=False))
    return out


def tail_logmass(topk_logprobs: np.ndarray) -> np.ndarray:
    """``log(1 − Σ exp(topk_logprobs))`` per row in float64 (−inf when the top-k holds all
    the mass), returned as float32.

    Float32 log-probs carry ≈1e-7 relative error, so tails below that are noise. Rows are done
    in cache-sized chunks over the harvest's threads (each row's sum is the same either way).
    """
    lp = np.asarray(topk_logprobs)
    out = np.empty(lp.shape[:-1], np.float32)
    lp_rows, out_rows = lp.reshape(out.size, lp.shape[-1]), out.reshape(-1)

    def rows(lo: int, hi: int) -> None:
        for a in range(lo, hi, TAIL_CHUNK_ROWS):
            b = min(a + TAIL_CHUNK_ROWS, hi)
            mass = np.exp(lp_rows[a:b], dtype=np.float64).sum(axis=-1)
            with np.errstate(divide="ignore"):
                out_rows[a:b] = np.log1p(-np.minimum(mass, 1.0))

    over_rows(0, len(lp_rows), rows)
    return out


def finish_rows(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    target_logprob: np.ndarray,
    target_rank: np.ndarray,
) -> dict[str, np.ndarray]:
    """The contract's arrays (contiguous, dtypes fixed, tail added) from raw top-k rows."""
    topk_logprobs = np.ascontiguousarray(topk_logprobs, dtype=np.float32)
    return {
        "topk_ids": np.ascontiguousarray(topk_ids, dtype=np.int32),
        "topk_logprobs": topk_logprobs,
        "target_logprob": np.ascontiguousarray(target_logprob, dtype=np.float32).reshape(-1),
        "target_rank": np.ascontiguousarray(target_rank, dtype=np.int32).reshape(-1),
        "tail_logmass": tail_logmass(topk_logprobs),
    }


def sample_rows(draws: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
    """The ``sample_*`` arrays from sorted draws ``[R, M]`` with their log-probs: unique ids
    ascending with counts, then padding (see :func:`mtkd.harvest.draws.unique_counts`)."""
    ids, counts, lps = unique_counts(torch.from_numpy(np.ascontiguousarray(draws, np.int64)),
                                     torch.from_numpy(np.ascontiguousarray(logprobs)))
    return {"sample_ids": ids.numpy(), "sample_counts": counts.numpy().astype(np.uint16),
            "sample_logprobs": lps.numpy()}


def rows_from_logprobs(
    logprobs: torch.Tensor, targets: torch.Tensor, k: int
) -> dict[str, np.ndarray]:
    """The contract's arrays from full-vocabulary log-probs ``[R, V]`` and next tokens ``[R]``.

    The rank counts the entries ``>=`` the target's log-prob (vLLM's definition).
    """
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1)
    tgt = logprobs.gather(-1, targets.view(-1, 1).to(torch.int64))
    rank = (logprobs >= tgt).sum(dim=-1)
    return finish_rows(*(t.cpu().numpy() for t in (top_ids, top_lp, tgt, rank)))


def concat_rows(chunks: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-batch row dicts along the row axis (key sets must agree)."""
    if not chunks:
        raise ValueError("no rows to concatenate")
    return {key: np.concatenate([c[key] for c in chunks], axis=0) for key in chunks[0]}
