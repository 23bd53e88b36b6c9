"""Tempering of a truncated (top-k + tail) teacher distribution.

Inside the stored support tempering is exact: p_i^{(T)} = p_i^{1/T} / Z_T. The normaliser must
include the tempered tail, Z_T = Σ_topk p_i^{1/T} + t_T, where t_T = Σ_{j∉top-k} p_j^{1/T} comes
from a tail model (``tails``), so the tempered row (top-k + one tail bucket) sums to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtkd.distill.diagnostics import entropy
from mtkd.distill.tails import TailModel, get_tail_model, logsumexp


@dataclass(frozen=True)
class TeacherRows:
    """One teacher's rows for a block of N positions, as harvested (temperature 1).

    ``ids [N,k]`` distinct ids per row in descending log-prob order; ``logprobs [N,k]`` natural
    log-probs; ``tail_logmass [N]`` = log(1 − Σ_topk p) (−inf when the top-k holds everything);
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
    ``tail_logmass [N]`` (float64), with Σ exp(logprobs) + exp(tail_logmass) = 1 per row."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail_logmass: np.ndarray

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.logprobs)

    @property
    def tail_mass(self) -> np.ndarray:
        return np.exp(self.tail_logmass)

    def entropy(self) -> np.ndarray:
        """Entropy over the top-k plus the tail as one category, [N] nats."""
        cats = np.concatenate([self.logprobs, self.tail_logmass[:, None]], axis=1)
        return entropy(np.exp(cats), cats)


def temper(
    rows: TeacherRows,
    temperature: float,
    tail_model: str | TailModel,
    vocab_size: int,
) -> TemperedRows:
    """Temper ``rows`` at ``temperature`` with the given tail model.

    log p_i^{(T)} = l_i/T − log Z_T,  log t^{(T)} = log t_T − log Z_T,
    log Z_T = logaddexp(logsumexp_i(l_i/T), log t_T).
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    model = get_tail_model(tail_model)
    logprobs = np.asarray(rows.logprobs, dtype=np.float64)
    scaled = logprobs / temperature
    log_tail = model.log_tempered_tail(
        logprobs, rows.tail_logmass, temperature, vocab_size, rows.tempered_tail(temperature)
    )
    log_z = np.logaddexp(logsumexp(scaled), log_tail)
    return TemperedRows(
        ids=np.asarray(rows.ids, dtype=np.int32),
        logprobs=scaled - log_z[:, None],
        tail_logmass=log_tail - log_z,
    )
