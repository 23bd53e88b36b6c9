"""Tempering of a truncated (top-k + tail) teacher distribution.

Inside the stored support tempering is exact: p_i^{(T)} = p_i^{1/T} / Z_T. The normaliser must
include the tempered tail, Z_T = Σ_topk p_i^{1/T} + t_T, where t_T = Σ_{j∉top-k} p_j^{1/T} comes
from a tail model (``tails``), so the tempered row (top-k + one tail bucket) sums to 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtkd.distill.aggregate.operators import xlogx
from mtkd.distill.aggregate.tails import TailModel, as_float64, get_tail_model


@dataclass(frozen=True)
class TeacherRows:
    """One teacher's rows for a block of N positions, as harvested (temperature 1).

    ``ids [N,k]`` distinct ids per row in descending log-prob order; ``logprobs [N,k]`` natural
    log-probs (any float dtype; float16 as stored is fine); ``tail_logmass [N]`` =
    log(1 − Σ_topk p) (−inf when the top-k holds everything);
    ``target_logprob [N]`` log p of the actual next token (for token-level weights);
    ``tempered_tail_logmass [N,nT]`` exact normalised tempered tail log-mass at each of
    ``temperatures`` (from a full-vocabulary engine), if harvested.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    tail_logmass: np.ndarray
    target_logprob: np.ndarray | None = None
    tempered_tail_logmass: np.ndarray | None = None
    temperatures: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.ids.shape != self.logprobs.shape:
            raise ValueError(
                f"teacher ids {self.ids.shape} and logprobs {self.logprobs.shape} "
                "must both be [N,k]"
            )
        n = self.ids.shape[0]
        if self.tail_logmass.shape != (n,):
            raise ValueError(f"tail_logmass has shape {self.tail_logmass.shape}, expected ({n},)")
        if self.target_logprob is not None and self.target_logprob.shape != (n,):
            raise ValueError(
                f"target_logprob has shape {self.target_logprob.shape}, expected ({n},)"
            )
        if self.tempered_tail_logmass is not None:
            want = (n, len(self.temperatures))
            if self.tempered_tail_logmass.shape != want:
                raise ValueError(
                    f"tempered_tail_logmass has shape {self.tempered_tail_logmass.shape}, "
                    f"expected {want} (one column per temperature {list(self.temperatures)})"
                )

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def rows(self, start: int, stop: int) -> TeacherRows:
        """The sub-block of rows ``start:stop`` (views, no copy)."""
        sl = slice(start, stop)
        return TeacherRows(
            self.ids[sl],
            self.logprobs[sl],
            self.tail_logmass[sl],
            None if self.target_logprob is None else self.target_logprob[sl],
            None if self.tempered_tail_logmass is None else self.tempered_tail_logmass[sl],
            self.temperatures,
        )

    def tempered_tail(self, temperature: float) -> np.ndarray | None:
        """The stored exact tempered tail log-mass column for ``temperature``, or None."""
        if self.tempered_tail_logmass is None:
            return None
        for col, t in enumerate(self.temperatures):
            if abs(t - temperature) <= 1e-6 * max(1.0, temperature):
                return self.tempered_tail_logmass[:, col]
        return None


@dataclass(frozen=True)
class TemperedRows:
    """A teacher's tempered distribution: ``ids [N,k]``, ``logprobs [N,k]`` and
    ``tail_logmass [N]`` (float64), with Σ exp(logprobs) + exp(tail_logmass) = 1 per row.

    ``log_norm [N]`` is log Z_T (the normaliser of the unnormalised tempered row l/T), kept so
    that the same rows can be tempered again without the tail model (see ``temper``).
    """

    ids: np.ndarray
    logprobs: np.ndarray
    tail_logmass: np.ndarray
    log_norm: np.ndarray | None = None
    _probs: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def probs(self) -> np.ndarray:
        """exp(logprobs), computed once by ``temper``."""
        return np.exp(self.logprobs) if self._probs is None else self._probs

    @property
    def tail_mass(self) -> np.ndarray:
        return np.exp(self.tail_logmass)

    def plogp_topk(self) -> np.ndarray:
        """Σ_i p_i log p_i over the top-k alone, [N]."""
        return np.einsum("nk,nk->n", self.probs, np.maximum(self.logprobs, _LOG_MIN))

    def plogp(self) -> np.ndarray:
        """Σ p log p over the top-k plus the tail as one category (−entropy), [N]."""
        return self.plogp_topk() + xlogx(self.tail_mass, self.tail_logmass)

    def entropy(self) -> np.ndarray:
        """Entropy over the top-k plus the tail as one category, [N] nats."""
        return -self.plogp()


# exp(−745) is the smallest float64 subnormal; below it p = 0 and p·max(log p, −745) = 0.
_LOG_MIN = -800.0


def temper(
    rows: TeacherRows,
    temperature: float,
    tail_model: str | TailModel,
    vocab_size: int,
    *,
    normaliser: tuple[np.ndarray, np.ndarray] | None = None,
) -> TemperedRows:
    """Temper ``rows`` at ``temperature`` with the given tail model.

    log p_i^{(T)} = l_i/T − log Z_T,  log t^{(T)} = log t_T − log Z_T,
    log Z_T = logaddexp(logsumexp_i(l_i/T), log t_T).

    One exp pass: e_i = exp(l_i/T − m) gives both Z_T and p_i = e_i·e^{m − log Z_T}.
    ``normaliser`` = (log Z_T, normalised tempered tail log-mass) from an earlier ``temper`` of
    the same rows at the same temperature (its ``log_norm`` and ``tail_logmass``) skips the tail
    model and the normalisation: then p_i = exp(l_i/T − log Z_T).
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    logprobs = as_float64(rows.logprobs)
    scaled = logprobs / temperature if temperature != 1.0 else logprobs
    ids = np.asarray(rows.ids, dtype=np.int32)
    if normaliser is not None:
        log_z, log_tail = (np.asarray(a, dtype=np.float64) for a in normaliser)
        out = scaled - log_z[:, None]
        return TemperedRows(ids, out, log_tail, log_z, np.exp(out))
    model = get_tail_model(tail_model)
    log_tail = model.log_tempered_tail(
        logprobs, rows.tail_logmass, temperature, vocab_size, rows.tempered_tail(temperature)
    )
    n, k = scaled.shape
    if k == 0:
        log_z = np.asarray(log_tail, dtype=np.float64)
        return TemperedRows(ids, scaled.copy(), log_tail - log_z, log_z, np.zeros((n, 0)))
    m = scaled.max(axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    e = scaled - m[:, None]
    np.exp(e, out=e)
    with np.errstate(divide="ignore"):
        log_z = np.logaddexp(np.log(e.sum(axis=1)) + m, log_tail)
    e *= np.exp(m - log_z)[:, None]
    return TemperedRows(ids, scaled - log_z[:, None], log_tail - log_z, log_z, e)
