"""Teacher weights: validation, static weights, and adaptive weights at three scales.

Adaptive weights (Flouro & Chadwick, arXiv 2601.17910) come from signals at three scales —
token (each teacher's entropy on the row, or its probability of the actual next token), task
(a table keyed by the sequence's task tag) and context (a per-sequence feature such as each
teacher's mean loss on the sequence) — composed by product-structure normalisation

    w_k ∝ b_k · w_k^tok · w_k^task · w_k^ctx = exp(log b_k + Σ_scales log w_k^scale),

with b a static prior. Each scale is given as a log-factor ("logits", [N,K]) so products never
underflow. Then boundedness w_k ≥ ε (mixing with the uniform: w ← ε + (1 − Kε)·w) and a safety
floor (a safety teacher never drops below its floor; see ``apply_safety_floor``). Every step is
continuous (softmax-Lipschitz in the signals) and keeps rows on the simplex.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

# Tolerance on Σw = 1 for weights given by a user or returned by a policy.
SUM_TOL = 1e-6


def validate_weights(
    weights: np.ndarray | Sequence[float],
    n_teachers: int,
    *,
    n_rows: int | None = None,
    normalise: bool = False,
) -> np.ndarray:
    """Check static ``[K]`` or per-row ``[N,K]`` weights and return them as float64.

    Errors (ValueError) on a wrong shape, non-finite or negative entries, an all-zero row, or
    rows not summing to 1 within 1e-6 — unless ``normalise=True``, which rescales them.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim not in (1, 2) or w.shape[-1] != n_teachers:
        raise ValueError(
            f"weights must have shape [{n_teachers}] or [N,{n_teachers}], got {w.shape}"
        )
    if w.ndim == 2 and n_rows is not None and w.shape[0] != n_rows:
        raise ValueError(f"per-row weights have {w.shape[0]} rows, expected {n_rows}")
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite")
    if (w < 0).any():
        raise ValueError(f"weights must be >= 0, got a minimum of {w.min():g}")
    total = w.sum(axis=-1)
    if (total <= 0).any():
        raise ValueError("weights are all 0 on some row; at least one teacher needs weight > 0")
    if normalise:
        return w / total[..., None]
    worst = float(np.max(np.abs(total - 1.0)))
    if worst > SUM_TOL:
        raise ValueError(
            f"weights must sum to 1 (off by up to {worst:.3g}); pass normalise=True to rescale them"
        )
    return w


def validate_temperatures(temperatures: float | Sequence[float], n_teachers: int) -> np.ndarray:
    """One temperature per teacher (a scalar applies to all); each finite and > 0."""
    t = np.asarray(temperatures, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(n_teachers, float(t))
    if t.shape != (n_teachers,):
        raise ValueError(f"need {n_teachers} temperatures (one per teacher), got {t.shape}")
    if not (np.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"temperatures must be finite and > 0, got {t.tolist()}")
    return t


def fit_mixture_weights(
    target_logprob: np.ndarray, *, max_iter: int = 500, tol: float = 1e-10
) -> np.ndarray:
    """Maximum-likelihood static weights of a linear mixture of K teachers.

    ``target_logprob [N,K]``: each teacher's log-probability of the actual next token (every
    teacher store holds it). EM on the mixture weights only: w_k ← mean_n r_nk with
    responsibilities r_nk = w_k·p_nk / Σ_j w_j·p_nj. Each step raises the mean log-likelihood
    Σ_n log Σ_k w_k p_nk / N (the problem is concave in w), so the fitted mixture is at least as
    likely as every single teacher and as the uniform mixture; iteration stops when that gain
    drops below ``tol`` nats. Non-finite entries (a teacher giving the token probability 0)
    count as −inf, rows where every teacher does are ignored.
    """
    lp = np.asarray(target_logprob, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[1] < 1:
        raise ValueError(f"target_logprob must be [N,K], got shape {lp.shape}")
    lp = np.where(np.isfinite(lp), lp, -np.inf)
    lp = lp[np.isfinite(lp).any(axis=1)]
    k = lp.shape[1]
    if len(lp) == 0:
        raise ValueError("no position with a finite teacher log-probability to fit weights on")
    shift = lp.max(axis=1, keepdims=True)
    p = np.exp(lp - shift)  # rescaled per row: the responsibilities do not change
    w = np.full(k, 1.0 / k)
    last = -np.inf
    for _ in range(max_iter):
        mix = p @ w
        ll = float(np.mean(np.log(mix)))
        if ll - last < tol:
            break
        last = ll
        w = w * (p / mix[:, None]).mean(axis=0)
        w /= w.sum()
    return w


def check_sharpness(flag: str, value: float) -> None:
    """A scale's sharpness β is finite and ≥ 0 (β < 0 would favour the worse teachers)."""
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{flag} must be finite and >= 0 (0: uniform, larger sharpens), "
                         f"got {value:g}")


def check_eps(eps: float, n_teachers: int) -> None:
    """ε ∈ [0, 1/K]: K teachers each ≥ ε must still sum to 1."""
    if not (eps >= 0.0 and eps * n_teachers <= 1.0):
        raise ValueError(f"--eps must be in [0, 1/K] = [0, {1.0 / n_teachers:g}] with "
                         f"K = {n_teachers} teachers (each weight >= eps, all summing to 1), "
                         f"got {eps:g}; give a smaller --eps")


def check_safety_floor(floor: float, n_teachers: int, eps: float) -> None:
    """The safety floor ∈ [0, 1 − (K−1)·ε]: what the other teachers' ε-bounds leave."""
    spare = 1.0 - (n_teachers - 1) * eps
    if not 0.0 <= floor <= spare:
        raise ValueError(f"--safety-floor must be in [0, 1 − (K−1)·eps] = [0, {spare:g}] "
                         f"(the safety teacher's weight, the others keeping >= eps), "
                         f"got {floor:g}; give a floor in that range")


def entropy_logits(entropy: np.ndarray, sharpness: float) -> np.ndarray:
    """Token scale from entropy: w_k^tok ∝ exp(−β·H_k) — confident teachers count more.
    β = 0 is uniform; larger β sharpens."""
    check_sharpness("--token-sharpness", sharpness)
    return -sharpness * np.asarray(entropy, dtype=np.float64)


def target_logits(target_logprob: np.ndarray, sharpness: float) -> np.ndarray:
    """Token scale from the actual next token: w_k^tok ∝ p_k(y)^β = exp(β·log p_k(y))."""
    check_sharpness("--token-sharpness", sharpness)
    return sharpness * np.asarray(target_logprob, dtype=np.float64)


def task_logits(task_index: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Task scale: w_k^task = table[task of the row, k]; ``table [n_tasks,K]`` ≥ 0 (a 0 drops a
    teacher on that task), ``task_index [N]`` in [0, n_tasks)."""
    table = np.asarray(table, dtype=np.float64)
    idx = np.asarray(task_index)
    if table.ndim != 2:
        raise ValueError(f"task table must be [n_tasks, K], got shape {table.shape}")
    if not np.isfinite(table).all() or (table < 0).any():
        raise ValueError("task table entries must be finite and >= 0")
    if (table.sum(axis=1) <= 0).any():
        raise ValueError("every task table row needs a positive entry")
    if idx.size and (idx.min() < 0 or idx.max() >= table.shape[0]):
        raise ValueError(f"task index out of range [0, {table.shape[0]})")
    with np.errstate(divide="ignore"):
        return np.log(table)[idx]


def _broadcast_to_rows(per_sequence: np.ndarray, seq_offsets: np.ndarray) -> np.ndarray:
    """Repeat row s of ``per_sequence [S,K]`` over rows seq_offsets[s]..seq_offsets[s+1]."""
    offsets = np.asarray(seq_offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.shape[0] != per_sequence.shape[0] + 1:
        raise ValueError(
            f"seq_offsets must be [S+1] = [{per_sequence.shape[0] + 1}], got {offsets.shape}"
        )
    lengths = np.diff(offsets)
    if offsets[0] != 0 or (lengths < 0).any():
        raise ValueError("seq_offsets must start at 0 and be non-decreasing")
    return np.repeat(per_sequence, lengths, axis=0)


def sequence_mean_loss(target_logprob: np.ndarray, seq_offsets: np.ndarray) -> np.ndarray:
    """Each teacher's mean loss −log p(y) over each sequence's rows, ``[S,K]`` (0 when empty;
    +inf where a teacher gave an actual token probability 0)."""
    offsets = np.asarray(seq_offsets, dtype=np.int64)
    loss = -np.asarray(target_logprob, dtype=np.float64)
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != loss.shape[0]:
        raise ValueError(f"seq_offsets must run from 0 to the {loss.shape[0]} rows")
    lengths = np.diff(offsets)
    out = np.zeros((len(lengths), loss.shape[1]))
    filled = lengths > 0
    if filled.any():
        # reduceat over the starts of non-empty sequences: each sum runs to the next start.
        out[filled] = np.add.reduceat(loss, offsets[:-1][filled], axis=0)
    return out / np.maximum(lengths, 1)[:, None]


def context_logits(
    seq_feature: np.ndarray, seq_offsets: np.ndarray, sharpness: float
) -> np.ndarray:
    """Context scale: w_k^ctx ∝ exp(−β·f_{s,k}) for a per-sequence feature f (lower is better,
    e.g. mean loss: β = 1 gives the geometric-mean probability of the sequence's tokens),
    broadcast to the sequence's rows."""
    check_sharpness("--context-sharpness", sharpness)
    feature = np.asarray(seq_feature, dtype=np.float64)
    return -sharpness * _broadcast_to_rows(feature, seq_offsets)


def floor_weights(weights: np.ndarray, eps: float) -> np.ndarray:
    """Boundedness: w ← ε + (1 − Kε)·w, so every w_k ≥ ε and rows still sum to 1."""
    n_teachers = weights.shape[-1]
    check_eps(eps, n_teachers)
    return eps + (1.0 - n_teachers * eps) * weights


def apply_safety_floor(
    weights: np.ndarray, index: int, floor: float, eps: float = 0.0
) -> np.ndarray:
    """Raise the safety teacher ``index`` to ``floor`` on rows where it is below.

    The others give up the difference in proportion to their excess over ε, so they stay ≥ ε:
    w_k ← ε + (w_k − ε)·(1 − floor − (K−1)ε)/(1 − w_s − (K−1)ε). Identity where w_s ≥ floor,
    continuous, and non-decreasing in each w_k, so raising a teacher's input weight never
    lowers its output weight.
    """
    w = np.array(weights, dtype=np.float64)
    n_teachers = w.shape[-1]
    if not 0 <= index < n_teachers:
        raise ValueError(f"safety teacher index {index} out of range [0, {n_teachers})")
    check_safety_floor(floor, n_teachers, eps)
    spare = 1.0 - (n_teachers - 1) * eps
    low = w[:, index] < floor
    if low.any():
        others = np.arange(n_teachers) != index
        excess = np.maximum(w[np.ix_(low, others)] - eps, 0.0)
        scale = (spare - floor) / (spare - w[low, index])
        w[np.ix_(low, others)] = eps + excess * scale[:, None]
        w[low, index] = floor
    return w


def _prior(base: np.ndarray | Sequence[float] | None, n_teachers: int) -> np.ndarray:
    """The static prior: validated like user weights, uniform if None."""
    if base is None:
        return np.full(n_teachers, 1.0 / n_teachers)
    return validate_weights(base, n_teachers)


def compose(
    logits: Sequence[np.ndarray],
    n_rows: int,
    n_teachers: int,
    *,
    base: np.ndarray | Sequence[float] | None = None,
    eps: float = 0.0,
    safety_index: int | None = None,
    safety_floor: float = 0.0,
) -> np.ndarray:
    """Product-structure normalisation of the given log-factors, then ε-floor and safety floor.

    w = softmax(log b + Σ logits) per row; ``base`` is the static prior (validated like user
    weights; uniform if None). Returns ``[n_rows, n_teachers]`` float64.
    """
    with np.errstate(divide="ignore"):
        z = np.broadcast_to(np.log(_prior(base, n_teachers)), (n_rows, n_teachers)).copy()
    for lg in logits:
        if lg.shape != (n_rows, n_teachers):
            raise ValueError(f"weight factor has shape {lg.shape}, expected {(n_rows, n_teachers)}")
        z += lg
    top = z.max(axis=1, keepdims=True)
    if np.isnan(z).any() or not np.isfinite(top).all():
        raise ValueError(
            "adaptive weights vanish (or are NaN) on some row: every teacher got a "
            "zero or non-finite factor there"
        )
    w = np.exp(z - top)
    w = floor_weights(w / w.sum(axis=1, keepdims=True), eps)
    if safety_index is not None:
        w = apply_safety_floor(w, safety_index, safety_floor, eps)
    return w


@dataclass(frozen=True)
class WeightInputs:
    """Per-row signals for token-level weights, computed by ``fuse`` after tempering:
    ``entropy [N,K]`` of each teacher's tempered top-k + tail; ``target_logprob [N,K]`` each
    teacher's T=1 log-prob of the actual next token (None if a teacher lacks it)."""

    entropy: np.ndarray
    target_logprob: np.ndarray | None = None


WeightPolicy = Callable[[WeightInputs], np.ndarray]


@dataclass(frozen=True)
class AdaptiveWeights:
    """An adaptive weight policy for one block of rows (a ``WeightPolicy``).

    ``token``: "none" | "entropy" | "target" with ``token_sharpness`` β. ``task_table
    [n_tasks,K]`` with per-row ``task_index [N]``. ``context``: "none" | "loss" (each teacher's
    mean loss on the sequence, from target log-probs) | "feature" (``context_feature [S,K]``,
    lower is better), with ``context_sharpness`` and ``seq_offsets [S+1]`` of the block.
    ``base`` is the static prior, ``eps`` the lower bound, and the safety teacher
    ``safety_index`` never drops below ``safety_floor`` (default: its base weight, capped at
    the 1 − (K−1)·eps that the ε-bound leaves, so adaptation never takes it below its static
    share).
    """

    base: Sequence[float] | None = None
    token: Literal["none", "entropy", "target"] = "none"
    token_sharpness: float = 1.0
    task_table: np.ndarray | None = None
    task_index: np.ndarray | None = None
    context: Literal["none", "loss", "feature"] = "none"
    context_sharpness: float = 1.0
    context_feature: np.ndarray | None = None
    seq_offsets: np.ndarray | None = None
    eps: float = 0.0
    safety_index: int | None = None
    safety_floor: float | None = None

    def __post_init__(self) -> None:
        if self.token not in ("none", "entropy", "target"):
            raise ValueError(
                f"unknown token-level weighting {self.token!r}; "
                "choose 'none', 'entropy' or 'target'"
            )
        if self.context not in ("none", "loss", "feature"):
            raise ValueError(
                f"unknown context-level weighting {self.context!r}; "
                "choose 'none', 'loss' or 'feature'"
            )
        if (self.task_table is None) != (self.task_index is None):
            raise ValueError("task-level weights need both task_table and task_index")
        if self.context != "none" and self.seq_offsets is None:
            raise ValueError("context-level weights need seq_offsets")
        if self.context == "feature" and self.context_feature is None:
            raise ValueError("context='feature' needs context_feature [S,K]")
        check_sharpness("--token-sharpness", self.token_sharpness)
        check_sharpness("--context-sharpness", self.context_sharpness)
        if self.base is not None:  # K known: the bounds that depend on it, before any row
            check_eps(self.eps, len(self.base))
            if self.safety_index is not None and self.safety_floor is not None:
                check_safety_floor(self.safety_floor, len(self.base), self.eps)

    def __call__(self, inputs: WeightInputs) -> np.ndarray:
        n_rows, n_teachers = inputs.entropy.shape
        logits: list[np.ndarray] = []
        if self.token == "entropy":
            logits.append(entropy_logits(inputs.entropy, self.token_sharpness))
        elif self.token == "target":
            logits.append(target_logits(self._target(inputs), self.token_sharpness))
        if self.task_table is not None:
            logits.append(task_logits(self.task_index, self.task_table))
        if self.context != "none":
            feature = (
                sequence_mean_loss(self._target(inputs), self.seq_offsets)
                if self.context == "loss"
                else self.context_feature
            )
            logits.append(context_logits(feature, self.seq_offsets, self.context_sharpness))
        floor = self.safety_floor
        if self.safety_index is not None and floor is None:
            prior = _prior(self.base, n_teachers)[self.safety_index]
            floor = min(float(prior), 1.0 - (n_teachers - 1) * self.eps)
        return compose(
            logits,
            n_rows,
            n_teachers,
            base=self.base,
            eps=self.eps,
            safety_index=self.safety_index,
            safety_floor=floor or 0.0,
        )

    @staticmethod
    def _target(inputs: WeightInputs) -> np.ndarray:
        if inputs.target_logprob is None:
            raise ValueError("this weight policy needs every teacher's target_logprob")
        return inputs.target_logprob
