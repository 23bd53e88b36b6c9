"""A teacher with another tokenizer reads each window's text its own way (``--tokenization own``).

Per sequence of the tokens store, the window's text (meta column ``text``, written by ``mtkd
tokenize``) is decoded strictly, tokenised canonically by the teacher's tokenizer (the names
of its special tokens read as text), after the tokens its convention puts first (its BOS, zero
bytes), and walked along the text
(``ingest.token_bytes.byte_bounds``) for the end byte of every teacher token. A sequence of M
teacher tokens gives M − 1 rows: row i is the teacher's distribution after token i, whose
context ends at byte ``context_end[i]``, about token i + 1 (``next_id[i]``); docs/FORMAT.md.

A window may start or end inside a UTF-8 character (a character split over byte tokens): the
teacher reads its whole characters, ``text[a:b]`` (``whole_characters``), its first token's
context then taking in the partial bytes before ``a`` (no row predicts it) and its last token
ending at ``b``, at most 3 bytes before the text's end (the aggregate falls back on the student
rows that predict bytes past it). A sequence the teacher cannot read gets no rows and is
counted by reason: it is not UTF-8 even so (``undecodable``), the teacher's tokens do not spell
it, e.g. a normalizer changed it (``not_spelled``), it makes fewer than 2 teacher tokens
(``too_short``) or more than the engine's maximum length (``too_long``). The aggregate then
falls back on it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtkd.ingest.token_bytes import byte_bounds, token_bytes
from mtkd.ingest.tokenizer import LoadedTokenizer, TokenizerError, load_pretrained_tokenizer
from mtkd.store import Store, StoreError
from mtkd.store.schema import BYTE_END, OWN_TOKENS, TEXT, require_byte_ends

#: Why the teacher cannot read a sequence (part stats ``unreadable``).
UNDECODABLE, NOT_SPELLED = "undecodable", "not_spelled"
TOO_SHORT, TOO_LONG = "too_short", "too_long"
RETOKENIZE = ("re-tokenize the corpus with this mtkd version, without --no-byte-offsets "
              "(mtkd tokenize then keeps the texts)")


@dataclass(frozen=True)
class TeacherTokens:
    """One part's sequences in the teacher's tokens (an empty array where it cannot read one),
    the per-row arrays of the readable ones in order, and the unreadable ones by reason."""

    sequences: list[np.ndarray]
    context_end: np.ndarray  # int32 [R]
    next_id: np.ndarray  # int32 [R]
    unreadable: Counter[str]


@dataclass(frozen=True)
class TeacherTokenizer:
    """The teacher's tokenizer and what each of its ids spells."""

    loaded: LoadedTokenizer
    spelled: list[bytes | None]

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str]) -> TeacherTokenizer:
        try:
            loaded = load_pretrained_tokenizer(model_dir)
            loaded.tokenizer.no_truncation()  # whole texts, as transformers' calls read them
            loaded.tokenizer.no_padding()
            # a special token's name in the text is text (the student's were left out of it):
            # its bytes, not the token, which spells nothing (split_special_tokens)
            loaded.tokenizer.encode_special_tokens = True
            return cls(loaded, token_bytes(loaded.tokenizer))
        except (TokenizerError, ValueError) as e:
            raise StoreError(f"teacher {model_dir}: its tokenizer cannot read the windows' texts "
                             f"({e})") from None

    def read(self, texts: Sequence[bytes], max_len: int | None = None) -> TeacherTokens:
        """The teacher's tokens of each text; ``max_len``: the most tokens the engine takes."""
        unreadable: Counter[str] = Counter()
        decoded: dict[int, str] = {}
        spans: dict[int, tuple[int, int]] = {}
        for s, data in enumerate(texts):
            spans[s] = a, b = whole_characters(data)
            try:
                decoded[s] = data[a:b].decode("utf-8", errors="strict")
            except UnicodeDecodeError:
                unreadable[UNDECODABLE] += 1
        encodings = self.loaded.tokenizer.encode_batch_fast(list(decoded.values()),
                                                            add_special_tokens=False)
        prefix = list(self.loaded.prefix_ids)
        sequences = [np.zeros(0, np.int64)] * len(texts)
        ends, nexts = [], []
        for s, enc in zip(decoded, encodings, strict=True):
            ids = np.asarray(prefix + enc.ids, np.int64)
            why, bounds = self._check(ids, texts[s], spans[s], max_len)
            if why:
                unreadable[why] += 1
                continue
            sequences[s] = ids
            ends.append(bounds[1:-1])
            nexts.append(ids[1:])
        return TeacherTokens(sequences, _flat(ends), _flat(nexts), unreadable)

    def _check(self, ids: np.ndarray, text: bytes, span: tuple[int, int], max_len: int | None
               ) -> tuple[str | None, np.ndarray]:
        """Why the teacher cannot read bytes ``span`` of ``text`` as ``ids`` (None: it can), and
        their bounds in the text."""
        if len(ids) < 2:
            return TOO_SHORT, ids
        if max_len is not None and len(ids) > max_len:
            return TOO_LONG, ids
        a, b = span
        try:
            bounds = byte_bounds(ids, self.spelled, text[:b], start=a)
        except ValueError:
            return NOT_SPELLED, ids
        if bounds[-1] != b:  # the tokens left some of the text out
            return NOT_SPELLED, ids
        if b < len(text) and bounds[-1] - bounds[-2] != len(self.spelled[int(ids[-1])] or b""):
            return NOT_SPELLED, ids  # the aggregate finds where the text ends by its spelling
        return None, bounds


def whole_characters(data: bytes) -> tuple[int, int]:
    """The bytes ``[a, b)`` of a window text that hold whole characters: the text without the
    continuation bytes it starts with (the end of a character cut at the window's start) and
    without the character it ends inside (cut at its end); at most 3 bytes each side."""
    a = 0
    while a < min(3, len(data)) and 0x80 <= data[a] < 0xC0:
        a += 1
    b = len(data)
    for back in range(1, min(4, b - a) + 1):  # the last character's lead byte
        lead = data[b - back]
        if lead < 0x80:
            break
        if lead >= 0xC0:
            if back < (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4):
                b -= back  # its character goes on past the window's end
            break
    return a, b


def _flat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, np.int32)


def check_texts(tokens: Store) -> None:
    """Refuse a tokens store without its windows' texts (made by an older ``mtkd tokenize``)."""
    require_byte_ends(tokens, "a teacher with its own tokenizer (it reads the texts)")


def window_texts(tokens: Store, part: int) -> tuple[np.ndarray, list[bytes], np.ndarray]:
    """Seq ids, window texts and token counts of one part of the tokens store, checked against
    each other (every text as long as its tokens' last ``byte_end`` says)."""
    batch = tokens.read_part(part, [BYTE_END])
    meta = tokens.read_meta(part)
    where = f"{tokens.root} part {part}"
    if meta is None or TEXT not in meta.column_names:
        raise StoreError(f"{where}: no {TEXT!r} column in its meta: {RETOKENIZE}")
    if meta.column("seq_id").to_pylist() != batch.seq_ids.tolist():
        raise StoreError(f"{where}: its meta's sequences are not its arrays' sequences")
    texts = [bytes(t) for t in meta.column(TEXT).to_pylist()]
    lengths = np.diff(batch.offsets)
    last = np.where(lengths > 0, batch[BYTE_END][np.maximum(batch.offsets[1:] - 1, 0)], 0)
    if not np.array_equal(last, [len(t) for t in texts]):
        s = int(np.flatnonzero(last != [len(t) for t in texts])[0])
        raise StoreError(f"{where}, sequence {s}: its text holds {len(texts[s])} bytes but its "
                         f"tokens end at byte {last[s]}: the store is inconsistent")
    return batch.seq_ids, texts, lengths


def unreadable_counts(store: Store) -> Counter[str]:
    """The sequences an own-tokens teacher store holds no rows for, by reason (all parts)."""
    counts: Counter[str] = Counter()
    for part in range(store.num_parts):
        counts.update(store.part_stats(part).get("unreadable", {}))
    return counts


def own_attrs(teacher: TeacherTokenizer, vocab_size: int) -> dict[str, Any]:
    """The attrs that say a teacher store is in the teacher's own tokens (docs/FORMAT.md)."""
    loaded = teacher.loaded
    attrs: dict[str, Any] = {
        "tokenization": OWN_TOKENS,
        "tokenizer_hash": loaded.vocab_hash,
        "vocab_size": vocab_size,
        "teacher_tokenizer": str(loaded.path),
        "teacher_tokenizer_hash": loaded.vocab_hash,
        "teacher_vocab_size": vocab_size,
        "bos_id": loaded.prefix_ids[-1] if loaded.prefix_ids else None,
    }
    if len(loaded.prefix_ids) > 1:
        attrs["prefix_ids"] = list(loaded.prefix_ids)
    return attrs

