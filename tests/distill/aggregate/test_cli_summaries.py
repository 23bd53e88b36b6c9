"""What `mtkd aggregate` and `mtkd info` say of a target store: the same diagnostics, the
fitted weights, a rerun that did nothing, a config shown whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.distill.aggregate.summary import summarize
from mtkd.store import open_store

from .test_job import make_teacher, make_tokens

runner = CliRunner()


def test_aggregate_and_info_say_what_the_targets_hold(tmp_path: Path) -> None:
    tokens = make_tokens(tmp_path)
    teachers = [str(make_teacher(tmp_path, tokens, f"t{j}", seed=j, scale=1.0 + j))
                for j in range(2)]
    out = tmp_path / "targets"
    args = ["aggregate", *teachers, "--tokens", str(tokens), "--out", str(out),
            "--weights", "fit", "--k-out", "8"]
    first = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert first.exit_code == 0, first.output
    fitted = open_store(out).attrs["config"]["weights"]
    assert len(fitted) == 2 and abs(sum(fitted) - 1) < 1e-9
    assert "  fitted static weights " + " ".join(f"{w:.3f}" for w in fitted) in first.output
    d = summarize(out)
    diagnostics = f"  mean jensen_gap {max(d['jensen_gap'], 0.0):.4f}  disagreement"
    assert f"aggregate: {int(d['positions']):,} positions → {out}" in first.output
    assert diagnostics in first.output

    again = runner.invoke(app, args, env={"COLUMNS": "300"})  # a requeue: nothing to fuse
    assert again.exit_code == 0, again.output
    assert f"aggregate: {out} was already complete" in again.output
    assert diagnostics in again.output

    shown = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    weights = "  mean weights " + " ".join(f"{d[f'mean_weight_{j}']:.3f}" for j in range(2))
    assert diagnostics in shown.output and weights + "\n" in shown.output
    config = open_store(out).attrs["config"]
    assert "  config:\n" in shown.output
    for name, value in config.items():  # a line per option, none cut off
        if len(json.dumps(value)) < 100:
            text = value if isinstance(value, str) else json.dumps(value)
            assert f"\n    {name}: {text}\n" in shown.output, name


def test_a_single_teacher_s_gap_is_not_shown_negative(tmp_path: Path) -> None:
    """One teacher: the Jensen gap is 0 up to rounding, shown 0.0000 (it was −0.0000)."""
    tokens = make_tokens(tmp_path)
    teacher = make_teacher(tmp_path, tokens, "t0", seed=0, scale=1.0)
    result = runner.invoke(app, ["aggregate", str(teacher), "--tokens", str(tokens), "--out",
                                 str(tmp_path / "one"), "--k-out", "8"])
    assert result.exit_code == 0, result.output
    assert "mean jensen_gap 0.0000" in result.output
    assert np.isfinite(summarize(tmp_path / "one")["jensen_gap"])
