"""Each window's text and where its tokens end in it: what a teacher with another tokenizer reads.

A tokens store keeps, per window, the UTF-8 bytes its tokens spell (meta column ``text``), where
they start in the document (``byte_start``), and the end of every token within that text (array
``byte_end``; docs/FORMAT.md). They are exact: the tokens are walked along the document's bytes
with :func:`mtkd.ingest.token_bytes.byte_bounds`, which refuses tokens that do not spell it.

Special tokens take zero bytes: the end-of-document token tokenize appends, and a special token
the tokenizer found written out in the document (e.g. a literal ``<|endoftext|>``), whose bytes
then are not part of the window's text (the text is what the tokens spell).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtkd.ingest.token_bytes import backend, byte_bounds, token_bytes


@dataclass(frozen=True)
class Spelling:
    """What each id of a tokenizer spells: ``plain`` (:func:`token_bytes`, special tokens
    nothing) and ``literal`` (special tokens their content, as when read from a text)."""

    plain: list[bytes | None]
    literal: list[bytes | None]
    specials: frozenset[int] = frozenset()  # ids that spell nothing plainly and literally do
    unknown: int | None = None  # the id of a character the tokenizer does not know (<unk>)

    @classmethod
    def of(cls, tokenizer: Any) -> Spelling:
        """Raises ``ValueError`` for a tokenizer whose tokens do not spell text (WordPiece …)."""
        plain = token_bytes(tokenizer)
        literal = list(plain)
        for i, token in backend(tokenizer).get_added_tokens_decoder().items():
            if plain[i] is None:
                literal[i] = token.content.encode("utf-8")
        specials = frozenset(i for i, b in enumerate(plain) if b is None and literal[i] is not None)
        return cls(plain, literal, specials, unknown_id(tokenizer))


def unknown_id(tokenizer: Any) -> int | None:
    """The id a tokenizer's model gives what it does not know (``<unk>``), if it has one."""
    tok = backend(tokenizer)
    model = json.loads(tok.to_str()).get("model") or {}
    if isinstance(model.get("unk_token"), str):
        return tok.token_to_id(model["unk_token"])
    unk = model.get("unk_id")
    return unk if isinstance(unk, int) else None


@dataclass(frozen=True)
class DocumentBytes:
    """A document's tokens on its bytes: token i starts at byte ``starts[i]`` of the document
    and spans ``bounds[i]:bounds[i+1]`` of ``spelled`` (the bytes its tokens spell); the text
    of a window starting at token i starts at byte ``text_starts[i]`` of the document (after
    the special tokens read from the text that it starts with: they spell nothing)."""

    starts: np.ndarray  # int64 [L+1]
    bounds: np.ndarray  # int64 [L+1]
    spelled: bytes
    text_starts: np.ndarray  # int64 [L+1]
    literal_specials: int = 0  # special tokens read from the text (their bytes left out)

    def window(self, start: int, stop: int) -> tuple[int, np.ndarray, bytes]:
        """Tokens ``[start, stop)`` as a window: where its text starts in the document, the end
        of each token within the text (int32), and the text."""
        base = int(self.bounds[start])
        ends = (self.bounds[start + 1:stop + 1] - base).astype(np.int32)
        return int(self.text_starts[start]), ends, self.spelled[base:int(self.bounds[stop])]


def document_bytes(ids: Sequence[int], appended: int, text: str,
                   spelling: Spelling) -> DocumentBytes:
    """``ids``, the tokens a tokenizer read from ``text``, followed by ``appended`` special tokens
    (zero bytes at its end). Raises ``ValueError`` (``token_bytes.Unspelled``) when the tokens
    do not spell the text."""
    data = text.encode("utf-8")
    try:
        starts = byte_bounds(ids, spelling.literal, data, specials=spelling.specials)
    except ValueError as e:
        if spelling.unknown is None or spelling.unknown not in ids:
            raise
        raise ValueError(f"the tokenizer read a character it does not know as its unknown "
                         f"token (id {spelling.unknown}; it has no byte fallback): {e}") from None
    special = np.fromiter((spelling.plain[i] is None for i in ids), bool, len(ids))
    if special.any():  # read from the text, spelling nothing: their bytes leave it
        width = np.diff(starts)
        width[special] = 0
        bounds = np.concatenate([[0], np.cumsum(width)]).astype(np.int64)
        spelled = b"".join(data[starts[i]:starts[i + 1]] for i in np.flatnonzero(~special))
    else:
        bounds, spelled = starts, data[:int(starts[-1])]
    tail = np.repeat(starts[-1:], appended), np.repeat(bounds[-1:], appended)
    return DocumentBytes(np.concatenate([starts, tail[0]]), np.concatenate([bounds, tail[1]]),
                         spelled, np.concatenate([_text_starts(starts, special), tail[0]]),
                         int(special.sum()))


def _text_starts(starts: np.ndarray, special: np.ndarray) -> np.ndarray:
    """For each token i (and the end), the start of the first token from i on that is not a
    special token read from the text: where a window starting at i has its first byte."""
    index = np.arange(len(starts))
    index[:-1][special] = len(starts)  # a special token: take the next one's
    return starts[np.minimum.accumulate(index[::-1])[::-1]]
