"""What each token of a Hugging Face tokenizer spells, as bytes, and where tokens sit in a text.

Aligning a teacher with another tokenizer to the student's positions (``distill.aggregate.
align``) works on bytes: every token of either vocabulary is the byte string it stands for.
The vocabulary strings say it in one of three schemes, told by the tokenizer's decoder:

* **byte-level BPE** (GPT-2, Llama 3, Qwen; ``ByteLevel`` decoder): every character of a token
  string is one byte through GPT-2's bytes↔unicode table (:func:`bytes_to_unicode`);
* **SentencePiece style** (Llama 2, Mistral, T5; ``Metaspace`` or ``Replace("▁", " ")``
  decoders): ``▁`` is a space, and with a ``ByteFallback`` decoder ``<0xNN>`` is the byte NN;
* **plain** (no decoder, or one that joins tokens as they are): the token string's UTF-8.

Special tokens (``<|endoftext|>``, ``<s>``) spell nothing: ``None``, zero bytes in a text.
Added tokens that are not special spell their content. WordPiece (``##``) and end-of-word
suffix vocabularies leave the spaces between words implicit, so they are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from tokenizers import Tokenizer

#: Decoders whose tokens do not spell their text by themselves.
UNSUPPORTED_DECODERS = frozenset({"WordPiece", "BPEDecoder", "CTC"})
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
METASPACE = "▁"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte → the printable character byte-level BPE writes for it.

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, …) take the
    characters U+0100 onwards, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def backend(tokenizer: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself, or a transformers fast
    tokenizer's ``backend_tokenizer``)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    inner = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(inner, Tokenizer):
        return inner
    raise ValueError(f"{type(tokenizer).__name__} is not a fast Hugging Face tokenizer "
                     "(a tokenizers.Tokenizer or a PreTrainedTokenizerFast is needed)")


def decoder_types(tokenizer: Any) -> list[str]:
    """The types of the tokenizer's decoder and of the decoders inside it, outermost first."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.append(node.get("type", "?"))
            for inner in node.get("decoders") or ():
                walk(inner)

    walk(json.loads(backend(tokenizer).to_str()).get("decoder"))
    return found


def _replacements(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """(pattern, content) of the decoder's string replacements, ``▁`` → space for Metaspace."""
    out: list[tuple[str, str]] = []

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind == "Metaspace":
            out.append((node.get("replacement", METASPACE), " "))
        elif kind == "Replace" and "String" in (node.get("pattern") or {}):
            out.append((node["pattern"]["String"], node.get("content", "")))
        for inner in node.get("decoders") or ():
            walk(inner)

    walk(json.loads(tokenizer.to_str()).get("decoder"))
    return out


def spelling(tokenizer: Any) -> Callable[[str], bytes]:
    """The function from a (non-added) vocabulary string to the bytes it stands for."""
    tok = backend(tokenizer)
    kinds = set(decoder_types(tok))
    if kinds & UNSUPPORTED_DECODERS:
        raise ValueError(f"decoder {sorted(kinds & UNSUPPORTED_DECODERS)}: its tokens leave the "
                         "spaces between words implicit, so they do not spell the text's bytes")
    if "ByteLevel" in kinds:
        table = unicode_to_bytes()

        def byte_level(s: str) -> bytes:
            if all(c in table for c in s):
                return bytes(table[c] for c in s)
            return s.encode("utf-8")  # not a byte-level string (should not occur in a vocab)

        return byte_level
    fallback = "ByteFallback" in kinds
    replacements = _replacements(tok)

    def spell(s: str) -> bytes:
        if fallback:
            m = _BYTE_TOKEN.fullmatch(s)
            if m:
                return bytes([int(m.group(1), 16)])
        for pattern, content in replacements:
            s = s.replace(pattern, content)
        return s.encode("utf-8")

    return spell


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each id spells, ``[vocab size]``; ``None`` for special tokens and unused ids.

    ``tokenizer``: a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
    """
    tok = backend(tokenizer)
    added = tok.get_added_tokens_decoder()
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    out: list[bytes | None] = [None] * size
    spell = spelling(tok)
    fallback = "ByteFallback" in decoder_types(tok)
    for string, i in vocab.items():
        token = added.get(i)
        if token is None or (fallback and _BYTE_TOKEN.fullmatch(string)):
            out[i] = spell(string)  # byte-fallback tokens are bytes even when added
        elif not token.special:
            out[i] = token.content.encode("utf-8")
    return out


def special_pairs(teacher: Any, student: Any,
                  same: Mapping[str, str] | None = None) -> dict[int, int]:
    """Teacher id → student id of the special tokens with the same content, plus the pairs
    ``same`` names by content (e.g. ``{"</s>": "<|endoftext|>"}`` to pair end-of-text tokens
    of two families)."""
    def specials(tok: Any) -> dict[str, int]:
        return {t.content: i for i, t in backend(tok).get_added_tokens_decoder().items()
                if t.special}

    theirs, ours = specials(teacher), specials(student)
    pairs = {theirs[c]: ours[c] for c in theirs.keys() & ours.keys()}
    for t_content, s_content in (same or {}).items():
        if t_content not in theirs or s_content not in ours:
            raise ValueError(f"no special token {t_content!r} in the teacher or "
                             f"{s_content!r} in the student")
        pairs[theirs[t_content]] = ours[s_content]
    return pairs


class Unspelled(ValueError):
    """Tokens that do not spell a text; ``token``: the index of the first one that does not."""

    def __init__(self, token: int, message: str) -> None:
        super().__init__(message)
        self.token = token


def byte_bounds(ids: Sequence[int] | np.ndarray, spelled: Sequence[bytes | None],
                text: bytes | str, start: int = 0, *,
                specials: Collection[int] = frozenset()) -> np.ndarray:
    """Byte offsets of tokens ``ids`` read from ``text`` at byte ``start``: ``int64 [L+1]``,
    where the first token starts, then where each token ends (what ``align`` takes).

    Each token must spell the next bytes of the text (``spelled``: :func:`token_bytes`); special
    tokens (spelling ``None``, or ids in ``specials``) take what they spell. One exception:
    the first token that spells anything, and the first after each special token, may begin
    with a space that the text lacks (SentencePiece's dummy prefix, which a ``Prepend``
    normalizer adds to every piece of text between special tokens); it does not count.
    Anything else (a normalizer that changed the text, a different text) raises
    :class:`Unspelled` (a ``ValueError``) naming the first token that does not spell it.
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    out = np.empty(len(ids) + 1, dtype=np.int64)
    out[0] = pos = start
    for lo, hi in _segments(ids, spelled, specials):
        pos = _segment(ids, spelled, data, pos, (lo, hi), out)
    return out


def _segments(ids: Sequence[int] | np.ndarray, spelled: Sequence[bytes | None],
              specials: Collection[int]) -> list[tuple[int, int]]:
    """[lo, hi) of the runs of tokens that each end with a special token (the last run: with
    the last token): a dummy prefix may start each run."""
    cuts = [n + 1 for n, i in enumerate(ids)
            if int(i) in specials or _spelling(spelled, i) is None]
    if not cuts or cuts[-1] != len(ids):
        cuts.append(len(ids))
    return list(zip([0, *cuts[:-1]], cuts, strict=True))


def _segment(ids: Sequence[int] | np.ndarray, spelled: Sequence[bytes | None], data: bytes,
             pos: int, run: tuple[int, int], out: np.ndarray) -> int:
    """Walk tokens ``run`` from byte ``pos``, as spelled or else with a dummy prefix; the end.
    When both fail, the error of the walk that went further (it names the real mismatch)."""
    try:
        return _walk(ids, spelled, data, pos, run, out, dummy_prefix=False)
    except Unspelled as plain:
        try:  # the first spelled space may be the dummy prefix even where the text has one
            return _walk(ids, spelled, data, pos, run, out, dummy_prefix=True)
        except Unspelled as dummy:
            raise (dummy if dummy.token > plain.token else plain) from None


def _spelling(spelled: Sequence[bytes | None], i: int | np.integer) -> bytes | None:
    return spelled[int(i)] if 0 <= int(i) < len(spelled) else None


def _walk(ids: Sequence[int] | np.ndarray, spelled: Sequence[bytes | None], data: bytes,
          pos: int, run: tuple[int, int], out: np.ndarray, dummy_prefix: bool) -> int:
    for n in range(*run):
        i = int(ids[n])
        b = _spelling(spelled, i)
        if b and dummy_prefix:
            if b[:1] != b" ":
                raise Unspelled(n, f"token {n} (id {i}) spells {b!r}, which has no dummy-prefix "
                                   "space to drop")
            b, dummy_prefix = b[1:], False
        if b and not data.startswith(b, pos):
            raise Unspelled(n, f"token {n} (id {i}) spells {b!r} but the text holds "
                               f"{data[pos:pos + len(b)]!r} at byte {pos}: the tokens do not "
                               "spell the text (a normalizer changed it?)")
        pos += len(b or b"")
        out[n + 1] = pos
    return pos


def first_token_fn(tokenizer: Any) -> Callable[[bytes], int | None]:
    """The id of the first token the tokenizer's model makes of a byte string (``None`` when it
    makes none), for an exact vocabulary projection (``vocab_projection.project_vocab``).

    Runs the model alone (no normalizer, no pre-tokenizer): byte-level BPE on the string of the
    bytes' GPT-2 characters; the others on the UTF-8 text with spaces as ``▁`` when the decoder
    turns ``▁`` into a space (bytes that are not valid UTF-8 give ``None``).
    """
    tok = backend(tokenizer)
    model = tok.model
    if "ByteLevel" in decoder_types(tok):
        table = bytes_to_unicode()

        def as_text(b: bytes) -> str | None:
            return "".join(table[x] for x in b)
    else:
        meta = any(c == " " and p == METASPACE for p, c in _replacements(tok))

        def as_text(b: bytes) -> str | None:
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                return None
            return s.replace(" ", METASPACE) if meta else s

    def first(b: bytes) -> int | None:
        s = as_text(b)
        pieces = model.tokenize(s) if s else []
        return pieces[0].id if pieces else None

    return first
