"""Teachers with another tokenizer, harvested in their own tokens (``--tokenization own``).

The student's tokens store is cut with the session's BPE (vocabulary 512); the teachers are tiny
Llamas on another byte-level BPE (vocabulary 400), one without and one with a BOS. Every stored
row is checked against an independent reference: transformers' own tokenisation of each window's
text (``AutoTokenizer``, BOS included by its convention), token byte lengths from transformers'
byte table, and a float32 forward of the model on that sequence alone.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.harvest.job import HarvestConfig, harvest
from mtkd.harvest.own_tokens import unreadable_counts
from mtkd.store import Store, StoreError, open_store
from tests.store.stores import assert_reads_alike

from .test_engines import LOGPROB_ATOL

K = 8
EOS = "<|endoftext|>"
MAX_POSITION = 24  # the teachers' context: the longest windows do not fit
EXACT = ("--k", str(K), "--dtype", "float32", "--logprob-dtype", "float32", "--codec", "raw")
UNICODE_DOCS = ["naïve café — über straße, 日本語のテキスト 🎉🎉 and then plain words again " * 2,
                "x = '✓' if ok else '✗'  # ünïcödé in code\n" * 3]


@dataclass(frozen=True)
class Setup:
    tokens: Path  # the student's tokens store (session tokenizer)
    old_tokens: Path  # the same, without window texts (--no-byte-offsets)
    teacher: Path  # another tokenizer, no BOS
    bos_teacher: Path  # another tokenizer that puts <s> first
    hf_store: Path  # `teacher` harvested with the reference engine


def mtkd(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Setup:
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from mtkd.ingest.job import TokenizeConfig, tokenize_corpus
    from mtkd.recipes.models import init_llama, train_bpe_tokenizer
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    root = tmp_path_factory.mktemp("own-tokens")
    corpus = root / "corpus"
    corpus.mkdir()
    texts = [*stdlib_texts(max_files=4, max_chars=4_000), *UNICODE_DOCS]
    for i, text in enumerate(texts):  # two files: two parts
        with open(corpus / f"c{i % 2}.jsonl", "a") as f:
            for a in range(0, len(text), 700):
                f.write(json.dumps({"text": text[a:a + 700]}) + "\n")
    tokens, old = root / "tokens", root / "tokens-old"
    cfg = TokenizeConfig(max_len=20, overlap=4)
    tokenize_corpus([corpus], tokenizer_dir, tokens, cfg, num_parts=2, progress=False)
    tokenize_corpus([corpus], tokenizer_dir, old, TokenizeConfig(max_len=20, overlap=4,
                                                                  byte_offsets=False),
                    num_parts=2, progress=False)
    small = {"hidden": 64, "layers": 1, "heads": 2, "max_position": MAX_POSITION}
    other_texts = list(stdlib_texts(max_files=20))[8:]  # not the student's tokenizer's texts
    tok = train_bpe_tokenizer(other_texts, 400, root / "teacher-tokenizer")
    teacher = init_llama(root / "teacher", len(tok), seed=5, tokenizer=tok, **small)
    backend = Tokenizer.from_file(str(root / "teacher-tokenizer" / "tokenizer.json"))
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", bos)])
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=EOS)
    bos_teacher = init_llama(root / "bos-teacher", len(bos_tok), seed=6, tokenizer=bos_tok,
                             **small)
    assert AutoTokenizer.from_pretrained(str(bos_teacher))("a")["input_ids"][0] == bos
    hf_store = root / "hf"
    code, msg = mtkd("harvest", tokens, "--model", teacher, "--out", hf_store, "--engine", "hf",
                     *EXACT, "--batch-tokens", "300")
    assert code == 0, msg
    return Setup(tokens, old, teacher, bos_teacher, hf_store)


# --------------------------------------------------------------------------- the reference


@dataclass
class Reference:
    """Per tokens-store sequence: the teacher's ids (None: unreadable), and for the readable
    ones the float64 log-probs of every row and where each row's context ends."""

    ids: list[np.ndarray | None]
    logprobs: list[np.ndarray]
    context_end: list[np.ndarray]
    unreadable: Counter[str]


def reference(model_dir: Path, tokens: Store, max_len: int) -> Reference:
    """transformers alone: AutoTokenizer's ids of each window text, byte lengths from
    transformers' byte-level table, a float32 forward of each sequence on its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    specials = set(tok.all_special_ids)
    out = Reference([], [], [], Counter())
    for text in tokens.read_meta().column("text").to_pylist():
        read = whole_characters(text)
        if read is None:
            out.ids.append(None)
            out.unreadable["undecodable"] += 1
            continue
        a, b, string = read
        ids = tok(string)["input_ids"]
        if len(ids) < 2 or len(ids) > max_len:
            out.ids.append(None)
            out.unreadable["too_short" if len(ids) < 2 else "too_long"] += 1
            continue
        pieces = [b"" if i in specials else bytes(to_byte[c] for c in s)
                  for i, s in zip(ids, tok.convert_ids_to_tokens(ids), strict=True)]
        assert b"".join(pieces) == text[a:b]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        out.ids.append(np.asarray(ids))
        out.logprobs.append(torch.log_softmax(logits.double(), dim=-1).numpy())
        out.context_end.append(a + np.cumsum([len(p) for p in pieces])[:-1])
    return out


def whole_characters(text: bytes) -> tuple[int, int, str] | None:
    """The longest run ``text[a:b]`` of whole UTF-8 characters left when a window cut inside a
    character loses the partial ones at its ends (at most 3 bytes each), and its string."""
    for a in range(min(4, len(text) + 1)):
        for b in range(len(text), max(a, len(text) - 4), -1):
            try:
                return a, b, text[a:b].decode("utf-8")
            except UnicodeDecodeError:
                continue
    return None


def check_against_reference(store_dir: Path, tokens: Store, ref: Reference,
                            atol: float, k: int = K) -> None:
    """Sequences, context ends and next ids exactly; log-probs within ``atol``; top-k ids where
    the reference's gaps are clear."""
    store = open_store(store_dir, "teacher")
    rows = store.read(np.arange(store.num_sequences))
    np.testing.assert_array_equal(rows.seq_ids, tokens.seq_ids)
    want_rows = [0 if ids is None else len(ids) - 1 for ids in ref.ids]
    np.testing.assert_array_equal(np.diff(rows.offsets), want_rows)
    readable = [ids for ids in ref.ids if ids is not None]
    np.testing.assert_array_equal(rows["next_id"], np.concatenate([i[1:] for i in readable]))
    np.testing.assert_array_equal(rows["context_end"], np.concatenate(ref.context_end))
    full = np.concatenate(ref.logprobs)
    target = full[np.arange(len(full)), rows["next_id"]]
    np.testing.assert_allclose(rows["target_logprob"], target, atol=atol)
    got_ids = rows["topk_ids"].astype(np.int64)
    np.testing.assert_allclose(rows["topk_logprobs"], np.take_along_axis(full, got_ids, 1),
                               atol=atol)
    ordered = -np.sort(-full, axis=1)[:, :k]
    np.testing.assert_allclose(rows["topk_logprobs"], ordered, atol=atol)
    clear = np.ones_like(ordered, bool)
    clear[:, 1:] &= ordered[:, :-1] - ordered[:, 1:] > 2 * atol
    clear[:, :-1] &= ordered[:, :-1] - ordered[:, 1:] > 2 * atol
    np.testing.assert_array_equal(got_ids[clear], np.argsort(-full, axis=1)[:, :k][clear])
    for p in range(store.num_parts):
        stats = store.part_stats(p)
        assert stats["unreadable_sequences"] == sum(stats["unreadable"].values())
    assert unreadable_counts(store) == ref.unreadable


# --------------------------------------------------------------------------- reference engine


def test_reference_engine_rows_equal_an_independent_forward(setup: Setup) -> None:
    tokens = open_store(setup.tokens)
    ref = reference(setup.teacher, tokens, MAX_POSITION)
    # windows cut inside a character are read, long ones are not, and most windows are read
    texts = tokens.read_meta().column("text").to_pylist()
    cut = [s for s, t in enumerate(texts) if whole_characters(t)[:2] != (0, len(t))]
    assert sum(ref.ids[s] is not None for s in cut) > len(cut) / 2
    assert not ref.unreadable["undecodable"] and ref.unreadable["too_long"]
    assert sum(ids is not None for ids in ref.ids) > 0.6 * len(ref.ids)
    check_against_reference(setup.hf_store, tokens, ref, atol=1e-5)
    attrs = open_store(setup.hf_store).attrs
    from mtkd.ingest.tokenizer import load_pretrained_tokenizer

    teacher_tok = load_pretrained_tokenizer(setup.teacher)
    assert attrs["tokenization"] == "own" and attrs["bos_id"] is None
    assert attrs["teacher_tokenizer"] == str(setup.teacher.resolve())
    assert attrs["teacher_tokenizer_hash"] == attrs["tokenizer_hash"] == teacher_tok.vocab_hash
    assert attrs["teacher_vocab_size"] == attrs["vocab_size"] == len(teacher_tok.tokenizer
                                                                     .get_vocab())
    assert attrs["tokens_fingerprint"] == tokens.manifest["checksum"]
    assert attrs["vocab_size"] != tokens.attrs["vocab_size"]
    code, out = mtkd("info", setup.hf_store)  # says which windows have no rows, and why
    why = ", ".join(f"{name}={n:,}" for name, n in ref.unreadable.most_common())
    assert code == 0 and f"unreadable sequences {sum(ref.unreadable.values()):,} ({why};" in out


def test_a_bos_teacher_starts_every_sequence_with_its_bos(setup: Setup, tmp_path: Path) -> None:
    """The BOS takes zero bytes: row 0's context ends at byte 0 (after the partial character a
    window cut inside one starts with) and predicts the text's first token. The API with an
    engine factory, q64 coding: ids exact, log-probs within q64."""
    from mtkd.harvest.hf_engine import HfReferenceEngine

    tokens = open_store(setup.tokens)
    config = HarvestConfig(engine="hf", k=K, dtype="float32", tokenization="own")
    summary = harvest(setup.tokens, setup.bos_teacher, tmp_path / "bos", config, progress=False,
                      engine_factory=lambda: HfReferenceEngine(setup.bos_teacher, K))
    assert summary.complete and summary.tokenization == "own"
    store = open_store(tmp_path / "bos")
    bos = store.attrs["bos_id"]
    assert bos is not None and store.attrs["topk_coding"] == "q64v2"
    ref = reference(setup.bos_teacher, tokens, MAX_POSITION)
    assert all(ids[0] == bos for ids in ref.ids if ids is not None)
    assert summary.unreadable == dict(ref.unreadable)
    check_against_reference(tmp_path / "bos", tokens, ref, atol=1 / 64)
    rows = store.read(np.arange(store.num_sequences))
    firsts = rows.offsets[:-1][np.diff(rows.offsets) > 0]
    starts = [whole_characters(t)[0] for t, ids in zip(tokens.read_meta().column("text")
                                                          .to_pylist(), ref.ids, strict=True)
              if ids is not None]
    assert rows["context_end"][firsts].tolist() == starts and any(starts)


def test_an_id_table_holds_the_teachers_most_read_ids_and_keeps_every_row(
        setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--id-table N``: the header holds the N ids of the teacher's own tokens of the texts
    (counted by transformers here) most frequent first; rows read back as without a table."""
    from mtkd.harvest import job
    from mtkd.store.id_table import frequency_table

    tokens = open_store(setup.tokens)
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", tmp_path / "t",
                     "--engine", "hf", "--k", K, "--dtype", "float32", "--id-table", 16)
    assert code == 0, msg
    store = open_store(tmp_path / "t")
    read = [ids for ids in reference(setup.teacher, tokens, max_len=10**6).ids
            if ids is not None]  # every window the teacher can read, too long for it or not
    want = frequency_table(np.bincount(np.concatenate(read)), 16)
    assert store.attrs["topk_id_table"] == want
    ref = reference(setup.teacher, tokens, MAX_POSITION)
    assert len(store.attrs["topk_id_table"]) == 16
    check_against_reference(tmp_path / "t", tokens, ref, atol=1 / 64)
    # a teacher of the store's tokens counts the store's ids, of the first parts only
    for parts, limit in ((range(tokens.num_parts), 10**9), ([0], 1)):
        monkeypatch.setattr(job, "ID_TABLE_TOKENS", limit)
        ids = np.concatenate([tokens.read_part(p, ["token_ids"])["token_ids"] for p in parts])
        assert job.read_id_table(tokens, None, 8) == frequency_table(np.bincount(ids), 8)
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", tmp_path / "f",
                     "--engine", "hf", *EXACT, "--id-table", 16)
    assert code == 1 and "--id-table needs --logprob-dtype q64v2 or q64v3 or q64r" in msg, msg
    assert not (tmp_path / "f").exists()
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", tmp_path / "f",
                     "--engine", "hf", "--tail-nats", 0.25)
    assert code == 1 and "--tail-nats needs --logprob-dtype q64r" in msg, msg
    # q64r (range-coded, with the table, streams of ≥ 4 rows): the same rows as q64v2's
    monkeypatch.undo()
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", tmp_path / "r",
                     "--engine", "hf", "--k", K, "--dtype", "float32", "--id-table", 16,
                     "--logprob-dtype", "q64r", "--stream-rows", 4)
    assert code == 0, msg
    v2, r = open_store(tmp_path / "t"), open_store(tmp_path / "r")
    assert r.attrs["topk_coding"] == "q64r" and r.attrs["topk_id_table"] == want
    assert r.attrs["topk_stream_rows"] == 4
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", tmp_path / "r",
                     "--engine", "hf", "--k", K, "--dtype", "float32", "--id-table", 16,
                     "--logprob-dtype", "q64r")  # resumed with another (the default) value
    assert code == 1 and "was begun with --stream-rows 4; this harvest asks --stream-rows " \
        "2048" in " ".join(msg.split()), msg
    for order in (np.arange(v2.num_sequences), np.arange(v2.num_sequences)[::-2]):
        for name, values in v2.read(order).arrays.items():
            assert_reads_alike(r.read(order)[name], values, name, scalars_coded=True)
    # a q64r harvest started before seen ids were ranked by count (and before the actual
    # token and the tail were coded against the top-k) resumes as it was started
    header = json.loads((tmp_path / "r" / "store.json").read_text())
    assert header["attrs"].pop("topk_id_ranking") == "count" and header["schema_version"] == 7
    assert header["attrs"].pop("scalar_coding") == "q64r"
    exact = {"target_level": "target_logprob", "tail_residual": "tail_logmass"}
    header["arrays"] = {exact.get(n, n): a | {"dtype": "float32"} if n in exact else a
                        for n, a in header["arrays"].items()}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "store.json").write_text(json.dumps(header | {"schema_version": 4}))
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", tmp_path / "old",
                     "--engine", "hf", "--k", K, "--dtype", "float32", "--id-table", 16,
                     "--logprob-dtype", "q64r", "--stream-rows", 4)
    assert code == 0, msg
    old = open_store(tmp_path / "old", verify="full")
    assert "topk_id_ranking" not in old.attrs
    for name, values in v2.read(np.arange(v2.num_sequences)).arrays.items():
        np.testing.assert_array_equal(old.read(np.arange(v2.num_sequences))[name], values,
                                      err_msg=name)


def test_auto_coding_keeps_a_begun_stores_own(setup: Setup, tmp_path: Path) -> None:
    """``--logprob-dtype auto`` (the default) writes q64v2 for this teacher's small vocabulary,
    but resumes a store begun as q64r as q64r, with its tail grid and stream rows: the same
    rows as the q64r harvest's; a coding that differs from a begun store's is refused, naming
    both."""
    args = ("--engine", "hf", "--k", K, "--dtype", "float32")
    q64r = ("--logprob-dtype", "q64r", "--tail-nats", 0.25, "--stream-rows", 4)
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", tmp_path / "r",
                     *args, *q64r)
    assert code == 0, msg
    for begun in ("begun", "refused"):  # q64r harvests stopped before a part committed
        (tmp_path / begun).mkdir()
        shutil.copy(tmp_path / "r" / "store.json", tmp_path / begun / "store.json")
    for out, coding in (("begun", "q64r"), ("fresh", "q64v2")):
        code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out",
                         tmp_path / out, *args)
        assert code == 0 and f"MiB on disk ({coding})" in msg, msg  # the summary says which
    r, begun = open_store(tmp_path / "r"), open_store(tmp_path / "begun", verify="full")
    assert begun.attrs["topk_coding"] == "q64r"
    assert (begun.attrs["topk_tail_step"], begun.attrs["topk_stream_rows"]) == (4, 4)
    assert open_store(tmp_path / "fresh").attrs["topk_coding"] == "q64v2"
    order = np.arange(r.num_sequences)
    for name, values in r.read(order).arrays.items():
        np.testing.assert_array_equal(begun.read(order)[name], values, err_msg=name)
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out",
                     tmp_path / "refused", *args, "--logprob-dtype", "q64v2")
    assert code != 0 and "was begun with --logprob-dtype q64r; this harvest asks " \
        "--logprob-dtype q64v2" in " ".join(msg.split()), msg
    assert not (tmp_path / "refused" / "parts").exists() or \
        not any((tmp_path / "refused" / "parts").iterdir())


def test_q64r_codes_the_draws_against_the_top_k(setup: Setup, tmp_path: Path) -> None:
    """q64r with draws: they read as q64v2's (the same seed draws the same tokens, and at
    q64's tail grid their values are q64v2's), coded against the top-k, and so are the actual
    token's log-prob and the tail, within their bound (schema version 7); a q64r harvest
    started before those codings resumes with the draws coded as q64v2 codes them and the
    scalars exact."""
    from mtkd.store.format import HEADER_FILE
    from mtkd.store.schema import teacher_header

    args = ("--engine", "hf", "--k", K, "--dtype", "float32", "--num-samples", 16)
    for name, coding in (("v2", "q64v2"), ("r", "q64r")):
        code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher,
                         "--out", tmp_path / name, *args, "--logprob-dtype", coding)
        assert code == 0, msg
    header = json.loads((tmp_path / "r" / HEADER_FILE).read_text())
    assert header["schema_version"] == 7 and header["attrs"]["sample_coding"] == "q64r"
    assert header["attrs"]["scalar_coding"] == "q64r" and "tail_residual" in header["arrays"]
    assert "sample_stream" in header["arrays"] and "sample_ids" not in header["arrays"]
    v2, r = open_store(tmp_path / "v2"), open_store(tmp_path / "r", verify="full")
    assert (v2.read_part(0)["sample_counts"].astype(int).sum(axis=1) == 16).all()
    for order in (np.arange(v2.num_sequences), np.arange(v2.num_sequences)[::-2]):
        for name, values in v2.read(order).arrays.items():
            assert_reads_alike(r.read(order)[name], values, name, scalars_coded=True)
    # a store begun before: its header as that mtkd wrote it (draws as q64v2 codes them)
    attrs = {n: v for n, v in r.attrs.items() if n not in ("sample_coding", "scalar_coding")}
    old = teacher_header(r.num_parts, K, attrs, num_samples=16, logprob_dtype="q64r",
                         stream_rows=2048, stream_samples=False, code_scalars=False,
                         own_tokens=r.attrs.get("tokenization") == "own")
    assert old.schema_version == 5
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / HEADER_FILE).write_text(json.dumps(old.to_json()))
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", tmp_path / "old",
                     *args, "--logprob-dtype", "q64r")
    assert code == 0, msg
    resumed = open_store(tmp_path / "old", verify="full")
    assert "sample_coding" not in resumed.attrs and "scalar_coding" not in resumed.attrs
    assert {"sample_ids", "tail_logmass"} <= {a.name for a in resumed.header.arrays}
    for name, values in v2.read(np.arange(v2.num_sequences)).arrays.items():
        np.testing.assert_array_equal(resumed.read(np.arange(v2.num_sequences))[name], values,
                                      err_msg=name)


def test_a_model_given_by_hub_id_is_read_from_the_cache(setup: Setup, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``--model owner/name`` offline: the cached snapshot, harvested as the directory is."""
    import huggingface_hub.constants

    from tests.ingest.test_tokenizer_loading import fake_hub_cache

    snapshot = fake_hub_cache(tmp_path / "hub", "acme/tiny-teacher", setup.teacher)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, msg = mtkd("harvest", setup.tokens, "--model", "acme/tiny-teacher", "--out",
                     tmp_path / "out", "--engine", "hf", *EXACT, "--batch-tokens", "300")
    assert code == 0 and "own tokenization" in msg, msg
    got, want = open_store(tmp_path / "out"), open_store(setup.hf_store)
    assert got.attrs["teacher"] == got.attrs["teacher_tokenizer"] == str(snapshot.resolve())
    for p in range(got.num_parts):
        a, b = got.read_part(p), want.read_part(p)
        np.testing.assert_array_equal(a.offsets, b.offsets)
        for name in got.array_names:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    code, msg = mtkd("harvest", setup.tokens, "--model", "acme/elsewhere", "--out",
                     tmp_path / "none", "--engine", "hf", *EXACT)
    assert code == 1 and "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in msg
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- refusals


def test_what_cannot_be_harvested_in_own_tokens_is_refused(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hf = ("--engine", "hf", *EXACT)
    code, msg = mtkd("harvest", setup.old_tokens, "--model", setup.teacher, "--out", out, *hf)
    assert code == 1 and "keeps no window texts" in msg and "re-tokenize" in msg
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", out, *hf,
                     "--tokenization", "store")
    assert code == 1 and "different tokenizer" in msg and "--tokenization own" in msg
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", out, *hf,
                     "--tokenization", "own", "--vocab-map", "auto")
    assert code == 1 and "exclude each other" in msg
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", out, *hf,
                     "--temperature", "2")
    assert code == 1 and "own tokens" in msg
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.teacher, "--out", out, *hf,
                     "--tokenization", "mine")
    assert code == 1 and "tokenization must be one of auto, store, own" in msg
    code, msg = mtkd("harvest", setup.tokens, "--model", tmp_path / "missing", "--out", out, *hf)
    assert code == 1 and "no such file or directory" in msg
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((setup.teacher / "config.json").read_text())
    code, msg = mtkd("harvest", setup.tokens, "--model", no_tokenizer, "--out", out, *hf,
                     "--tokenization", "own")
    assert code == 1 and "cannot read the windows' texts" in msg
    code, msg = mtkd("harvest", setup.tokens, "--model", no_tokenizer, "--out", out, *hf)
    assert code == 1 and "no tokenizer to compare" in msg
    assert not out.exists()  # every refusal came before the store was created


def test_a_tokens_store_whose_texts_do_not_match_its_offsets_is_refused(
        setup: Setup, tmp_path: Path) -> None:
    from mtkd.harvest.own_tokens import window_texts

    tokens = open_store(setup.tokens)
    seq_ids, texts, lengths = window_texts(tokens, 0)
    assert len(texts) == len(seq_ids) == len(lengths) == len(tokens.part_sequences(0))
    broken = tmp_path / "broken"
    shutil.copytree(setup.tokens, broken)
    meta_path = broken / "parts" / "00000" / "meta.parquet"
    table = pq.read_table(meta_path)
    column = pa.array([texts[0] + b"!", *texts[1:]], pa.large_binary())
    pq.write_table(table.set_column(table.column_names.index("text"), "text", column), meta_path)
    with pytest.raises(StoreError, match="sequence 0: its text holds"):
        window_texts(open_store(broken, verify="none"), 0)


def test_windows_cut_inside_a_character_align_like_the_stores_own_ids(
        setup: Setup, successor_dir: Path, tmp_path: Path) -> None:
    """A window that starts or ends inside a UTF-8 character (one split over byte tokens) is
    read without the partial characters' bytes, not left out; aligned back to the student, a
    teacher on the student's own tokenizer harvested that way gives the targets of the same
    teacher on the store's ids wherever it covers a row, and it covers most rows of such
    windows (not those that predict a partial character's bytes)."""
    tokens = open_store(setup.tokens)
    texts = tokens.read_meta().column("text").to_pylist()
    cut = np.array([whole_characters(t)[:2] != (0, len(t)) for t in texts])
    assert cut.sum() >= 4
    hf = ("--engine", "hf", "--k", str(K), "--dtype", "float32")
    stores = {}
    for how in ("own", "store"):
        code, msg = mtkd("harvest", setup.tokens, "--model", successor_dir, "--out",
                         tmp_path / how, *hf, "--tokenization", how)
        assert code == 0, msg
        code, msg = mtkd("aggregate", tmp_path / how, "--tokens", setup.tokens, "--out",
                         tmp_path / f"{how}-targets", "--k-out", str(K))
        assert code == 0, msg
        stores[how] = open_store(tmp_path / f"{how}-targets")
    assert not unreadable_counts(open_store(tmp_path / "own"))["undecodable"]
    own, same = (s.read(np.arange(s.num_sequences)) for s in (stores["own"], stores["store"]))
    rows = np.diff(own.offsets)
    in_cut = np.repeat(cut, rows)
    covered = own["coverage"] > 0
    assert covered[in_cut].mean() > 0.8
    dense = np.zeros((2, len(covered), open_store(setup.tokens).attrs["vocab_size"]))
    for d, got in zip(dense, (own, same), strict=True):
        np.put_along_axis(d, got["ids"].astype(np.int64), got["probs"], axis=1)
    gap = np.abs(dense[0] - dense[1]).sum(axis=1)[covered]
    assert np.median(gap) < 1e-3 and (gap < 0.05).mean() > 0.97


def test_a_teachers_special_token_spelled_in_the_text_is_read_as_text(
        setup: Setup, tokenizer_dir: Path, tmp_path: Path) -> None:
    """The text "<s>" is text to the student (not one of its special tokens), so the window
    keeps its bytes; the BOS teacher reads them as text too (transformers'
    ``split_special_tokens``), not as its BOS, which spells nothing: the window is read, not
    left out as not spelled."""
    from transformers import AutoTokenizer

    from mtkd.ingest.job import TokenizeConfig, tokenize_corpus

    docs = ["so <s>old</s> it", "plain words"]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tokenize_corpus([corpus], tokenizer_dir, tmp_path / "tokens", TokenizeConfig(max_len=64),
                    progress=False)
    code, msg = mtkd("harvest", tmp_path / "tokens", "--model", setup.bos_teacher, "--out",
                     tmp_path / "out", "--engine", "hf", *EXACT)
    assert code == 0, msg
    store = open_store(tmp_path / "out")
    assert not unreadable_counts(store)
    tok = AutoTokenizer.from_pretrained(str(setup.bos_teacher))
    rows = store.read(np.arange(store.num_sequences), ["next_id"])
    want = [tok(t, split_special_tokens=True)["input_ids"][1:] for t in docs]
    assert rows["next_id"].tolist() == [i for ids in want for i in ids]


# --------------------------------------------------------------------------- vLLM


@pytest.mark.engine
def test_vllm_rows_equal_an_independent_forward(setup: Setup, tmp_path: Path,
                                                mtkd_cli: Callable[..., str]) -> None:
    """The same teacher on vLLM (float32, eager): the same sequences, context ends and next ids
    as the reference engine, log-probs within the engines' tolerance; its draws at the
    teacher's own positions: each row's log-probs those of the reference row, their mean the
    reference's −entropy within 5 standard errors (a text of max_model_len tokens is left out
    as too long: draws need a token of room after it)."""
    out = tmp_path / "vllm"
    draws = 32
    stdout = mtkd_cli("harvest", setup.tokens, "--model", setup.teacher, "--out", out, *EXACT,
                      "--engine", "vllm", "--enforce-eager", "--tokenization", "own",
                      "--num-samples", draws)
    assert "unreadable" in stdout
    tokens = open_store(setup.tokens)
    ref = reference(setup.teacher, tokens, MAX_POSITION - 1)  # draws need a token of room
    check_against_reference(out, tokens, ref, atol=LOGPROB_ATOL)
    store = open_store(out)
    rows = store.read(np.arange(store.num_sequences))
    full = np.concatenate(ref.logprobs)
    ids, counts = rows["sample_ids"].astype(np.int64), rows["sample_counts"].astype(np.int64)
    assert (counts.sum(axis=1) == draws).all()
    real = counts > 0
    drawn_lp = np.take_along_axis(full, np.maximum(ids, 0), axis=1)
    np.testing.assert_allclose(rows["sample_logprobs"][real], drawn_lp[real], atol=LOGPROB_ATOL)
    per_row = (np.where(real, drawn_lp, 0.0) * counts).sum(axis=1) / draws
    p = np.exp(full)
    mean_lp, second = (p * full).sum(axis=1), (p * full**2).sum(axis=1)
    se = np.sqrt(((second - mean_lp**2) / draws).sum()) / len(full)
    assert abs(per_row.mean() - mean_lp.mean()) < 5 * se
    got, want = open_store(out), open_store(setup.hf_store)
    assert got.attrs["engine"] == "vllm" and got.attrs["teacher_tokenizer_hash"] == want.attrs[
        "teacher_tokenizer_hash"]


@pytest.mark.engine
def test_vllm_harvests_smollm2_over_another_tokenizers_store(
        tokenizer_dir: Path, tmp_path: Path, mtkd_cli: Callable[..., str]) -> None:
    """The real pretrained teacher (vocabulary 49,152) over windows cut by the session's BPE
    (vocabulary 512): vLLM float32 rows in SmolLM2's own tokens against transformers."""
    from mtkd.ingest.job import TokenizeConfig, tokenize_corpus
    from mtkd.recipes.real_teacher import TeacherUnavailableError, ensure_smollm2

    try:
        smollm2 = ensure_smollm2()
    except TeacherUnavailableError as err:
        pytest.skip(f"SmolLM2 is not cached and cannot be built here: {err}")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "The json module exposes an API familiar to users of the standard library marshal "
        "and pickle modules.",
        'def fib(n):\n    """Return the Fibonacci series up to n."""\n    a, b = 0, 1\n',
        "Exceptions are raised when the program encounters an error: naïve café.")))
    tokenize_corpus([corpus], tokenizer_dir, tmp_path / "tokens", TokenizeConfig(max_len=32),
                    progress=False)
    out = tmp_path / "smollm2"
    mtkd_cli("harvest", tmp_path / "tokens", "--model", smollm2, "--out", out, "--k", "16",
             "--dtype", "float32", "--logprob-dtype", "float32", "--enforce-eager",
             "--max-model-len", "128")
    tokens = open_store(tmp_path / "tokens")
    ref = reference(smollm2, tokens, 128)
    assert sum(ids is not None for ids in ref.ids) >= tokens.num_sequences - 2
    check_against_reference(out, tokens, ref, atol=1e-3, k=16)
    attrs = open_store(out).attrs
    assert attrs["tokenization"] == "own" and attrs["vocab_size"] == 49152
