"""The demo's headline figures: one number each, ``name=value``, in held-out bits per byte.

Bits per byte compare models whatever their tokenizer (``mtkd.distill.train.bits_per_byte``).
The figures are computed from what the run measured (students' and teachers'
``final_metrics.json``, the target stores' coverage counts), written to ``results.json`` under
``figures`` and printed at the end of ``mtkd demo``; ``FIGURE_GOALS`` says what each should
reach. A figure the run could not measure (a stage skipped, a store without ``byte_end``) is
left out rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mtkd.recipes.cross_experiments import (
    CROSS_TARGETS,
    CROSS_TEACHER,
    PAIRED_TEACHER,
    REAL_TARGETS,
    REAL_TEACHER,
)
from mtkd.recipes.run import Run
from mtkd.store import StoreError

#: figure → (the goal in words, whether a value meets it)
FIGURE_GOALS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "cross_tokenizer_recovery": ("≥ 0.9", lambda v: v >= 0.9),
    "real_teacher_gain_pct": ("≤ −5", lambda v: v <= -5),
    "mixture_vs_best_single_pct": ("< 0", lambda v: v < 0),
    "sampled_vllm_vs_full_kd_pct": ("≤ 1.0", lambda v: v <= 1.0),
    "demo_seconds": ("≤ 600", lambda v: v <= 600),
}
#: students that are not a single teacher's offline top-k targets (other target kinds)
NOT_SINGLE = ("-full", "-sampled", "-hybrid", "-label")


def student_bpb(results: dict[str, Any]) -> dict[str, float]:
    """Held-out bits per byte of every student that has it."""
    return {name: m["heldout_bpb"] for name, m in results.get("students", {}).items()
            if m.get("heldout_bpb") is not None}


def single_teacher_students(bpb: dict[str, float]) -> dict[str, float]:
    """The students distilled from one teacher's offline top-k targets."""
    return {k: v for k, v in bpb.items() if k.startswith("single-") and not k.endswith(NOT_SINGLE)}


def coverage_fraction(run: Run, store: str, teacher: int = 0) -> float | None:
    """The share of student positions that teacher ``teacher`` of the target store ``store``
    gives a distribution (None when the store is absent or records no coverage)."""
    from mtkd.distill.aggregate.summary import summarize

    try:
        return summarize(run.path("stores", store)).get(f"coverage_fraction_{teacher}")
    except (StoreError, FileNotFoundError):
        return None


def _pct(value: float, base: float) -> float:
    return 100.0 * (value - base) / base


def headline_figures(run: Run) -> dict[str, float]:
    """The run's headline figures (see the module docstring); finite numbers only."""
    results = run.results
    bpb = student_bpb(results)
    teachers = results.get("teachers", {})
    ce = bpb.get("ce-only")
    best = results.get("best_teacher")
    figures: dict[str, float | None] = {
        "ce_only_bpb": ce,
        "mix_linear_bpb": bpb.get("mix-linear"),
        "best_single_bpb": bpb.get(f"single-{best}"),
        "best_single_full_vocab_bpb": bpb.get(f"single-{best}-full"),
        f"teacher_{PAIRED_TEACHER}_bpb": teachers.get(PAIRED_TEACHER, {}).get("heldout_bpb"),
        f"teacher_{CROSS_TEACHER}_bpb": teachers.get(CROSS_TEACHER, {}).get("heldout_bpb"),
    }
    for suffix, figure in (("-sampled", "cross_tokenizer_recovery"),
                           ("", "cross_tokenizer_recovery_topk")):
        same = bpb.get(f"single-{PAIRED_TEACHER}{suffix}")
        cross = bpb.get(f"single-{CROSS_TEACHER}{suffix}")
        figures |= {f"single-{PAIRED_TEACHER}{suffix}-bpb": same,
                    f"single-{CROSS_TEACHER}{suffix}-bpb": cross}
        if ce is not None and same is not None and cross is not None and ce != same:
            figures[figure] = (ce - cross) / (ce - same)
    real, mix = bpb.get(f"single-{REAL_TEACHER}"), bpb.get("mix-real")
    figures |= {f"single_{REAL_TEACHER}_bpb": real, "mix_real_bpb": mix}
    figures["alignment_coverage_cross"] = coverage_fraction(run, CROSS_TARGETS)
    figures["alignment_coverage_real"] = coverage_fraction(run, REAL_TARGETS)
    if ce is not None and real is not None:
        figures["real_teacher_gain_pct"] = _pct(real, ce)
    singles = single_teacher_students(bpb)
    if mix is not None and singles:
        figures["mixture_vs_best_single_pct"] = _pct(mix, min(singles.values()))
    sampled, full = bpb.get(f"single-{best}-sampled"), bpb.get(f"single-{best}-full")
    hybrid = bpb.get(f"single-{best}-hybrid")  # --experiments all
    figures |= {"best_single_sampled_bpb": sampled, "best_single_hybrid_bpb": hybrid}
    if sampled is not None and full is not None:  # vLLM's draws against full-vocabulary KD
        figures["sampled_vllm_vs_full_kd_pct"] = _pct(sampled, full)
    if hybrid is not None and full is not None:  # its exact top-8 + draws from the rest
        figures["hybrid_vllm_vs_full_kd_pct"] = _pct(hybrid, full)
    figures["demo_seconds"] = results.get("seconds")
    return {k.replace("-", "_"): float(v) for k, v in figures.items()
            if v is not None and math.isfinite(v)}


def figure_lines(figures: dict[str, float]) -> list[str]:
    """``name=value`` lines (4 decimals; seconds to 1)."""
    return [f"{name}={value:.1f}" if name.endswith("seconds") else f"{name}={value:.4f}"
            for name, value in figures.items()]
