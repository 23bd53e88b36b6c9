"""Aggregate options refused by the config itself, before any store is opened or begun.

Found by a user review: adaptive numbers out of range were refused per part, after the target
store's store.json was written (so the corrected rerun was refused as different settings);
static weights that a task row zeroes failed mid-job; options that the other settings ignore
were taken silently (exit 0, the same targets).
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.distill.aggregate.job import aggregate
from mtkd.store import open_store
from mtkd.store.schema import TARGET
from tests.distill.aggregate.test_job import PARTS, config


@pytest.mark.parametrize(("kw", "match"), [
    ({"eps": 0.9, "token": "entropy"}, r"--eps must be in \[0, 1/K\] = \[0, 0.5\]"),
    ({"eps": -0.1, "token": "entropy"}, r"--eps must be in"),
    ({"safety": 0, "safety_floor": 1.5}, r"--safety-floor must be in \[0, 1 − \(K−1\)·eps\]"),
    ({"safety": 0, "safety_floor": -0.2}, r"--safety-floor must be in"),
    ({"safety": 0, "safety_floor": 0.9, "eps": 0.2, "token": "entropy"},
     r"--safety-floor must be in .* = \[0, 0.8\]"),
    ({"token": "entropy", "token_sharpness": -1.0}, r"--token-sharpness must be finite and >= 0"),
    ({"token": "target", "token_sharpness": float("inf")}, r"--token-sharpness must be finite"),
    ({"context": "loss", "context_sharpness": -3.0}, r"--context-sharpness must be finite"),
])
def test_adaptive_numbers_out_of_range_are_refused_by_the_config(two, kw, match):
    with pytest.raises(ValueError, match=match):
        config(two[1], **kw)


def test_a_refused_eps_leaves_no_store_behind_and_the_corrected_rerun_runs(two, tmp_path):
    """The review's case: --eps 0.9 over 2 teachers wrote store.json before it was refused,
    and the rerun with --eps 0.1 was then refused as a different attrs.config.eps."""
    tokens, teachers = two
    out = tmp_path / "out"
    args = ["aggregate", *map(str, teachers), "--tokens", str(tokens), "--out", str(out),
            "--token", "entropy", "--k-out", "8"]
    bad = CliRunner().invoke(app, [*args, "--eps", "0.9"], env={"COLUMNS": "300"})
    assert bad.exit_code == 1 and "--eps must be in [0, 1/K] = [0, 0.5]" in bad.output
    assert not out.exists()
    good = CliRunner().invoke(app, [*args, "--eps", "0.1"], env={"COLUMNS": "300"})
    assert good.exit_code == 0, good.output


def test_static_weights_that_a_task_row_zeroes_entirely_are_refused(two):
    """--weights 1,0 --task-weight module=0,1: every teacher weighs 0 on module sequences;
    it failed mid-job ("adaptive weights vanish") after a part was committed."""
    with pytest.raises(ValueError, match=r"--task-weight module=0,1 with --weights 1,0 gives "
                                         r"every teacher weight 0 on the 'module' sequences"):
        config(two[1], weights=(1.0, 0.0), task_weights={"module": (0.0, 1.0)})
    config(two[1], weights=(1.0, 0.0), task_weights={"module": (1.0, 1.0)})  # teacher 0 left


@pytest.mark.parametrize(("kw", "match"), [
    ({"alpha": 2.0}, r"--alpha 2 is the power mean's exponent and --operator linear does not"),
    ({"alpha": 0.7, "operator": "geometric"}, r"--alpha 0.7 .* --operator geometric"),
    ({"token_sharpness": 3.0}, r"--token-sharpness 3 sharpens token-level weights and there "
                               r"are none \(--token none\)"),
    ({"token_sharpness": 2.0, "context": "loss"}, r"--token-sharpness 2"),
    ({"context_sharpness": 0.5}, r"--context-sharpness 0.5 sharpens context-level weights"),
    ({"context_sharpness": 2.0, "token": "entropy"}, r"--context-sharpness 2"),
])
def test_options_the_settings_would_ignore_are_refused(two, kw, match):
    with pytest.raises(ValueError, match=match):
        config(two[1], **kw)


@pytest.mark.parametrize("kw", [
    {"operator": "power_mean", "alpha": 2.0},
    {"token": "entropy", "token_sharpness": 3.0},
    {"context": "loss", "context_sharpness": 0.5},
    {"alpha": 0.5, "token_sharpness": 1.0, "context_sharpness": 1.0},  # the defaults
])
def test_the_same_options_where_they_are_used_are_taken(two, kw):
    config(two[1], **kw)


def test_safety_with_static_weights_and_no_floor_changes_nothing(two, tmp_path):
    """Kept (the demo passes it): with eps 0 the floor is the teacher's own static weight,
    which static weights already give it, so the targets are those without --safety."""
    tokens, teachers = two
    plain = config(teachers, weights=(0.3, 0.7), k_out=8)
    aggregate(tokens, tmp_path / "plain", plain, progress=False)
    aggregate(tokens, tmp_path / "safe", config(teachers, weights=(0.3, 0.7), k_out=8,
                                                safety=1), progress=False)
    a, b = open_store(tmp_path / "plain", TARGET), open_store(tmp_path / "safe", TARGET)
    for p in range(PARTS):
        for name in ("ids", "probs", "tail_mass", "weights"):
            np.testing.assert_allclose(a.read_part(p)[name], b.read_part(p)[name],
                                       rtol=0, atol=1e-7, err_msg=name)
