"""`--weights fit` on a large store reads a bounded, evenly spread subset of its parts (it held
every position of every part in memory: 32 GB per worker at 1e9 positions and 4 teachers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtkd.distill.aggregate.job import aggregate, fit_parts, target_logprobs
from mtkd.distill.aggregate.weights import fit_mixture_weights
from mtkd.store import open_store

from .test_job import config, make_teacher, make_tokens


def test_the_fit_reads_parts_spread_within_the_bound(tmp_path: Path) -> None:
    tokens = open_store(make_tokens(tmp_path))
    rows = tokens.num_rows
    assert list(fit_parts(tokens, rows)) == [0, 1, 2]  # a store within the bound: all of it
    assert list(fit_parts(tokens, -(-rows // 2))) == [0, 2]  # half: every other part
    assert list(fit_parts(tokens, 1)) == [0]


def test_a_bounded_fit_is_the_fit_of_its_parts(tmp_path: Path) -> None:
    tokens = make_tokens(tmp_path)
    teachers = [make_teacher(tmp_path, tokens, f"t{j}", seed=j, scale=1.0 + j) for j in range(2)]
    stores = [open_store(t) for t in teachers]
    store = open_store(tokens)
    whole, bounded = tmp_path / "whole", tmp_path / "bounded"
    aggregate(tokens, whole, config(teachers, fit_weights=True), progress=False)
    aggregate(tokens, bounded, config(teachers, fit_weights=True, fit_positions=1),
              progress=False)
    got = open_store(bounded).attrs["config"]["weights"]
    want = fit_mixture_weights(target_logprobs(stores, store, [0]))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert open_store(whole).attrs["config"]["weights"] == pytest.approx(
        fit_mixture_weights(target_logprobs(stores, store)), rel=1e-12)
    assert got != open_store(whole).attrs["config"]["weights"]
