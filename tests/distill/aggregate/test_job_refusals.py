"""Aggregate settings refused from what the stores hold, before the target store is begun:
``--task-weight`` tags that the tokens store lacks, exact tails a teacher lacks at its own
temperature (and not at the others')."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mtkd.distill.aggregate.job import aggregate
from mtkd.store import StoreError, StoreWriter
from mtkd.store.schema import tokens_header
from tests.distill.aggregate.test_job import PARTS, VOCAB, config, make_teacher, make_tokens


def test_a_task_weight_tag_the_tokens_store_lacks_is_refused(two, tmp_path):
    tokens, teachers = two
    cfg = config(teachers, task_weights={"code": (1.0, 0.5), "modlue": (0.0, 1.0)})
    with pytest.raises(StoreError, match=r"--task-weight tags \['modlue'\] are not tasks of "
                                         r"the tokens store .*, which holds: code, math, prose"):
        aggregate(tokens, tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("meta", ["none", "no task column", "empty tags"])
def test_task_weights_over_a_tokens_store_without_tasks_are_refused(tmp_path, meta):
    rng = np.random.default_rng(0)
    writer = StoreWriter(tmp_path / "tokens", tokens_header(
        PARTS, {"tokenizer_hash": "tok", "vocab_size": VOCAB, "eos_id": None}))
    for p in range(PARTS):
        lengths, seq_ids = np.full(3, 6), (p << 32) + np.arange(3)
        table = None if meta == "none" else pa.table(
            {"seq_id": seq_ids} | ({"task": [""] * 3} if meta == "empty tags" else {}))
        with writer.open_part(p) as pw:
            pw.append({"token_ids": rng.integers(0, VOCAB, 18).astype(np.int32)}, lengths,
                      seq_ids, table)
    assert writer.finalize()
    tokens = tmp_path / "tokens"
    teachers = [make_teacher(tmp_path, tokens, f"t{j}", seed=j, scale=1.0) for j in range(2)]
    cfg = config(teachers, task_weights={"code": (1.0, 0.5)})
    with pytest.raises(StoreError, match=r"--task-weight weighs sequences by their task tag, "
                                         r"and the tokens store .* holds none"):
        aggregate(tokens, tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_exact_tails_are_needed_at_each_teachers_own_temperature_only(tmp_path):
    """--temperatures 2,1,1 --tail-model exact: the third teacher, harvested without
    --temperature, runs at T = 1 and needs no tempered tail (it was asked for T = 2)."""
    tokens = make_tokens(tmp_path)
    teachers = [make_teacher(tmp_path, tokens, f"t{j}", seed=j, scale=2.0,
                             temperatures=(2.0,)) for j in range(2)]
    teachers.append(make_teacher(tmp_path, tokens, "tc", seed=5, scale=2.0))
    done = aggregate(tokens, tmp_path / "out", config(teachers, temperatures=(2.0, 1.0, 1.0),
                                                      tail_model="exact"), progress=False)
    assert done.complete
    with pytest.raises(StoreError, match=r"needs the tempered tail at T = 3 in .*tc \(it holds "
                                         r"none\)"):
        aggregate(tokens, tmp_path / "hot", config(teachers, temperatures=(2.0, 1.0, 3.0),
                                                   tail_model="exact"), progress=False)
    with pytest.raises(StoreError, match=r"at T = 3 in .*t1 \(it holds \[2.0\]\)"):
        aggregate(tokens, tmp_path / "hot", config(teachers, temperatures=(2.0, 3.0, 1.0),
                                                   tail_model="exact"), progress=False)
    assert not (tmp_path / "hot").exists()
