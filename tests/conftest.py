"""Shared fixtures: a small BPE tokenizer trained on the standard library, built once."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
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


def run_mtkd(*args: object, timeout: float = 540) -> str:
    """``python -m mtkd ARGS`` in its own process group (vLLM's engine processes can outlive the
    command, so the group is killed afterwards); its stdout, or a failure showing its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "mtkd", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    return stdout


@pytest.fixture(scope="session")
def mtkd_cli() -> Callable[..., str]:
    """:func:`run_mtkd`: a real ``mtkd`` command line, as a user runs it."""
    return run_mtkd
