"""Bad inputs, one test per row of the table in docs/RELIABILITY.md: each gives a clear outcome
(an exit code and a message saying what to change), never a traceback, and refused runs leave
no output store behind that a corrected rerun would disagree with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.harvest.engine import finish_rows
from mtkd.harvest.job import HarvestConfig, harvest
from mtkd.store import StoreError, open_store

from .conftest import AGGREGATE, HARVEST, PIPELINE_MAX_LEN, Pipeline
from .test_kills import STUDENT

pytestmark = pytest.mark.torture


def mtkd(*args: object) -> tuple[int, str]:
    """Run a command in this process: (exit code, output as one line)."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    assert "Traceback" not in result.output
    if result.exit_code not in (0, 1, 2):  # an exception escaped the command
        raise AssertionError(f"exit {result.exit_code}: {result.exception!r}")
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


def tokens_of(store: Path) -> list[list[int]]:
    s = open_store(store)
    batch = s.read(np.arange(s.num_sequences))
    ids, off = batch["token_ids"], batch.offsets
    return [ids[off[i]:off[i + 1]].tolist() for i in range(s.num_sequences)]


# ----------------------------------------------------------------------------------- corpus


def test_empty_corpus(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.txt").write_text("")
    code, out = mtkd("tokenize", tmp_path / "a.jsonl", tmp_path / "b.txt", "--tokenizer",
                     tokenizer_dir, "--out", tmp_path / "tok")
    assert code == 1 and "error: empty corpus" in out and "hold no bytes" in out
    assert not (tmp_path / "tok").exists()
    (tmp_path / "dir").mkdir()
    code, out = mtkd("tokenize", tmp_path / "dir", "--tokenizer", tokenizer_dir, "--out",
                     tmp_path / "tok")
    assert code == 1 and "no input files found" in out


def test_a_corpus_of_skipped_documents_is_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Every document skipped (here: no such --text-field) gives an error naming what was
    skipped, and no complete, empty store; a rerun refuses the same way."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "def f():\\n    return 1\\n"}\n{"text": "x = 2\\n"}\nnot json\n')
    for _ in range(2):
        code, out = mtkd("tokenize", corpus, "--tokenizer", tokenizer_dir, "--out",
                         tmp_path / "tok", "--text-field", "body")
        assert code == 1 and "no document of the corpus made a sequence" in out
        assert "missing_field=2" in out and "bad_json=1" in out and "--text-field" in out
        with pytest.raises(StoreError, match="not complete"):
            open_store(tmp_path / "tok")
    code, out = mtkd("tokenize", corpus, "--tokenizer", tokenizer_dir, "--out", tmp_path / "ok")
    assert code == 0 and open_store(tmp_path / "ok").num_sequences == 2


def test_non_utf8_bytes(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"text": "def ok():\\n    return 1\\n"}\n{"text": "caf\xe9 \xff"}\n')
    (tmp_path / "latin1.txt").write_bytes("na\xefve text\n".encode("latin-1"))
    code, out = mtkd("tokenize", corpus, tmp_path / "latin1.txt", "--tokenizer", tokenizer_dir,
                     "--out", tmp_path / "tok")
    assert code == 0 and "1 documents" in out and "skipped: invalid_utf8=2" in out
    assert f"{corpus}@" in out and "latin1.txt (byte 2)" in out
    code, out = mtkd("tokenize", corpus, "--tokenizer", tokenizer_dir, "--out",
                     tmp_path / "strict", "--strict")
    assert code == 1 and "invalid utf8 (refused with --strict)" in out
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_10mb_single_line_document(tokenizer_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    line = "def f(x): return x + 1  # " * 400_000
    text = line[: 10_000_000]
    corpus = tmp_path / "big.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n")
    assert corpus.stat().st_size > 10_000_000 and corpus.read_text().count("\n") == 1
    code, out = mtkd("tokenize", corpus, "--tokenizer", tokenizer_dir, "--out", tmp_path / "tok",
                     "--max-len", 4096)
    assert code == 0 and "from 1 documents" in out, out
    store = open_store(tmp_path / "tok")
    assert store.seq_lengths.max() <= 4096 and store.num_sequences > 1000
    ids = store.read(np.arange(store.num_sequences))["token_ids"]
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert ids[-1] == tok.token_to_id("<|endoftext|>")
    assert tok.decode(ids[:-1].tolist()) == text  # the windows hold the whole line, in order


def test_document_longer_than_max_len(tokenizer_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    text = "import os\nprint(os.getcwd())\n" * 200
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": text}) + "\n")
    code, out = mtkd("tokenize", tmp_path / "c.jsonl", "--tokenizer", tokenizer_dir, "--out",
                     tmp_path / "tok", "--max-len", 64, "--overlap", 16)
    assert code == 0, out
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    want = [*tok.encode(text, add_special_tokens=False).ids, tok.token_to_id("<|endoftext|>")]
    windows = tokens_of(tmp_path / "tok")
    assert len(windows) > 1 and all(len(w) <= 64 for w in windows)
    rebuilt = list(windows[0])
    for w in windows[1:]:  # each window repeats the last 16 tokens of the one before
        assert w[:16] == rebuilt[-16:]
        rebuilt += w[16:]
    assert rebuilt == want


# ---------------------------------------------------------------------------------- harvest


def test_mismatched_tokenizer(pipeline: Pipeline, tmp_path: Path) -> None:
    from mtkd.recipes.models import train_bpe_tokenizer
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    other = tmp_path / "other-teacher"
    train_bpe_tokenizer(stdlib_texts(max_files=5), vocab_size=300, out_dir=other)
    out = tmp_path / "teacher"
    code, msg = mtkd("harvest", pipeline.tokens, "--model", other, "--out", out, *HARVEST,
                     "--tokenization", "store")
    assert code == 1 and "has a different tokenizer" in msg and str(other) in msg
    assert not out.exists()


def test_k_above_the_engine_cap(pipeline: Pipeline, tmp_path: Path) -> None:
    """One bound for k (HarvestConfig's MAX_K): a usage error before anything is written."""
    out = tmp_path / "teacher"
    for engine in ("vllm", "hf"):
        code, msg = mtkd("harvest", pipeline.tokens, "--model", pipeline.teachers[0], "--out",
                         out, "--engine", engine, "--k", 257)
        assert code == 2 and "Invalid value for '--k'" in msg and "256" in msg, msg
        assert not out.exists(), "a refused harvest claimed the output directory"


def test_a_teacher_that_cannot_load(pipeline: Pipeline, tmp_path: Path) -> None:
    """A model directory with the right tokenizer but no model: the engine fails before the
    output store exists, so the corrected rerun starts clean."""
    out = tmp_path / "teacher"
    code, msg = mtkd("harvest", pipeline.tokens, "--model", pipeline.tokenizer, "--out", out,
                     *HARVEST)
    assert code == 1 and "Unrecognized model" in msg, msg
    assert not (out / "store.json").exists()


def test_a_harvest_out_of_other_files_is_refused_before_the_engine(pipeline: Pipeline,
                                                                  tmp_path: Path) -> None:
    """A bad --out is said at once: here the model would not load either, and the --out
    refusal comes first (it is checked before the engine's start-up)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    code, msg = mtkd("harvest", pipeline.tokens, "--model", pipeline.tokenizer, "--out", out,
                     *HARVEST)
    assert code == 1 and "is not an mtkd store (it holds notes.txt)" in msg, msg
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


class FakeEngine:
    """A teacher engine returning plausible rows, with one defect injected."""

    name = "fake"
    vocab_size = 512
    k = 8

    def __init__(self, defect: str) -> None:
        self.defect = defect

    def harvest(self, sequences: list[np.ndarray]) -> dict[str, np.ndarray]:
        n = sum(len(s) - 1 for s in sequences)
        lp = np.tile(-3.0 - 0.1 * np.arange(self.k), (n, 1))
        rows = finish_rows(np.tile(np.arange(self.k), (n, 1)), lp, lp[:, 0], np.ones(n))
        if self.defect == "nan":
            rows["topk_logprobs"][n // 2, 3] = np.nan
        elif self.defect == "+inf":
            rows["target_logprob"][n // 3] = np.inf
        elif self.defect == "positive":
            rows["topk_logprobs"][0, 0] = 0.5
        elif self.defect == "nan-tail":
            rows["tail_logmass"][1] = np.nan
        elif self.defect == "id-out-of-vocab":
            rows["topk_ids"][2, 5] = self.vocab_size
        elif self.defect == "rows-missing":
            rows = {key: v[:-1] for key, v in rows.items()}
        return rows


@pytest.mark.parametrize(("defect", "message"), [
    ("nan", "invalid log-probs in topk_logprobs"),
    ("+inf", "invalid log-probs in target_logprob"),
    ("positive", "invalid log-probs in topk_logprobs"),
    ("nan-tail", "tail_logmass: NaN or +inf values refused"),
    ("id-out-of-vocab", "token ids outside [0, 512)"),
    ("rows-missing", "rows for"),
])
def test_nan_or_inf_logprobs_from_an_engine(defect: str, message: str, pipeline: Pipeline,
                                            tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    with pytest.raises(StoreError, match=re.escape(message)):
        harvest(pipeline.tokens, pipeline.teachers[0], out, HarvestConfig(k=8, engine="hf"),
                progress=False, engine_factory=lambda: FakeEngine(defect))
    parts = out / "parts"
    assert not list(parts.iterdir()), "a part was committed or a temp part left behind"


# -------------------------------------------------------------------------------- aggregate


def test_mismatched_tokens_store(pipeline: Pipeline, tokenizer_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-tokens"
    code, _ = mtkd("tokenize", pipeline.corpus, "--tokenizer", tokenizer_dir, "--out", other,
                   "--max-len", PIPELINE_MAX_LEN + 1, "--num-parts", 6)
    assert code == 0
    out = tmp_path / "targets"
    code, msg = mtkd("aggregate", *pipeline.teacher_stores, "--tokens", other, "--out", out,
                     *AGGREGATE)
    assert code == 1 and "was built over a different tokens store" in msg
    assert not out.exists()
    code, msg = mtkd("aggregate", pipeline.tokens, pipeline.teacher_stores[0], "--tokens",
                     pipeline.tokens, "--out", out)
    assert code == 1 and "is a tokens store, expected a teacher store" in msg


@pytest.mark.parametrize(("weights", "message"), [
    ("0.5,0.6", "weights 0.5,0.6 sum to 1.1; give 2 weights that sum to 1"),
    ("1.2,-0.2", "weights must be >= 0"),
    ("0.5,0.3,0.2", "weights must have shape [2]"),
    ("nan,1", "weights must be finite"),
    ("a,b", "--weights must be numbers separated by commas"),
])
def test_weights_that_do_not_sum_to_one(weights: str, message: str, pipeline: Pipeline,
                                        tmp_path: Path) -> None:
    code, msg = mtkd("aggregate", *pipeline.teacher_stores, "--tokens", pipeline.tokens,
                     "--out", tmp_path / "t", "--weights", weights)
    assert code in (1, 2) and message in msg, msg
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("temperatures", ["0,1", "-1,2", "inf,1"])
def test_nonpositive_temperature(temperatures: str, pipeline: Pipeline, tmp_path: Path) -> None:
    code, msg = mtkd("aggregate", *pipeline.teacher_stores, "--tokens", pipeline.tokens,
                     "--out", tmp_path / "t", "--temperatures", temperatures)
    assert code == 1 and "temperatures must be finite and > 0" in msg
    code, msg = mtkd("harvest", pipeline.tokens, "--model", pipeline.teachers[0], "--out",
                     tmp_path / "h", "--engine", "hf", "--temperature",
                     temperatures.split(",")[0])
    assert code == 1 and "temperatures must be positive and finite" in msg
    assert not (tmp_path / "t").exists() and not (tmp_path / "h").exists()


def test_sampled_targets_need_sampled_stores(pipeline: Pipeline, tmp_path: Path) -> None:
    """--source samples refuses top-k-only stores; with draws harvested (hf --num-samples) it
    fuses them, and --label-entry is refused on them (it is for top-k targets)."""
    code, msg = mtkd("aggregate", *pipeline.teacher_stores, "--tokens", pipeline.tokens,
                     "--out", tmp_path / "t", "--source", "samples")
    assert code == 1 and "holds no sampled targets (harvest with --num-samples" in msg, msg
    assert not (tmp_path / "t").exists()
    code, msg = mtkd("harvest", pipeline.tokens, "--model", pipeline.teachers[0], "--out",
                     tmp_path / "draws", *HARVEST, "--num-samples", 16)
    assert code == 0, msg
    code, msg = mtkd("aggregate", tmp_path / "draws", "--tokens", pipeline.tokens, "--out",
                     tmp_path / "t", "--source", "samples", "--label-entry")
    assert code == 1 and "label entry is for top-k targets" in msg, msg
    code, msg = mtkd("aggregate", tmp_path / "draws", "--tokens", pipeline.tokens, "--out",
                     tmp_path / "t", "--source", "samples", "--k-out", 16, "--codec", "raw")
    assert code == 0, msg
    target = open_store(tmp_path / "t", verify="full").read_part(0)  # raw: exact counts / 16
    assert np.all(target["tail_mass"] < 1e-6)  # 16 draws: at most 16 ids, none lumped
    assert np.allclose(target["probs"].sum(axis=1), 1, atol=1e-6)
    assert np.all(np.round(target["probs"] * 16, 4) % 1 == 0)  # counts / 16


def test_nonpositive_student_temperature(pipeline: Pipeline, tmp_path: Path) -> None:
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    code, msg = mtkd("train", "--tokens", pipeline.tokens, "--targets", pipeline.targets,
                     "--student-config", student, "--out", tmp_path / "run", "--seq-len",
                     PIPELINE_MAX_LEN, "--steps", 2, "--temperature", 0)
    assert code == 1 and "temperature must be > 0 and finite, got 0.0" in msg
    assert not (tmp_path / "run").exists()  # refused before anything is opened or written


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--operator", "foo", "unknown operator 'foo'; choose one of"),
    ("--tail-model", "foo", "unknown tail model 'foo'; choose one of"),
    ("--token", "foo", "unknown token-level weighting 'foo'"),
    ("--k-out", "513", "--k-out 513 is more than the student's vocabulary of 512 ids"),
])
def test_unknown_operator_name(option: str, value: str, message: str, pipeline: Pipeline,
                               tmp_path: Path) -> None:
    code, msg = mtkd("aggregate", *pipeline.teacher_stores, "--tokens", pipeline.tokens,
                     "--out", tmp_path / "t", option, value)
    assert code == 1 and message in msg, msg
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------ train


def test_student_vocab_smaller_than_the_targets(pipeline: Pipeline, tmp_path: Path) -> None:
    student = tmp_path / "student.json"
    student.write_text(json.dumps({**STUDENT, "vocab_size": 100}))
    code, msg = mtkd("train", "--tokens", pipeline.tokens, "--targets", pipeline.targets,
                     "--student-config", student, "--out", tmp_path / "run", "--seq-len",
                     PIPELINE_MAX_LEN, "--steps", 2)
    assert code == 1 and "the student's vocabulary has 100 entries" in msg
    assert "vocab_size ≥ 512" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------- config, workers


@pytest.mark.parametrize(("suffix", "text"), [
    ("toml", "[aggregate]\noperator = 'linear'\nwieghts = '0.5,0.5'\n"),
    ("yaml", "operator: linear\nwieghts: 0.5,0.5\n"),
    ("toml", "[aggregate]\noperator = 'linear'\n[harvest]\nk = 8\n[train]\nlr = 1\nsteps_ = 2\n"),
])
def test_config_file_with_unknown_keys(suffix: str, text: str, pipeline: Pipeline,
                                       tmp_path: Path) -> None:
    config = tmp_path / f"mtkd.{suffix}"
    config.write_text(text)
    command = "train" if "steps_" in text else "aggregate"
    args = ["--tokens", pipeline.tokens, "--out", tmp_path / "o"]
    args += ["--student-config", "x.json"] if command == "train" else \
        [str(s) for s in pipeline.teacher_stores]
    code, msg = mtkd(command, *args, "--config", config)
    bad = "steps_" if command == "train" else "wieghts"
    assert code == 2 and f"unknown key '{bad}' for `mtkd {command}`" in msg, msg
    assert not (tmp_path / "o").exists()


def test_worker_index_out_of_range(pipeline: Pipeline, tmp_path: Path) -> None:
    for command in (["aggregate", *pipeline.teacher_stores, "--tokens", pipeline.tokens],
                    ["harvest", pipeline.tokens, "--model", pipeline.teachers[0]]):
        code, msg = mtkd(*command, "--out", tmp_path / "o", "--worker-index", 4,
                         "--num-workers", 4)
        assert code == 2 and "--worker-index 4 is not in [0, 4)" in msg
    assert not (tmp_path / "o").exists()


def test_incomplete_tokens_store(pipeline: Pipeline, tmp_path: Path) -> None:
    import shutil

    tokens = Path(shutil.copytree(pipeline.tokens, tmp_path / "tokens"))
    (tokens / "manifest.json").unlink()
    shutil.rmtree(tokens / "parts" / "00002")
    code, msg = mtkd("harvest", tokens, "--model", pipeline.teachers[0], "--out",
                     tmp_path / "o", *HARVEST)
    parts = open_store(pipeline.tokens).num_parts
    assert code == 1 and f"is not complete: 1 of {parts} parts uncommitted (part 2)" in msg
    assert not (tmp_path / "o").exists()


def test_an_empty_part_reads_like_the_others(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Files with no usable document make parts without sequences; their metadata must still
    concatenate with the other parts' (it used to have null-typed columns)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in (("a", "def f():\n    return 1\n"), ("b", " " * 24),
                       ("c", "x = [1, 2, 3, 4, 5, 6]\n")):  # equal sizes: one file a part
        (corpus / f"{name}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    assert len({p.stat().st_size for p in corpus.iterdir()}) == 1
    code, msg = mtkd("tokenize", corpus, "--tokenizer", tokenizer_dir, "--out", tmp_path / "t",
                     "--num-parts", 3)
    assert code == 0 and "skipped: empty_document=1" in msg
    store = open_store(tmp_path / "t")
    assert [len(store.part_sequences(p)) for p in range(3)] == [1, 0, 1]
    meta = store.read_meta()
    assert meta.num_rows == 2 and meta.schema.field("task").type == "string"
