"""Test stores for teachers with their own tokenizer, written directly (no engine).

``write_tokens`` does what ``mtkd tokenize`` writes for cross-tokenizer alignment
(``byte_end`` per token, meta ``text`` / ``byte_start``) and ``write_own_teacher`` what
``mtkd harvest --tokenization own`` writes (rows in teacher ids over the teacher's own tokens of
each window text, ``context_end`` / ``next_id``, the ``teacher_tokenizer*`` attrs), following
/work/notes/cross_format.md; the teachers' rows are random dense distributions (or given).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mtkd.ingest.job import windows
from mtkd.ingest.token_bytes import byte_bounds, token_bytes
from mtkd.ingest.window_text import Spelling, document_bytes
from mtkd.recipes.models import byte_level_bpe
from mtkd.store import StoreWriter, open_store
from mtkd.store.schema import (
    CONTEXT_END,
    NEXT_ID,
    SAMPLE_COUNTS,
    SAMPLE_IDS,
    SAMPLE_LOGPROBS,
    TOKENS,
    teacher_header,
    tokens_header,
    vocab_fingerprint,
)

EOS = "<|endoftext|>"


def save_tokenizer(tok: Tokenizer, path: Path, eos: str | None = EOS) -> Path:
    """A tokenizer directory as tokenize and harvest load it (tokenizer.json + config)."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return path


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with ``<|endoftext|>`` as id 0."""
    return byte_level_bpe(texts, vocab_size)


def byte_teacher() -> Tokenizer:
    """A byte-level tokenizer (the 256 bytes, no merges, no special token): the finest."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def plain_bpe(vocab: dict[str, int], merges: list[tuple[str, str]],
              specials: Sequence[str] = ()) -> Tokenizer:
    """A BPE without pre-tokenizer or decoder: tokens spell their own strings."""
    tok = Tokenizer(models.BPE(vocab, merges))
    if specials:
        tok.add_special_tokens(list(specials))
    return tok


def permuted(tok: Tokenizer, perm: np.ndarray) -> Tokenizer:
    """The same tokenizer with id i renumbered ``perm[i]`` (vocabulary and added tokens)."""
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"] = {s: int(perm[i]) for s, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = int(perm[added["id"]])
    return Tokenizer.from_str(json.dumps(spec))


def write_tokens(root: Path, tok_dir: Path, docs: Sequence[str], *, max_len: int,
                 parts: int = 2, name: str = "tokens", offsets: bool = True) -> Path:
    """A tokens store as ``mtkd tokenize`` writes it with byte offsets: each document tokenised
    plus EOS, cut into windows of ``max_len``, documents dealt round robin to ``parts``
    (``offsets=False``: without ``byte_end``, as an older tokenize wrote it)."""
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    spelling = Spelling.of(tok)
    eos = tok.token_to_id(EOS)
    attrs = {"tokenizer": str(tok_dir.resolve()),
             "tokenizer_hash": vocab_fingerprint(tok.get_vocab(with_added_tokens=True)),
             "vocab_size": tok.get_vocab_size(with_added_tokens=True), "eos_id": eos}
    header = tokens_header(parts, attrs, byte_offsets=offsets)
    writer = StoreWriter(root / name, header)
    for p in range(parts):
        ids_rows, end_rows, meta = [], [], {"seq_id": [], "text": [], "byte_start": []}
        for doc in docs[p::parts]:
            ids = tok.encode(doc, add_special_tokens=False).ids
            doc_bytes = document_bytes(ids, 1, doc, spelling)
            ids = [*ids, eos]
            for start, stop in windows(len(ids), max_len, 0):
                if stop - start < 2:
                    continue
                byte_start, ends, text = doc_bytes.window(start, stop)
                ids_rows.append(np.asarray(ids[start:stop], np.int32))
                end_rows.append(ends)
                meta["seq_id"].append((p << 32) | len(meta["seq_id"]))
                meta["text"].append(text)
                meta["byte_start"].append(byte_start)
        lengths = np.array([len(r) for r in ids_rows], np.int64)
        table = pa.table({"seq_id": pa.array(meta["seq_id"], pa.int64()),
                          "text": pa.array(meta["text"], pa.binary()),
                          "byte_start": pa.array(meta["byte_start"], pa.int64())})
        with writer.open_part(p) as pw:
            arrays = {"token_ids": np.concatenate(ids_rows), "byte_end": np.concatenate(end_rows)}
            pw.append({a.name: arrays[a.name] for a in header.arrays}, lengths,
                      np.array(meta["seq_id"], np.int64), table)
    assert writer.finalize()
    return root / name


def sparse_rows(logp: np.ndarray, next_ids: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """A teacher store's rows from dense log-probs ``[R,V]`` (top-k, target, rank, tail)."""
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logp, order, axis=1)
    target = logp[np.arange(len(logp)), next_ids]
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - np.exp(top).sum(axis=1), 0.0, None))
    return {"topk_ids": order.astype(np.int32), "topk_logprobs": top.astype(np.float32),
            "target_logprob": target.astype(np.float32),
            "target_rank": (1 + (logp > target[:, None]).sum(axis=1)).astype(np.int32),
            "tail_logmass": tail.astype(np.float32)}


def draw_columns(logp: np.ndarray, num_samples: int, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """``num_samples`` draws per row of ``logp [R,V]`` as a store's sampled columns: distinct
    ids ascending with their counts and log-probs, then padding (−1, 0, −inf)."""
    ids = np.full((len(logp), num_samples), -1, np.int32)
    counts = np.zeros((len(logp), num_samples), np.uint16)
    lps = np.full((len(logp), num_samples), -np.inf, np.float32)
    p = np.exp(logp)
    for i in range(len(logp)):
        c = rng.multinomial(num_samples, p[i] / p[i].sum())
        drawn = np.flatnonzero(c)
        ids[i, :len(drawn)], counts[i, :len(drawn)] = drawn, c[drawn]
        lps[i, :len(drawn)] = logp[i, drawn]
    return {SAMPLE_IDS: ids, SAMPLE_COUNTS: counts, SAMPLE_LOGPROBS: lps}


def random_logp(rng: np.random.Generator, rows: int, vocab: int, scale: float = 2.0
                ) -> np.ndarray:
    z = rng.standard_normal((rows, vocab)) * scale
    return z - np.logaddexp.reduce(z, axis=1, keepdims=True)


#: (part, sequence index, window text) → the teacher's tokens of it: ids [M], bounds [M+1]
#: (None: the teacher cannot read it)
Tokenise = Callable[[int, int, bytes], tuple[Sequence[int], Sequence[int]] | None]
#: (part, the teacher's next ids [R]) → its dense log-probs [R, V_t]
Rows = Callable[[int, np.ndarray], np.ndarray]


def canonical(tok: Tokenizer, bos: int | None = None) -> Tokenise:
    """The teacher's own tokenisation of a window text (with ``bos`` first, zero bytes)."""
    spelled = token_bytes(tok)

    def tokenise(part: int, s: int, text: bytes) -> tuple[list[int], list[int]] | None:
        try:
            ids = tok.encode(text.decode("utf-8"), add_special_tokens=False).ids
        except UnicodeDecodeError:
            return None  # a window cut inside a character: unreadable, no rows
        ids = [bos, *ids] if bos is not None else ids
        return ids, byte_bounds(ids, spelled, text).tolist()

    return tokenise


def bytewise(tok: Tokenizer) -> Tokenise:
    """``byte_teacher``'s tokens of any window text, split characters included."""
    from mtkd.ingest.token_bytes import bytes_to_unicode

    table = bytes_to_unicode()

    def tokenise(part: int, s: int, text: bytes) -> tuple[list[int], list[int]]:
        return [tok.token_to_id(table[b]) for b in text], list(range(len(text) + 1))

    return tokenise


def write_own_teacher(root: Path, tokens_dir: Path, name: str, tok_dir: Path, k: int, *,
                      tokenise: Tokenise | None = None, rows: Rows | None = None, seed: int = 0,
                      logprob_dtype: str = "float32", bos_id: int | None = None,
                      unreadable: Sequence[tuple[int, int]] = (),
                      edit: Callable[[int, dict[str, np.ndarray]], None] | None = None,
                      drop: Sequence[str] = (), attrs: dict[str, Any] | None = None,
                      num_samples: int = 0) -> Path:
    """A teacher store in the teacher's own tokens over ``tokens_dir`` (same parts and
    sequences). ``tokenise``: default the teacher's canonical tokenisation; ``rows``: default
    random dense rows; ``unreadable``: (part, sequence) pairs stored with no rows; ``edit``:
    changes a part's arrays before they are written; ``drop``: arrays left out (bad stores);
    ``num_samples``: that many draws per row from the rows, beside the top-k."""
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tokenise = tokenise or canonical(tok, bos_id)
    rng = np.random.default_rng(seed)
    rows = rows or (lambda part, nxt: random_logp(rng, len(nxt), vocab))
    tokens = open_store(tokens_dir, TOKENS)
    base = teacher_header(tokens.num_parts, k, {
        "tokenizer_hash": vocab_fingerprint(tok.get_vocab(with_added_tokens=True)),
        "vocab_size": vocab, "tokens_fingerprint": tokens.manifest["checksum"],
        "teacher": name, "tokenization": "own", "teacher_tokenizer": str(tok_dir.resolve()),
        "teacher_tokenizer_hash": vocab_fingerprint(tok.get_vocab(with_added_tokens=True)),
        "teacher_vocab_size": vocab, "bos_id": bos_id,
        "unreadable_sequences": len(unreadable)} | (attrs or {}),
        logprob_dtype=logprob_dtype, own_tokens=True, num_samples=num_samples)
    header = replace(base, arrays=tuple(a for a in base.arrays if a.name not in drop))
    writer = StoreWriter(root / name, header)
    for p in range(tokens.num_parts):
        texts = tokens.read_meta(p).column("text").to_pylist()
        ends, nxt, lengths = [], [], []
        for s, text in enumerate(texts):
            got = None if (p, s) in unreadable else tokenise(p, s, text)
            ids, bounds = got if got is not None else ([], [0])
            n = max(len(ids) - 1, 0)
            ends += list(bounds[1:1 + n])
            nxt += list(ids[1:])
            lengths.append(n)
        nxt_a = np.asarray(nxt, np.int64)
        logp = rows(p, nxt_a)
        arrays = sparse_rows(logp, nxt_a, k) | {
            CONTEXT_END: np.asarray(ends, np.int32), NEXT_ID: nxt_a.astype(np.int32)}
        if num_samples:
            arrays |= draw_columns(logp, num_samples, np.random.default_rng(seed + 1000 + p))
        if edit is not None:
            edit(p, arrays)
        with writer.open_part(p) as pw:
            pw.append({a.name: arrays[a.name] for a in header.arrays},
                      np.asarray(lengths, np.int64), tokens.read_part(p).seq_ids)
    assert writer.finalize()
    return root / name


def write_store_teacher(root: Path, tokens_dir: Path, name: str, k: int, rows: Rows,
                        logprob_dtype: str = "float32", num_samples: int = 0) -> Path:
    """A teacher store in the student's tokens (as today): rows ``rows(part, next ids)``,
    with ``num_samples`` draws per row from them beside the top-k."""
    tokens = open_store(tokens_dir, TOKENS)
    header = teacher_header(tokens.num_parts, k, {
        "tokenizer_hash": tokens.attrs["tokenizer_hash"], "vocab_size": tokens.attrs["vocab_size"],
        "tokens_fingerprint": tokens.manifest["checksum"], "teacher": name},
        logprob_dtype=logprob_dtype, num_samples=num_samples)
    writer = StoreWriter(root / name, header)
    for p in range(tokens.num_parts):
        batch = tokens.read_part(p)
        nxt = np.delete(batch["token_ids"], batch.offsets[:-1]).astype(np.int64)
        logp = rows(p, nxt)
        arrays = sparse_rows(logp, nxt, k)
        if num_samples:
            arrays |= draw_columns(logp, num_samples, np.random.default_rng(2000 + p))
        with writer.open_part(p) as pw:
            pw.append(arrays, np.diff(batch.offsets) - 1, batch.seq_ids)
    assert writer.finalize()
    return root / name
