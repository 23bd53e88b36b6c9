"""The numpy backend of ``fuse`` (the reference): ``temper`` each teacher, build the dense
union stack ``[K, N, U+1]`` (``union``), apply the operator, cut the top-k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtkd.distill.aggregate.diagnostics import disagreement, jensen_gap
from mtkd.distill.aggregate.engine import BlockResult, weight_inputs
from mtkd.distill.aggregate.imputation import tempered_rank_exponent
from mtkd.distill.aggregate.operators import Linear, Operator
from mtkd.distill.aggregate.tails import TailModel
from mtkd.distill.aggregate.targets import top_k
from mtkd.distill.aggregate.tempering import TeacherRows, TemperedRows, temper
from mtkd.distill.aggregate.union import to_union
from mtkd.distill.aggregate.weights import WeightInputs


class NumpyEngine:
    """The numpy backend (a ``FusionEngine``)."""

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
        return weight_inputs(self.teachers, ent), (log_z, log_tail)

    def block(self, start: int, stop: int, ws: np.ndarray, op: Operator,
              norm: tuple[np.ndarray, ...] | None, keep: bool, ids_out: np.ndarray,
              probs_out: np.ndarray, tail_out: np.ndarray) -> BlockResult:
        """``FusionEngine.block``: temper, dense union stack, operator, top-k."""
        tempered = self._temper(start, stop, norm)
        exps = None
        if self.rank:
            exps = [tempered_rank_exponent(t.rows(start, stop).logprobs, temp)
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
