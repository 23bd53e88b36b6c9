"""``mtkd tokenize``: a corpus tokenised once into a tokens store.

Every document is tokenised (plus an end-of-document token), cut into windows of ``max_len``
tokens that overlap by ``overlap`` tokens, and written as one sequence per window. Sequence ids
are ``part << 32 | index``: deterministic, so any worker or rerun produces the same store.
Parts run through the part executor (``mtkd.store.executor``): workers, local processes, the
next part's documents read while the current part is tokenised. Each window's text and the end
of each of its tokens in it are kept too (``byte_offsets``; ``mtkd.ingest.window_text``); a
document whose tokens do not spell its text is skipped and counted (``unspelled_text``).
A run whose input is refused before any part is committed, in a store it began alone, removes
that store, so that the corrected rerun starts afresh rather than being refused as other
settings (an I/O failure keeps it: the same command resumes).
"""

from __future__ import annotations

import os
import shutil
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
    PART_SPLIT,
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
from mtkd.ingest.tokenizer import LoadedTokenizer, load_pretrained_tokenizer
from mtkd.ingest.tokenizer import load_tokenizer as load_tokenizer
from mtkd.ingest.window_text import DocumentBytes, Spelling, document_bytes
from mtkd.store import StoreWriter, open_store
from mtkd.store.executor import run_parts
from mtkd.store.format import HEADER_FILE, PARTS_DIR
from mtkd.store.schema import BYTE_END, BYTE_START, TEXT, TOKEN_IDS, TOKENS, tokens_header

SEQ_ID_SHIFT = 32
DEFAULT_PART_BYTES = 64 << 20
NO_BYTE_OFFSETS = ("tokenize with --no-byte-offsets to keep no window texts (a teacher with "
                   "another tokenizer then cannot be harvested over the store)")
#: A document's tokens do not spell its text (a normalizer changed it, an unknown character
#: became <unk>): skipped, counted under this name.
UNSPELLED = "unspelled_text"
#: A text every tokenizer that keeps the text spells (mixed case: a lowercasing normalizer).
SPELLING_PROBE = "Hello World, this is Mixed Case text."
#: meta.parquet's columns (docs/FORMAT.md §4); explicit, so that a part without sequences has
#: the same column types as the others (readers concatenate the parts' tables).
META_SCHEMA = pa.schema([("seq_id", pa.int64()), ("doc_id", pa.int64()), ("source", pa.string()),
                         ("task", pa.string()), ("window", pa.int64()), ("start", pa.int64())])
#: With byte offsets: where the window's text starts in its document's UTF-8, and the text.
META_SCHEMA_BYTES = META_SCHEMA.append(pa.field(BYTE_START, pa.int64())).append(
    pa.field(TEXT, pa.large_binary()))


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
    #: special tokens found written out in the documents (e.g. a literal <|endoftext|>): kept
    #: as their special ids, their bytes left out of the window texts
    special_tokens_in_text: int = 0
    #: documents without the --task-field, kept with the default --task (not skipped)
    defaulted_task: int = 0


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
    loaded = load_pretrained_tokenizer(tokenizer_dir)
    tokenizer = loaded.tokenizer
    if config.byte_offsets:
        check_spelling(loaded)
    check_eos(loaded, config)
    attrs = {
        "tokenizer": str(loaded.path),
        "tokenizer_hash": loaded.vocab_hash,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eos_id": loaded.eos_id if config.add_eos else None,
        "corpus_fingerprint": fingerprint(files),
        "config": config.__dict__,
        "num_files": len(files),
        # how files map to parts: a store begun under another rule is refused, not mixed
        "part_split": PART_SPLIT,
    }
    made_dir = not Path(out).exists()
    begun_here = not (Path(out) / HEADER_FILE).exists()
    writer = StoreWriter(out, tokens_header(len(groups), attrs, byte_offsets=config.byte_offsets))
    pending = writer.pending_parts(worker_index, num_workers)
    job = TokenizeParts(str(out), groups, str(loaded.path), config, attrs)
    try:
        run_parts(pending, job, processes=processes, desc="tokenize", progress=progress)
    except (CorpusError, ValueError):  # the input refused (not an I/O failure: a full disk
        if begun_here and num_workers == 1:  # keeps what it began, for the rerun to resume)
            discard_uncommitted(writer, made_dir)
        raise
    if all(writer.is_committed(p) for p in range(len(groups))):
        refuse_no_sequences(writer, len(groups))
    complete = writer.finalize()
    return summarize(out, len(groups), len(pending), complete)


def check_eos(loaded: LoadedTokenizer, config: TokenizeConfig) -> None:
    """Refuse ``add_eos`` with a tokenizer that names no EOS token (``CorpusError``): the
    documents would run into one another with nothing between them, while the store's
    config said they were ended."""
    if not config.add_eos or loaded.eos_id is not None:
        return
    where = loaded.path if loaded.path.is_dir() else loaded.path.parent
    specials = [t.content for t in loaded.tokenizer.get_added_tokens_decoder().values()
                if t.special][:5]
    known = f" (its special tokens: {', '.join(specials)})" if specials else ""
    raise CorpusError(f"tokenizer {loaded.path} names no end-of-sequence token, so --add-eos "
                      "(the default) cannot end each document with one: name it in "
                      f"{where / 'tokenizer_config.json'} as {{\"eos_token\": \"…\"}}{known}, "
                      "or tokenize with --no-add-eos")


def check_spelling(loaded: LoadedTokenizer) -> None:
    """Refuse byte offsets for a tokenizer whose tokens cannot spell text (WordPiece) or that
    changes every text it reads (a lowercasing normalizer: the probe's capitals), before the
    store is begun; a document it spells wrong on its own is skipped when it is met."""
    try:
        spelling = Spelling.of(loaded.tokenizer)
    except ValueError as e:
        raise CorpusError(f"tokenizer {loaded.path}: {e}; {NO_BYTE_OFFSETS}") from None
    ids = loaded.tokenizer.encode(SPELLING_PROBE, add_special_tokens=False).ids
    if any(spelling.plain[i] is None for i in ids):
        return  # an unknown character (<unk>): says nothing of the others
    try:
        document_bytes(ids, 0, SPELLING_PROBE, spelling)
    except ValueError as e:
        raise CorpusError(f"tokenizer {loaded.path}: its tokens do not spell the text "
                          f"{SPELLING_PROBE!r} ({e}): it changes the text it reads; "
                          f"{NO_BYTE_OFFSETS}") from None


def discard_uncommitted(writer: StoreWriter, made_dir: bool) -> None:
    """Remove the store this run began, alone, if none of its parts is committed: a run
    refused early (--strict's first bad document) left store.json behind, and the rerun that
    the refusal asked for (other settings) was refused as a different store."""
    if any(writer.is_committed(p) for p in range(writer.header.num_parts)):
        return
    if made_dir:
        shutil.rmtree(writer.root, ignore_errors=True)
        return
    (writer.root / HEADER_FILE).unlink(missing_ok=True)
    shutil.rmtree(writer.root / PARTS_DIR, ignore_errors=True)


def refuse_no_sequences(writer: StoreWriter, parts: int) -> None:
    """Refuse to finalise a tokens store without a sequence (``CorpusError``): a corpus whose
    every document was skipped (a wrong ``--text-field``, files that are not text) must not
    give a complete, empty store that the next stages would take."""
    commits = [writer.commit_record(p) for p in range(parts)]
    if any(c["num_sequences"] for c in commits):
        return
    problems: Counter[str] = Counter()
    for c in commits:
        problems.update(c.get("stats", {}).get("problems", {}))
    why = ", ".join(f"{name}={n}" for name, n in problems.most_common()) or "none"
    hint = f"; or, as the tokens do not spell the texts, {NO_BYTE_OFFSETS}" if UNSPELLED in \
        problems else ""
    raise CorpusError(f"no document of the corpus made a sequence (skipped: {why}); check "
                      f"--text-field and the input files{hint}. {writer.root} is left "
                      "incomplete: remove it before tokenizing again")


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
        summary.special_tokens_in_text += stats.get("special_tokens_in_text", 0)
        summary.defaulted_task += stats.get("defaulted_task", 0)
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
    byte_end: np.ndarray | None = None  # with byte offsets: each token's end in its window text
    literal_specials: int = 0  # special tokens found written out in the documents


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

    @cached_property
    def spelling(self) -> Spelling:
        return Spelling.of(self.tokenizer)

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
        ends: list[np.ndarray] = []
        columns = ("doc_id", "source", "task", "window", "start")
        if config.byte_offsets:
            columns += (BYTE_START, TEXT)
        meta: dict[str, list[Any]] = {k: [] for k in columns}
        literal_specials = kept = 0
        for doc_index, (doc, enc) in enumerate(zip(docs, encodings, strict=True)):
            ids = np.asarray(enc.ids + eos, dtype=np.int32)
            spans = [(s, e) for s, e in windows(len(ids), config.max_len, config.overlap)
                     if e - s >= 2]
            if not spans:
                problems.add("too_short", doc.where)
                continue
            if config.byte_offsets:
                doc_bytes = self._document_bytes(enc.ids, len(eos), doc, problems)
                if doc_bytes is None:
                    continue
                literal_specials += doc_bytes.literal_specials
            kept += 1
            for w, (start, stop) in enumerate(spans):
                token_rows.append(ids[start:stop])
                meta["doc_id"].append((part << SEQ_ID_SHIFT) | doc_index)
                meta["source"].append(doc.source)
                meta["task"].append(doc.task)
                meta["window"].append(w)
                meta["start"].append(start)
                if config.byte_offsets:
                    byte_start, byte_end, text = doc_bytes.window(start, stop)
                    ends.append(byte_end)
                    meta[BYTE_START].append(byte_start)
                    meta[TEXT].append(text)
        lengths = np.array([len(r) for r in token_rows], dtype=np.int64)
        seq_ids = (np.int64(part) << SEQ_ID_SHIFT) | np.arange(len(token_rows), dtype=np.int64)
        schema = META_SCHEMA_BYTES if config.byte_offsets else META_SCHEMA
        table = pa.table({"seq_id": seq_ids, **meta}, schema=schema)
        flat = np.concatenate(token_rows) if token_rows else np.zeros(0, np.int32)
        byte_end = None
        if config.byte_offsets:
            byte_end = np.concatenate(ends) if ends else np.zeros(0, np.int32)
        return _Windows(flat, lengths, seq_ids, table, kept, problems, byte_end,
                        literal_specials)

    def _document_bytes(self, ids: list[int], appended: int, doc: Document,
                        problems: Problems) -> DocumentBytes | None:
        """The document's tokens on its bytes; None (skipped, counted) if they do not spell
        it, e.g. a literal <s> after which a normalizer changed the text, or an unknown
        character read as <unk> by a tokenizer without byte fallback."""
        try:
            return document_bytes(ids, appended, doc.text, self.spelling)
        except ValueError as e:
            problems.add(UNSPELLED, f"{doc.where} ({e})", hint=NO_BYTE_OFFSETS)
            return None

    def write(self, part: int, cut: _Windows) -> int:
        writer = StoreWriter(self.out, tokens_header(len(self.groups), self.attrs,
                                                     byte_offsets=self.config.byte_offsets))
        with writer.open_part(part) as pw:
            pw.stats = {"documents": cut.documents, "problems": dict(cut.problems.counts),
                        "examples": cut.problems.examples}
            if cut.literal_specials:
                pw.stats["special_tokens_in_text"] = cut.literal_specials
            pw.stats.update(cut.problems.notes)  # defaulted_task
            rows = {TOKEN_IDS: cut.tokens}
            if cut.byte_end is not None:
                rows[BYTE_END] = cut.byte_end
            pw.append(rows, cut.lengths, cut.seq_ids, cut.meta)
        return int(cut.lengths.sum())
