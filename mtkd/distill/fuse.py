"""Fuse K teachers' sparse rows into one sparse target per position: the entry point of the
aggregation maths (``mtkd aggregate`` calls it block by block).

Steps per block of rows: temper each teacher (``tempering``) → weights per row (``weights``)
→ union of the teachers' top-k ids, with each teacher's mass on ids outside its own top-k
imputed from its tail (``to_union``) → operator (``operators``) over union ids + tail bucket →
diagnostics → the fused top-k_out. Everything is vectorised over rows.

Imputation. For an id in another teacher's top-k but not in teacher B's, B's probability is
unknown but at most B's k-th (tempered) probability. We give it B's per-id share of its tempered
tail, v = min(t_B/(V − k_B), p_B,(k)) — the even spread over B's V − k_B unseen ids, capped at
its k-th prob — and take it out of B's tail: t_B ← t_B − m·v for the m union ids B lacks.
Since m ≤ V − k_B, the tail stays ≥ 0 and B's mass over union ∪ tail still sums to 1. The
even share is conservative (an id another teacher ranks highly is likely among B's next ranks,
so its true prob is often nearer the cap); geometric pooling is the operator most sensitive to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtkd.distill.diagnostics import disagreement, effective_teachers, jensen_gap
from mtkd.distill.operators import Operator, Stack, get_operator, xlogx
from mtkd.distill.tails import TailModel, get_tail_model
from mtkd.distill.tempering import TeacherRows, TemperedRows, temper
from mtkd.distill.weights import (
    WeightInputs,
    WeightPolicy,
    validate_temperatures,
    validate_weights,
)


@dataclass(frozen=True)
class UnionBlock:
    """K teachers on the union of their supports: ``ids [N,U]`` (ascending per row, padded with
    −1), ``counts [N]`` real union ids per row, and ``stack`` over U+1 categories (the union
    columns, then the tail bucket; padding columns hold 0)."""

    ids: np.ndarray
    counts: np.ndarray
    stack: Stack


def union_support(
    ids: Sequence[np.ndarray], vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-row union of several ``[N,k_j]`` id arrays (ids in [0, V), distinct per teacher).

    Returns the union ``[N,U]`` (ascending, −1 padded), its size per row ``[N]``, and the union
    column of each input id ``[N, Σk_j]`` (inputs side by side). Vectorised: pack (id, input
    column) into one integer key, sort each row once, mark where the id changes, and
    cumulative-sum the marks.
    """
    width = sum(a.shape[1] for a in ids)
    n = ids[0].shape[0]
    shift = max(1, (width - 1).bit_length())
    dtype = np.int32 if (vocab_size << shift) < 2**31 else np.int64
    keys = np.empty((n, width), dtype=dtype)
    start = 0
    for a in ids:
        keys[:, start : start + a.shape[1]] = a
        start += a.shape[1]
    keys <<= shift
    keys |= np.arange(width, dtype=dtype)
    keys.sort(axis=1)
    sorted_ids = keys >> shift
    source_col = keys & ((1 << shift) - 1)
    is_new = np.empty(keys.shape, dtype=bool)
    is_new[:, :1] = True
    np.not_equal(sorted_ids[:, 1:], sorted_ids[:, :-1], out=is_new[:, 1:])
    pos = np.cumsum(is_new, axis=1, dtype=np.int32)
    pos -= 1
    counts = pos[:, -1] + 1 if width else np.zeros(n, np.int32)
    size = int(counts.max()) if n else 0
    rows = np.arange(n, dtype=np.intp)[:, None]
    union = np.full((n, size), -1, dtype=np.int32)
    # Scatter every element (duplicates write the same id to the same place); flat 1-D
    # indices are numpy's fast path.
    union.ravel()[(rows * size + pos).ravel()] = sorted_ids.ravel()
    col_of = np.empty((n, width), dtype=np.int32)
    col_of.ravel()[(rows * width + source_col).ravel()] = pos.ravel()
    return union, counts, col_of


def to_union(tempered: Sequence[TemperedRows], vocab_size: int) -> UnionBlock:
    """Put tempered teachers on their union support, imputing missing ids from each teacher's
    tail (see the module docstring); every teacher's row still sums to 1 over union + tail.

    Built sparsely: fill each row with the imputed value, scatter the teacher's own k probs.
    Σ p log p comes from the k + 2 distinct values; the log stack is left to the operators
    that need it.
    """
    union, counts, cols = union_support([t.ids for t in tempered], vocab_size)
    n, size = union.shape
    pad = np.arange(size) >= counts[:, None]
    probs = np.empty((len(tempered), n, size + 1))
    plogp = np.empty((len(tempered), n))
    row_base = np.arange(n, dtype=np.intp)[:, None] * (size + 1)
    start = 0
    for j, t in enumerate(tempered):
        log_v, log_tail = _impute(t, counts, vocab_size)
        v, tail, own = np.exp(log_v), np.exp(log_tail), t.probs
        out = probs[j]
        out[:, :size] = v[:, None]
        np.copyto(out[:, :size], 0.0, where=pad)
        out[:, size] = tail
        stop = start + t.ids.shape[1]
        out.ravel()[(row_base + cols[:, start:stop]).ravel()] = own.ravel()
        start = stop
        missing = counts - t.ids.shape[1]
        plogp[j] = (
            xlogx(own, t.logprobs).sum(axis=1) + missing * xlogx(v, log_v) + xlogx(tail, log_tail)
        )
    return UnionBlock(union, counts, Stack(probs, plogp=plogp))


def _impute(t: TemperedRows, counts: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """log v (mass per union id the teacher lacks) and its log tail after giving that away."""
    n_free = vocab_size - t.ids.shape[1]
    if n_free <= 0:
        return np.full(counts.shape, -np.inf), t.tail_logmass
    log_t = t.tail_logmass
    log_v = np.minimum(log_t - np.log(n_free), t.logprobs.min(axis=1))
    missing = counts - t.ids.shape[1]
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = np.where(np.isfinite(log_t), missing * np.exp(log_v - log_t), 0.0)
    with np.errstate(divide="ignore"):
        return log_v, log_t + np.log1p(-np.minimum(ratio, 1.0))


def top_k(q: np.ndarray, ids: np.ndarray, k_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k_out`` largest entries of ``q [N,U]`` with their ``ids``, in descending float32
    order (ties: smaller column first); padded with id −1 / prob 0, and ids of zero mass → −1.

    One sort of packed (float32 bits, column) int64 keys — far faster than argpartition."""
    n, size = q.shape
    out_ids = np.full((n, k_out), -1, dtype=np.int32)
    out_probs = np.zeros((n, k_out), dtype=np.float64)
    m = min(k_out, size)
    if m == 0 or n == 0:
        return out_ids, out_probs
    shift = max(1, (size - 1).bit_length())
    bits = (q.astype(np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    keys = (bits << shift) | (size - 1 - np.arange(size, dtype=np.int64))
    keys.sort(axis=1)
    cols = size - 1 - (keys[:, : -m - 1 : -1] & ((1 << shift) - 1))
    cols += np.arange(n, dtype=np.int64)[:, None] * size  # flat indices into q and ids
    out_probs[:, :m] = q.ravel()[cols]
    out_ids[:, :m] = np.where(out_probs[:, :m] > 0, ids.ravel()[cols], -1)
    return out_ids, out_probs


def _weights_per_row(
    weights: np.ndarray | Sequence[float] | WeightPolicy,
    teachers: Sequence[TeacherRows],
    temperatures: np.ndarray,
    tail_model: TailModel,
    vocab_size: int,
    block_rows: int,
) -> np.ndarray:
    """Validated ``[N,K]`` weights; a policy gets each teacher's tempered entropy and T=1
    target log-prob."""
    n, n_teachers = teachers[0].n, len(teachers)
    if callable(weights):
        ent = np.empty((n, n_teachers))
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            for j, (rows, temp) in enumerate(zip(teachers, temperatures, strict=True)):
                ent[start:stop, j] = temper(
                    rows.rows(start, stop), temp, tail_model, vocab_size
                ).entropy()
        targets = [t.target_logprob for t in teachers]
        target = None if any(x is None for x in targets) else np.stack(targets, axis=1)
        weights = weights(WeightInputs(entropy=ent, target_logprob=target))
    w = validate_weights(weights, n_teachers, n_rows=n)
    return np.broadcast_to(w, (n, n_teachers))


def _check_teachers(teachers: Sequence[TeacherRows], vocab_size: int) -> None:
    if not teachers:
        raise ValueError("fuse needs at least one teacher")
    n = teachers[0].n
    for j, t in enumerate(teachers):
        if t.n != n:
            raise ValueError(f"teacher {j} has {t.n} rows, teacher 0 has {n}")
        if t.k > vocab_size:
            raise ValueError(f"teacher {j} has k={t.k} > vocab_size={vocab_size}")
        if t.n and t.k and (int(t.ids.min()) < 0 or int(t.ids.max()) >= vocab_size):
            raise ValueError(f"teacher {j} has ids outside [0, {vocab_size})")


def fuse(
    teachers: Sequence[TeacherRows],
    weights: np.ndarray | Sequence[float] | WeightPolicy,
    temperatures: float | Sequence[float],
    operator: str | Operator,
    tail_model: str | TailModel,
    k_out: int,
    vocab_size: int,
    keep_teacher_blocks: bool = False,
    *,
    block_rows: int = 4096,
) -> dict[str, np.ndarray]:
    """Fuse a block of N positions from K teachers into sparse targets.

    ``weights``: static ``[K]``, per-row ``[N,K]`` or a ``WeightPolicy``; ``temperatures``: one
    per teacher (or a scalar); ``operator`` / ``tail_model``: registry names or instances.
    Returns ``ids [N,k_out]`` int32 (−1 padded), ``probs [N,k_out]``, ``tail_mass [N]`` (1 − Σ
    probs: q's tail bucket plus its mass on union ids beyond k_out), ``weights [N,K]``,
    ``jensen_gap``, ``disagreement``, ``n_eff``, ``tail_bucket`` (q's tail category) — all
    float32 — and, with ``keep_teacher_blocks``, ``teacher{j}_ids/_probs/_tail_mass``: teacher
    j's tempered distribution on its own top-k + tail (for the L_multi objective).
    Rows are processed ``block_rows`` at a time to bound memory.
    """
    _check_teachers(teachers, vocab_size)
    if k_out < 1:
        raise ValueError(f"k_out must be >= 1, got {k_out}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    temps = validate_temperatures(temperatures, len(teachers))
    op = get_operator(operator)
    model = get_tail_model(tail_model)
    w = _weights_per_row(weights, teachers, temps, model, vocab_size, block_rows)
    n = teachers[0].n
    out: dict[str, np.ndarray] = {
        "ids": np.empty((n, k_out), np.int32),
        "probs": np.empty((n, k_out), np.float32),
        "tail_mass": np.empty(n, np.float32),
        "weights": w.astype(np.float32),
        "jensen_gap": np.empty(n, np.float32),
        "disagreement": np.empty(n, np.float32),
        "n_eff": effective_teachers(w).astype(np.float32),
        "tail_bucket": np.empty(n, np.float32),
    }
    if keep_teacher_blocks:
        for j, t in enumerate(teachers):
            out[f"teacher{j}_ids"] = np.asarray(t.ids, dtype=np.int32)
            out[f"teacher{j}_probs"] = np.empty((n, t.k), np.float32)
            out[f"teacher{j}_tail_mass"] = np.empty(n, np.float32)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        tempered = [
            temper(t.rows(start, stop), temp, model, vocab_size)
            for t, temp in zip(teachers, temps, strict=True)
        ]
        block = to_union(tempered, vocab_size)
        ws = w[start:stop]
        q = op(block.stack, ws)
        size = block.ids.shape[1]
        ids, probs = top_k(q[:, :size], block.ids, k_out)
        probs32 = probs.astype(np.float32)
        out["ids"][start:stop] = ids
        out["probs"][start:stop] = probs32
        out["tail_mass"][start:stop] = np.maximum(1.0 - probs32.sum(axis=1, dtype=np.float64), 0)
        out["tail_bucket"][start:stop] = q[:, size]
        out["jensen_gap"][start:stop] = jensen_gap(block.stack, ws, q)
        out["disagreement"][start:stop] = disagreement(block.stack)
        if keep_teacher_blocks:
            for j, t in enumerate(tempered):
                out[f"teacher{j}_probs"][start:stop] = t.probs
                out[f"teacher{j}_tail_mass"][start:stop] = t.tail_mass
    return out
