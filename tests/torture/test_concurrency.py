"""Workers started at once on one output directory (``--worker-index i --num-workers 4``, separate
processes) finish one complete store equal to a single process's; a second round over the
complete store rewrites nothing (every file's and directory's inode, size and mtime unchanged).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import AGGREGATE, HARVEST, Pipeline, write_corpus
from .harness import Cli, compare_stores, leftovers, snapshot
from .test_kills import cli_ok

pytestmark = pytest.mark.torture

WORKERS = 4


def run_workers(make_args: list[list[object]], log_dir: Path, name: str) -> list[str]:
    """Start every command at once; wait for all; return their outputs."""
    clis = [Cli(args, log_dir / f"{name}-{i}.log") for i, args in enumerate(make_args)]
    for cli in clis:
        assert cli.wait(600) == 0, cli.tail()
    return [cli.output() for cli in clis]


def workers(args: list[object], extra: tuple[int, ...] = ()) -> list[list[object]]:
    """``args`` for workers 0..3, plus a second copy of each index in ``extra`` (two writers
    racing for the same parts: the first rename wins, the other discards its copy)."""
    return [[*args, "--worker-index", i, "--num-workers", WORKERS]
            for i in [*range(WORKERS), *extra]]


def check_round_two_is_a_noop(out: Path, args: list[object], log_dir: Path, name: str) -> None:
    before = snapshot(out)
    run_workers(workers(args), log_dir, f"{name}-again")
    assert snapshot(out) == before, "a rerun over a complete store changed files"


def test_four_tokenize_workers(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", files=12, chars=300_000)
    args: list[object] = ["tokenize", corpus, "--tokenizer", tokenizer_dir, "--max-len", 128,
                          "--num-parts", 12, "--out"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    cli_ok(*args, ref)
    run_workers(workers([*args, out], extra=(0,)), tmp_path, "tokenize")
    compare_stores(ref, out)
    assert "OK" in cli_ok("verify", out) and leftovers(out) == []
    check_round_two_is_a_noop(out, [*args, out], tmp_path, "tokenize")


def test_four_harvest_workers(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "teacher1"
    args: list[object] = ["harvest", pipeline.tokens, "--model", pipeline.teachers[1], "--out",
                          out, *HARVEST]
    outputs = run_workers(workers(args), tmp_path, "harvest")
    assert sum("store complete" in o for o in outputs) >= 1, outputs
    compare_stores(pipeline.teacher_stores[1], out)
    assert "OK" in cli_ok("verify", out) and leftovers(out) == []
    check_round_two_is_a_noop(out, args, tmp_path, "harvest")


def test_four_aggregate_workers(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "targets"
    args: list[object] = ["aggregate", *pipeline.teacher_stores, "--tokens", pipeline.tokens,
                          "--out", out, *AGGREGATE]
    run_workers(workers(args, extra=(1,)), tmp_path, "aggregate")
    compare_stores(pipeline.targets, out)
    assert "OK" in cli_ok("verify", out) and leftovers(out) == []
    check_round_two_is_a_noop(out, args, tmp_path, "aggregate")


def test_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """A writer killed while writing ``store.json`` or ``manifest.json`` leaves a temp file in
    the store's root: ``finalize`` removes it once its writer is dead, never a live one's."""
    import os

    import numpy as np

    from mtkd.store import ArraySpec, Header, StoreWriter
    from mtkd.store.fs import HOST

    writer = StoreWriter(tmp_path / "s", Header("tokens", 1, (ArraySpec("x", "int32"),), {}))
    dead = tmp_path / "s" / f".tmp-manifest.json-{HOST}-{2**22 + 12345}-0a1b"
    live = tmp_path / "s" / f".tmp-store.json-{HOST}-{os.getpid()}-0a1b"
    for path in (dead, live):
        path.write_text("{")
    with writer.open_part(0) as pw:
        pw.append({"x": np.arange(3)}, [3], [0])
    assert writer.finalize()
    assert not dead.exists() and live.exists()
