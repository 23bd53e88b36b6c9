"""The demo's headline figures: computed from a run's results as the issue states them, left
out when not measured, and shown in the report's goals table with met / missed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mtkd.recipes.figures import figure_lines, headline_figures
from mtkd.recipes.report import figure_goals
from mtkd.recipes.run import Run
from mtkd.recipes.sizes import SIZES


def run_with(tmp_path: Path, bpb: dict[str, float], **results: object) -> Run:
    run = Run(tmp_path, SIZES["tiny"])
    run.results = {"students": {name: {"heldout_ce": 5.0, "heldout_bpb": v}
                                for name, v in bpb.items()},
                   "best_teacher": "t2-safety", **results}
    return run


def test_figures_follow_the_issue_formulas(tmp_path: Path) -> None:
    bpb = {"ce-only": 2.0, "single-t0-narrow-sampled": 1.8, "single-t0-cross-sampled": 1.81,
           "single-t0-narrow": 1.9, "single-t0-cross": 1.95,
           "single-t2-safety": 1.75, "single-smollm2": 1.7, "mix-real": 1.6,
           "single-t2-safety-full": 1.5, "single-t2-safety-sampled": 1.51,
           "single-t2-safety-hybrid": 1.503, "mix-linear": 1.74}
    run = run_with(tmp_path, bpb, seconds=590.0,
                   teachers={"t0-narrow": {"heldout_bpb": 1.9}, "t0-cross": {"heldout_bpb": 1.8}})
    fig = headline_figures(run)
    assert fig["cross_tokenizer_recovery"] == pytest.approx((2.0 - 1.81) / (2.0 - 1.8))
    assert fig["cross_tokenizer_recovery_topk"] == pytest.approx((2.0 - 1.95) / (2.0 - 1.9))
    assert fig["single_t0_cross_sampled_bpb"] == 1.81 and fig["single_t0_cross_bpb"] == 1.95
    assert fig["real_teacher_gain_pct"] == pytest.approx(100 * (1.7 - 2.0) / 2.0)
    # the best single-teacher student of offline targets: not the full-vocabulary one
    assert fig["mixture_vs_best_single_pct"] == pytest.approx(100 * (1.6 - 1.7) / 1.7)
    assert fig["sampled_vllm_vs_full_kd_pct"] == pytest.approx(100 * (1.51 - 1.5) / 1.5)
    assert fig["hybrid_vllm_vs_full_kd_pct"] == pytest.approx(100 * (1.503 - 1.5) / 1.5)
    assert fig["ce_only_bpb"] == 2.0 and fig["best_single_bpb"] == 1.75
    assert fig["teacher_t0_cross_bpb"] == 1.8 and fig["demo_seconds"] == 590.0
    assert "alignment_coverage_cross" not in fig  # no target store in this run: not measured
    lines = figure_lines(fig)
    assert "demo_seconds=590.0" in lines and "ce_only_bpb=2.0000" in lines
    assert all("-" not in line.split("=")[0] for line in lines)

    met = {row["measured"].split("=")[0]: row["met"] for row in figure_goals(fig)}
    assert met == {"cross_tokenizer_recovery": True, "real_teacher_gain_pct": True,
                   "mixture_vs_best_single_pct": True, "sampled_vllm_vs_full_kd_pct": True,
                   "demo_seconds": True}


def test_unmeasured_figures_are_left_out(tmp_path: Path) -> None:
    run = run_with(tmp_path, {"ce-only": 2.0, "single-t0-narrow-sampled": 2.0,
                              "single-t0-cross-sampled": math.nan})
    fig = headline_figures(run)
    assert "cross_tokenizer_recovery" not in fig  # no gain to recover: no ratio
    assert "cross_tokenizer_recovery_topk" not in fig  # not run
    assert "single_t0_cross_sampled_bpb" not in fig  # not finite
    assert "real_teacher_gain_pct" not in fig and "mixture_vs_best_single_pct" not in fig
    assert figure_goals(fig) == []
