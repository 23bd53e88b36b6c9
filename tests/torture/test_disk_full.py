"""A full disk: a clear one-line error (no traceback), nothing partial committed, and a rerun
once space is free completes the store.

Two ways to run out of space: a 1 MiB tmpfs mounted for the test (``mount -t tmpfs``, needs
root; skipped where mounting is not permitted) gives ENOSPC; ``RLIMIT_FSIZE`` in the child
(with SIGXFSZ ignored) gives EFBIG on the first file larger than the limit, anywhere.
"""

from __future__ import annotations

import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtkd.store import IncompleteStoreError, open_store

from .conftest import AGGREGATE, Pipeline, write_corpus
from .harness import check_store_after_kill, compare_stores, leftovers, run_cli
from .test_kills import cli_ok

pytestmark = pytest.mark.torture


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "test_file_size_limit covers the same path with RLIMIT_FSIZE")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def grow(mnt: Path) -> None:
    """Free space: the same file system, 64 MiB."""
    subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)


def assert_failed_cleanly(output: str, out: Path, reason: str) -> None:
    assert "error:" in output and reason in output, output[-2000:]
    assert "not committed" in output and "Traceback" not in output, output[-2000:]
    assert leftovers(out) == [], "temp files left behind"
    check_store_after_kill(out)  # committed parts sound, the rest absent
    with pytest.raises(IncompleteStoreError):
        open_store(out)


def test_tokenize_on_a_full_disk(small_disk: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", files=8, chars=1_000_000)
    args: list[object] = ["tokenize", corpus, "--tokenizer", tokenizer_dir, "--max-len", 128,
                          "--num-parts", 8, "--out"]
    ref, out = tmp_path / "ref", small_disk / "tokens"
    cli_ok(*args, ref)
    cli = run_cli([*args, out], tmp_path / "full.log")
    assert cli.proc.returncode == 1
    assert_failed_cleanly(cli.output(), out, "No space left on device")
    grow(small_disk)
    cli = run_cli([*args, out], tmp_path / "rerun.log")
    assert cli.proc.returncode == 0, cli.tail()
    compare_stores(ref, out)


def test_aggregate_on_a_full_disk(small_disk: Path, pipeline: Pipeline, tmp_path: Path) -> None:
    out = small_disk / "targets"
    args: list[object] = ["aggregate", *pipeline.teacher_stores, "--tokens", pipeline.tokens,
                          "--out", out, *AGGREGATE]
    cli = run_cli(args, tmp_path / "full.log")
    assert cli.proc.returncode == 1
    assert_failed_cleanly(cli.output(), out, "No space left on device")
    grow(small_disk)
    cli = run_cli(args, tmp_path / "rerun.log")
    assert cli.proc.returncode == 0, cli.tail()
    compare_stores(pipeline.targets, out)


def _limit_file_size(limit: int) -> None:
    """In the child before exec: files may not grow past ``limit`` bytes; writes beyond it
    fail with EFBIG instead of the default SIGXFSZ kill."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", files=4, chars=600_000)
    args: list[object] = ["tokenize", corpus, "--tokenizer", tokenizer_dir, "--max-len", 128,
                          "--num-parts", 4, "--out"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    cli_ok(*args, ref)
    cli = run_cli([*args, out], tmp_path / "limited.log",
                  preexec_fn=lambda: _limit_file_size(128 << 10))
    assert cli.proc.returncode == 1
    assert_failed_cleanly(cli.output(), out, "File too large")
    cli = run_cli([*args, out], tmp_path / "rerun.log")
    assert cli.proc.returncode == 0, cli.tail()
    compare_stores(ref, out)
