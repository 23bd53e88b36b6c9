"""Fixtures of the torture suite: corpora, two tiny teachers, the uninterrupted reference runs;
the session's summary line; no process left behind."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import TALLY, kill_all_live

#: Harvest options of every teacher store here (the hf engine: exact and quick to start).
HARVEST = ("--engine", "hf", "--k", "8", "--dtype", "float32", "--batch-tokens", "4096")
AGGREGATE = ("--weights", "0.6,0.4", "--temperatures", "2,1", "--k-out", "16")
PIPELINE_MAX_LEN = 64


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY.used:
        terminalreporter.write_sep("=", "torture")
        terminalreporter.write_line(TALLY.line())


@pytest.fixture(autouse=True)
def _no_process_left() -> Iterator[None]:
    yield
    kill_all_live()


def write_corpus(out: Path, files: int, chars: int, doc_chars: int = 1500,
                 skip: int = 0) -> Path:
    """``files`` jsonl files of standard-library source cut into documents of ~``doc_chars``
    characters, ``chars`` in all (deterministic)."""
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py"))[skip:]:
        text = path.read_text(encoding="utf-8", errors="replace")
        for a in range(0, len(text), doc_chars):
            docs.append(text[a:a + doc_chars])
            total += len(docs[-1])
            if total >= chars:
                break
        if total >= chars:
            break
    for i in range(files):
        with open(out / f"c{i:03d}.jsonl", "w") as f:
            for doc in docs[i::files]:
                f.write(json.dumps({"text": doc, "tag": f"t{i % 3}"}) + "\n")
    return out


@dataclass(frozen=True)
class Pipeline:
    """The uninterrupted runs every torture test compares with."""

    root: Path
    tokenizer: Path
    corpus: Path
    tokens: Path
    teachers: tuple[Path, Path]  # model directories
    teacher_stores: tuple[Path, Path]  # harvested with HARVEST
    targets: Path  # aggregated with AGGREGATE


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Pipeline:
    import torch
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from mtkd.cli import app
    from mtkd.recipes.models import init_llama

    root = tmp_path_factory.mktemp("torture-pipeline")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    teachers = tuple(
        init_llama(root / f"teacher{i}", 512, hidden=64, layers=2 - i, heads=2,
                   max_position=256, seed=1 + i, tokenizer=tok)
        for i in range(2)
    )
    corpus = write_corpus(root / "corpus", files=6, chars=45_000)
    runner = CliRunner()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (OMP_NUM_THREADS=1): identical floats
    try:
        def mtkd(*args: object) -> None:
            result = runner.invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, result.output

        tokens = root / "tokens"
        mtkd("tokenize", corpus, "--tokenizer", tokenizer_dir, "--out", tokens,
             "--max-len", PIPELINE_MAX_LEN, "--num-parts", 6, "--task-field", "tag")
        stores = (root / "teacher0-ref", root / "teacher1-ref")
        for model, store in zip(teachers, stores, strict=True):
            mtkd("harvest", tokens, "--model", model, "--out", store, *HARVEST)
        targets = root / "targets-ref"
        mtkd("aggregate", *stores, "--tokens", tokens, "--out", targets, *AGGREGATE)
    finally:
        torch.set_num_threads(threads)
    return Pipeline(root, tokenizer_dir, corpus, tokens, teachers, stores, targets)
