"""Fuse K teachers' sparse rows into one sparse target per position: the entry point of the
aggregation maths (``mtkd aggregate`` calls it once per part; it works block by block).

Steps per block of rows: temper each teacher (``tempering``) → weights per row (``weights``)
→ union of the teachers' top-k ids, with each teacher's mass on ids outside its own top-k
imputed from its tail (``union``, ``imputation``) → operator (``operators``) over union ids +
tail bucket → diagnostics → the fused top-k_out (``targets``). Two backends compute the same
thing: ``numpy`` (dense [K, N, U+1] stacks; the reference: ``numpy_engine``) and ``numba``
(fused per-row kernels, no dense stack; several times faster: ``numba_engine``) — see
docs/MATHS.md.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import numpy as np

from mtkd.distill.aggregate.engine import FusionEngine, ids_outside_vocab
from mtkd.distill.aggregate.imputation import IMPUTATIONS
from mtkd.distill.aggregate.numba_engine import NumbaEngine
from mtkd.distill.aggregate.numpy_engine import NumpyEngine
from mtkd.distill.aggregate.operators import Operator, get_operator
from mtkd.distill.aggregate.tails import TailModel, get_tail_model
from mtkd.distill.aggregate.targets import check_same_rows, fused_rows
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.weights import (
    WeightPolicy,
    validate_temperatures,
    validate_weights,
)
from mtkd.store.schema import teacher_block

_ENGINES: dict[str, type[FusionEngine]] = {"numpy": NumpyEngine, "numba": NumbaEngine}
BACKENDS = tuple(_ENGINES)


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
            raise ids_outside_vocab(j, vocab_size)


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
    the teacher's next ranks under a Zipf fit); see :func:`~.imputation.impute_logs`.
    ``backend``: "numba" (fused per-row kernels) or "numpy" (dense union stacks), default
    :func:`default_backend`;
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
    engine = _ENGINES[backend](teachers, temps, model, vocab_size, imputation == "rank")
    cache = None
    if callable(weights):
        inputs, cache = engine.policy_inputs(block_rows)
        weights = weights(inputs)
    w = np.broadcast_to(validate_weights(weights, n_teachers, n_rows=n), (n, n_teachers))
    out = fused_rows(w, k_out)
    if keep_teacher_blocks:
        for j, t in enumerate(teachers):
            ids, probs, tail = teacher_block(j)
            out[ids] = np.asarray(t.ids, dtype=np.int32)
            out[probs] = np.empty((n, t.k), np.float32)
            out[tail] = np.empty(n, np.float32)
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
                _, probs, tail = teacher_block(j)
                out[probs][start:stop] = res.teacher_probs[j]
                out[tail][start:stop] = res.teacher_tails[j]
    return out
