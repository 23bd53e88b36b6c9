"""Test inputs shared across the aggregate tests: random dense teachers, their top-k rows as a
harvest engine stores them, and a fused target as dense rows."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from mtkd.distill.aggregate.tails import logsumexp
from mtkd.distill.aggregate.tempering import TeacherRows

TAILS = ["renormalise", "lump", "zipf", "exact"]


def dense_logprobs(rng: np.random.Generator, n: int, vocab: int, scale: float) -> np.ndarray:
    """Random full-vocabulary log-probs [n,V] (float64)."""
    logits = rng.standard_normal((n, vocab)) * scale
    return logits - logsumexp(logits)[:, None]


def tempered_dense(logp: np.ndarray, temperature: float) -> np.ndarray:
    """Exact tempered log-probs of full-vocabulary rows."""
    x = logp / temperature
    return x - logsumexp(x)[:, None]


def sparse_rows(logp: np.ndarray, k: int, temperatures: tuple[float, ...] = ()) -> TeacherRows:
    """The top-k view of dense rows, as a harvest engine stores it (float64 here), with exact
    tempered tails at ``temperatures`` (what the reference engine stores)."""
    order = np.argsort(-logp, axis=1, kind="stable")
    ids, rest = order[:, :k], order[:, k:]
    top = np.take_along_axis(logp, ids, axis=1)
    comp = np.take_along_axis(logp, rest, axis=1)
    tail = logsumexp(comp) if rest.shape[1] else np.full(logp.shape[0], -np.inf)
    exact = None
    if temperatures:
        cols = []
        for t in temperatures:
            lt = tempered_dense(logp, t)
            cols.append(
                logsumexp(np.take_along_axis(lt, rest, axis=1))
                if rest.shape[1]
                else np.full(logp.shape[0], -np.inf)
            )
        exact = np.stack(cols, axis=1)
    return TeacherRows(ids.astype(np.int32), top, tail, None, exact, tuple(temperatures))


def fused_dense(out: dict[str, np.ndarray], vocab: int) -> np.ndarray:
    """The fused target as dense rows [N, V+1]: probs at ids, tail_mass in the last column."""
    n = out["ids"].shape[0]
    dense = np.zeros((n, vocab + 1))
    rows, cols = np.nonzero(out["ids"] >= 0)
    dense[rows, out["ids"][rows, cols]] = out["probs"][rows, cols]
    dense[:, vocab] = out["tail_mass"]
    return dense


@st.composite
def teachers_case(draw: st.DrawFn, max_teachers: int = 3):
    """Random dense teachers over a small vocabulary, harvested as top-k rows (k may differ)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_teachers = draw(st.integers(1, max_teachers))
    n, vocab = draw(st.integers(1, 6)), draw(st.integers(2, 40))
    temps = [draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for _ in range(n_teachers)]
    logps = [dense_logprobs(rng, n, vocab, draw(st.floats(0.3, 4.0))) for _ in range(n_teachers)]
    ks = [draw(st.integers(1, vocab)) for _ in range(n_teachers)]
    teachers = [
        sparse_rows(lp, k, tuple(sorted(set(temps)))) for lp, k in zip(logps, ks, strict=True)
    ]
    w = rng.dirichlet(np.ones(n_teachers))
    return teachers, logps, temps, w, vocab, rng
