"""The three store kinds: their headers, and the check that stores share one tokens store."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtkd.store import ArraySpec, Header, StoreError, open_store
from mtkd.store.schema import (
    TARGET,
    TEACHER,
    TEACHER_ROWS,
    TOKENS,
    check_aligned,
    target_header,
    teacher_header,
    tokens_header,
    vocab_fingerprint,
)

from .stores import write_store


def test_schema_headers() -> None:
    tok = tokens_header(3, {"tokenizer_hash": "h"})
    assert tok.kind == TOKENS and [a.name for a in tok.arrays] == ["token_ids"]
    teacher = teacher_header(2, 8, {"vocab_size": 1000}, temperatures=(1.0, 2.0),
                             num_samples=5)
    assert teacher.kind == TEACHER and teacher.schema_version == 2
    # default: the q64 top-k coding (byte planes; ids in 2 bytes for this vocabulary)
    assert teacher.attrs["topk_coding"] == "q64"
    assert teacher.spec("topk_ids") == ArraySpec("topk_ids", "uint8", (2, 8), "zstd")
    assert teacher.spec("topk_logprobs") == ArraySpec("topk_logprobs", "uint8", (2, 8), "zstd")
    assert teacher_header(2, 8, {}).spec("topk_ids").row_shape == (4, 8)  # no vocab: 4 bytes
    plain = teacher_header(2, 8, {"topk_coding": "q64"}, logprob_dtype="float16")
    assert plain.schema_version == 1 and "topk_coding" not in plain.attrs
    assert plain.spec("topk_ids") == ArraySpec("topk_ids", "int32", (8,), "zstd")
    assert plain.spec("topk_logprobs").dtype == "float16"
    assert [a.name for a in plain.arrays] == list(TEACHER_ROWS)  # what every engine returns
    with pytest.raises(ValueError, match="logprob dtype 'int8'"):
        teacher_header(2, 8, {}, logprob_dtype="int8")
    assert teacher.spec("tempered_tail_logmass").row_shape == (2,)
    assert teacher.spec("sample_counts").dtype == "uint16"
    assert teacher.attrs["k"] == 8 and teacher.attrs["temperatures"] == [1.0, 2.0]
    target = target_header(2, 16, 3, {}, teacher_ks=(8, 8))
    assert target.kind == TARGET and all(a.codec == "raw" for a in target.arrays)
    assert target.spec("weights").row_shape == (3,)
    assert target.spec("teacher1_probs").row_shape == (8,)
    assert vocab_fingerprint({"a": 0, "b": 1}) == vocab_fingerprint({"b": 1, "a": 0})
    assert vocab_fingerprint({"a": 0, "b": 1}) != vocab_fingerprint({"a": 1, "b": 0})


def test_check_aligned(tmp_path: Path) -> None:
    write_store(tmp_path / "tok", tokens_header(1, {}), [[3, 4]])
    tokens = open_store(tmp_path / "tok", TOKENS)
    good = Header(TEACHER, 1, (ArraySpec("x", "int32"),),
                  {"tokens_fingerprint": tokens.manifest["checksum"]})
    bad = Header(TEACHER, 1, (ArraySpec("x", "int32"),), {"tokens_fingerprint": "other"})
    write_store(tmp_path / "good", good, [[2, 3]])
    write_store(tmp_path / "bad", bad, [[2, 3]])
    check_aligned(tokens, open_store(tmp_path / "good"))
    with pytest.raises(StoreError, match="different tokens store"):
        check_aligned(tokens, open_store(tmp_path / "bad"))
