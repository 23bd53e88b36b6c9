"""The aggregate stage's options: the only home of their defaults, help texts and bounds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mtkd.config import changed_options, check_bounds, option
from mtkd.distill.aggregate.imputation import IMPUTATIONS
from mtkd.distill.aggregate.operators import get_operator
from mtkd.distill.aggregate.tails import get_tail_model
from mtkd.distill.aggregate.weights import (
    SUM_TOL,
    AdaptiveWeights,
    validate_temperatures,
    validate_weights,
)

SOURCES = ("topk", "samples")


def vanishing_tasks(static: np.ndarray, task_weights: Mapping[str, Sequence[float]]
                    ) -> list[str]:
    """The task tags on whose sequences every teacher gets weight 0 (static weight × task
    factor), which no adaptive scale can revive: the weights are a product."""
    return [tag for tag, factors in sorted(task_weights.items())
            if not np.any(static * np.asarray(factors, float) > 0)]


def _numbers(values: Sequence[float] | np.ndarray) -> str:
    """``1,0.5``: values as the flags take them."""
    return ",".join(f"{float(v):g}" for v in values)


@dataclass(frozen=True)
class AggregateConfig:
    """Everything that decides the targets; every worker of one target store must agree on it.

    ``weights`` are static per-teacher priors (sum to 1); adaptive weighting multiplies them by
    token-level (``token``: entropy | target), task-level (``task_weights``: task tag → K
    factors) and context-level (``context``: loss) factors and renormalises
    (product-structure normalisation). ``safety`` names the safety teacher, whose weight never
    drops below ``safety_floor`` (default: its static weight). ``imputation``: how a teacher's
    mass on a union id outside its top-k is imputed (``imputation.impute_logs``: "even" share of its
    tail, or "rank": the id takes its next ranks under a Zipf fit). ``source="samples"`` fuses
    the teachers' random-sampling targets (harvested with ``--num-samples``) instead of their
    top-k: static weights and the linear operator at temperature 1 only (see
    :mod:`mtkd.distill.aggregate.sampled`). ``label_entry`` stores the actual next token's exact
    probability in one more column wherever the support lacks it
    (:func:`~mtkd.distill.aggregate.targets.add_label_entry`; linear operator at temperature 1).
    """

    teachers: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    fit_weights: bool = False  # static weights fitted by maximum likelihood (see fitted_config)
    fit_positions: int = option(
        10_000_000,
        "Positions --weights fit reads at most: whole parts spread evenly over the store, the "
        "same for every worker (8 bytes per position and teacher of memory; K weights need "
        "far fewer positions than a large store holds).",
        min=1,
    )
    temperatures: tuple[float, ...] | None = None
    operator: Literal["linear", "geometric", "power_mean"] = option(
        "linear", "linear | geometric | power_mean."
    )
    alpha: float = option(0.5, "Power-mean exponent (1 linear, 0 geometric).")
    tail_model: Literal["renormalise", "lump", "zipf", "exact"] = option(
        "lump", "Tempered tail outside the top-k: renormalise | lump | zipf | exact."
    )
    k_out: int = option(64, "Support size kept per position.", min=1)
    token: Literal["none", "entropy", "target"] = option(
        "none", "Token-level adaptive weights: none | entropy | target."
    )
    token_sharpness: float = option(1.0, "Sharpness of token weights.")
    task_weights: Mapping[str, Sequence[float]] = field(default_factory=dict)
    context: Literal["none", "loss"] = option(
        "none", "Context-level weights: none | loss (each teacher's loss on the sequence)."
    )
    context_sharpness: float = option(1.0, "Sharpness of context weights.")
    eps: float = option(0.0, "Lower bound on every adaptive weight.")
    safety: int | None = option(
        None, "Index of the safety teacher (its weight never drops below its floor)."
    )
    safety_floor: float | None = option(
        None, "Safety teacher's weight floor (default: its static weight)."
    )
    teacher_blocks: bool = option(
        False, "Also store each teacher's tempered targets (for training with objective multi)."
    )
    imputation: Literal["even", "rank"] = option(
        "even", "Mass of ids a teacher lacks: even (share of its tail) | rank (Zipf next ranks)."
    )
    source: Literal["topk", "samples"] = option(
        "topk",
        "What to fuse: topk (the harvested top-k + tail) | samples (random-sampling "
        "targets from harvest --num-samples; linear, static weights).",
    )
    sample_head: int = option(
        0,
        "With --source samples from a store of plain draws: keep the exact top-H of its "
        "top-k and let the draws outside it share the rest's exact mass (the hybrid's "
        "unbiased estimator without its harvest; 0: the draws alone).",
    )
    label_entry: bool = option(
        False,
        "Give the actual next token its exact probability in one more column wherever "
        "the support lacks it (linear, T=1; the teacher stores hold p(label)).",
    )
    codec: Literal["raw", "zstd", "q64v2"] = option(
        "q64v2",
        "Target store arrays: q64v2 (sparse columns coded, |log q error| <= 1/128 where "
        "q >= 1e-3, in small zstd chunks: 146 instead of 528 bytes per position on a real "
        "teacher, shuffled reads at 0.75 of sequential; docs/FORMAT.md) | raw (memory-mapped, "
        "exact, no decoding) | zstd (exact, compressed chunks decoded on every read).",
    )

    def __post_init__(self) -> None:
        k = len(self.teachers)
        if k == 0:
            raise ValueError("aggregate needs at least one teacher store")
        if self.weights is not None and len(self.weights) == k \
                and np.isfinite(self.weights).all() and abs(sum(self.weights) - 1) > SUM_TOL:
            raise ValueError(f"weights {','.join(f'{w:g}' for w in self.weights)} sum to "
                             f"{sum(self.weights):g}; give {k} weights that sum to 1")
        validate_weights(self.static_weights, k)
        validate_temperatures(self.teacher_temperatures, k)
        get_operator(self.operator, **self.operator_params)
        get_tail_model(self.tail_model)
        if self.imputation not in IMPUTATIONS:
            raise ValueError(f"unknown imputation {self.imputation!r}; "
                             f"choose one of {list(IMPUTATIONS)}")
        check_bounds(self)  # k_out
        if self.safety is not None and not 0 <= self.safety < k:
            raise ValueError(f"safety teacher index {self.safety} is not in [0, {k})")
        for tag, factors in self.task_weights.items():
            if len(factors) != k or any(not np.isfinite(f) or f < 0 for f in factors):
                raise ValueError(f"task weights for {tag!r} must be {k} finite factors >= 0")
        vanishing = vanishing_tasks(self.static_weights, self.task_weights)
        if vanishing:
            raise ValueError(
                f"--task-weight {vanishing[0]}={_numbers(self.task_weights[vanishing[0]])} "
                f"with --weights {_numbers(self.static_weights)} gives every teacher weight 0 "
                f"on the {vanishing[0]!r} sequences (each has a 0 factor or a 0 weight): give "
                "a teacher of positive --weights a positive factor for that tag")
        self.refuse_unused()
        # the policy validates its own fields (token/context names, sharpness, eps, floor)
        self.policy(np.zeros(1, np.int64), np.zeros(2, np.int64))
        if self.eps and not self.adaptive and self.safety is None:  # else silently unused
            raise ValueError(f"eps {self.eps:g} bounds adaptive weights from below, and these "
                             "weights are static (no --token, --context, --task-weight or "
                             "--safety): drop it")
        if self.safety_floor is not None and self.safety is None:
            raise ValueError("safety_floor is the safety teacher's floor: give --safety too")
        tempered = bool(np.any(self.teacher_temperatures != 1))
        if self.label_entry and (self.operator != "linear" or self.source != "topk" or tempered):
            raise ValueError("the label entry is for top-k targets fused by the linear operator "
                             "at temperature 1 (the stores hold each teacher's untempered "
                             "p(label))")
        if self.codec not in ("raw", "zstd", "q64v2"):
            raise ValueError(f"unknown codec {self.codec!r}; choose raw, zstd or q64v2")
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; choose one of {list(SOURCES)}")
        if self.sample_head < 0 or (self.sample_head and self.source != "samples"):
            raise ValueError(f"sample_head must be >= 0 and is for --source samples, got "
                             f"{self.sample_head} with source {self.source!r}")
        if self.source == "samples":
            unsupported = [name for name, bad in (
                ("operator " + self.operator, self.operator != "linear"),
                ("temperatures other than 1", tempered),
                ("adaptive or safety weights", self.adaptive or self.safety is not None),
                ("teacher blocks", self.teacher_blocks),
                ("tail model " + self.tail_model, self.tail_model != "lump"),  # no top-k tail
                ("imputation " + self.imputation, self.imputation != "even"),
            ) if bad]
            if unsupported:
                raise ValueError("sampled targets are fused linearly with static weights at "
                                 "temperature 1 (the sampling temperature is the harvest's); "
                                 f"not supported with: {', '.join(unsupported)}")

    def refuse_unused(self) -> None:
        """Refuse a sharpness, α or fit size that these settings would ignore (the same targets as
        without it, so a mistyped run would pass for the one asked)."""
        changed = changed_options(self)
        for name, unused, fix in (
            ("alpha", self.operator != "power_mean",
             f"is the power mean's exponent and --operator {self.operator} does not use it: "
             "give --operator power_mean, or drop --alpha"),
            ("token_sharpness", self.token == "none",
             "sharpens token-level weights and there are none (--token none): give --token "
             "entropy or target, or drop --token-sharpness"),
            ("context_sharpness", self.context == "none",
             "sharpens context-level weights and there are none (--context none): give "
             "--context loss, or drop --context-sharpness"),
            ("fit_positions", not self.fit_weights,
             "bounds the positions of the weights' fit and there is none: give --weights fit, "
             "or drop --fit-positions"),
        ):
            if unused and name in changed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name):g} {fix}")

    @property
    def static_weights(self) -> np.ndarray:
        k = len(self.teachers)
        return np.full(k, 1.0 / k) if self.weights is None else np.asarray(self.weights, float)

    @property
    def teacher_temperatures(self) -> np.ndarray:
        k = len(self.teachers)
        return np.ones(k) if self.temperatures is None else np.asarray(self.temperatures, float)

    @property
    def operator_params(self) -> dict[str, float]:
        return {"alpha": self.alpha} if self.operator == "power_mean" else {}

    @property
    def adaptive(self) -> bool:
        return self.token != "none" or bool(self.task_weights) or self.context != "none"

    def policy(self, task_index: np.ndarray, seq_offsets: np.ndarray
               ) -> AdaptiveWeights | np.ndarray:
        """The weights of one part: static, or an adaptive policy over its rows."""
        if not self.adaptive and self.safety is None:
            return self.static_weights
        table = None
        if self.task_weights:
            tags = sorted(self.task_weights)
            table = np.array([self.task_weights[t] for t in tags] + [[1.0] * len(self.teachers)])
        return AdaptiveWeights(
            base=tuple(self.static_weights),
            token=self.token,
            token_sharpness=self.token_sharpness,
            task_table=table,
            task_index=task_index if table is not None else None,
            context=self.context,
            context_sharpness=self.context_sharpness,
            seq_offsets=seq_offsets,
            eps=self.eps,
            safety_index=self.safety,
            safety_floor=self.safety_floor,
        )
