"""The demo's command runner: commands queued side by side run in parallel processes (each
once), each logged beside its output, and nothing runs when the block that queued them
fails."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mtkd.recipes import run as run_module
from mtkd.recipes.models import train_bpe_tokenizer
from mtkd.recipes.run import DemoError, Run, is_complete, train_job
from mtkd.recipes.sizes import SIZES
from mtkd.store import open_store


def _corpus(tmp_path: Path) -> tuple[Path, Path]:
    docs = [{"text": f"def f{i}(x):\n    return x * {i}\n" * 8} for i in range(6)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    train_bpe_tokenizer((d["text"] for d in docs), 300, tmp_path / "tokenizer")
    return corpus, tmp_path / "tokenizer"


def _tokenize(run: Run, corpus: Path, tokenizer: Path, name: str) -> None:
    run.mtkd("tokenize", corpus, "--tokenizer", tokenizer, "--out", run.path("stores", name),
             "--max-len", "32")


def test_side_by_side_runs_queued_commands_in_parallel_and_logs_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_module.os, "cpu_count", lambda: 2)
    corpus, tokenizer = _corpus(tmp_path)
    run = Run(tmp_path, SIZES["tiny"])
    with run.side_by_side(threads=1):
        for name in ("a", "b", "a"):  # the same command twice runs once
            _tokenize(run, corpus, tokenizer, name)
        assert not (tmp_path / "stores").exists()  # queued, not run yet
        with pytest.raises(RuntimeError, match="nest"), run.side_by_side():
            pass
    a, b = (open_store(tmp_path / "stores" / n, verify="full") for n in ("a", "b"))
    assert a.num_rows == b.num_rows > 0
    assert (tmp_path / "stores" / "a.log").read_text()  # each command's output, beside it
    assert (tmp_path / "stores" / "b.log").read_text()
    assert [c.split(" --out ")[1].split()[0] for c in run.commands] == [
        str(tmp_path / "stores" / "a"), str(tmp_path / "stores" / "b")]
    assert set(run.results["stage_seconds"]) == {"tokenize stores/a", "tokenize stores/b"}
    assert run.queued is None


def test_side_by_side_runs_nothing_when_its_block_fails(tmp_path: Path) -> None:
    corpus, tokenizer = _corpus(tmp_path)
    run = Run(tmp_path, SIZES["tiny"])
    with pytest.raises(ValueError, match="planning failed"), run.side_by_side():
        _tokenize(run, corpus, tokenizer, "a")
        raise ValueError("planning failed")
    assert not is_complete(tmp_path / "stores" / "a")
    assert run.commands == [] and run.queued is None
    _tokenize(run, corpus, tokenizer, "a")  # outside the block: at once
    assert is_complete(tmp_path / "stores" / "a")


def test_side_by_side_finishes_the_others_and_names_the_command_that_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_module.os, "cpu_count", lambda: 2)
    corpus, tokenizer = _corpus(tmp_path)
    run = Run(tmp_path, SIZES["tiny"])
    with pytest.raises(DemoError, match=r"tokenize stores/bad` failed"), run.side_by_side():
        _tokenize(run, tmp_path / "missing.jsonl", tokenizer, "bad")
        _tokenize(run, corpus, tokenizer, "good")
    assert is_complete(tmp_path / "stores" / "good")
    assert not is_complete(tmp_path / "stores" / "bad")
    assert "missing.jsonl" in (tmp_path / "stores" / "bad.log").read_text()


@pytest.mark.parametrize(("asked", "native"), [(True, True), (True, False), (False, True)])
def test_trainings_use_bf16_only_where_asked_and_native(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: bool, native: bool) -> None:
    monkeypatch.setattr(run_module, "native_bf16", lambda: native)
    run = Run(tmp_path, dataclasses.replace(SIZES["tiny"], bf16=asked))
    job = train_job(run, tmp_path / "students" / "s", tokens="tokens-student", steps=10,
                    batch=2, seed=0)
    assert ("--bf16" in job.args) == (asked and native)


def _cli(*args: object) -> tuple[int, str]:
    """``mtkd ARGS`` in this process: (exit code, output); never a traceback."""
    from typer.testing import CliRunner

    from mtkd.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{result.exception!r} escaped: {result.output[-2000:]}")
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(("text", "message"), [
    ("{broken", "unreadable"), ("[1, 2]", "not a demo run's results"),
    ("{}", "not a demo run's results"),
])
def test_report_and_demo_refuse_results_of_no_demo_run(text: str, message: str,
                                                       tmp_path: Path) -> None:
    """A damaged results.json gave `mtkd report` and a resumed `mtkd demo` a JSON traceback,
    and `{}` an empty report with exit 0."""
    (tmp_path / "results.json").write_text(text)
    code, out = _cli("report", tmp_path)
    assert code == 1 and f"{tmp_path / 'results.json'}: " in out and message in out, out
    assert not (tmp_path / "report").exists()
    code, out = _cli("demo", "--size", "tiny", "--workdir", tmp_path)
    assert code == 1 and message in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_demo_refuses_a_workdir_that_is_a_file_or_other_files(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, out = _cli("demo", "--size", "tiny", "--workdir", tmp_path / "file")
    assert code == 1 and "is a file, not a demo run directory" in out, out
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    code, out = _cli("demo", "--size", "tiny", "--workdir", home)
    assert code == 1 and "not a demo run directory (it holds notes.txt)" in out, out
    assert [p.name for p in home.iterdir()] == ["notes.txt"]
