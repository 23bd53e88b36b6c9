"""Vocabulary maps: harvest a teacher whose tokenizer differs from the tokens store's.

A teacher store always speaks the tokens store's ids (aggregate and train never see the
teacher's). A :class:`VocabMap` pairs store ids with teacher ids, one to one where a pair exists:

* **inputs** are translated store ids → teacher ids before the engine sees them; a sequence
  holding a store id without a teacher counterpart cannot be scored faithfully, so the harvest
  refuses it (:func:`unmapped_sequences` finds them);
* **rows** come back in store ids (:func:`map_rows`): top-k teacher ids without a store
  counterpart leave the support, so their mass joins the tail (recomputed in float64 as
  1 − Σ kept p); the engine is asked for ``k + extra`` entries (:func:`engine_extra`) and the
  first k mappable ones are kept, so a row holds the teacher's top-k over the mappable ids
  whenever its top-(k + extra) holds k of them (always when ``extra`` ≥ the number of unmapped
  teacher ids). Slots still empty get ``filler`` ids with log-prob −inf (p = 0), store ids
  without a teacher counterpart first (the teacher gives them exactly 0);
* the target log-prob and rank are the engine's for the next token's teacher id (the rank
  counts the teacher's whole vocabulary).

``auto`` (:func:`auto_map`) pairs tokens whose strings are identical (byte-level BPE strings;
added and special tokens by their content); a map file (:func:`read_map_file`) is JSON
``{"store_to_teacher": {"<store id>": <teacher id>, ...}}``. docs/FORMAT.md ("teacher") has the
store attributes a mapped harvest records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from mtkd.harvest.engine import TeacherEngine, finish_rows
from mtkd.store.schema import vocab_fingerprint

AUTO = "auto"
FILE_KEY = "store_to_teacher"


class VocabMapError(ValueError):
    """A vocabulary map that cannot be built, read or applied as asked."""


@dataclass(frozen=True, eq=False)
class VocabMap:
    """``store_to_teacher [V_store]``: the teacher id of each store id, −1 where none; one to
    one where defined. ``teacher_size``: the teacher's ids are ``[0, teacher_size)``."""

    store_to_teacher: np.ndarray
    teacher_size: int
    source: str  # "auto" or "file"

    def __post_init__(self) -> None:
        s2t = np.asarray(self.store_to_teacher)
        if s2t.ndim != 1 or not np.issubdtype(s2t.dtype, np.integer):
            raise VocabMapError(f"a vocabulary map is a 1-D integer array, got {s2t.dtype} "
                                f"{s2t.shape}")
        mapped = s2t[s2t >= 0]
        if s2t.size and (s2t.min() < -1 or (mapped.size and mapped.max() >= self.teacher_size)):
            raise VocabMapError(f"teacher ids outside [0, {self.teacher_size})")
        values, counts = np.unique(mapped, return_counts=True)
        if (counts > 1).any():
            twice = values[counts > 1]
            raise VocabMapError(f"{len(twice)} teacher ids are mapped from several store ids "
                                f"(e.g. {twice[:5].tolist()}); a map must be one to one")
        object.__setattr__(self, "store_to_teacher", s2t.astype(np.int64))

    @property
    def store_size(self) -> int:
        return len(self.store_to_teacher)

    @property
    def mapped(self) -> int:
        """Number of (store id, teacher id) pairs."""
        return int((self.store_to_teacher >= 0).sum())

    def teacher_to_store(self, teacher_size: int = 0) -> np.ndarray:
        """The inverse, ``int64 [max(teacher_size, self.teacher_size)]`` (−1 where none): an
        engine whose vocabulary is padded beyond the map's has more, unmapped, ids."""
        out = np.full(max(teacher_size, self.teacher_size), -1, dtype=np.int64)
        has = np.flatnonzero(self.store_to_teacher >= 0)
        out[self.store_to_teacher[has]] = has
        return out

    def is_identity(self) -> bool:
        """Every id maps to itself and both vocabularies have the same size: no map needed."""
        return self.store_size == self.teacher_size and bool(
            np.array_equal(self.store_to_teacher, np.arange(self.store_size)))

    def digest(self) -> str:
        """sha256 (32 hex digits) of the teacher size and the map: the map's identity."""
        h = hashlib.sha256(np.int64(self.teacher_size).tobytes())
        h.update(self.store_to_teacher.astype("<i8").tobytes())
        return h.hexdigest()[:32]

    def attrs(self, engine_k: int, teacher_tokenizer_hash: str | None) -> dict[str, Any]:
        """The teacher store's ``attrs.vocab_map`` (docs/FORMAT.md)."""
        return {
            "source": self.source,
            "hash": self.digest(),
            "teacher_tokenizer_hash": teacher_tokenizer_hash,
            "teacher_vocab_size": self.teacher_size,
            "mapped": self.mapped,
            "store_coverage": round(self.mapped / max(self.store_size, 1), 6),
            "teacher_coverage": round(self.mapped / max(self.teacher_size, 1), 6),
            "engine_k": engine_k,
        }


# --------------------------------------------------------------------------- building maps


def token_keys(tokenizer: Tokenizer) -> dict[tuple[bool, str], int]:
    """``(added, string) → id``: added/special tokens keyed by their content, the others by
    their vocabulary string (byte-level BPE: the string spells the token's bytes)."""
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    keys = {(False, s): i for s, i in tokenizer.get_vocab(with_added_tokens=False).items()
            if i not in added}
    keys.update({(True, content): i for i, content in added.items()})
    return keys


def decoder_kind(tokenizer: Tokenizer) -> str:
    """The decoder's type(s), e.g. ``ByteLevel``: what a token string means as bytes."""
    def kind(node: Any) -> str:
        if not isinstance(node, dict):
            return "none"
        inner = node.get("decoders")
        return node.get("type", "?") + (f"[{','.join(map(kind, inner))}]" if inner else "")
    return kind(json.loads(tokenizer.to_str()).get("decoder"))


def auto_map(store: Tokenizer, teacher: Tokenizer, store_size: int, teacher_size: int
             ) -> VocabMap:
    """Pair the tokens whose keys (:func:`token_keys`) are identical.

    Identical strings mean identical bytes only when both tokenizers decode alike, so
    tokenizers with different decoders are refused (give a map file instead).
    """
    if decoder_kind(store) != decoder_kind(teacher):
        raise VocabMapError(
            f"--vocab-map auto pairs tokens by their strings, which spell the same bytes only "
            f"when both tokenizers decode alike (store: {decoder_kind(store)}, teacher: "
            f"{decoder_kind(teacher)}); give a map file instead")
    theirs = token_keys(teacher)
    s2t = np.full(store_size, -1, dtype=np.int64)
    for key, i in token_keys(store).items():
        j = theirs.get(key)
        if j is not None and i < store_size and j < teacher_size:
            s2t[i] = j
    return VocabMap(s2t, teacher_size, AUTO)


def read_map_file(path: str | os.PathLike[str], store_size: int, teacher_size: int
                  ) -> VocabMap:
    """A hand-made map: JSON ``{"store_to_teacher": {"<store id>": <teacher id>, ...}}``;
    store ids absent from it have no teacher counterpart."""
    where = f"vocabulary map {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise VocabMapError(f"{where}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabMapError(f"{where}: not valid JSON ({e})") from None
    pairs = data.get(FILE_KEY) if isinstance(data, dict) and set(data) == {FILE_KEY} else None
    if not isinstance(pairs, dict):
        raise VocabMapError(f'{where}: expected {{"{FILE_KEY}": {{"<store id>": <teacher id>, '
                            f'...}}}} and nothing else')
    if not pairs:
        raise VocabMapError(f"{where}: maps no ids")
    s2t = np.full(store_size, -1, dtype=np.int64)
    for key, value in pairs.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= store_size:
            raise VocabMapError(f"{where}: store id {key!r} is not an integer in "
                                f"[0, {store_size})")
        if isinstance(value, bool) or not isinstance(value, int) or not (
                0 <= value < teacher_size):
            raise VocabMapError(f"{where}: teacher id {value!r} (store id {key}) is not an "
                                f"integer in [0, {teacher_size})")
        s2t[int(key)] = value
    try:
        return VocabMap(s2t, teacher_size, "file")
    except VocabMapError as e:
        raise VocabMapError(f"{where}: {e}") from None


def teacher_vocab_size(model_dir: str | os.PathLike[str], tokenizer: Tokenizer | None) -> int:
    """The teacher's id range: its config's ``vocab_size`` (embedding rows, possibly padded
    beyond the tokenizer) or, if larger or absent, the tokenizer's size."""
    sizes = [tokenizer.get_vocab_size(with_added_tokens=True)] if tokenizer else []
    config = Path(model_dir) / "config.json"
    if config.exists():
        cfg = json.loads(config.read_text())
        size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
        if isinstance(size, int):
            sizes.append(size)
    if not sizes:
        raise VocabMapError(f"{model_dir}: neither config.json nor tokenizer.json says the "
                            "teacher's vocabulary size")
    return max(sizes)


def _tokenizer(directory: str | os.PathLike[str], what: str) -> Tokenizer:
    path = Path(directory)
    path = path / "tokenizer.json" if path.is_dir() else path
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types
        raise VocabMapError(f"{what} {path}: cannot load the tokenizer ({e})") from None


def resolve_vocab_map(
    spec: str, tokens_attrs: Mapping[str, Any], model_dir: str | os.PathLike[str]
) -> tuple[VocabMap | None, str | None]:
    """The map ``spec`` (``auto`` or a file) asks for, and the teacher's tokenizer hash.

    ``auto`` reads the tokens store's tokenizer (``attrs.tokenizer``, checked against
    ``attrs.tokenizer_hash``) and the teacher's ``tokenizer.json``. Returns ``None`` for the
    map when it is the identity (harvest as if no map were given).
    """
    teacher_file = Path(model_dir) / "tokenizer.json"
    teacher = _tokenizer(model_dir, "teacher") if teacher_file.exists() else None
    teacher_hash = (vocab_fingerprint(teacher.get_vocab(with_added_tokens=True))
                    if teacher else None)
    store_size = int(tokens_attrs["vocab_size"])
    size = teacher_vocab_size(model_dir, teacher)
    if spec != AUTO:
        vmap = read_map_file(spec, store_size, size)
    else:
        if teacher is None:
            raise VocabMapError(f"--vocab-map auto: {model_dir} has no tokenizer.json")
        if teacher_hash == tokens_attrs.get("tokenizer_hash"):
            return None, teacher_hash
        store_dir = tokens_attrs.get("tokenizer")
        if not store_dir or not Path(store_dir).exists():
            raise VocabMapError(f"--vocab-map auto needs the tokens store's tokenizer, "
                                f"recorded as {store_dir!r}, which is not there; give a map "
                                "file instead")
        store = _tokenizer(store_dir, "tokens store's tokenizer")
        if vocab_fingerprint(store.get_vocab(with_added_tokens=True)) != tokens_attrs.get(
                "tokenizer_hash"):
            raise VocabMapError(f"the tokenizer at {store_dir} has changed since the tokens "
                                "store was cut (its vocabulary hash differs); give a map file")
        vmap = auto_map(store, teacher, store_size, size)
    return (None if vmap.is_identity() else vmap), teacher_hash


# --------------------------------------------------------------------------- applying maps


def unmapped_sequences(flat: np.ndarray, offsets: np.ndarray, store_to_teacher: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Which sequences of ``flat`` (cut at ``offsets``) hold an id without a teacher
    counterpart (bool ``[S]``), and those ids (unique)."""
    bad = store_to_teacher[flat] < 0
    seq_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    per_seq = np.zeros(len(offsets) - 1, dtype=bool)
    per_seq[seq_of[bad]] = True
    return per_seq, np.unique(flat[bad])


def translate_sequences(sequences: Sequence[np.ndarray], store_to_teacher: np.ndarray
                        ) -> list[np.ndarray]:
    """Store-id sequences → teacher-id sequences; refuses ids without a counterpart."""
    out = []
    for i, seq in enumerate(sequences):
        mapped = store_to_teacher[np.asarray(seq, dtype=np.int64)]
        if (mapped < 0).any():
            raise VocabMapError(f"sequence {i} holds store ids without a teacher counterpart: "
                                f"{np.unique(np.asarray(seq)[mapped < 0])[:8].tolist()}")
        out.append(mapped)
    return out


def engine_extra(unmapped_teacher_ids: int, k: int, engine_cap: int) -> int:
    """How many entries beyond k to ask the engine for: enough to replace every unmapped
    teacher id when there are at most k of them, within the engine's cap on k."""
    return max(0, min(unmapped_teacher_ids, k, engine_cap - k))


def filler_order(store_to_teacher: np.ndarray) -> np.ndarray:
    """Store ids in the order :func:`map_rows` uses them as fillers: those without a teacher
    counterpart (probability exactly 0) first, then the others."""
    return np.argsort(store_to_teacher >= 0, kind="stable")


def map_rows(rows: Mapping[str, np.ndarray], teacher_to_store: np.ndarray, k: int,
             fillers: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Engine rows in teacher ids (top ``k + extra``) → contract rows of width k in store ids.

    Keeps the first k mappable entries of each row in rank order, fills any slot left with
    the first ``fillers`` ids not in the row (log-prob −inf) and recomputes the tail from the
    kept log-probs (float64, so the dropped entries' mass joins the tail). Returns the rows
    and the number of rows that needed a filler.
    """
    ids = teacher_to_store[np.asarray(rows["topk_ids"], dtype=np.int64)]
    order = np.argsort(ids < 0, axis=1, kind="stable")[:, :k]  # mappable first, rank order
    out_ids = np.take_along_axis(ids, order, 1)
    out_lps = np.take_along_axis(np.asarray(rows["topk_logprobs"], np.float32), order, 1)
    empty = out_ids < 0
    out_lps[empty] = -np.inf
    short = np.flatnonzero(empty.any(axis=1))
    for r in short:  # rare: fewer than k mappable ids among the engine's top-(k + extra)
        need = empty[r]
        head = fillers[:k]  # at least need.sum() of these are not among the row's k − need
        out_ids[r, need] = head[~np.isin(head, out_ids[r, ~need])][: need.sum()]
    return finish_rows(out_ids, out_lps, rows["target_logprob"], rows["target_rank"]), len(short)


class MappedEngine:
    """A TeacherEngine in store ids around an engine in teacher ids (see the module doc)."""

    def __init__(self, inner: TeacherEngine, vmap: VocabMap, k: int) -> None:
        if not 1 <= k <= min(inner.k, vmap.store_size):
            raise VocabMapError(f"k={k} must be at most the engine's k ({inner.k}) and the "
                                f"store's vocabulary ({vmap.store_size})")
        self.inner = inner
        self.k = k
        self.vocab_size = vmap.store_size
        self.name = f"{inner.name}+vocab-map"
        self.store_to_teacher = vmap.store_to_teacher
        self.teacher_to_store = vmap.teacher_to_store(inner.vocab_size)
        self.fillers = filler_order(vmap.store_to_teacher)
        #: rows so far with fewer than k mappable ids in the engine's top-(k + extra)
        self.filled_rows = 0

    def harvest(self, sequences: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Contract rows in store ids for store-id ``sequences``."""
        rows = self.inner.harvest(translate_sequences(sequences, self.store_to_teacher))
        out, filled = map_rows(rows, self.teacher_to_store, self.k, self.fillers)
        self.filled_rows += filled
        return out
