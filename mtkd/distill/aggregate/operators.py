"""Aggregation operators G(p_1..p_K; w) on a shared set of categories.

Inputs are a ``Stack``: K teachers' (already tempered) distributions over the same C categories
of N rows — in ``fuse`` the union of the teachers' top-k ids plus one tail bucket, which every
operator treats as just another category. Weights are ``[N,K]``, non-negative, rows summing to 1
(``weights.validate_weights`` checks that). Each operator returns q ``[N,C]`` float64 with rows
summing to 1. A teacher of weight 0 is ignored (0·log 0 := 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from mtkd.distill.aggregate.tails import logsumexp


def xlogx(p: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """p·log p elementwise, with 0·log 0 = 0."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * log_p, 0.0)


class Stack:
    """K distributions over the same C categories of N rows: ``probs [K,N,C]``.

    ``logprobs [K,N,C]`` (natural logs, −inf where a prob is 0) and ``plogp [K,N]``
    (Σ_c p log p, the negative entropy) are computed on first use unless given: ``fuse`` builds
    them cheaply from the sparse rows, and only the operators that need logs ask for them.
    """

    def __init__(
        self, probs: np.ndarray, logprobs: np.ndarray | None = None, plogp: np.ndarray | None = None
    ) -> None:
        self.probs = np.asarray(probs, dtype=np.float64)
        self._logprobs = logprobs
        self._plogp = plogp

    @property
    def n_teachers(self) -> int:
        return self.probs.shape[0]

    @property
    def logprobs(self) -> np.ndarray:
        if self._logprobs is None:
            with np.errstate(divide="ignore"):
                self._logprobs = np.log(self.probs)
        return self._logprobs

    @property
    def plogp(self) -> np.ndarray:
        if self._plogp is None:
            self._plogp = xlogx(self.probs, self.logprobs).sum(axis=-1)
        return self._plogp

    def select_rows(self, rows: np.ndarray) -> Stack:
        """The sub-stack of the given rows (index or mask)."""
        return Stack(
            self.probs[:, rows],
            None if self._logprobs is None else self._logprobs[:, rows],
            None if self._plogp is None else self._plogp[:, rows],
        )


class Operator(Protocol):
    """Maps (stack [K,N,C], weights [N,K]) to the fused distribution q [N,C]."""

    name: ClassVar[str]

    def __call__(self, stack: Stack, weights: np.ndarray) -> np.ndarray: ...


def _normalise_log(log_unnorm: np.ndarray, stack: Stack, weights: np.ndarray) -> np.ndarray:
    """exp(x − logsumexp x) per row: a distribution from unnormalised log-masses.

    A row with no mass left (the positively weighted teachers share no category, possible
    only when some teacher has zeros) falls back to the linear mixture.
    """
    log_z = logsumexp(log_unnorm)
    with np.errstate(invalid="ignore"):
        q = np.exp(log_unnorm - log_z[:, None])
    empty = ~np.isfinite(log_z)
    if empty.any():
        q[empty] = Linear()(stack.select_rows(empty), weights[empty])
    return q


def _weighted_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_k w_k x_k over ``values [K,N,C]`` [N,C], a zero-weight teacher's term taken as 0
    (so 0·(−inf) = 0). In place: no [N,C] temporaries beyond one buffer."""
    out = np.zeros(values.shape[1:])
    term = np.empty_like(out)
    with np.errstate(invalid="ignore"):
        for k in range(values.shape[0]):
            np.multiply(values[k], weights[:, k, None], out=term)
            unused = weights[:, k] == 0
            if unused.any():
                term[unused] = 0.0
            out += term
    return out


@dataclass(frozen=True)
class Linear:
    """Linear mixture q = Σ_k w_k p_k (inside the convex hull of the teachers, per coordinate)."""

    name: ClassVar[str] = "linear"

    def __call__(self, stack: Stack, weights: np.ndarray) -> np.ndarray:
        return _weighted_sum(stack.probs, weights)


@dataclass(frozen=True)
class Geometric:
    """Normalised geometric (log-linear) pooling q ∝ Π_k p_k^{w_k} = exp(Σ_k w_k log p_k).

    A category that a positively weighted teacher gives 0 gets 0 (the price of log pooling).
    On dense inputs with one common T it equals the T=1 pool tempered at T.
    """

    name: ClassVar[str] = "geometric"

    def __call__(self, stack: Stack, weights: np.ndarray) -> np.ndarray:
        return _normalise_log(_weighted_sum(stack.logprobs, weights), stack, weights)


@dataclass(frozen=True)
class PowerMean:
    """Power-mean pooling q ∝ (Σ_k w_k p_k^α)^{1/α}, normalised.

    α = 1 is the linear mixture, α → 0 the geometric pool (α = 0 is handled exactly as
    geometric), α < 0 leans toward the minimum. Computed in log space (``_log_power_mean``),
    safe for any finite α; for |α| < 1e-3, where that cancels,
    log m = log1p(Σ_k w_k expm1(α log p_k))/α (uses Σ w_k = 1).
    """

    name: ClassVar[str] = "power_mean"
    alpha: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.alpha):
            raise ValueError(f"power_mean alpha must be finite, got {self.alpha}")

    def __call__(self, stack: Stack, weights: np.ndarray) -> np.ndarray:
        a = float(self.alpha)
        if a == 0.0:
            return Geometric()(stack, weights)
        if a == 1.0:
            return Linear()(stack, weights)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if abs(a) < 1e-3:
                total = _weighted_sum(np.expm1(a * stack.logprobs), weights)
                log_m = np.log1p(np.maximum(total, -1.0)) / a
            else:
                log_m = _log_power_mean(stack.logprobs, weights, a)
        return _normalise_log(log_m, stack, weights)


def _log_power_mean(logprobs: np.ndarray, weights: np.ndarray, alpha: float) -> np.ndarray:
    """log m = s + logsumexp_k(log w_k + α(log p_k − s))/α per category ``[N,C]``, with s the
    largest log p_k of the weighted teachers for α > 0 (the smallest for α < 0).

    Shifted so that no α(log p_k − s) is positive: α·log p_k itself overflows to −inf for a
    huge α (1e308) on every category, which emptied whole rows; shifted, m tends to the
    maximum (minimum) as α → ±∞, as it should. m = 0 where s = −inf (α > 0: no weighted
    teacher has the category; α < 0: one has it at 0).
    """
    used = weights.T[:, :, None] > 0  # [K,N,1]
    extreme = np.max if alpha > 0 else np.min
    shift = extreme(np.where(used, logprobs, -np.inf if alpha > 0 else np.inf), axis=0)
    finite = np.isfinite(shift)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        terms = np.log(weights.T)[:, :, None] + alpha * (logprobs - np.where(finite, shift, 0.0))
        terms[~np.broadcast_to(used, terms.shape)] = -np.inf
        log_m = shift + logsumexp(terms, axis=0) / alpha
    return np.where(finite, log_m, -np.inf)


OPERATORS: dict[str, type] = {op.name: op for op in (Linear, Geometric, PowerMean)}


def get_operator(spec: str | Operator, **params: float) -> Operator:
    """An operator by registry name (``power_mean`` needs ``alpha``), or ``spec`` itself."""
    if not isinstance(spec, str):
        return spec
    if spec not in OPERATORS:
        raise ValueError(f"unknown operator {spec!r}; choose one of {sorted(OPERATORS)}")
    if spec == PowerMean.name and "alpha" not in params:
        raise ValueError("operator 'power_mean' needs alpha (1 = linear, 0 = geometric)")
    return OPERATORS[spec](**params)
