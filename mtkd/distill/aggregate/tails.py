"""Tail models: the tempered mass a teacher puts outside its stored top-k.

A teacher row keeps its top-k log-probs l_1 ≥ … ≥ l_k (temperature 1, natural log) and the tail
mass r = 1 − Σ_i e^{l_i}. Tempering at T needs the *unnormalised* tempered tail

    t_T = Σ_{j ∉ top-k} p_j^{1/T},

which r alone does not determine: for T > 1 it lies between r^{1/T} (all tail mass on one token)
and r^{1/T}·(V−k)^{1−1/T} (tail spread evenly over the V−k other ids). Each tail model picks a
value and returns log t_T per row as float64 [N]; ``tempering.temper`` then normalises the top-k
and the tail together. Every model except ``renormalise`` returns log r exactly at T = 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

# Log-probs below this are treated as this value when fitting (a stored −inf is a zero prob).
_LOG_FLOOR = -1.0e4


@functools.cache
def float16_values() -> np.ndarray:
    """The float64 value of every float16 bit pattern: a 64K-entry table, indexed by the bits."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)


def as_float64(x: np.ndarray) -> np.ndarray:
    """``x`` as float64; float16 (the stored log-prob dtype) through :func:`float16_values`,
    which is several times faster than numpy's scalar half-precision cast."""
    x = np.asarray(x)
    if x.dtype != np.float16:
        return np.asarray(x, dtype=np.float64)
    return float16_values()[np.ascontiguousarray(x).view(np.uint16)]


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log Σ exp(x) along ``axis``; −inf where every entry is −inf."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis))
    return out + np.squeeze(m, axis=axis)


class TailModel(Protocol):
    """Maps a teacher's T=1 rows to log t_T = log Σ_{j∉top-k} p_j^{1/T} (float64 [N])."""

    name: ClassVar[str]

    def log_tempered_tail(
        self,
        logprobs: np.ndarray,
        tail_logmass: np.ndarray,
        temperature: float,
        vocab_size: int,
        exact: np.ndarray | None,
    ) -> np.ndarray:
        """``logprobs [N,k]`` and ``tail_logmass [N]`` at T=1; ``exact [N]`` is the stored
        normalised tempered tail log-mass for this temperature, or None when not harvested."""
        ...


@dataclass(frozen=True)
class Renormalise:
    """Drop the tail: t_T = 0, so the tempered row is p_i^{1/T} / Σ_topk p^{1/T}.

    Not the identity at T=1 (it renormalises the top-k); the biased baseline of axolotl.
    """

    name: ClassVar[str] = "renormalise"

    def log_tempered_tail(
        self,
        logprobs: np.ndarray,
        tail_logmass: np.ndarray,
        temperature: float,
        vocab_size: int,
        exact: np.ndarray | None,
    ) -> np.ndarray:
        return np.full(np.shape(tail_logmass), -np.inf)


@dataclass(frozen=True)
class Lump:
    """The tail as one token: t_T = r^{1/T} (DistillKit's choice; the lower bound for T > 1)."""

    name: ClassVar[str] = "lump"

    def log_tempered_tail(
        self,
        logprobs: np.ndarray,
        tail_logmass: np.ndarray,
        temperature: float,
        vocab_size: int,
        exact: np.ndarray | None,
    ) -> np.ndarray:
        return np.asarray(tail_logmass, dtype=np.float64) / temperature


def expm1_ratio(z: np.ndarray) -> np.ndarray:
    """φ(z) = expm1(z)/z, taken as 1 + z/2 where |z| < 1e-10: the factor of the power-law
    integral ∫_lo^hi x^{−s} dx = lo^{1−s}·Δ·φ((1−s)Δ), Δ = log(hi/lo), that stays finite at
    s = 1."""
    small = np.abs(z) < 1e-10
    z_safe = np.where(small, 1.0, z)
    return np.where(small, 1.0 + 0.5 * z, np.expm1(z_safe) / z_safe)


def log_power_sum(s: np.ndarray, first: int, last: int) -> np.ndarray:
    """log Σ_{j=first}^{last} j^{−s} per entry of ``s ≥ 0`` (float64), for 1 ≤ first ≤ last.

    Terms below j = max(16, max(s) + 8, first + 4) are summed exactly, the rest by
    Euler–Maclaurin (integral, end-point and two derivative corrections), which is accurate
    once j is well above s — relative error < 1e-9. Terms are scaled by first^{s} so nothing
    under- or overflows for large s.
    """
    s = np.asarray(s, dtype=np.float64)
    a = float(first)
    n_terms = last - first + 1
    s_max = float(s.max()) if s.size else 0.0
    n_head = min(max(16, int(np.ceil(s_max)) + 8, first + 4) - first, n_terms)
    total = np.zeros_like(s)
    for i in range(n_head):
        total += np.exp(-s * np.log1p(i / a))
    if n_terms > n_head:
        lo, hi = a + n_head, float(last)
        log_u, log_v = np.log(lo / a), np.log(hi / a)
        g_lo, g_hi = np.exp(-s * log_u), np.exp(-s * log_v)
        # ∫_lo^hi (x/a)^{−s} dx = lo·g_lo·Δ·φ((1−s)Δ), φ(z) = expm1(z)/z, Δ = log(hi/lo).
        delta = log_v - log_u
        integral = lo * g_lo * delta * expm1_ratio((1.0 - s) * delta)
        d1 = -s / hi * g_hi + s / lo * g_lo  # g'(hi) − g'(lo)
        c3 = s * (s + 1.0) * (s + 2.0)
        d3 = -c3 / hi**3 * g_hi + c3 / lo**3 * g_lo  # g'''(hi) − g'''(lo)
        total += integral + 0.5 * (g_lo + g_hi) + d1 / 12.0 - d3 / 720.0
    return -s * np.log(a) + np.log(total)


@dataclass(frozen=True)
class Zipf:
    """Extrapolate the tail by a power law fitted to the top-k ranks.

    Fit log p_ρ ≈ a − b·log ρ by least squares over ranks ρ ∈ [⌊fit_from·k⌋+1, k] (the ranks
    nearest the tail; b clipped to [0, max_exponent]). Give tail rank ρ = k+1..V the mass
    m_ρ = r·ρ^{−b}/S(b), S(s) = Σ_{ρ=k+1}^{V} ρ^{−s} — the fitted shape, scaled so the tail
    holds exactly r. Tempering each extrapolated rank exactly and summing:

        t_T = Σ_ρ m_ρ^{1/T} = r^{1/T} · S(b/T) / S(b)^{1/T},

    which is r at T=1 and lies between the ``lump`` and the even-spread bounds.
    """

    name: ClassVar[str] = "zipf"
    fit_from: float = 0.5
    max_exponent: float = 20.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fit_from < 1.0:
            raise ValueError(f"zipf fit_from must be in [0, 1), got {self.fit_from}")
        if not self.max_exponent > 0.0:
            raise ValueError(f"zipf max_exponent must be > 0, got {self.max_exponent}")

    def exponent(self, logprobs: np.ndarray) -> np.ndarray:
        """The fitted power-law exponent b ≥ 0 per row (0 where fewer than two ranks)."""
        n, k = logprobs.shape
        start = min(int(k * self.fit_from), max(k - 2, 0))
        x = np.log(np.arange(start + 1, k + 1, dtype=np.float64))
        xc = x - x.mean()
        denom = float(xc @ xc)
        if denom == 0.0:
            return np.zeros(n)
        y = np.maximum(as_float64(logprobs[:, start:]), _LOG_FLOOR)
        return np.clip(-(y @ xc) / denom, 0.0, self.max_exponent)

    def log_tempered_tail(
        self,
        logprobs: np.ndarray,
        tail_logmass: np.ndarray,
        temperature: float,
        vocab_size: int,
        exact: np.ndarray | None,
    ) -> np.ndarray:
        k = logprobs.shape[1]
        log_r = np.asarray(tail_logmass, dtype=np.float64)
        if vocab_size <= k:
            return np.full(log_r.shape, -np.inf)
        b = self.exponent(logprobs)
        log_s1 = log_power_sum(b, k + 1, vocab_size)
        log_st = log_power_sum(b / temperature, k + 1, vocab_size)
        return (log_r - log_s1) / temperature + log_st


@dataclass(frozen=True)
class Exact:
    """The exact tempered tail stored at harvest time by a full-vocabulary engine.

    The store holds τ_T = t_T / Z_T (normalised over the full vocabulary). Since the top-k holds
    1 − τ_T of Z_T, t_T = τ_T/(1 − τ_T) · Σ_topk p_i^{1/T}. At T=1 it is r, stored or not.
    """

    name: ClassVar[str] = "exact"

    def log_tempered_tail(
        self,
        logprobs: np.ndarray,
        tail_logmass: np.ndarray,
        temperature: float,
        vocab_size: int,
        exact: np.ndarray | None,
    ) -> np.ndarray:
        if temperature == 1.0:
            return np.asarray(tail_logmass, dtype=np.float64)
        if exact is None:
            raise ValueError(
                f"tail model 'exact' needs the stored tempered tail mass for T={temperature:g}; "
                "harvest this teacher with a full-vocabulary engine at that temperature, "
                "or choose another tail model"
            )
        log_tau = np.minimum(np.asarray(exact, dtype=np.float64), -1e-12)
        log_top = logsumexp(as_float64(logprobs) / temperature)
        return log_tau - np.log(-np.expm1(log_tau)) + log_top


TAIL_MODELS: dict[str, type] = {m.name: m for m in (Renormalise, Lump, Zipf, Exact)}


def get_tail_model(spec: str | TailModel, **params: float) -> TailModel:
    """A tail model by registry name (with its parameters), or ``spec`` itself if a model."""
    if not isinstance(spec, str):
        return spec
    try:
        cls = TAIL_MODELS[spec]
    except KeyError:
        raise ValueError(
            f"unknown tail model {spec!r}; choose one of {sorted(TAIL_MODELS)}"
        ) from None
    return cls(**params)
