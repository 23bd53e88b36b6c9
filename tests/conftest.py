"""Shared fixtures: a small BPE tokenizer trained on the standard library, built once."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("soak", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mtkd.recipes.models import train_bpe_tokenizer
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(stdlib_texts(max_files=40), vocab_size=512, out_dir=out)
    return out


FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def memory_tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temp dir in memory where possible: for tests writing many small stores, fsync/unlink
    on a busy disk dominate their cost (the protocol's semantics are the same on tmpfs)."""
    if FAST_TMP is None:
        yield tmp_path_factory.mktemp("t")
        return
    path = Path(tempfile.mkdtemp(dir=FAST_TMP, prefix="mtkd-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
