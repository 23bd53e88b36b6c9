"""Fuse K teachers' sparse rows into one sparse target per position: the entry point of the
aggregation maths (``mtkd aggregate`` calls it once per part; it works block by block).

Steps per block of rows: temper each teacher (``tempering``) → weights per row (``weights``)
→ union of the teachers' top-k ids, with each teacher's mass on ids outside its own top-k
imputed from its tail (``to_union`` / ``impute_logs``) → operator (``operators``) over union
ids + tail bucket → diagnostics → the fused top-k_out. Two backends compute the same thing:
``numpy`` (dense [K, N, U+1] stacks; the reference) and ``numba`` (fused per-row kernels, no
dense stack; several times faster) — see the comment above the kernels and docs/MATHS.md.

Imputation. For an id in another teacher's top-k but not in teacher B's, B's probability is
unknown but at most B's k-th (tempered) probability. By default we give it B's per-id share of
its tempered tail, v = min(t_B/(V − k_B), p_B,(k)) — the even spread over B's V − k_B unseen
ids, capped at its k-th prob — and take it out of B's tail: t_B ← t_B − m·v for the m union ids
B lacks. Since m ≤ V − k_B, the tail stays ≥ 0 and B's mass over union ∪ tail still sums to 1.
The even share is conservative (an id another teacher ranks highly is likely among B's next
ranks, so its true prob is often nearer the cap); ``imputation="rank"`` gives it the mean of
B's next m ranks under a Zipf fit instead (measured closer to the truth; not continuous in the
union). Geometric pooling is the operator most sensitive to the choice.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from mtkd.distill.aggregate.diagnostics import disagreement, effective_teachers, jensen_gap
from mtkd.distill.aggregate.operators import (
    Geometric,
    Linear,
    Operator,
    PowerMean,
    Stack,
    get_operator,
    xlogx,
)
from mtkd.distill.aggregate.tails import TailModel, Zipf, get_tail_model, logsumexp
from mtkd.distill.aggregate.tempering import TeacherRows, TemperedRows, as_float64, temper
from mtkd.distill.aggregate.weights import (
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


def to_union(
    tempered: Sequence[TemperedRows],
    vocab_size: int,
    *,
    with_logs: bool = False,
    rank_exponents: Sequence[np.ndarray] | None = None,
) -> UnionBlock:
    """Put tempered teachers on their union support, imputing missing ids from each teacher's
    tail (see the module docstring); every teacher's row still sums to 1 over union + tail.

    Built sparsely: fill each row with the imputed value, scatter the teacher's own k probs.
    Σ p log p comes from the k + 2 distinct values. ``with_logs`` also fills the log stack from
    the tempered log-probs (exact, no log of the probs); otherwise operators that need it take
    the log of the probs. ``rank_exponents`` (one ``[N]`` per teacher: b/T of its Zipf fit)
    selects rank-based imputation instead of the even share.
    """
    union, counts, cols = union_support([t.ids for t in tempered], vocab_size)
    n, size = union.shape
    pad = np.arange(size) >= counts[:, None]
    probs = np.empty((len(tempered), n, size + 1))
    logs = np.empty_like(probs) if with_logs else None
    plogp = np.empty((len(tempered), n))
    row_base = np.arange(n, dtype=np.intp)[:, None] * (size + 1)
    start = 0
    for j, t in enumerate(tempered):
        exps = None if rank_exponents is None else rank_exponents[j]
        imp = impute(t, counts, vocab_size, exps)
        stop = start + t.ids.shape[1]
        flat = (row_base + cols[:, start:stop]).ravel()
        for out, fill, tail, own, empty in (
            (probs[j], imp.v, imp.tail, t.probs, 0.0),
            *(((logs[j], imp.log_v, imp.log_tail, t.logprobs, -np.inf),) if with_logs else ()),
        ):
            out[:, :size] = fill[:, None]
            np.copyto(out[:, :size], empty, where=pad)
            out[:, size] = tail
            out.ravel()[flat] = own.ravel()
        start = stop
        plogp[j] = imp.plogp(t, counts)
    return UnionBlock(union, counts, Stack(probs, logs, plogp))


@dataclass(frozen=True)
class Imputed:
    """One teacher's imputation on a block: per row ``v`` (mass of each union id it lacks) and
    ``tail`` (its tail after giving that away), with their logs; all ``[N]`` float64."""

    v: np.ndarray
    log_v: np.ndarray
    tail: np.ndarray
    log_tail: np.ndarray

    def plogp(self, t: TemperedRows, counts: np.ndarray) -> np.ndarray:
        """Σ p log p of the teacher on union + tail (its own k, the imputed ids, the tail)."""
        missing = counts - t.ids.shape[1]
        return (
            t.plogp_topk() + missing * xlogx(self.v, self.log_v) + xlogx(self.tail, self.log_tail)
        )


IMPUTATIONS = ("even", "rank")


def log_rank_share(s: np.ndarray, k: np.ndarray | int, missing: np.ndarray, vocab_size: int
                   ) -> np.ndarray:
    """log of the share of a power-law tail ρ^{−s} over ranks k+1..V held by its first
    ``missing`` ranks k+1..k+m, both sums taken as the midpoint integrals ∫ x^{−s} dx over
    [k+½, k+m+½] and [k+½, V+½] (so the share is ≤ 1; accurate to ~s²/(24k²) for k ≥ 16).

    ∫_lo^hi x^{−s} dx = lo^{1−s}·Δ·φ((1−s)Δ), Δ = log(hi/lo), φ(z) = expm1(z)/z.
    """
    s = np.asarray(s, dtype=np.float64)
    lo = np.asarray(k, dtype=np.float64) + 0.5
    d_m = np.log1p(np.maximum(missing, 0) / lo)
    d_v = np.log((vocab_size + 0.5) / lo)

    def log_int(delta: np.ndarray) -> np.ndarray:
        z = (1.0 - s) * delta
        small = np.abs(z) < 1e-10
        z_safe = np.where(small, 1.0, z)
        with np.errstate(divide="ignore"):
            phi = np.where(small, 1.0 + 0.5 * z, np.expm1(z_safe) / z_safe)
            return np.log(delta) + np.log(phi)

    return np.minimum(log_int(d_m) - log_int(d_v), 0.0)


def impute_logs(
    log_t: np.ndarray,
    log_pmin: np.ndarray,
    missing: np.ndarray,
    k: np.ndarray | int,
    vocab_size: int,
    rank_exponent: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(log v, log t') for teachers with tempered tail log-mass ``log_t``, k-th tempered
    log-prob ``log_pmin`` and ``missing`` union ids outside their top-``k`` (any broadcastable
    shapes, e.g. ``[N]`` or ``[N,K]``).

    Even share (``rank_exponent`` None): v = min(t/(V − k), p_(k)). Rank-based: the missing ids
    take the teacher's next ranks k+1..k+m of a power-law tail ρ^{−s} (s = b/T from the Zipf fit
    of its top-k), each the mean of those ranks' share of t, capped at p_(k):
    v = min(t·share_m/m, p_(k)). Either way m·v ≤ t, and t' = t − m·v ≥ 0, computed as
    log t + log1p(−min(m·v/t, 1)).
    """
    n_free = vocab_size - np.asarray(k)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_free = np.log(np.maximum(n_free, 1))
        if rank_exponent is None:
            log_v = np.minimum(log_t - log_free, log_pmin)
        else:
            m = np.maximum(missing, 1)
            share = log_rank_share(rank_exponent, k, m, vocab_size)
            log_v = np.minimum(log_t + share - np.log(m), log_pmin)
        log_v = np.where(n_free > 0, log_v, -np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = np.where(np.isfinite(log_t), missing * np.exp(log_v - log_t), 0.0)
    with np.errstate(divide="ignore"):
        return log_v, log_t + np.log1p(-np.minimum(ratio, 1.0))


def impute(
    t: TemperedRows, counts: np.ndarray, vocab_size: int, rank_exponent: np.ndarray | None = None
) -> Imputed:
    """Imputation of the ids a teacher lacks on a union of ``counts [N]`` ids per row
    (see :func:`impute_logs`; ``rank_exponent [N]`` selects the rank-based variant)."""
    k = t.ids.shape[1]
    if k == 0:
        log_v, log_tail = np.full(counts.shape, -np.inf), t.tail_logmass
    else:
        log_v, log_tail = impute_logs(t.tail_logmass, t.logprobs.min(axis=1), counts - k, k,
                                      vocab_size, rank_exponent)
    return Imputed(np.exp(log_v), log_v, np.exp(log_tail), log_tail)


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


def add_label_entry(
    ids: np.ndarray, probs: np.ndarray, tail_mass: np.ndarray, labels: np.ndarray,
    label_probs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the actual next token out of the tail: one more column per row.

    Where the label is not in a row's support, column ``k`` holds it with its exact target
    probability (e.g. Σ_k w_k p_k(y) for a linear mixture at T = 1: every teacher store holds
    p_k(y)), taken out of the tail bucket; elsewhere it is padding (id −1, prob 0). The target
    is still the same distribution, on a finer partition: forward KL to it is closer to the
    full-vocabulary KL, at the cost of one stored entry, on exactly the token held-out
    cross-entropy scores. ``label_probs`` above the tail (imputation rounding) are capped.
    """
    n, k = ids.shape
    outside = ~(ids == labels[:, None]).any(axis=1) & (label_probs > 0)
    share = np.where(outside, np.minimum(label_probs, tail_mass), 0.0)
    out_ids = np.full((n, k + 1), -1, dtype=ids.dtype)
    out_ids[:, :k] = ids
    out_ids[outside, k] = labels[outside]
    out_probs = np.zeros((n, k + 1), dtype=probs.dtype)
    out_probs[:, :k] = probs
    out_probs[:, k] = share
    return out_ids, out_probs, np.maximum(tail_mass - share, 0.0).astype(tail_mass.dtype)


# --------------------------------------------------------------------------- fuse


BACKENDS = ("numpy", "numba")


def default_backend() -> str:
    """The backend ``fuse`` uses unless told: "numba" when numba is importable and the
    environment variable ``MTKD_NUMBA`` is not 0/false/no/off, else "numpy"."""
    if os.environ.get("MTKD_NUMBA", "1").strip().lower() in ("0", "false", "no", "off"):
        return "numpy"
    return "numba" if importlib.util.find_spec("numba") is not None else "numpy"


def _check_teachers(teachers: Sequence[TeacherRows], vocab_size: int, ids: bool = True) -> None:
    """Refuse teachers that cannot be fused (``ids``: also scan the ids' range)."""
    check_same_rows(teachers, "teacher")
    for j, t in enumerate(teachers):
        if t.k > vocab_size:
            raise ValueError(f"teacher {j} has k={t.k} > vocab_size={vocab_size}")
        if ids and t.n and t.k and (int(t.ids.min()) < 0 or int(t.ids.max()) >= vocab_size):
            _bad_ids(j, vocab_size)


def check_same_rows(teachers: Sequence[Any], kind: str) -> None:
    """Refuse an empty list, or teachers (anything with ``.n`` rows) of unequal row counts."""
    if not teachers:
        raise ValueError(f"need at least one {kind}")
    n = teachers[0].n
    for j, t in enumerate(teachers):
        if t.n != n:
            raise ValueError(f"{kind} {j} has {t.n} rows, {kind} 0 has {n}")


def _bad_ids(teacher: int, vocab_size: int) -> None:
    raise ValueError(f"teacher {teacher} has ids outside [0, {vocab_size})")


@dataclass
class BlockResult:
    """One block's ``tail_bucket``, ``jensen_gap`` and ``disagreement``, and each teacher's
    tempered top-k probs and tail (for teacher blocks; its ids and probs go straight to the
    output)."""

    tail_bucket: np.ndarray
    jensen_gap: np.ndarray
    disagreement: np.ndarray
    teacher_probs: list[np.ndarray]
    teacher_tails: list[np.ndarray]


def fused_rows(weights: np.ndarray, k_out: int) -> dict[str, np.ndarray]:
    """The fused target's arrays for ``weights [N,K]`` rows, to be filled (the weights and
    ``n_eff`` are set; ``tail_bucket`` starts at 0)."""
    n = weights.shape[0]
    return {
        "ids": np.empty((n, k_out), np.int32),
        "probs": np.empty((n, k_out), np.float32),
        "tail_mass": np.empty(n, np.float32),
        "weights": weights.astype(np.float32),
        "jensen_gap": np.empty(n, np.float32),
        "disagreement": np.empty(n, np.float32),
        "n_eff": effective_teachers(weights).astype(np.float32),
        "tail_bucket": np.zeros(n, np.float32),
    }


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
    imputation: str = "even",
    backend: str | None = None,
) -> dict[str, np.ndarray]:
    """Fuse a block of N positions from K teachers into sparse targets.

    ``weights``: static ``[K]``, per-row ``[N,K]`` or a ``WeightPolicy``; ``temperatures``: one
    per teacher (or a scalar); ``operator`` / ``tail_model``: registry names or instances.
    Returns ``ids [N,k_out]`` int32 (−1 padded), ``probs [N,k_out]``, ``tail_mass [N]`` (1 − Σ
    probs: q's tail bucket plus its mass on union ids beyond k_out), ``weights [N,K]``,
    ``jensen_gap``, ``disagreement``, ``n_eff``, ``tail_bucket`` (q's tail category) — all
    float32 — and, with ``keep_teacher_blocks``, ``teacher{j}_ids/_probs/_tail_mass``: teacher
    j's tempered distribution on its own top-k + tail (for the L_multi objective).

    Rows are processed ``block_rows`` at a time to bound memory. ``imputation``: "even" (a
    teacher's mass on a union id it lacks is an even share of its tail) or "rank" (the id takes
    the teacher's next ranks under a Zipf fit); see :func:`impute_logs`. ``backend``: "numba"
    (fused per-row kernels) or "numpy" (dense union stacks), default :func:`default_backend`;
    both give the same targets up to float rounding (float32 ties go to the smaller id).
    Top-k log-probs must be in descending order per row, as harvested.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    # the numba union kernel checks the range of int32 ids as it goes
    scan = backend == "numpy" or any(np.asarray(t.ids).dtype != np.int32 for t in teachers)
    _check_teachers(teachers, vocab_size, ids=scan)
    if k_out < 1:
        raise ValueError(f"k_out must be >= 1, got {k_out}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if imputation not in IMPUTATIONS:
        raise ValueError(f"unknown imputation {imputation!r}; choose one of {list(IMPUTATIONS)}")
    temps = validate_temperatures(temperatures, len(teachers))
    op = get_operator(operator)
    model = get_tail_model(tail_model)
    n, n_teachers = teachers[0].n, len(teachers)
    engine_cls = _NumbaEngine if backend == "numba" else _NumpyEngine
    engine = engine_cls(teachers, temps, model, vocab_size, imputation == "rank")
    cache = None
    if callable(weights):
        inputs, cache = engine.policy_inputs(block_rows)
        weights = weights(inputs)
    w = np.broadcast_to(validate_weights(weights, n_teachers, n_rows=n), (n, n_teachers))
    out = fused_rows(w, k_out)
    if keep_teacher_blocks:
        for j, t in enumerate(teachers):
            out[f"teacher{j}_ids"] = np.asarray(t.ids, dtype=np.int32)
            out[f"teacher{j}_probs"] = np.empty((n, t.k), np.float32)
            out[f"teacher{j}_tail_mass"] = np.empty(n, np.float32)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        norm = None if cache is None else tuple(a[start:stop] for a in cache)
        res = engine.block(start, stop, np.array(w[start:stop]), op, norm, keep_teacher_blocks,
                           out["ids"][start:stop], out["probs"][start:stop],
                           out["tail_mass"][start:stop])
        out["tail_bucket"][start:stop] = res.tail_bucket
        out["jensen_gap"][start:stop] = res.jensen_gap
        out["disagreement"][start:stop] = res.disagreement
        if keep_teacher_blocks:
            for j in range(n_teachers):
                out[f"teacher{j}_probs"][start:stop] = res.teacher_probs[j]
                out[f"teacher{j}_tail_mass"][start:stop] = res.teacher_tails[j]
    return out


class _NumpyEngine:
    """The numpy backend: ``temper`` per teacher, the dense union stack, the operator."""

    def __init__(self, teachers: Sequence[TeacherRows], temps: np.ndarray, model: TailModel,
                 vocab_size: int, rank: bool) -> None:
        self.teachers, self.temps, self.model = teachers, temps, model
        self.vocab_size, self.rank = vocab_size, rank

    def _temper(self, start: int, stop: int, norm: tuple[np.ndarray, ...] | None
                ) -> list[TemperedRows]:
        return [
            temper(t.rows(start, stop), temp, self.model, self.vocab_size,
                   normaliser=None if norm is None else (norm[0][:, j], norm[1][:, j]))
            for j, (t, temp) in enumerate(zip(self.teachers, self.temps, strict=True))
        ]

    def policy_inputs(self, block_rows: int) -> tuple[WeightInputs, tuple[np.ndarray, ...]]:
        """What a weight policy sees (each teacher's tempered entropy, T=1 target log-prob),
        plus each teacher's log Z_T and tempered tail, kept so the fusion pass tempers again
        without the tail model or a second normalisation."""
        n, n_teachers = self.teachers[0].n, len(self.teachers)
        ent, log_z, log_tail = (np.empty((n, n_teachers)) for _ in range(3))
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            for j, t in enumerate(self._temper(start, stop, None)):
                ent[start:stop, j] = t.entropy()
                log_z[start:stop, j] = t.log_norm
                log_tail[start:stop, j] = t.tail_logmass
        return _weight_inputs(self.teachers, ent), (log_z, log_tail)

    def block(self, start: int, stop: int, ws: np.ndarray, op: Operator,
              norm: tuple[np.ndarray, ...] | None, keep: bool, ids_out: np.ndarray,
              probs_out: np.ndarray, tail_out: np.ndarray) -> BlockResult:
        """Fuse rows ``start:stop`` with weights ``ws [n,K]``; top-k into ``ids_out`` /
        ``probs_out [n,k_out]``, 1 − Σ probs into ``tail_out [n]``."""
        tempered = self._temper(start, stop, norm)
        exps = None
        if self.rank:
            exps = [_rank_exponent(t.rows(start, stop).logprobs, temp)
                    for t, temp in zip(self.teachers, self.temps, strict=True)]
        block = to_union(tempered, self.vocab_size, with_logs=not isinstance(op, Linear),
                         rank_exponents=exps)
        q = op(block.stack, ws)
        size = block.ids.shape[1]
        ids, probs = top_k(q[:, :size], block.ids, ids_out.shape[1])
        probs_out[:] = probs
        ids_out[:] = np.where(probs_out > 0, ids, -1)
        tail_out[:] = np.maximum(1.0 - probs_out.sum(axis=1, dtype=np.float64), 0)
        return BlockResult(
            q[:, size],
            jensen_gap(block.stack, ws, q),
            disagreement(block.stack),
            [t.probs for t in tempered],
            [t.tail_mass for t in tempered],
        )


def _weight_inputs(teachers: Sequence[TeacherRows], entropy: np.ndarray) -> WeightInputs:
    targets = [t.target_logprob for t in teachers]
    target = None if any(x is None for x in targets) else np.stack(targets, axis=1)
    return WeightInputs(entropy=entropy, target_logprob=target)


def _rank_exponent(logprobs: np.ndarray, temperature: float) -> np.ndarray:
    """s = b/T: the tempered tail's power-law exponent from the Zipf fit of the T=1 top-k."""
    return Zipf().exponent(as_float64(logprobs)) / temperature


# --------------------------------------------------------------------------- numba backend
#
# The numba backend never builds the dense [K, N, U+1] stack for the built-in operators.
# Per block:
# 1. tempered probs: for float16 inputs (the stored dtype) none are materialised: kernels look
#    up e = exp(l/T) in a table over the 65536 float16 bit patterns (one per temperature) and
#    scale it by 1/Z_T per (row, teacher); other dtypes get l/T − log Z_T from a kernel and one
#    numpy exp over the block;
# 2. a kernel unions the ids with a stamp array over the vocabulary (O(Σk), no sort);
# 3. numpy computes the imputation per (row, teacher) (``impute_logs``, shared with numpy);
# 4. a kernel fills a small per-row scratch with each teacher's values on the union and
#    accumulates Σ p log p, the disagreement and the operator (linear q, or the geometric
#    log-pool; other operators get the dense stack and run in numpy);
# 5. numpy normalises (geometric) and takes log q; a kernel writes packed top-k sort keys and
#    the Jensen gap; numpy sorts the keys; a kernel decodes them.
# Bulk exp/log stay in numpy: numba's scalar exp/log are several times slower here.

_LOW_MAX = (1 << 31) - 1  # the low 31 bits of a top-k key hold LOW_MAX − id (ties → smaller id)
_PAD_KEY = 1  # sorts after every real key (real keys are ≤ 0)
_MODE_LINEAR, _MODE_GEOMETRIC, _MODE_STACK = 0, 1, 2
# Table lookups of exp(l/T) need l_max/T well above −745 (underflow); the top log-prob of a
# distribution over V ids is ≥ −log V, so T ≥ 0.05 is safe for any V < 10^15.
_HALF_MIN_TEMPERATURE = 0.05


def _shift_kernel(
    lp: np.ndarray, inv_t: float, log_z: np.ndarray, use_log_z: bool, out: np.ndarray,
    col0: int, j: int, shift: np.ndarray, lmin: np.ndarray,
) -> None:
    """out[:, col0:col0+k] = lp·(1/T) − c per row, c = log_z[:, j] if ``use_log_z`` else
    the row max of lp/T (saved in ``shift[:, j]``); the row min of lp into ``lmin[:, j]``."""
    n, k = lp.shape
    for r in range(n):
        hi, lo = -np.inf, np.inf
        for i in range(k):
            x = lp[r, i]
            hi = max(hi, x)
            lo = min(lo, x)
        c = log_z[r, j] if use_log_z else (hi * inv_t if hi > -np.inf else 0.0)
        for i in range(k):
            out[r, col0 + i] = lp[r, i] * inv_t - c
        shift[r, j] = c
        lmin[r, j] = lo


def _sums_kernel(e: np.ndarray, d: np.ndarray, starts: np.ndarray, s_out: np.ndarray,
                 sd_out: np.ndarray) -> None:
    """Per row and teacher: Σ e and Σ e·d over the teacher's columns."""
    n = e.shape[0]
    for r in range(n):
        for j in range(starts.shape[0] - 1):
            s, sd = 0.0, 0.0
            for c in range(starts[j], starts[j + 1]):
                s += e[r, c]
                if e[r, c] > 0.0:
                    sd += e[r, c] * d[r, c]
            s_out[r, j] = s
            sd_out[r, j] = sd


def _sums_kernel_h(
    bits: np.ndarray, starts: np.ndarray, tidx: np.ndarray, etab: np.ndarray, ltab: np.ndarray,
    inv_t: np.ndarray, s_out: np.ndarray, sd_out: np.ndarray, lmin: np.ndarray,
) -> None:
    """Float16 inputs: per row and teacher, Σ e and Σ e·l/T with e = exp(l/T) from the table,
    and the row min of l."""
    n = bits.shape[0]
    for r in range(n):
        for j in range(starts.shape[0] - 1):
            s, sd, lo = 0.0, 0.0, np.inf
            tab = etab[tidx[j]]
            for c in range(starts[j], starts[j + 1]):
                b = bits[r, c]
                e = tab[b]
                s += e
                if e > 0.0:
                    sd += e * ltab[b]
                lo = min(lo, ltab[b])
            s_out[r, j] = s
            sd_out[r, j] = sd * inv_t[j]
            lmin[r, j] = lo


def _union_kernel(ids: np.ndarray, mark: np.ndarray, row0: int, vocab_size: int,
                  cols: np.ndarray, union: np.ndarray, counts: np.ndarray) -> int:
    """Per row: the union of ``ids [n,W]`` in first-seen order into ``union``, its size into
    ``counts``, the union column of every input id into ``cols``. ``mark [V]`` packs, per id,
    the last (global) row that saw it (high 32 bits; rows numbered from ``row0``) and its
    column there (low 32 bits). Branch-free: the new/seen outcome is unpredictable. Returns
    r·W + c of the first id outside [0, V), or −1."""
    n, width = ids.shape
    for r in range(n):
        tag = np.int64(row0 + r) << 32
        u = 0
        for c in range(width):
            i = ids[r, c]
            if i < 0 or i >= vocab_size:
                return r * width + c
            m = mark[i]
            new = (m & ~np.int64(0xFFFFFFFF)) != tag
            m = (tag | u) if new else m
            mark[i] = m
            union[r, u] = i
            cols[r, c] = m & 0xFFFFFFFF
            u += new
        counts[r] = u
    return -1


def _combine_kernel(
    cols: np.ndarray, counts: np.ndarray, starts: np.ndarray, half: bool, p: np.ndarray,
    lp: np.ndarray, bits: np.ndarray, tidx: np.ndarray, etab: np.ndarray, ltab: np.ndarray,
    inv_t: np.ndarray, scale: np.ndarray, log_z: np.ndarray, plogp_own: np.ndarray,
    v: np.ndarray, log_v: np.ndarray, tail: np.ndarray, log_tail: np.ndarray, w: np.ndarray,
    mode: int, vals: np.ndarray, stack: np.ndarray, log_stack: np.ndarray,
    disagree: np.ndarray, plogp: np.ndarray,
) -> None:
    """Per row: each teacher on union + tail into a scratch (own probs from ``p``/``lp``, or
    for float16 inputs from ``bits``: p = etab[T][bits]·scale, log p = ltab[bits]/T − log Z);
    Σ p log p per teacher on union + tail (from its top-k part ``plogp_own``), the
    disagreement, and (mode 0) linear q or (mode 1) Σ_j w_j log x_j (geometric, unnormalised)
    into ``vals [n, umax+1]`` (tail bucket last), or (mode 2) the dense stacks."""
    n = cols.shape[0]
    n_teachers = starts.shape[0] - 1
    umax = vals.shape[1] - 1
    x = np.zeros((n_teachers, umax + 1))
    lx = np.full((n_teachers, umax + 1), -np.inf)
    n_pairs = n_teachers * (n_teachers - 1) / 2.0
    for r in range(n):
        size = counts[r]
        for j in range(n_teachers):
            vj = v[r, j]
            for u in range(size):
                x[j, u] = vj
            x[j, umax] = tail[r, j]
            if mode != _MODE_LINEAR:
                lvj = log_v[r, j]
                for u in range(size):
                    lx[j, u] = lvj
                lx[j, umax] = log_tail[r, j]
            tab = etab[tidx[j]]
            sc, lz, it = scale[r, j], log_z[r, j], inv_t[j]
            if half:
                for c in range(starts[j], starts[j + 1]):
                    x[j, cols[r, c]] = tab[bits[r, c]] * sc
            else:
                for c in range(starts[j], starts[j + 1]):
                    x[j, cols[r, c]] = p[r, c]
            if mode != _MODE_LINEAR:
                for c in range(starts[j], starts[j + 1]):
                    lx[j, cols[r, c]] = ltab[bits[r, c]] * it - lz if half else lp[r, c]
            own = plogp_own[r, j]
            missing = size - (starts[j + 1] - starts[j])
            if vj > 0.0:
                own += missing * (vj * log_v[r, j])
            if tail[r, j] > 0.0:
                own += tail[r, j] * log_tail[r, j]
            plogp[r, j] = own
        overlap = 0.0
        for a in range(n_teachers):
            for b2 in range(a + 1, n_teachers):
                s = 0.0
                for u in range(size):
                    s += min(x[a, u], x[b2, u])
                overlap += s + min(x[a, umax], x[b2, umax])
        disagree[r] = max(1.0 - overlap / n_pairs, 0.0) if n_teachers > 1 else 0.0
        if mode == _MODE_STACK:
            for j in range(n_teachers):
                for u in range(size):
                    stack[j, r, u] = x[j, u]
                    log_stack[j, r, u] = lx[j, u]
                for u in range(size, umax):
                    stack[j, r, u] = 0.0
                    log_stack[j, r, u] = -np.inf
                stack[j, r, umax] = x[j, umax]
                log_stack[j, r, umax] = lx[j, umax]
            continue
        src = x if mode == _MODE_LINEAR else lx
        pad = 0.0
        for u in range(size):
            vals[r, u] = 0.0
        vals[r, umax] = 0.0
        for j in range(n_teachers):
            wj = w[r, j]
            if wj == 0.0:
                continue
            if mode != _MODE_LINEAR:
                pad = -np.inf
            for u in range(size):
                vals[r, u] += wj * src[j, u]
            vals[r, umax] += wj * src[j, umax]
        for u in range(size, umax):
            vals[r, u] = pad


def _finish_kernel(
    q: np.ndarray, log_q: np.ndarray, cols: np.ndarray, counts: np.ndarray, starts: np.ndarray,
    half: bool, p: np.ndarray, bits: np.ndarray, tidx: np.ndarray, etab: np.ndarray,
    scale: np.ndarray, v: np.ndarray, tail: np.ndarray, w: np.ndarray, plogp: np.ndarray,
    union: np.ndarray, linear: bool, keys: np.ndarray, gap: np.ndarray,
) -> None:
    """Per row: packed top-k sort keys of q's union columns into ``keys [n,umax]`` (ascending
    order = descending float32 q, then ascending id) and the Jensen gap Σ_j w_j KL(x_j‖q):
    for linear q, Σ_j w_j Σ x_j log x_j − Σ q log q; otherwise Σ_u x_j(u) log q(u) =
    v_j·(Σ_U log q − Σ_own log q) + Σ_own p log q + t_j log q_tail where q > 0 on the union
    (else term by term, +inf where q = 0 < x_j)."""
    n = cols.shape[0]
    n_teachers = starts.shape[0] - 1
    umax = q.shape[1] - 1
    x = np.empty(umax + 1)
    fbuf = np.zeros(max(umax, 1), np.float32)
    ibuf = fbuf.view(np.int32)
    zero32 = np.float32(0.0)
    for r in range(n):
        size = counts[r]
        for u in range(size):
            fbuf[u] = np.float32(q[r, u]) + zero32
        for u in range(size):
            keys[r, u] = -((np.int64(ibuf[u]) << 32) | (_LOW_MAX - np.int64(union[r, u])))
        for u in range(size, umax):
            keys[r, u] = _PAD_KEY
        if linear:
            total = 0.0
            for j in range(n_teachers):
                if w[r, j] > 0.0:
                    total += w[r, j] * plogp[r, j]
            for u in range(size):
                if q[r, u] > 0.0:
                    total -= q[r, u] * log_q[r, u]
            if q[r, umax] > 0.0:
                total -= q[r, umax] * log_q[r, umax]
            gap[r] = total
            continue
        sum_log = 0.0
        positive = True
        for u in range(size):
            if q[r, u] > 0.0:
                sum_log += log_q[r, u]
            else:
                positive = False
        total = 0.0
        for j in range(n_teachers):
            wj = w[r, j]
            if not wj > 0.0:
                continue
            cross = 0.0
            infinite = False
            tab = etab[tidx[j]]
            sc = scale[r, j]
            vj = v[r, j]
            if not positive:
                for u in range(size):
                    x[u] = vj
            own_log = 0.0
            for c in range(starts[j], starts[j + 1]):
                pc = tab[bits[r, c]] * sc if half else p[r, c]
                col = cols[r, c]
                if positive:
                    own_log += log_q[r, col]
                    cross += pc * log_q[r, col]
                else:
                    x[col] = pc
            if positive:
                if vj > 0.0:
                    cross += vj * (sum_log - own_log)
            else:
                for u in range(size):
                    if x[u] > 0.0:
                        if q[r, u] <= 0.0:
                            infinite = True
                            break
                        cross += x[u] * log_q[r, u]
            t = tail[r, j]
            if t > 0.0:
                if q[r, umax] <= 0.0:
                    infinite = True
                else:
                    cross += t * log_q[r, umax]
            total += wj * (np.inf if infinite else plogp[r, j] - cross)
        gap[r] = total


def _decode_kernel(keys: np.ndarray, ids: np.ndarray, probs: np.ndarray,
                   tail_mass: np.ndarray) -> None:
    """The first ``k_out`` sorted keys of each row as ids and float32 probs, padded with −1 / 0
    (keys of zero mass are padding), and tail_mass = max(1 − Σ probs, 0) in float64."""
    n, umax = keys.shape
    k_out = ids.shape[1]
    ibuf = np.zeros(1, np.int32)
    fbuf = ibuf.view(np.float32)
    for r in range(n):
        total = 0.0
        c = 0
        while c < min(k_out, umax):
            key = keys[r, c]
            if key > 0:
                break
            neg = -key
            ibuf[0] = np.int32(neg >> 32)
            if not fbuf[0] > 0.0:
                break
            probs[r, c] = fbuf[0]
            ids[r, c] = np.int32(_LOW_MAX - (neg & 0xFFFFFFFF))
            total += np.float64(fbuf[0])
            c += 1
        for c2 in range(c, k_out):
            probs[r, c2] = 0.0
            ids[r, c2] = -1
        tail_mass[r] = max(1.0 - total, 0.0)


_KERNELS: SimpleNamespace | None = None


def _kernels() -> SimpleNamespace:
    """The jitted kernels (compiled on first use, cached on disk by numba)."""
    global _KERNELS
    if _KERNELS is None:
        import numba

        jit = numba.njit(cache=True, nogil=True, error_model="numpy")
        # Reassociation lets LLVM vectorise the sums (several accumulators instead of one
        # dependency chain); no nnan/ninf: the kernels see −inf log-probs.
        fast = numba.njit(cache=True, nogil=True, error_model="numpy",
                          fastmath={"reassoc", "nsz", "arcp", "contract"})
        _KERNELS = SimpleNamespace(
            shift=jit(_shift_kernel), sums=fast(_sums_kernel), sums_h=fast(_sums_kernel_h),
            union=jit(_union_kernel), combine=fast(_combine_kernel),
            finish=fast(_finish_kernel), decode=jit(_decode_kernel),
        )
    return _KERNELS


_F16_VALUES: np.ndarray | None = None


def _f16_values() -> np.ndarray:
    """float64 value of every float16 bit pattern."""
    global _F16_VALUES
    if _F16_VALUES is None:
        _F16_VALUES = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    return _F16_VALUES


class _Workspace:
    """Buffers reused from block to block. Fresh multi-megabyte temporaries per block cost more
    than the kernels themselves here: glibc returns them to the OS and every block pays the
    page faults again."""

    def __init__(self) -> None:
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
        """A C-contiguous array of ``shape`` (contents undefined), valid until the next
        ``get`` of the same name."""
        size = int(np.prod(shape))
        buf = self.bufs.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self.bufs[name] = np.empty(max(size, 1), dtype)
        return buf[:size].reshape(shape)


class _NumbaEngine:
    """The numba backend (see the comment above the kernels)."""

    def __init__(self, teachers: Sequence[TeacherRows], temps: np.ndarray, model: TailModel,
                 vocab_size: int, rank: bool) -> None:
        self.kern = _kernels()
        self.teachers, self.temps, self.model = teachers, temps, model
        self.vocab_size, self.rank = vocab_size, rank
        n_teachers = len(teachers)
        self.ks = np.array([t.k for t in teachers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.ks)]).astype(np.int64)
        self.inv_t = 1.0 / temps
        self.mark = np.full(vocab_size, -1, dtype=np.int64)
        self.rows_seen = 0
        self.half = bool(
            all(np.asarray(t.logprobs).dtype == np.float16 for t in teachers)
            and temps.min() >= _HALF_MIN_TEMPERATURE
        )
        self.ltab = _f16_values() if self.half else np.zeros(1)
        uniq = sorted(set(temps.tolist()))
        self.tidx = np.array([uniq.index(t) for t in temps.tolist()], dtype=np.int64)
        if self.half:
            with np.errstate(over="ignore", invalid="ignore"):
                self.etab = np.exp(self.ltab[None, :] / np.array(uniq)[:, None])
        else:
            self.etab = np.zeros((1, 1))
            self.tidx = np.zeros(n_teachers, dtype=np.int64)
        self.dummy2 = np.zeros((1, 1))
        self.dummy_bits = np.zeros((1, 1), np.uint16)
        self.work = _Workspace()

    def _bits(self, start: int, stop: int) -> np.ndarray:
        """The float16 log-probs' bits side by side, ``[n, Σk]`` uint16."""
        out = self.work.get("bits", (stop - start, int(self.starts[-1])), np.uint16)
        for j, t in enumerate(self.teachers):
            out[:, self.starts[j]:self.starts[j + 1]] = t.logprobs[start:stop].view(np.uint16)
        return out

    def _shifted(self, start: int, stop: int, log_z: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[n, Σk] of l/T − c side by side (c = log Z_T if given, else the row max of l/T),
        with c and the row min of l, ``[n,K]`` each (non-float16 inputs)."""
        n, n_teachers = stop - start, len(self.teachers)
        out = self.work.get("shifted", (n, int(self.starts[-1])))
        shift, lmin = np.empty((n, n_teachers)), np.empty((n, n_teachers))
        use = log_z is not None
        lz = np.ascontiguousarray(log_z) if use else shift
        for j, t in enumerate(self.teachers):
            lp = t.logprobs[start:stop]
            if lp.dtype not in (np.float32, np.float64):
                lp = as_float64(lp)
            self.kern.shift(np.ascontiguousarray(lp), float(self.inv_t[j]), lz, use, out,
                            int(self.starts[j]), j, shift, lmin)
        return out, shift, lmin

    def _normalise(self, start: int, stop: int) -> tuple[np.ndarray, ...]:
        """log Z_T, the tempered tail log-mass, the row min of l, Σ_topk p log p and the
        entropy per (row, teacher), ``[n,K]`` each."""
        n, n_teachers = stop - start, len(self.teachers)
        s, sd = np.empty((n, n_teachers)), np.empty((n, n_teachers))
        if self.half:
            lmin = np.empty((n, n_teachers))
            self.kern.sums_h(self._bits(start, stop), self.starts, self.tidx, self.etab,
                             self.ltab, self.inv_t, s, sd, lmin)
            m = np.zeros((n, n_teachers))
        else:
            d, m, lmin = self._shifted(start, stop, None)
            e = np.exp(d, out=self.work.get("exp", d.shape))
            self.kern.sums(e, d, self.starts, s, sd)
        ltu = np.empty((n, n_teachers))
        for j, (t, temp) in enumerate(zip(self.teachers, self.temps, strict=True)):
            rows = t.rows(start, stop)
            ltu[:, j] = self.model.log_tempered_tail(
                rows.logprobs, rows.tail_logmass, temp, self.vocab_size,
                rows.tempered_tail(temp),
            )
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            log_z = np.logaddexp(m + np.log(s), ltu)
            c = np.exp(m - log_z)
            # Σ_i p_i log p_i with p_i = c·e_i, log p_i = d_i + m − log Z (Σ e d = sd)
            plogp = c * sd + np.where(s > 0, c * s * (m - log_z), 0.0)
            log_tail = ltu - log_z
        ent = -(plogp + xlogx(np.exp(log_tail), log_tail))
        return log_z, log_tail, lmin, plogp, ent

    def policy_inputs(self, block_rows: int) -> tuple[WeightInputs, tuple[np.ndarray, ...]]:
        """Entropies for a weight policy, and the normaliser cache (log Z_T, tempered tail,
        row min of l, Σ_topk p log p per (row, teacher))."""
        n, n_teachers = self.teachers[0].n, len(self.teachers)
        arrays = [np.empty((n, n_teachers)) for _ in range(5)]
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            for a, b in zip(arrays, self._normalise(start, stop), strict=True):
                a[start:stop] = b
        return _weight_inputs(self.teachers, arrays[4]), tuple(arrays[:4])

    def block(self, start: int, stop: int, ws: np.ndarray, op: Operator,
              norm: tuple[np.ndarray, ...] | None, keep: bool, ids_out: np.ndarray,
              probs_out: np.ndarray, tail_out: np.ndarray) -> BlockResult:
        """Fuse rows ``start:stop`` with weights ``ws [n,K]``; top-k into ``ids_out`` /
        ``probs_out [n,k_out]``, 1 − Σ probs into ``tail_out [n]``."""
        kern, n, n_teachers = self.kern, stop - start, len(self.teachers)
        log_z, log_t, lmin, plogp_own = norm if norm is not None else self._normalise(
            start, stop)[:4]
        log_z = np.ascontiguousarray(log_z)
        if self.half:
            bits, p, lp = self._bits(start, stop), self.dummy2, self.dummy2
            scale = np.exp(-log_z)
        else:
            lp = self._shifted(start, stop, log_z)[0]
            p = np.exp(lp, out=self.work.get("exp", lp.shape))
            bits, scale = self.dummy_bits, self.dummy2
        work = self.work
        width = int(self.starts[-1])
        ids = work.get("ids", (n, width), np.int32)
        for j, t in enumerate(self.teachers):
            ids[:, self.starts[j]:self.starts[j + 1]] = t.ids[start:stop]
        cols = work.get("cols", (n, width), np.int32)
        union = work.get("union", (n, width), np.int32)
        counts = np.zeros(n, np.int32)
        bad = kern.union(ids, self.mark, self.rows_seen, self.vocab_size, cols, union, counts)
        self.rows_seen += n
        if bad >= 0:
            _bad_ids(int(np.searchsorted(self.starts, bad % width, side="right")) - 1,
                     self.vocab_size)
        umax = int(counts.max()) if n else 0
        exps = None
        if self.rank:
            exps = np.stack([_rank_exponent(t.logprobs[start:stop], temp)
                             for t, temp in zip(self.teachers, self.temps, strict=True)], axis=1)
        with np.errstate(invalid="ignore"):
            log_pmin = np.where(self.ks > 0, lmin * self.inv_t - log_z, -np.inf)
        log_v, log_tail = impute_logs(log_t, log_pmin, counts[:, None] - self.ks, self.ks,
                                      self.vocab_size, exps)
        v, tail = np.exp(log_v), np.exp(log_tail)
        mode = _operator_mode(op)
        dense = (n_teachers, n, umax + 1) if mode == _MODE_STACK else (1, 1, 1)
        stack, log_stack = work.get("stack", dense), work.get("log_stack", dense)
        plogp = np.empty((n, n_teachers))

        def combine(rows: np.ndarray | None, mode: int) -> tuple[np.ndarray, np.ndarray]:
            def sel(a: np.ndarray) -> np.ndarray:
                return a if rows is None or a.shape[0] != n else np.ascontiguousarray(a[rows])

            m = n if rows is None else len(rows)
            vals = work.get("vals", (n, umax + 1)) if rows is None else np.empty((m, umax + 1))
            disagree = np.empty(m)
            kern.combine(sel(cols), sel(counts), self.starts, self.half, sel(p), sel(lp),
                         sel(bits), self.tidx, self.etab, self.ltab, self.inv_t, sel(scale),
                         sel(log_z), sel(plogp_own), sel(v), sel(log_v), sel(tail),
                         sel(log_tail), sel(ws),
                         mode, vals, stack, log_stack, disagree,
                         plogp if rows is None else np.empty((m, n_teachers)))
            return vals, disagree

        vals, disagree = combine(None, mode)
        if mode == _MODE_LINEAR:
            q = vals
        elif mode == _MODE_GEOMETRIC:
            log_norm = logsumexp(vals)
            with np.errstate(invalid="ignore"):
                q = np.exp(vals - log_norm[:, None])
            empty = np.flatnonzero(~np.isfinite(log_norm))
            if len(empty):  # no mass left: the linear mixture (as operators._normalise_log)
                q[empty] = combine(empty, _MODE_LINEAR)[0]
        else:
            q = op(Stack(stack, log_stack, plogp.T), ws)
        with np.errstate(divide="ignore"):
            log_q = np.log(q, out=work.get("log_q", q.shape))
        keys = work.get("keys", (n, umax), np.int64)
        gap = np.empty(n)
        kern.finish(q, log_q, cols, counts, self.starts, self.half, p, bits, self.tidx,
                    self.etab, scale, v, tail, ws, plogp, union, mode == _MODE_LINEAR, keys, gap)
        keys.sort(axis=1)
        kern.decode(keys, ids_out, probs_out, tail_out)
        return BlockResult(
            q[:, umax], gap, disagree,
            [self._teacher_probs(j, p, bits, scale) for j in range(n_teachers)] if keep else [],
            list(np.exp(log_t).T),
        )

    def _teacher_probs(self, j: int, p: np.ndarray, bits: np.ndarray, scale: np.ndarray
                       ) -> np.ndarray:
        a, b = int(self.starts[j]), int(self.starts[j + 1])
        if not self.half:
            return p[:, a:b]
        return self.etab[self.tidx[j]][bits[:, a:b]] * scale[:, j, None]


def _operator_mode(op: Operator) -> int:
    if isinstance(op, Linear) or (isinstance(op, PowerMean) and op.alpha == 1.0):
        return _MODE_LINEAR
    if isinstance(op, Geometric) or (isinstance(op, PowerMean) and op.alpha == 0.0):
        return _MODE_GEOMETRIC
    return _MODE_STACK
