"""The three store kinds and their arrays (see docs/FORMAT.md).

* ``tokens``: the corpus tokenised once; rows are tokens.
* ``teacher``: one teacher's sparse log-probs; rows are target positions (L−1 per sequence).
* ``target``: fused mixture targets; rows are target positions.

Teacher and target stores have exactly the parts and sequences of their tokens store, so
aggregation and training are positional, never a join.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtkd.store import scalar_codec, target_codec, topk_codec
from mtkd.store.errors import StoreError
from mtkd.store.format import ArraySpec, Codec, Header
from mtkd.store.part_writer import CHUNK_ROWS_ATTR
from mtkd.store.reader import Store
from mtkd.store.target_codec import teacher_block

TOKENS, TEACHER, TARGET = "tokens", "teacher", "target"

#: The token ids of a tokens store.
TOKEN_IDS = "token_ids"
#: Tokens store (``mtkd tokenize``): where each token ends in its window's text (UTF-8 bytes),
#: and the meta columns holding where that text starts in its document and the text itself.
BYTE_END = "byte_end"
BYTE_START, TEXT = "byte_start", "text"

# The arrays of a teacher store, by name: every engine returns them, the harvest writes them,
# aggregation reads them. The top-k columns are named by ``topk_codec``, which codes them.
TOPK_IDS, TOPK_LOGPROBS = topk_codec.IDS, topk_codec.LOGPROBS
TARGET_LOGPROB, TARGET_RANK = scalar_codec.TARGET_LOGPROB, scalar_codec.TARGET_RANK
TAIL_LOGMASS = scalar_codec.TAIL_LOGMASS
#: Exact tempered tail masses (reference engine, ``--temperature``).
TEMPERED_TAIL_LOGMASS = "tempered_tail_logmass"
#: Random-sampling targets (``--num-samples``); q64v2 codes them too.
SAMPLE_IDS, SAMPLE_COUNTS, SAMPLE_LOGPROBS = (
    topk_codec.SAMPLE_IDS, topk_codec.SAMPLE_COUNTS, topk_codec.SAMPLE_LOGPROBS)
#: What every teacher store holds per position (and every engine returns).
TEACHER_ROWS = (TOPK_IDS, TOPK_LOGPROBS, TARGET_LOGPROB, TARGET_RANK, TAIL_LOGMASS)
#: A teacher harvested in its own tokens (``attrs.tokenization == "own"``): where row i's context
#: ends in the window text (the end byte of the teacher's token i), and the teacher id of token
#: i + 1 (the token the row's target is about).
CONTEXT_END, NEXT_ID = "context_end", "next_id"
#: ``attrs.tokenization`` of a teacher store: in the tokens store's ids, or in the teacher's own.
STORE_TOKENS, OWN_TOKENS = "store", "own"


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """A stable hash of a tokenizer's token → id map; equal iff the vocabularies are equal."""
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:32]


def tokens_header(num_parts: int, attrs: Mapping[str, Any], *,
                  byte_offsets: bool = False) -> Header:
    """Token ids; with ``byte_offsets`` each token's end in its window's text too (``mtkd
    tokenize`` writes them unless told not to)."""
    arrays = [ArraySpec(TOKEN_IDS, "int32")]
    if byte_offsets:
        arrays.append(ArraySpec(BYTE_END, "int32"))
    return Header(TOKENS, num_parts, tuple(arrays), attrs)


def check_logprob_dtype(name: str) -> str:
    """``name`` if it is a top-k coding (``topk_codec.CODINGS``) or a float dtype, else
    ValueError."""
    if name in topk_codec.CODINGS:
        return name
    try:
        if np.dtype(name).kind == "f":
            return name
    except TypeError:
        pass
    raise ValueError(f"logprob dtype {name!r}: use {' or '.join(topk_codec.CODINGS)} (coded, "
                     "bounded error) or a float dtype (float16, float32)")


def teacher_header(
    num_parts: int,
    k: int,
    attrs: Mapping[str, Any],
    *,
    temperatures: Sequence[float] = (),
    num_samples: int = 0,
    logprob_dtype: str = topk_codec.Q64,
    codec: Codec = "zstd",
    own_tokens: bool = False,
    id_table: Sequence[int] = (),
    tail_step: int = 1,
    stream_rows: int = 0,
    rank_ids: bool = True,
    stream_samples: bool = True,
    code_scalars: bool = True,
) -> Header:
    """Top-k ids and log-probs per position, the actual token's log-prob and rank, the tail.

    ``logprob_dtype``: ``q64v2`` codes the top-k and sampled columns compactly with a bounded
    error, ``q64`` (the default here) the top-k ones (``topk_codec``; both need
    ``attrs["vocab_size"]`` to store ids in fewer than 4 bytes); a float dtype stores int32 ids
    and log-probs of that dtype. Readers see int32 ids and float log-probs either way.
    ``temperatures`` adds exact tempered tail masses (reference engine);
    ``num_samples`` adds random-sampling KD targets (unique ids, counts, log-probs) of width
    ``num_samples``. ``own_tokens``: rows are the teacher's own tokens of each window's text,
    with ``context_end`` and ``next_id`` (the caller sets ``attrs.tokenization``).
    ``id_table`` (q64v2, q64v3, q64r): the most frequent ids first, e.g.
    ``id_table.frequency_table`` of the tokens store's counts; top-k ids are renumbered through
    it (``attrs.topk_id_table``).
    ``tail_step`` (q64r only): the tail's grid in 1/16-nat steps (``attrs.topk_tail_step``).
    ``stream_rows`` (q64r only): consecutive sequences share a stream until it holds that many
    rows (``attrs.topk_stream_rows``; 0: a stream per sequence). ``rank_ids`` (q64r): number
    the ids seen in earlier rows by count (``attrs.topk_id_ranking``), else by first sight (as
    stores written before it). ``stream_samples`` (q64r with draws): code the draws against
    the top-k (``attrs.sample_coding``), else as q64v2 does (as stores written before it).
    ``code_scalars`` (q64r): code ``target_logprob`` and ``tail_logmass`` against the top-k
    within its bound (``attrs.scalar_coding``), else store them exactly (as stores written
    before it).
    """
    attrs = {n: v for n, v in attrs.items() if n not in (
        topk_codec.CODING_ATTR, topk_codec.ID_TABLE_ATTR, topk_codec.TAIL_STEP_ATTR,
        topk_codec.STREAM_ROWS_ATTR, topk_codec.ID_RANKING_ATTR, topk_codec.SAMPLE_CODING_ATTR,
        scalar_codec.SCALAR_CODING_ATTR)}
    if id_table and logprob_dtype not in topk_codec.FLOOR_CODINGS:
        raise ValueError(f"an id table needs logprob dtype in {list(topk_codec.FLOOR_CODINGS)}")
    if tail_step != 1 and logprob_dtype != topk_codec.Q64R:
        raise ValueError(f"a tail step needs logprob dtype {topk_codec.Q64R}")
    if stream_rows and logprob_dtype != topk_codec.Q64R:
        raise ValueError(f"stream rows need logprob dtype {topk_codec.Q64R}")
    coded: dict[str, tuple[str, tuple[int, ...]]] = {}
    if check_logprob_dtype(logprob_dtype) in topk_codec.CODINGS:
        stream_samples = stream_samples and logprob_dtype == topk_codec.Q64R and num_samples > 0
        coded = topk_codec.stored_arrays(k, attrs.get("vocab_size"), logprob_dtype, num_samples,
                                         stream_samples=stream_samples)
        streams = (topk_codec.STREAM, topk_codec.SAMPLE_STREAM)
        topk = [ArraySpec(name, *coded[name], "zstd" if name in streams else codec)
                for name in (TOPK_IDS, topk_codec.RECUR, TOPK_LOGPROBS, *streams)
                if name in coded]  # q64r's streams: zstd, so each sequence's unused end is free
        attrs[topk_codec.CODING_ATTR] = logprob_dtype
        if tail_step != 1:
            attrs[topk_codec.TAIL_STEP_ATTR] = tail_step
        if logprob_dtype == topk_codec.Q64R and rank_ids:
            attrs[topk_codec.ID_RANKING_ATTR] = topk_codec.BY_COUNT
        if stream_samples:
            attrs[topk_codec.SAMPLE_CODING_ATTR] = topk_codec.Q64R
        if code_scalars and logprob_dtype == topk_codec.Q64R:
            attrs[scalar_codec.SCALAR_CODING_ATTR] = topk_codec.Q64R
        if stream_rows:
            attrs[topk_codec.STREAM_ROWS_ATTR] = int(stream_rows)
            topk.append(ArraySpec(topk_codec.STREAM_START, "uint8", (), "zstd"))
        if id_table:
            attrs[topk_codec.ID_TABLE_ATTR] = [int(i) for i in id_table]
            topk_codec.coding(attrs)  # a set of ids below vocab_size, or ValueError
    else:
        topk = [ArraySpec(TOPK_IDS, "int32", (k,), codec),
                ArraySpec(TOPK_LOGPROBS, logprob_dtype, (k,), codec)]
    scalars = ((scalar_codec.TARGET_LEVEL, "int32"), (TARGET_RANK, "int32"),
               (scalar_codec.TAIL_RESIDUAL, "int32")) if topk_codec.codes_scalars(attrs) else (
        (TARGET_LOGPROB, "float32"), (TARGET_RANK, "int32"), (TAIL_LOGMASS, "float32"))
    arrays = [*topk, *(ArraySpec(name, dtype, (), codec) for name, dtype in scalars)]
    if temperatures:
        arrays.append(ArraySpec(TEMPERED_TAIL_LOGMASS, "float32", (len(temperatures),), codec))
    if num_samples:
        plain = {SAMPLE_IDS: ("int32", (num_samples,)), SAMPLE_COUNTS: ("uint16", (num_samples,)),
                 SAMPLE_LOGPROBS: ("float32", (num_samples,))}
        arrays += [ArraySpec(name, *coded.get(name, spec), codec) for name, spec in plain.items()
                   if topk_codec.SAMPLE_STREAM not in coded]
    if own_tokens:
        arrays += [ArraySpec(CONTEXT_END, "int32", (), codec),
                   ArraySpec(NEXT_ID, "int32", (), codec)]
    full_attrs = dict(attrs) | {"k": k, "temperatures": list(temperatures),
                                "num_samples": num_samples}
    topk_codec.coding(full_attrs)  # a coding it can write with these attrs, or ValueError
    # version 2: a version-1 reader would take the coded columns for plain ids and log-probs;
    # version 3: rows in the teacher's own tokens, which an older reader would take for rows of
    # the tokens store's positions; version 4: q64r streams over several sequences, which an
    # older reader would take for damaged ones; version 5: q64r's seen ids numbered by count,
    # which an older reader would decode as numbered by first sight; version 6: q64r's draws
    # coded against the top-k, which an older reader would not find; version 7: q64r's
    # actual-token log-prob and tail coded against the top-k, which it would not find either
    version = (7 if topk_codec.codes_scalars(full_attrs)
               else 6 if topk_codec.streams_samples(full_attrs)
               else 5 if topk_codec.ranked(full_attrs)
               else 4 if stream_rows else 3 if own_tokens
               else 2 if topk_codec.CODING_ATTR in full_attrs else 1)
    return Header(TEACHER, num_parts, tuple(arrays), full_attrs, version)


def target_header(
    num_parts: int,
    k_out: int,
    num_teachers: int,
    attrs: Mapping[str, Any],
    *,
    teacher_ks: Sequence[int] = (),
    codec: Codec = "raw",
    coding: str | None = None,
) -> Header:
    """Fused targets on their support, plus diagnostics; ``teacher_ks`` adds L_multi blocks.

    ``codec``: ``raw`` is memory-mapped, so the trainer's shuffled batch reads cost no
    decoding; ``zstd`` compresses chunks that every read decodes whole. ``coding`` ``q64v2``
    (:mod:`~mtkd.store.target_codec`; it needs ``attrs["vocab_size"]``) codes the sparse
    columns with a bounded error in small zstd chunks: measured sizes in docs/FORMAT.md.
    """
    attrs = dict(attrs)
    sparse: dict[int, tuple[tuple[str, tuple[int, ...]], ...]] = {}
    if coding is not None:
        if coding not in target_codec.CODINGS:
            raise ValueError(f"unknown target coding {coding!r}; choose one of "
                             f"{list(target_codec.CODINGS)}")
        codec = "zstd"
        attrs |= {target_codec.CODING_ATTR: coding, CHUNK_ROWS_ATTR: target_codec.CHUNK_ROWS}
        for k in {k_out, *teacher_ks}:
            sparse[k] = target_codec.stored_arrays(k, attrs.get("vocab_size"))

    def pair(ids: str, probs: str, k: int) -> list[ArraySpec]:
        if coding is None:
            return [ArraySpec(ids, "int32", (k,), codec), ArraySpec(probs, "float32", (k,), codec)]
        (id_dtype, id_shape), (code_dtype, code_shape) = sparse[k]
        return [ArraySpec(ids, id_dtype, id_shape, codec),
                ArraySpec(probs, code_dtype, code_shape, codec)]

    arrays = [
        *pair("ids", "probs", k_out),
        ArraySpec("tail_mass", "float32", (), codec),
        ArraySpec("weights", "float32", (num_teachers,), codec),
        ArraySpec("jensen_gap", "float32", (), codec),
        ArraySpec("disagreement", "float32", (), codec),
    ]
    for j, k in enumerate(teacher_ks):
        ids, probs, tail = teacher_block(j)
        arrays += [*pair(ids, probs, k), ArraySpec(tail, "float32", (), codec)]
    full_attrs = attrs | {"k_out": k_out, "num_teachers": num_teachers,
                          "teacher_blocks": bool(teacher_ks)}
    # version 2: coded columns, which a version-1 reader would take for plain ids and probs
    return Header(TARGET, num_parts, tuple(arrays), full_attrs, 2 if coding else 1)


def check_aligned(tokens: Store, other: Store) -> None:
    """Refuse a teacher/target store that was not built over exactly this tokens store."""
    want = tokens.manifest["checksum"]
    got = other.attrs.get("tokens_fingerprint")
    if got != want:
        raise StoreError(
            f"{other.root} was built over a different tokens store "
            f"(tokens_fingerprint {got}, {tokens.root} has {want})"
        )


def has_byte_ends(tokens: Store) -> bool:
    """Whether a tokens store records where each token ends in its text (``byte_end``)."""
    return BYTE_END in tokens.array_names


def require_byte_ends(tokens: Store, needed_by: str) -> None:
    """Refuse a tokens store without ``byte_end`` (made by an older mtkd tokenize, or with
    --no-byte-offsets), naming what needs it: its texts and their bytes come from there."""
    if not has_byte_ends(tokens):
        raise StoreError(f"{tokens.root} keeps no window texts (no {BYTE_END} array: made by "
                         "an older mtkd tokenize, or with --no-byte-offsets), which "
                         f"{needed_by} needs: re-tokenize the corpus with this mtkd version, "
                         "without --no-byte-offsets")
