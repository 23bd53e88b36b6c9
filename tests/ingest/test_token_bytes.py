"""token_bytes: what each token spells under the three schemes (byte-level BPE, SentencePiece
style with byte fallback, plain), special tokens, byte offsets of tokens in a text, and the
tokenizer model's first token of a byte string."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mtkd.ingest.token_bytes import (
    byte_bounds,
    bytes_to_unicode,
    decoder_types,
    first_token_fn,
    special_pairs,
    token_bytes,
    unicode_to_bytes,
)
from mtkd.recipes.models import byte_level_bpe as models_byte_level_bpe

TEXTS = ["def f(x):\n    return x + 1  # héllo wörld", "the cat sat on the mat, 日本語",
         "naïve café — über straße", "for i in range(10):\n\tprint(i)"] * 20
SAMPLES = ["hello world", "  two  spaces", "café 日本 ümlaut", "x\n\ty", "the mat sat"]
EOS = "<|endoftext|>"


def byte_level_bpe(vocab_size: int = 400, texts: list[str] = TEXTS) -> Tokenizer:
    """A GPT-2-style byte-level BPE (``recipes.models.byte_level_bpe``)."""
    return models_byte_level_bpe(texts, vocab_size)


def llama_style_bpe(vocab_size: int = 350) -> Tokenizer:
    """A Llama-2-style SentencePiece BPE: ``▁`` for spaces, a dummy prefix, ``<0xNN>`` bytes."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        [t for t in TEXTS if t.isascii()],
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    return tok


def metaspace_unigram() -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False))
    return tok


def spelled(tok: Tokenizer, text: str) -> bytes:
    table = token_bytes(tok)
    return b"".join(table[i] or b"" for i in tok.encode(text).ids)


def test_gpt2_table_is_a_bijection_onto_printable_characters() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert all(unicode_to_bytes()[c] == b for b, c in table.items())


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_tokens_spell_the_text(text: str) -> None:
    tok = byte_level_bpe()
    assert decoder_types(tok) == ["ByteLevel"]
    assert spelled(tok, text) == text.encode()
    table = token_bytes(tok)
    assert table[tok.token_to_id(EOS)] is None
    ids = tok.encode(text).ids
    bounds = byte_bounds(ids, table, text)
    assert bounds[0] == 0 and bounds[-1] == len(text.encode())
    assert all(bounds[n + 1] - bounds[n] == len(table[i]) for n, i in enumerate(ids))


@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_byte_level_spells_any_text(text: str) -> None:
    tok = _BYTE_LEVEL
    ids = tok.encode(text).ids
    assert spelled(tok, text) == text.encode()
    assert byte_bounds(ids, token_bytes(tok), text)[-1] == len(text.encode())


_BYTE_LEVEL = byte_level_bpe()


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_style_with_byte_fallback(text: str) -> None:
    tok = llama_style_bpe()
    table = token_bytes(tok)
    assert table[tok.token_to_id("<0x41>")] == b"A"  # byte-fallback token
    assert table[tok.token_to_id("<s>")] is None
    assert b" " in [table[i] for i in range(len(table)) if table[i] and len(table[i]) == 1]
    # the dummy prefix: the tokens spell " " + text; byte_bounds drops that first space
    assert spelled(tok, text) == b" " + text.encode()
    enc = tok.encode(text)
    bounds = byte_bounds(enc.ids, table, text)
    assert bounds[0] == 0 and bounds[-1] == len(text.encode())
    assert bounds[1] == len(table[enc.ids[0]]) - 1


def test_metaspace_unigram_spells_spaces() -> None:
    tok = metaspace_unigram()
    assert "Metaspace" in decoder_types(tok)
    for text in ("the cat", "sat on the mat"):
        assert spelled(tok, text) == b" " + text.encode()
        assert byte_bounds(tok.encode(text).ids, token_bytes(tok), text)[-1] == len(text)


def test_plain_vocabulary_and_transformers_tokenizer() -> None:
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "é": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    assert token_bytes(tok) == [b"a", b"b", "é".encode(), b"[UNK]"]
    fast = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(), eos_token=EOS)
    assert token_bytes(fast) == token_bytes(fast.backend_tokenizer)
    with pytest.raises(ValueError, match="not a fast Hugging Face tokenizer"):
        token_bytes(object())


def test_added_tokens_special_or_not() -> None:
    tok = byte_level_bpe()
    tok.add_tokens(["<tool>"])
    tok.add_special_tokens(["<|pad|>"])
    table = token_bytes(tok)
    assert table[tok.token_to_id("<tool>")] == b"<tool>"
    assert table[tok.token_to_id("<|pad|>")] is None


def test_wordpiece_is_refused() -> None:
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="implicit"):
        token_bytes(tok)


def test_special_pairs_by_content_and_by_name() -> None:
    teacher, student = llama_style_bpe(), byte_level_bpe()
    assert special_pairs(teacher, student) == {}
    pairs = special_pairs(teacher, student, {"</s>": EOS})
    assert pairs == {teacher.token_to_id("</s>"): student.token_to_id(EOS)}
    assert special_pairs(student, student) == {student.token_to_id(EOS): student.token_to_id(EOS)}
    with pytest.raises(ValueError, match="no special token"):
        special_pairs(teacher, student, {"<nope>": EOS})


def test_byte_bounds_refuses_a_text_the_tokens_do_not_spell() -> None:
    tok = byte_level_bpe()
    ids = tok.encode("hello world").ids
    with pytest.raises(ValueError, match="do not spell the text"):
        byte_bounds(ids, token_bytes(tok), "hello there")
    # special tokens take no bytes; ``start`` offsets everything
    eos = tok.token_to_id(EOS)
    bounds = byte_bounds([*ids, eos], token_bytes(tok), "..hello world", start=2)
    assert bounds[0] == 2 and bounds[-1] == bounds[-2] == 13


def test_first_token_of_a_token_is_itself() -> None:
    """The model's first token of a vocabulary token's own bytes is the token itself (or one
    spelling the same bytes: ``<0x61>`` and ``a``)."""
    for tok in (byte_level_bpe(), llama_style_bpe()):
        table, first = token_bytes(tok), first_token_fn(tok)
        for i, b in enumerate(table):
            if b and b.isascii():
                assert table[first(b)] == b, (i, b)
    assert first_token_fn(byte_level_bpe())(b"") is None


def test_byte_bounds_names_the_mismatch_past_the_dummy_prefix() -> None:
    """With a dummy prefix, the walk without it fails at token 0; the error names the token
    where the walk with it fails (the real mismatch), not token 0."""
    tok = llama_style_bpe()
    ids = tok.encode("the cat sat", add_special_tokens=False).ids
    with pytest.raises(ValueError, match=r"token [1-9]\d* .*do not spell") as caught:
        byte_bounds(ids, token_bytes(tok), "the dog sat")
    assert "at byte 0" not in str(caught.value)
