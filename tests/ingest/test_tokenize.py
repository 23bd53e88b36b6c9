"""The tokenize job: the corpus readers, windows, problems, resume and workers."""

from __future__ import annotations

import itertools
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.ingest.corpus import (
    CorpusError,
    Problems,
    group_units,
    list_files,
    plan_units,
    read_unit,
)
from mtkd.ingest.job import TokenizeConfig, load_tokenizer, tokenize_corpus, windows
from mtkd.store import open_store, verify_store

EXCLUDE = ("site-packages", "test*", "idlelib", "__pycache__", "lib2to3", "tkinter", "turtledemo")
@pytest.fixture
def tmp_path(memory_tmp_path: Path) -> Path:
    """Stores in memory where possible (see conftest.memory_tmp_path)."""
    return memory_tmp_path


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~30 small standard-library sources, copied with their relative paths, plus decoys that
    the exclude patterns must skip."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in list_files([stdlib], "*.py", EXCLUDE) if 500 < p.stat().st_size < 12_000]
    out = tmp_path_factory.mktemp("corpus")
    for src in files[:: max(1, len(files) // 30)][:30]:
        dst = out / src.relative_to(stdlib)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    (out / "empty.py").write_text("\n\n")
    for decoy in ("site-packages/pkg/mod.py", "tests/test_mod.py", "pkg/test_x.py"):
        (out / decoy).parent.mkdir(parents=True, exist_ok=True)
        (out / decoy).write_text("raise SystemExit('excluded')\n")
    return out


def expected_sequences(texts: list[str], tokenizer_dir: Path, max_len: int,
                       overlap: int) -> list[list[int]]:
    """The reference: the tokenizer called directly, plus eos, cut into overlapping windows."""
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    out = []
    for text in texts:
        ids = [*tok.encode(text, add_special_tokens=False).ids, eos]
        start = 0
        while True:
            out.append(ids[start:start + max_len])
            if start + max_len >= len(ids):
                break
            start += max_len - overlap
    return out


def store_sequences(root: Path) -> list[list[int]]:
    store = open_store(root, "tokens", verify="full")
    batch = store.read(np.arange(store.num_sequences))
    return [batch["token_ids"][a:b].tolist() for a, b in zip(batch.offsets[:-1],
                                                               batch.offsets[1:], strict=True)]


def store_digest(root: Path) -> dict:
    """Everything a reader sees: manifest checksum (covers every file's sha256), arrays, meta."""
    store = open_store(root, verify="full")
    return {
        "checksum": store.manifest["checksum"],
        "tokens": [store.read_part(p)["token_ids"].tolist() for p in range(store.num_parts)],
        "meta": store.read_meta().to_pylist(),
    }


# --------------------------------------------------------------------------- the stdlib corpus


def test_stdlib_tokens_equal_the_tokenizer(stdlib_corpus: Path, tokenizer_dir: Path,
                                           tmp_path: Path) -> None:
    files = list_files([stdlib_corpus], "*.py", EXCLUDE)
    assert len(files) == 31 and not any("excluded" in f.read_text() for f in files)
    cfg = TokenizeConfig(max_len=96, overlap=16, pattern="*.py", exclude=EXCLUDE)
    summary = tokenize_corpus([stdlib_corpus], tokenizer_dir, tmp_path / "tok", cfg,
                              num_parts=4, progress=False)
    assert summary.complete and summary.parts == 4 and summary.parts_written == 4
    assert summary.documents == 30 and summary.problems == {"empty_document": 1}

    texts = [f.read_text(encoding="utf-8") for f in files if f.read_text().strip()]
    want = expected_sequences(texts, tokenizer_dir, 96, 16)
    assert store_sequences(tmp_path / "tok") == want
    assert summary.sequences == len(want) and summary.tokens == sum(map(len, want))

    store = open_store(tmp_path / "tok")
    meta = store.read_meta().to_pydict()
    assert meta["seq_id"] == store.seq_ids.tolist()
    assert [s >> 32 for s in meta["seq_id"]] == [d >> 32 for d in meta["doc_id"]]
    assert set(meta["source"]) == {str(f) for f in files if f.read_text().strip()}
    assert meta["window"][:2] == [0, 1] and meta["start"][:2] == [0, 80]
    assert set(meta["task"]) == {""}
    attrs = store.attrs
    assert attrs["eos_id"] == load_tokenizer(tokenizer_dir)[1] is not None
    assert attrs["num_files"] == 31 and attrs["config"]["max_len"] == 96
    assert len(attrs["tokenizer_hash"]) == 32 and attrs["vocab_size"] <= 512


def test_two_processes_equal_one(stdlib_corpus: Path, tokenizer_dir: Path,
                                 tmp_path: Path) -> None:
    cfg = TokenizeConfig(max_len=128, pattern="*.py", exclude=EXCLUDE)
    for name, processes in (("one", 1), ("two", 2)):
        tokenize_corpus([stdlib_corpus], tokenizer_dir, tmp_path / name, cfg, num_parts=3,
                        processes=processes, progress=False)
    assert store_digest(tmp_path / "one") == store_digest(tmp_path / "two")


def test_resume_completes_a_deleted_part(stdlib_corpus: Path, tokenizer_dir: Path,
                                         tmp_path: Path) -> None:
    cfg = TokenizeConfig(max_len=128, pattern="*.py", exclude=EXCLUDE)
    out = tmp_path / "tok"
    tokenize_corpus([stdlib_corpus], tokenizer_dir, out, cfg, num_parts=3, progress=False)
    before = store_digest(out)
    shutil.rmtree(out / "parts" / "00001")
    assert any("part 1 missing" in p for p in verify_store(out))
    summary = tokenize_corpus([stdlib_corpus], tokenizer_dir, out, cfg, num_parts=3,
                              progress=False)
    assert summary.parts_written == 1 and summary.complete
    assert verify_store(out) == []
    assert store_digest(out) == before
    again = tokenize_corpus([stdlib_corpus], tokenizer_dir, out, cfg, num_parts=3,
                            progress=False)
    assert again.parts_written == 0 and store_digest(out) == before


def test_cli_workers_as_separate_invocations(stdlib_corpus: Path, tokenizer_dir: Path,
                                             tmp_path: Path) -> None:
    runner = CliRunner()
    common = [str(stdlib_corpus), "--tokenizer", str(tokenizer_dir), "--max-len", "128",
              "--pattern", "*.py", "--num-parts", "3", *[f"--exclude={x}" for x in EXCLUDE]]
    single = runner.invoke(app, ["tokenize", *common, "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    out = str(tmp_path / "shared")
    first = runner.invoke(app, ["tokenize", *common, "--out", out, "--worker-index", "1",
                                "--num-workers", "2"])
    assert first.exit_code == 0, first.output
    assert "wrote 1 parts" in first.output and "every worker" in first.output
    assert not (tmp_path / "shared" / "manifest.json").exists()
    second = runner.invoke(app, ["tokenize", *common, "--out", out, "--worker-index", "0",
                                 "--num-workers", "2"])
    assert second.exit_code == 0, second.output
    assert "sequences" in second.output
    assert store_digest(tmp_path / "shared") == store_digest(tmp_path / "single")
    bad = runner.invoke(app, ["tokenize", *common, "--out", out, "--worker-index", "2",
                              "--num-workers", "2"])
    assert bad.exit_code == 2 and "--worker-index 2" in bad.output


def test_changed_settings_are_refused(stdlib_corpus: Path, tokenizer_dir: Path,
                                      tmp_path: Path) -> None:
    runner = CliRunner()
    common = [str(stdlib_corpus), "--tokenizer", str(tokenizer_dir), "--pattern", "*.py",
              "--num-parts", "2", "--out", str(tmp_path / "tok")]
    assert runner.invoke(app, ["tokenize", *common, "--max-len", "128"]).exit_code == 0
    result = runner.invoke(app, ["tokenize", *common, "--max-len", "64"])
    assert result.exit_code == 1 and "attrs.config.max_len" in result.output


# --------------------------------------------------------------------------- jsonl and parquet

JSONL_LINES = [
    json.dumps({"text": "def f():\n    return 1\n", "task": "code"}).encode(),
    json.dumps({"text": "hello world, hello"}).encode(),  # no task field
    b"{bad json",
    b'{"text": "caf\xe9 au lait"}',  # latin-1 byte: invalid UTF-8
    json.dumps({"text": ""}).encode(),
    json.dumps({"title": "no text here"}).encode(),
    b"",  # blank line: skipped silently
    b'{"text": "lone \\ud800 surrogate"}',
    json.dumps({"text": "x = [1, 2, 3]", "task": 3}).encode(),
    b"[1, 2]",
    json.dumps({"text": "   \n"}).encode(),
]
JSONL_PROBLEMS = {"bad_json": 1, "invalid_utf8": 2, "empty_document": 2, "missing_field": 2}
JSONL_DOCS = [("def f():\n    return 1\n", "code"), ("hello world, hello", "misc"),
              ("x = [1, 2, 3]", "3")]


def test_jsonl_documents_and_problems(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b"\n".join(JSONL_LINES) + b"\n")
    cfg = TokenizeConfig(max_len=8, overlap=2, task_field="task", task="misc")
    summary = tokenize_corpus([corpus], tokenizer_dir, tmp_path / "tok", cfg, progress=False)
    assert summary.documents == 3
    assert summary.problems == JSONL_PROBLEMS
    assert summary.defaulted_task == 1  # kept with --task misc: not skipped (it was listed so)
    assert any("bad_json" in e for e in summary.examples)
    assert store_sequences(tmp_path / "tok") == expected_sequences(
        [t for t, _ in JSONL_DOCS], tokenizer_dir, 8, 2)
    meta = open_store(tmp_path / "tok").read_meta().to_pydict()
    tasks = dict(zip(meta["doc_id"], meta["task"], strict=True))
    assert list(tasks.values()) == [task for _, task in JSONL_DOCS]


def test_jsonl_split_into_byte_ranges_reads_every_line_once(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(200)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for split in (1, 17, 64, 1000, 1 << 20):
        units = plan_units([corpus], split_bytes=split)
        problems = Problems()
        got = [d.text for u in units for d in read_unit(u, problems)]
        assert got == docs and not problems.counts, split


def test_parquet_input(tokenizer_dir: Path, tmp_path: Path) -> None:
    table = pa.table({"content": ["import os\n", "print('hi')\n", None, "x = 1\n", "y = 2\n"],
                      "kind": ["a", "b", "c", None, "e"]})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=2)
    assert len(plan_units([path])) == 3  # one unit per row group
    cfg = TokenizeConfig(max_len=16, text_field="content", task_field="kind")
    summary = tokenize_corpus([path], tokenizer_dir, tmp_path / "tok", cfg, num_parts=2,
                              progress=False)
    assert summary.parts == 2 and summary.documents == 4
    assert summary.problems == {"missing_field": 1} and summary.defaulted_task == 1
    texts = ["import os\n", "print('hi')\n", "x = 1\n", "y = 2\n"]
    assert store_sequences(tmp_path / "tok") == expected_sequences(texts, tokenizer_dir, 16, 0)
    assert open_store(tmp_path / "tok").read_meta()["task"].to_pylist() == ["a", "b", "", "e"]

    with pytest.raises(CorpusError, match=r"made a sequence \(skipped: missing_field=3\)"):
        tokenize_corpus([path], tokenizer_dir, tmp_path / "tok2", TokenizeConfig(),
                        progress=False)  # no "text" column: every document skipped


def test_strict_refuses(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b"\n".join(JSONL_LINES))
    with pytest.raises(CorpusError, match=r"bad json.*--strict"):
        tokenize_corpus([corpus], tokenizer_dir, tmp_path / "a", TokenizeConfig(strict=True),
                        progress=False)
    result = CliRunner().invoke(app, ["tokenize", str(corpus), "--tokenizer",
                                      str(tokenizer_dir), "--out", str(tmp_path / "b"),
                                      "--strict"])
    assert result.exit_code == 1 and "refused with --strict" in result.output
    assert not (tmp_path / "b" / "manifest.json").exists()
    lenient = CliRunner().invoke(app, ["tokenize", str(corpus), "--tokenizer",
                                       str(tokenizer_dir), "--out", str(tmp_path / "c")])
    assert lenient.exit_code == 0 and "skipped: bad_json=1" in lenient.output


def test_unreadable_inputs(tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no such file"):
        list_files([tmp_path / "missing"])
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="no input files"):
        list_files([tmp_path / "d"])
    (tmp_path / "d" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "d" / "good.txt").write_text("fine text")
    summary = tokenize_corpus([tmp_path / "d"], tokenizer_dir, tmp_path / "tok",
                              TokenizeConfig(max_len=4), progress=False)
    assert summary.problems == {"invalid_utf8": 1} and summary.documents == 1
    with pytest.raises(CorpusError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- units, windows


@given(length=st.integers(0, 300), max_len=st.integers(2, 40), data=st.data())
def test_windows_cover_the_document(length: int, max_len: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, max_len - 1))
    spans = windows(length, max_len, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (s0, e0), (s1, e1) in itertools.pairwise(spans):
        assert s1 == s0 + max_len - overlap and e0 - s1 == overlap  # exact overlap
        assert e1 - s1 > overlap  # every window brings a new token
    assert all(0 < e - s <= max_len for s, e in spans) or length == 0


@given(sizes=st.lists(st.integers(0, 1000), min_size=1, max_size=30), parts=st.integers(1, 10))
def test_group_units_is_contiguous_and_complete(sizes: list[int], parts: int) -> None:
    from mtkd.ingest.corpus import Unit

    units = [Unit(f"f{i}", "text", 0, s, s) for i, s in enumerate(sizes)]
    groups = group_units(units, parts)
    assert [u for g in groups for u in g] == units
    assert len(groups) == min(parts, len(units)) and all(groups)


def test_group_units_splits_two_unequal_files() -> None:
    """Two files, the first under half the bytes: two parts (each file's middle byte decides,
    not where it starts)."""
    from mtkd.ingest.corpus import Unit

    units = [Unit("a", "text", 0, 102_867, 102_867), Unit("b", "text", 0, 119_254, 119_254)]
    for parts in (2, 4):
        assert group_units(units, parts) == [[units[0]], [units[1]]]
    big = [Unit(f"f{i}", "text", 0, s, s) for i, s in enumerate([10, 1000, 10, 10])]
    assert [len(g) for g in group_units(big, 3)] == [1, 1, 2]


def test_the_summary_says_what_was_kept_unlike_the_text(tokenizer_dir: Path,
                                                        tmp_path: Path) -> None:
    """Documents tagged with the default --task and special tokens written in the text are
    said (they were listed as skipped, or only counted in the commit stats)."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a <|endoftext|> b", "kind": "x"}) + "\n"
                      + json.dumps({"text": "no kind here"}) + "\n")
    result = CliRunner().invoke(app, ["tokenize", str(corpus), "--tokenizer", str(tokenizer_dir),
                                      "--out", str(tmp_path / "s"), "--task-field", "kind",
                                      "--task", "dflt", "--max-len", "8", "--overlap", "2"])
    assert result.exit_code == 0, result.output
    assert "kept: defaulted_task=1 (no --task-field kind: tagged --task dflt)" in result.output
    assert "special tokens written in the text: 1" in result.output
    assert "skipped" not in result.output
