"""A target store is resumed whatever spelling names its stores: the teachers are what their
manifests hold, not the paths typed (another working directory, ``./``, absolute, a copy)."""

from __future__ import annotations

import shutil

import pytest

from mtkd.distill.aggregate.job import aggregate
from mtkd.store import StoreError
from tests.distill.aggregate.test_job import assert_same_store, config, make_teacher, make_tokens


def test_a_resume_from_another_directory_spells_the_same_stores_differently(
        tmp_path, monkeypatch):
    """Begun as `aggregate ta tb --tokens tok --out one` inside review-agg, resumed from its
    parent as `aggregate review-agg/ta ...`: the same stores, so the job goes on; a teacher
    store of other content under a known name is still refused."""
    base = tmp_path / "review-agg"
    base.mkdir()
    tokens = make_tokens(base)
    for j, name in enumerate(("ta", "tb")):
        make_teacher(base, tokens, name, seed=30 + j, scale=1.0 + j)
    monkeypatch.chdir(base)
    first = aggregate("tokens", "one", config(["ta", "tb"], k_out=8), worker_index=0,
                      num_workers=2, progress=False)
    assert not first.complete
    monkeypatch.chdir(tmp_path)
    rest = aggregate("review-agg/tokens", "review-agg/one",
                     config(["review-agg/ta", "./review-agg/tb"], k_out=8), worker_index=1,
                     num_workers=2, progress=False)
    assert rest.complete and rest.parts_written == 1
    again = aggregate(str(base / "tokens"), base / "one",  # absolute, complete: nothing to do
                      config([base / "ta", base / "tb"], k_out=8), progress=False)
    assert again.parts_written == 0 and again.complete
    aggregate("review-agg/tokens", "whole", config(["review-agg/ta", "review-agg/tb"], k_out=8),
              progress=False)
    assert_same_store(base / "one", tmp_path / "whole")
    shutil.copytree(base / "tb", tmp_path / "tb-copy")  # same content elsewhere: the same store
    assert aggregate("review-agg/tokens", "review-agg/one",
                     config(["review-agg/ta", "tb-copy"], k_out=8),
                     progress=False).parts_written == 0
    make_teacher(tmp_path, base / "tokens", "tb", seed=99, scale=2.0)  # another tb
    with pytest.raises(StoreError, match=r"different attrs.teacher_stores"):
        aggregate("review-agg/tokens", "review-agg/one", config(["review-agg/ta", "tb"],
                                                                k_out=8), progress=False)
