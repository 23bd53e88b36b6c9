"""Corpora and tokenizers a user review found mishandled: documents the tokens do not spell,
refused runs that blocked their corrected rerun, --add-eos without an EOS, file names that are
not UTF-8, gzip files and JSON arrays."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.ingest.corpus import CorpusError, Problems, plan_units, read_unit
from mtkd.ingest.job import TokenizeConfig, tokenize_corpus
from mtkd.store import open_store

DOCS = ["def f(x):\n    return x + 1\n", "the cat sat on the mat", "x = [1, 2, 3]\n"]


@pytest.fixture
def tmp_path(memory_tmp_path: Path) -> Path:
    return memory_tmp_path


def jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def tokens_of(store_dir: Path) -> list[int]:
    store = open_store(store_dir)
    return np.concatenate([store.read_part(p)["token_ids"]
                           for p in range(store.num_parts)]).tolist()


def tokenize(*args: object) -> tuple[int, str]:
    """``mtkd tokenize ARGS``: (exit code, output as one line)."""
    result = CliRunner().invoke(app, ["tokenize", *map(str, args)], env={"COLUMNS": "300"})
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.split())


# ------------------------------------------------------------- documents the tokens do not spell


def test_a_document_the_tokens_do_not_spell_is_skipped(tokenizer_dir: Path,
                                                       tmp_path: Path) -> None:
    """A normalizer that changes some documents (NFKD: "café") aborted the whole run at the
    first; it is skipped and counted, named by its file and byte offset; --strict refuses."""
    nfkd = tmp_path / "nfkd"
    shutil.copytree(tokenizer_dir, nfkd)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.normalizer = normalizers.NFKD()
    tok.save(str(nfkd / "tokenizer.json"))
    src = jsonl(tmp_path / "c" / "d.jsonl", [DOCS[0], "un café noir", DOCS[1]])
    offset = len(json.dumps({"text": DOCS[0]})) + 1
    summary = tokenize_corpus([src], nfkd, tmp_path / "tok", TokenizeConfig(max_len=16),
                              progress=False)
    assert summary.complete and summary.documents == 2
    assert summary.problems == {"unspelled_text": 1}
    assert summary.examples[0].startswith(f"{src}@{offset} (token ")
    assert summary.examples[0].endswith(": unspelled_text")
    meta = open_store(tmp_path / "tok").read_meta().to_pydict()
    assert [t.decode() for t in meta["text"]] == [DOCS[0], DOCS[1]]
    with pytest.raises(CorpusError, match=rf"d\.jsonl@{offset} .*unspelled text \(refused with "
                                          r"--strict\).*--no-byte-offsets"):
        tokenize_corpus([src], nfkd, tmp_path / "strict", TokenizeConfig(strict=True),
                        progress=False)


def test_a_corpus_of_unspelled_documents_says_no_byte_offsets(tokenizer_dir: Path,
                                                              tmp_path: Path) -> None:
    nfkd = tmp_path / "nfkd"
    shutil.copytree(tokenizer_dir, nfkd)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.normalizer = normalizers.NFKD()
    tok.save(str(nfkd / "tokenizer.json"))
    src = jsonl(tmp_path / "c" / "d.jsonl", ["café", "naïve"])
    with pytest.raises(CorpusError, match=r"skipped: unspelled_text=2.*--no-byte-offsets"):
        tokenize_corpus([src], nfkd, tmp_path / "tok", TokenizeConfig(), progress=False)


# ------------------------------------------------------------- a refused run leaves no store


def test_a_strict_refusal_leaves_no_store_and_the_lenient_rerun_runs(tokenizer_dir: Path,
                                                                     tmp_path: Path) -> None:
    """The review's case: --strict refused the first bad document after store.json was
    written, and the rerun without --strict that the refusal suggests was refused as a store
    with a different attrs.config.strict."""
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": DOCS[0]}) + "\n{bad json\n")
    out = tmp_path / "tok"
    code, said = tokenize(src, "--tokenizer", tokenizer_dir, "--out", out, "--strict")
    assert code == 1 and "bad json (refused with --strict)" in said
    assert not out.exists()
    code, said = tokenize(src, "--tokenizer", tokenizer_dir, "--out", out)
    assert code == 0 and "skipped: bad_json=1" in said, said
    # an empty --out the user made is kept, emptied of what the refused run began
    (tmp_path / "mine").mkdir()
    code, _ = tokenize(src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "mine", "--strict")
    assert code == 1 and list((tmp_path / "mine").iterdir()) == []


def test_a_refusal_keeps_a_store_it_did_not_begin_alone(tokenizer_dir: Path,
                                                        tmp_path: Path) -> None:
    """One worker of two, or a store with committed parts: nothing is removed."""
    src = tmp_path / "c.jsonl"
    src.write_text("{bad json\n" + json.dumps({"text": DOCS[0]}) + "\n")
    cfg = TokenizeConfig(strict=True)
    with pytest.raises(CorpusError, match="refused with --strict"):
        tokenize_corpus([src], tokenizer_dir, tmp_path / "w", cfg, worker_index=0,
                        num_workers=2, progress=False)
    assert (tmp_path / "w" / "store.json").exists()
    two = [jsonl(tmp_path / "d" / "a.jsonl", DOCS), tmp_path / "d" / "b.jsonl"]
    two[1].write_text("{bad json\n")
    with pytest.raises(CorpusError, match="refused with --strict"):
        tokenize_corpus(two, tokenizer_dir, tmp_path / "p", cfg, num_parts=2, progress=False)
    assert (tmp_path / "p" / "parts" / "00000" / "COMMIT.json").exists()


# ------------------------------------------------------------- --add-eos without an EOS


def test_add_eos_without_an_eos_token_is_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    """A bare tokenizer.json (no tokenizer_config.json) names no EOS: --add-eos did nothing
    while the store's config said add_eos true."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", bare)
    src = jsonl(tmp_path / "c" / "d.jsonl", DOCS)
    code, said = tokenize(src, "--tokenizer", bare, "--out", tmp_path / "a")
    assert code == 1 and "names no end-of-sequence token" in said
    assert f'{bare / "tokenizer_config.json"} as {{"eos_token": "…"}}' in said
    assert "<|endoftext|>" in said and "--no-add-eos" in said
    assert not (tmp_path / "a").exists()
    code, said = tokenize(src, "--tokenizer", bare, "--out", tmp_path / "b", "--no-add-eos")
    assert code == 0 and open_store(tmp_path / "b").attrs["eos_id"] is None


# ------------------------------------------------------------- file names and formats


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="APFS refuses non-UTF-8 names")
def test_a_file_name_that_is_not_utf8(tokenizer_dir: Path, tmp_path: Path) -> None:
    """``bad\\xffname.txt`` crashed with "'utf-8' codec can't encode character '\\udcff'"."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / os.fsdecode(b"bad\xffname.txt")).write_text("some text in a badly named file")
    (corpus / "plain.txt").write_text("A plain text file.\n")
    summary = tokenize_corpus([corpus], tokenizer_dir, tmp_path / "tok", TokenizeConfig(),
                              progress=False)
    assert summary.complete and summary.documents == 2
    sources = open_store(tmp_path / "tok").read_meta()["source"].to_pylist()
    assert sources == [f"{corpus}/bad\\xffname.txt", f"{corpus}/plain.txt"]


def test_gzip_files_are_read_decompressed(tokenizer_dir: Path, tmp_path: Path) -> None:
    """``z.jsonl.gz`` was read as text (``z.jsonl.gz (byte 1): invalid_utf8``)."""
    plain = jsonl(tmp_path / "plain" / "z.jsonl", [*DOCS, ""])
    (tmp_path / "plain" / "t.txt").write_text(DOCS[1])
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "z.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (packed / "t.txt.gz").write_bytes(gzip.compress(DOCS[1].encode()))
    cfg = TokenizeConfig(max_len=8)
    a = tokenize_corpus([tmp_path / "plain"], tokenizer_dir, tmp_path / "a", cfg, progress=False)
    b = tokenize_corpus([packed], tokenizer_dir, tmp_path / "b", cfg, progress=False)
    assert tokens_of(tmp_path / "b") == tokens_of(tmp_path / "a")
    assert a.problems == b.problems == {"empty_document": 1} and b.documents == 4
    offset = plain.read_text().rindex("{")  # the empty document, in the decompressed stream
    assert b.examples == [f"{packed / 'z.jsonl.gz'}@{offset}: empty_document"]
    cut = tmp_path / "cut.jsonl.gz"  # truncated: its whole lines read, then named
    cut.write_bytes(gzip.compress(plain.read_bytes())[:-12])
    c = tokenize_corpus([cut], tokenizer_dir, tmp_path / "c", cfg, progress=False)
    assert c.problems == {"unreadable_file": 1} and c.examples[0].startswith(f"{cut} (")
    damaged = bytearray(gzip.compress(plain.read_bytes() * 50))
    damaged[len(damaged) // 2] ^= 0xFF  # a flipped bit: garbage, then a zlib or CRC error
    (tmp_path / "damaged.jsonl.gz").write_bytes(damaged)
    problems = Problems()
    for unit in plan_units([tmp_path / "damaged.jsonl.gz"]):
        list(read_unit(unit, problems))
    assert problems.counts["unreadable_file"] == 1


@pytest.mark.parametrize(("name", "content", "said"), [
    ("a.json", b'[\n  {"text": "one"},\n  {"text": "two"}\n]\n', "holds a JSON array"),
    ("a.jsonl", b'  \n [{"text": "one"}]\n', "holds a JSON array"),
    ("a.jsonl.gz", gzip.compress(b'[{"text": "one"}]'), "holds a JSON array"),
    ("a.jsonl.zst", b"\x28\xb5\x2f\xfd", "a compressed file that tokenize cannot read"),
    ("a.parquet.gz", gzip.compress(b"PAR1"), "a compressed file that tokenize cannot read"),
], ids=["json-array", "spaced-array", "gzipped-array", "zstd", "gzipped-parquet"])
def test_json_arrays_and_other_compressions_are_refused(name: str, content: bytes, said: str,
                                                        tokenizer_dir: Path,
                                                        tmp_path: Path) -> None:
    """A pretty-printed JSON array was half parsed as JSON Lines (its last object taken)."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / name).write_bytes(content)
    jsonl(tmp_path / "c" / "ok.jsonl", DOCS)
    code, out = tokenize(tmp_path / "c", "--tokenizer", tokenizer_dir, "--out", tmp_path / "t")
    assert code == 1 and f"{tmp_path / 'c' / name}: {said}" in out and "--exclude" in out
    assert not (tmp_path / "t").exists()
