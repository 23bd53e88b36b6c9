"""Window texts in a tokens store: ``byte_end``, ``byte_start`` and ``text`` rebuild each window's
text exactly, its tokens spell it, and the token ids are those of a store without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.ingest.corpus import CorpusError
from mtkd.ingest.job import TokenizeConfig, tokenize_corpus
from mtkd.ingest.token_bytes import token_bytes
from mtkd.ingest.window_text import Spelling, document_bytes
from mtkd.store import open_store

from .test_token_bytes import llama_style_bpe, metaspace_unigram

EOS = "<|endoftext|>"
#: Documents with multi-byte characters (byte tokens: windows cut inside characters), spaces at
#: the edges, and a special token written out in the text.
DOCS = [
    "def f(x):\n    return x + 1  # héllo wörld\n" * 3,
    "the cat sat on the mat, 日本語テキスト 🎉 and more text after it",
    "  leading spaces\n\ttabs and naïve café — über straße  ",
    f"before {EOS} after, then more words to fill a window or two",
    "z",
]


@pytest.fixture
def tmp_path(memory_tmp_path: Path) -> Path:
    return memory_tmp_path


def corpus(root: Path, docs: list[str] = DOCS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def windows_of(store_dir: Path) -> list[dict]:
    """Every window: its ids, byte ends, text, byte start and document index."""
    store = open_store(store_dir)
    out = []
    for p in range(store.num_parts):
        batch = store.read_part(p)
        meta = store.read_meta(p).to_pydict()
        off = batch.offsets
        for s in range(len(batch.seq_ids)):
            out.append({"ids": batch["token_ids"][off[s]:off[s + 1]],
                        "ends": batch["byte_end"][off[s]:off[s + 1]],
                        "text": meta["text"][s], "byte_start": meta["byte_start"][s],
                        "doc": meta["doc_id"][s] & 0xFFFFFFFF, "start": meta["start"][s]})
    return out


def check_windows(store_dir: Path, tok: Tokenizer, docs: list[str], dummy_prefix: bool = False
                  ) -> list[dict]:
    """Each window's text is what its tokens spell, token by token, and (without special tokens
    written in the document) the document's bytes from ``byte_start``."""
    table = token_bytes(tok)
    found = windows_of(store_dir)
    assert found
    for w in found:
        ends, text = w["ends"], w["text"]
        assert ends.dtype == np.int32 and isinstance(text, bytes)
        assert len(text) == ends[-1] and (np.diff(ends) >= 0).all() and ends[0] >= 0
        prev = 0
        for n, (i, end) in enumerate(zip(w["ids"], ends, strict=True)):
            spelled = table[i] or b""
            piece = text[prev:end]
            first = dummy_prefix and w["byte_start"] == 0 and prev == 0
            if not (first and spelled == b" " + piece):
                assert piece == spelled, (w, n)
            prev = int(end)
        data = docs[w["doc"]].encode()
        if EOS not in docs[w["doc"]]:
            assert data[w["byte_start"]:w["byte_start"] + len(text)] == text
    return found


def test_windows_rebuild_their_text(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Overlapping windows of 7 tokens: texts split inside characters, the appended EOS and a
    literal special token take zero bytes; ids equal a store without byte offsets."""
    src = corpus(tmp_path / "c")
    cfg = TokenizeConfig(max_len=7, overlap=2)
    tokenize_corpus([src], tokenizer_dir, tmp_path / "tok", cfg, progress=False)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    found = check_windows(tmp_path / "tok", tok, DOCS)
    store = open_store(tmp_path / "tok")
    assert store.part_stats(0)["special_tokens_in_text"] == 1
    # the special token written in document 3 spells nothing: its windows' texts lack it
    spelled_doc = DOCS[3].replace(EOS, "").encode()
    doc3 = [w for w in found if w["doc"] == 3]
    assert all(spelled_doc.find(w["text"]) >= 0 for w in doc3)
    rebuilt = doc3[0]["text"] + b"".join(w["text"][w["ends"][1]:] for w in doc3[1:])
    assert rebuilt == spelled_doc  # windows overlap by 2 tokens
    undecodable = 0
    for w in found:
        try:
            w["text"].decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
    assert undecodable > 0  # cut inside a character: legal
    # the last window of each document ends with the EOS, zero bytes at the text's end
    eos = tok.token_to_id(EOS)
    ends_with_eos = [w for w in found if w["ids"][-1] == eos]
    assert ends_with_eos and all(w["ends"][-1] == w["ends"][-2] for w in ends_with_eos)

    # the same ids, sequences and windows as a store without byte offsets
    plain = TokenizeConfig(max_len=7, overlap=2, byte_offsets=False)
    tokenize_corpus([src], tokenizer_dir, tmp_path / "plain", plain, progress=False)
    a, b = open_store(tmp_path / "tok"), open_store(tmp_path / "plain")
    assert b.array_names == ["token_ids"] and a.array_names == ["byte_end", "token_ids"]
    assert "text" not in b.read_meta().column_names
    np.testing.assert_array_equal(a.read_part(0)["token_ids"], b.read_part(0)["token_ids"])
    np.testing.assert_array_equal(a.read_part(0).offsets, b.read_part(0).offsets)
    assert a.read_meta().drop_columns(["byte_start", "text"]).equals(b.read_meta())


def test_sentencepiece_style_dummy_prefix(tmp_path: Path) -> None:
    """A Llama-2-style tokenizer (normalizer prepends ``▁``): the first token's dummy space is
    not in the text; everything else is spelled exactly."""
    tok = llama_style_bpe()
    tok_dir = tmp_path / "sp"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    docs = ["the cat sat on the mat", "\nnew line first", "def f(x):\n    return x"]
    tokenize_corpus([corpus(tmp_path / "c", docs)], tok_dir, tmp_path / "tok",
                    TokenizeConfig(max_len=6), progress=False)
    check_windows(tmp_path / "tok", tok, docs, dummy_prefix=True)


def test_dummy_prefix_after_each_special_token(tmp_path: Path) -> None:
    """The review's case: a Llama-2-style normalizer prepends ``▁`` to the text after every
    special token too, so "with </s> literal" spelled "with ", "</s>", "  literal" and the
    whole run was refused; the dummy prefix may now follow each special token."""
    tok = llama_style_bpe()
    tok_dir = tmp_path / "sp"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    docs = ["text with </s> literal then more", "text with <s> in the middle", "</s>x",
            "a </s> b", "<s></s> two  spaces </s>"]
    summary = tokenize_corpus([corpus(tmp_path / "c", docs)], tok_dir, tmp_path / "tok",
                              TokenizeConfig(max_len=64), progress=False)
    assert summary.problems == {} and summary.documents == len(docs)
    texts = [w["text"] for w in windows_of(tmp_path / "tok")]
    assert texts == [d.replace("</s>", "").replace("<s>", "").encode() for d in docs]


def test_document_bytes_by_hand() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(list("abc "))
    tok.add_special_tokens([EOS])
    spelling = Spelling.of(tok)
    text = f"ab{EOS}c"
    ids = tok.encode(text, add_special_tokens=False).ids
    doc = document_bytes(ids, 1, text, spelling)
    assert doc.spelled == b"abc" and doc.literal_specials == 1
    np.testing.assert_array_equal(doc.bounds, [0, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(doc.starts, [0, 1, 2, 2 + len(EOS), 3 + len(EOS),
                                               3 + len(EOS)])
    start, ends, window = doc.window(1, 5)
    assert (start, ends.tolist(), window) == (1, [1, 1, 2, 2], b"bc")
    # a window starting on the special token: its text "c" starts after it, at byte 2 + 13
    start, ends, window = doc.window(2, 5)
    assert (start, ends.tolist(), window) == (2 + len(EOS), [0, 1, 1], b"c")
    assert doc.window(4, 5)[0] == 3 + len(EOS)  # the appended EOS: at the document's end


def first_spelled_run(w: dict, tok: Tokenizer) -> bytes:
    """The window's text up to its first special token after a spelled one (what the document
    holds contiguously from ``byte_start``)."""
    table, ends = token_bytes(tok), w["ends"]
    spelled = [table[i] is not None for i in w["ids"]]
    for n in range(1, len(spelled)):
        if spelled[n - 1] and not spelled[n] and any(spelled[:n]):
            return w["text"][:ends[n - 1]]
    return w["text"]


def test_a_window_starting_on_a_special_token_in_the_text(tokenizer_dir: Path,
                                                        tmp_path: Path) -> None:
    """The review's case: a window starting on a literal <|endoftext|> had byte_start at the
    special token (byte 8) while its text starts after it (byte 21)."""
    docs = [f"one two {EOS} three four five six", f"{EOS}{EOS}x y z w v u t s r q"]
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    summary = tokenize_corpus([corpus(tmp_path / "c", docs)], tokenizer_dir, tmp_path / "tok",
                              TokenizeConfig(max_len=5, overlap=2), progress=False)
    assert summary.special_tokens_in_text == 3  # the summary the CLI prints has it
    found = windows_of(tmp_path / "tok")
    eos = tok.token_to_id(EOS)
    assert any(w["ids"][0] == eos and w["text"] for w in found)  # the case is there
    for w in found:
        run = first_spelled_run(w, tok)
        data = docs[w["doc"]].encode()
        assert data[w["byte_start"]:w["byte_start"] + len(run)] == run, w
    assert open_store(tmp_path / "tok").part_stats(0)["special_tokens_in_text"] == 3


# --------------------------------------------------------------------------- refusals


def test_tokenizers_that_do_not_spell_the_text_are_refused(tokenizer_dir: Path,
                                                           tmp_path: Path) -> None:
    src = corpus(tmp_path / "c", ["Hello World, Mixed Case"])
    lower = tmp_path / "lower"  # the session's tokenizer behind a lowercasing normalizer
    shutil.copytree(tokenizer_dir, lower)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.normalizer = normalizers.Lowercase()
    tok.save(str(lower / "tokenizer.json"))
    with pytest.raises(CorpusError, match=r"lower: its tokens do not spell the text 'Hello "
                                          r"World.*changes the text it reads.*--no-byte-offsets"):
        tokenize_corpus([src], lower, tmp_path / "a", TokenizeConfig(max_len=8), progress=False)
    assert not (tmp_path / "a").exists()  # refused before the store was begun

    wordpiece = tmp_path / "wordpiece"
    wordpiece.mkdir()
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##s": 3}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece()
    wp.save(str(wordpiece / "tokenizer.json"))
    result = CliRunner().invoke(app, ["tokenize", str(src), "--tokenizer", str(wordpiece),
                                      "--out", str(tmp_path / "b"), "--max-len", "8"])
    assert result.exit_code == 1 and "WordPiece" in result.output
    assert "--no-byte-offsets" in " ".join(result.output.split())
    assert not (tmp_path / "b").exists()  # refused before the store was created
    # without byte offsets both tokenize as before
    for name, tokenizer in (("e", lower), ("d", wordpiece)):  # not "c": the corpus is there
        summary = tokenize_corpus([src], tokenizer, tmp_path / name,
                                  TokenizeConfig(max_len=8, byte_offsets=False,
                                                 add_eos=name == "e"), progress=False)
        assert summary.complete and open_store(tmp_path / name).array_names == ["token_ids"]


def test_an_unknown_character_is_named_as_such() -> None:
    """A tokenizer without byte fallback reads a character it does not know as <unk>, which
    spells nothing of it: the error says so rather than blame a normalizer."""
    tok = metaspace_unigram()
    spelling = Spelling.of(tok)
    assert spelling.unknown == tok.token_to_id("<unk>")
    text = "the cat ☃ sat"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert spelling.unknown in ids
    with pytest.raises(ValueError, match=r"a character it does not know as its unknown token "
                                         r"\(id 0; it has no byte fallback\): token \d+"):
        document_bytes(ids, 1, text, spelling)
