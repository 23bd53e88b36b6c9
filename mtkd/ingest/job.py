"""``mtkd tokenize``: a corpus tokenised once into a tokens store.

Every document is tokenised (plus an end-of-document token), cut into windows of ``max_len``
tokens that overlap by ``overlap`` tokens, and written as one sequence per window. Sequence ids
are ``part << 32 | index``: deterministic, so any worker or rerun produces the same store.
Parts run through the part executor (``mtkd.store.executor``): workers, local processes, the
next part's documents read while the current part is tokenised.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from mtkd.ingest.config import TokenizeConfig
from mtkd.ingest.corpus import (
    CorpusError,
    Document,
    Problems,
    Unit,
    fingerprint,
    group_units,
    list_files,
    plan_units,
    read_unit,
)
from mtkd.store import StoreWriter, open_store
from mtkd.store.executor import run_parts
from mtkd.store.schema import TOKEN_IDS, TOKENS, tokens_header, vocab_fingerprint

SEQ_ID_SHIFT = 32
DEFAULT_PART_BYTES = 64 << 20
#: meta.parquet's columns (docs/FORMAT.md §4); explicit, so that a part without sequences has
#: the same column types as the others (readers concatenate the parts' tables).
META_SCHEMA = pa.schema([("seq_id", pa.int64()), ("doc_id", pa.int64()), ("source", pa.string()),
                         ("task", pa.string()), ("window", pa.int64()), ("start", pa.int64())])


@dataclass
class TokenizeSummary:
    parts: int
    parts_written: int
    sequences: int
    tokens: int
    documents: int
    problems: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    complete: bool = False


def load_tokenizer(tokenizer_dir: str | os.PathLike[str]) -> tuple[Tokenizer, int | None]:
    """A fast tokenizer from a local Hugging Face directory and its end-of-sequence id."""
    path = Path(tokenizer_dir)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise CorpusError(f"{file}: no tokenizer.json (a fast Hugging Face tokenizer is needed)")
    tokenizer = Tokenizer.from_file(str(file))
    eos_id = None
    config = file.parent / "tokenizer_config.json"
    if config.exists():
        eos = json.loads(config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is not None:
            eos_id = tokenizer.token_to_id(eos)
    return tokenizer, eos_id


def windows(length: int, max_len: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of each window of a document of ``length`` tokens."""
    step = max_len - overlap
    return [(s, min(s + max_len, length)) for s in range(0, max(length - overlap, 1), step)]


def tokenize_corpus(
    inputs: Sequence[str | os.PathLike[str]],
    tokenizer_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TokenizeConfig = TokenizeConfig(),
    *,
    num_parts: int | None = None,
    processes: int = 1,
    worker_index: int = 0,
    num_workers: int = 1,
    progress: bool = True,
) -> TokenizeSummary:
    """Tokenise ``inputs`` into the tokens store ``out`` (resumable; committed parts skipped)."""
    files = list_files(inputs, config.pattern, config.exclude)
    if all(_size(f) == 0 for f in files):
        raise CorpusError(f"empty corpus: the {len(files)} input file(s) in "
                          f"{', '.join(map(str, inputs))} hold no bytes")
    units = plan_units(files)
    if num_parts is None:
        num_parts = max(1, -(-sum(u.size for u in units) // DEFAULT_PART_BYTES))
    groups = group_units(units, num_parts)
    tokenizer, eos_id = load_tokenizer(tokenizer_dir)
    attrs = {
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "tokenizer_hash": vocab_fingerprint(tokenizer.get_vocab(with_added_tokens=True)),
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eos_id": eos_id if config.add_eos else None,
        "corpus_fingerprint": fingerprint(files),
        "config": config.__dict__,
        "num_files": len(files),
    }
    writer = StoreWriter(out, tokens_header(len(groups), attrs))
    pending = writer.pending_parts(worker_index, num_workers)
    job = TokenizeParts(str(out), groups, str(tokenizer_dir), config, attrs)
    run_parts(pending, job, processes=processes, desc="tokenize", progress=progress)
    complete = writer.finalize()
    return summarize(out, len(groups), len(pending), complete)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1  # unreadable: reported as a problem when read


def summarize(out: str | os.PathLike[str], parts: int, written: int,
              complete: bool) -> TokenizeSummary:
    """Totals over the committed parts (all parts once the store is complete)."""
    summary = TokenizeSummary(parts, written, 0, 0, 0, complete=complete)
    if not complete:
        return summary
    store = open_store(out, TOKENS, verify="none")
    counts: Counter[str] = Counter()
    for p in range(store.num_parts):
        stats = store.part_stats(p)
        counts.update(stats.get("problems", {}))
        summary.documents += stats.get("documents", 0)
        summary.examples += stats.get("examples", [])[: 20 - len(summary.examples)]
    summary.sequences = store.num_sequences
    summary.tokens = store.num_rows
    summary.problems = dict(counts)
    return summary


@dataclass
class _Windows:
    """One part's sequences (token windows), their metadata and the part's reading problems."""

    tokens: np.ndarray
    lengths: np.ndarray
    seq_ids: np.ndarray
    meta: pa.Table
    documents: int
    problems: Problems


@dataclass
class TokenizeParts:
    """Tokenising as a part job: read a part's documents, cut them into token windows, commit.

    Picklable; the tokenizer is loaded once per process, on first use.
    """

    out: str
    groups: list[list[Unit]]
    tokenizer_dir: str
    config: TokenizeConfig
    attrs: dict[str, Any]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_dir)[0]

    def read(self, part: int) -> tuple[list[Document], Problems]:
        config = self.config
        problems = Problems(strict=config.strict)
        docs = [d for unit in self.groups[part]
                for d in read_unit(unit, problems, config.text_field, config.task_field,
                                   config.task)]
        return docs, problems

    def compute(self, part: int, inputs: tuple[list[Document], Problems]) -> _Windows:
        docs, problems = inputs
        config = self.config
        encodings = self.tokenizer.encode_batch_fast([d.text for d in docs],
                                                     add_special_tokens=False)
        eos = [self.attrs["eos_id"]] if self.attrs["eos_id"] is not None else []
        token_rows: list[np.ndarray] = []
        meta: dict[str, list[Any]] = {k: [] for k in ("doc_id", "source", "task", "window",
                                                      "start")}
        for doc_index, (doc, enc) in enumerate(zip(docs, encodings, strict=True)):
            ids = np.asarray(enc.ids + eos, dtype=np.int32)
            spans = [(s, e) for s, e in windows(len(ids), config.max_len, config.overlap)
                     if e - s >= 2]
            if not spans:
                problems.add("too_short", doc.source)
            for w, (start, stop) in enumerate(spans):
                token_rows.append(ids[start:stop])
                meta["doc_id"].append((part << SEQ_ID_SHIFT) | doc_index)
                meta["source"].append(doc.source)
                meta["task"].append(doc.task)
                meta["window"].append(w)
                meta["start"].append(start)
        lengths = np.array([len(r) for r in token_rows], dtype=np.int64)
        seq_ids = (np.int64(part) << SEQ_ID_SHIFT) | np.arange(len(token_rows), dtype=np.int64)
        table = pa.table({"seq_id": seq_ids, **meta}, schema=META_SCHEMA)
        flat = np.concatenate(token_rows) if token_rows else np.zeros(0, np.int32)
        return _Windows(flat, lengths, seq_ids, table, len(docs), problems)

    def write(self, part: int, cut: _Windows) -> int:
        writer = StoreWriter(self.out, tokens_header(len(self.groups), self.attrs))
        with writer.open_part(part) as pw:
            pw.stats = {"documents": cut.documents, "problems": dict(cut.problems.counts),
                        "examples": cut.problems.examples}
            pw.append({TOKEN_IDS: cut.tokens}, cut.lengths, cut.seq_ids, cut.meta)
        return int(cut.lengths.sum())
