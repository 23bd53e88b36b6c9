"""What a fusion backend is to ``fuse``: the two passes it runs over a block of rows, the result
of one block, and the pieces both backends share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mtkd.distill.aggregate.operators import Operator
from mtkd.distill.aggregate.tails import TailModel
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.weights import WeightInputs


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


class FusionEngine(Protocol):
    """A backend built once per ``fuse`` call (teachers, temperatures, tail model, V, and
    whether imputation is rank-based), then run block by block."""

    def __init__(self, teachers: Sequence[TeacherRows], temps: np.ndarray, model: TailModel,
                 vocab_size: int, rank: bool) -> None: ...

    def policy_inputs(self, block_rows: int) -> tuple[WeightInputs, tuple[np.ndarray, ...]]:
        """What a weight policy sees, and a normaliser cache that ``block`` takes back as
        ``norm`` (sliced to its rows) so the fusion pass skips the tail model."""
        ...

    def block(self, start: int, stop: int, ws: np.ndarray, op: Operator,
              norm: tuple[np.ndarray, ...] | None, keep: bool, ids_out: np.ndarray,
              probs_out: np.ndarray, tail_out: np.ndarray) -> BlockResult:
        """Fuse rows ``start:stop`` with weights ``ws [n,K]``; top-k into ``ids_out`` /
        ``probs_out [n,k_out]``, 1 − Σ probs into ``tail_out [n]``."""
        ...


def weight_inputs(teachers: Sequence[TeacherRows], entropy: np.ndarray) -> WeightInputs:
    """A weight policy's inputs: the tempered ``entropy [N,K]`` and, if every teacher has it,
    the T=1 log-prob of the actual next token."""
    targets = [t.target_logprob for t in teachers]
    target = None if any(x is None for x in targets) else np.stack(targets, axis=1)
    return WeightInputs(entropy=entropy, target_logprob=target)


def ids_outside_vocab(teacher: int, vocab_size: int) -> ValueError:
    """The error for a teacher whose ids leave [0, V)."""
    return ValueError(f"teacher {teacher} has ids outside [0, {vocab_size})")
