"""``mtkd harvest``: one teacher over a tokens store → a teacher store, part by part.

The teacher store has exactly the parts and sequences of the tokens store. Parts are shared
round robin by ``worker_index``/``num_workers``, so any number of workers on any nodes can run
against one output directory; committed parts are skipped and a killed worker's part is redone.
One engine serves all of a worker's parts; the part executor (``mtkd.store.executor``) reads the
next part's tokens and commits the previous part's rows while the engine scores the current one.
A teacher with another tokenizer reads each window's text in its own tokens
(``config.tokenization``; ``mtkd.harvest.own_tokens``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mtkd.harvest.config import ID_TABLE_TOKENS, LOGPROB_SLACK, MAX_K, HarvestConfig
from mtkd.harvest.engine import TeacherEngine
from mtkd.harvest.own_tokens import TeacherTokenizer, check_texts, own_attrs, window_texts
from mtkd.harvest.resume import begun_header, begun_options, check_resumed_coding, q64r_choices
from mtkd.harvest.vocab_map import (
    MappedEngine,
    VocabMap,
    engine_extra,
    resolve_vocab_map,
    teacher_vocab_size,
    unmapped_sequences,
)
from mtkd.ingest.tokenizer import (
    MODEL_FILES,
    TokenizerError,
    load_pretrained_tokenizer,
    resolve_pretrained,
)
from mtkd.store import (
    PartWriter,
    Store,
    StoreError,
    StoreWriter,
    bytes_on_disk,
    check_store_dir,
    open_store,
)
from mtkd.store.executor import run_parts
from mtkd.store.format import HEADER_FILE, Header
from mtkd.store.id_table import frequency_table
from mtkd.store.schema import (
    CONTEXT_END,
    NEXT_ID,
    OWN_TOKENS,
    STORE_TOKENS,
    TARGET_LOGPROB,
    TOKEN_IDS,
    TOKENS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    teacher_header,
)
from mtkd.store.writer import pending_parts


@dataclass
class HarvestSummary:
    parts: int
    parts_written: int
    tokens: int
    seconds: float
    bytes_on_disk: int
    complete: bool
    engine: str = ""
    tokenization: str = STORE_TOKENS
    #: own tokenization: sequences of this run's parts the teacher could not read, by reason
    unreadable: dict[str, int] = field(default_factory=dict)
    coding: str = ""  #: the top-k coding written (``--logprob-dtype auto`` made concrete)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """Hash of a local model's config and weight file names and sizes: a cheap revision id."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin", ".model"):
            h.update(path.name.encode() + str(path.stat().st_size).encode())
            if path.name == "config.json":
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def teacher_tokenizer_hash(model_dir: str | os.PathLike[str]) -> str:
    """The vocabulary hash of the teacher's tokenizer (any that transformers loads)."""
    try:
        return load_pretrained_tokenizer(model_dir).vocab_hash
    except TokenizerError as e:
        raise StoreError(f"teacher {model_dir}: no tokenizer to compare with the tokens store "
                         f"({e})") from None


def check_tokenizer(tokens: Store, model_dir: str | os.PathLike[str],
                    vocab_map: str | None = None) -> tuple[VocabMap | None, str | None]:
    """Refuse a teacher whose vocabulary differs from the one the tokens store was cut with,
    unless ``vocab_map`` (``auto`` or a file) is given; returns the map to apply (None: the
    vocabularies agree, or the map is the identity) and the teacher's tokenizer hash."""
    if vocab_map is not None:
        return resolve_vocab_map(vocab_map, tokens.attrs, model_dir)
    got = teacher_tokenizer_hash(model_dir)
    want = tokens.attrs.get("tokenizer_hash")
    if got != want:
        raise StoreError(
            f"teacher {model_dir} has a different tokenizer (vocabulary hash {got}) from the "
            f"tokens store {tokens.root} ({want}); harvest it in its own tokens "
            "(--tokenization own or auto: it reads each window's text with its own "
            "tokenizer), or through a vocabulary map: --vocab-map auto (tokens paired by their "
            "strings) or --vocab-map FILE"
        )
    return None, got


def choose_tokenization(tokens: Store, model_dir: str | os.PathLike[str],
                        config: HarvestConfig) -> str:
    """``store`` or ``own`` (see ``HarvestConfig.tokenization``); ``auto`` compares the
    vocabularies (a teacher without a loadable tokenizer takes the store path, which says so)."""
    if config.vocab_map is not None or config.tokenization == STORE_TOKENS:
        return STORE_TOKENS
    if config.tokenization == OWN_TOKENS:
        return OWN_TOKENS
    try:
        same = load_pretrained_tokenizer(model_dir).vocab_hash == tokens.attrs.get(
            "tokenizer_hash")
    except TokenizerError:
        return STORE_TOKENS
    return STORE_TOKENS if same else OWN_TOKENS


def prepare_own(tokens: Store, model_dir: str | os.PathLike[str],
                config: HarvestConfig) -> TeacherTokenizer:
    """The teacher's tokenizer for an own-tokens harvest, after refusing what it cannot do."""
    if config.temperatures:
        raise ValueError("exact tempered tails are not supported for a teacher harvested in "
                         "its own tokens (they do not survive the alignment to the student's "
                         "positions)")
    check_texts(tokens)
    return TeacherTokenizer.load(model_dir)


#: Tokens counted for a store's id table: the first parts' until at least this many.


def read_id_table(tokens: Store, teacher: TeacherTokenizer | None, size: int) -> list[int]:
    """The ``size`` ids the teacher reads most often, most frequent first (empty for 0): its
    tokens of the first parts (the tokens store's, or its own of their texts) until
    :data:`ID_TABLE_TOKENS`. Every worker counts the same parts, so their headers agree."""
    if not size:
        return []
    read: list[np.ndarray] = []
    for part in range(tokens.num_parts):
        if teacher is None:
            read.append(tokens.read_part(part, [TOKEN_IDS])[TOKEN_IDS])
        else:
            read.append(np.concatenate([np.zeros(0, np.int64), *teacher.read(
                window_texts(tokens, part)[1]).sequences]))
        if sum(map(len, read)) >= ID_TABLE_TOKENS:
            break
    return frequency_table(np.bincount(np.concatenate([np.zeros(0, np.int64), *read])
                                       .astype(np.int64)), size)


def check_mappable(tokens: Store, vmap: VocabMap) -> None:
    """Refuse a tokens store holding ids the teacher has no counterpart for (every part, so
    every worker refuses before writing anything)."""
    if (vmap.store_to_teacher >= 0).all():
        return
    bad_seqs, bad_ids = 0, np.zeros(0, dtype=np.int64)
    for part in range(tokens.num_parts):
        batch = tokens.read_part(part, [TOKEN_IDS])
        seqs, ids = unmapped_sequences(batch[TOKEN_IDS], batch.offsets, vmap.store_to_teacher)
        bad_seqs += int(seqs.sum())
        bad_ids = np.union1d(bad_ids, ids)
    if bad_seqs:
        raise StoreError(
            f"{bad_seqs} of {tokens.num_sequences} sequences of {tokens.root} hold store ids "
            f"with no teacher counterpart in the vocabulary map ({len(bad_ids)} distinct ids, "
            f"e.g. {spelled_ids(tokens, bad_ids[:8])}): the teacher cannot score them "
            "faithfully, so nothing was harvested; harvest it in its own tokens instead "
            "(--tokenization own: it reads each window's text with its own tokenizer), extend "
            "the map (--vocab-map FILE) or tokenize the corpus with a tokenizer the teacher "
            "covers"
        )


def spelled_ids(tokens: Store, ids: np.ndarray) -> str:
    """``ids`` of the tokens store's vocabulary with their strings (``286 'Ġ0'``), where its
    tokenizer still loads; the bare ids otherwise."""
    try:
        tokenizer = load_pretrained_tokenizer(tokens.attrs["tokenizer"]).tokenizer
    except (KeyError, TokenizerError):
        return str(ids.tolist())
    return "[" + ", ".join(f"{i} {tokenizer.id_to_token(int(i))!r}" for i in ids) + "]"


def build_engine(model_dir: str | os.PathLike[str], config: HarvestConfig,
                 k: int | None = None) -> TeacherEngine:
    """The engine ``config`` names, returning top-``k`` rows (default ``config.k``)."""
    k = config.k if k is None else k
    if config.engine == "vllm":
        from mtkd.harvest.vllm_engine import VllmEngine

        return VllmEngine(str(model_dir), k, dtype=config.dtype, fast_path=config.fast_path,
                          num_samples=config.num_samples,
                          sample_temperature=config.sample_temperature, seed=config.seed,
                          sample_rest=config.sample_rest, **config.engine_args)
    if config.engine == "hf":
        import torch

        from mtkd.harvest.hf_engine import HfReferenceEngine

        return HfReferenceEngine(str(model_dir), k, dtype=getattr(torch, config.dtype),
                                 temperatures=config.temperatures,
                                 num_samples=config.num_samples,
                                 sample_temperature=config.sample_temperature, seed=config.seed,
                                 sample_rest=config.sample_rest)
    raise ValueError(f"unknown engine {config.engine!r} (choose vllm or hf)")


def check_room(tokens: Store, engine: TeacherEngine, parts: Sequence[int]) -> None:
    """Refuse, before the store is begun, windows of ``parts`` longer than the engine takes
    (vLLM: ``max_sequence_len``, max_model_len less the token of room its draws need): said
    after the header, the error left a store that a rerun on windows cut shorter refused."""
    limit = getattr(engine, "max_sequence_len", None)
    lengths = [tokens.seq_lengths[tokens.part_sequences(p)] for p in parts]
    longest = max((int(n.max()) for n in lengths if len(n)), default=0)
    if limit is None or longest <= limit:
        return
    room = (" (draws need one token of room after each window)"
            if getattr(engine, "num_samples", 0) else "")
    raise ValueError(f"{tokens.root} holds windows of {longest} tokens and the engine takes "
                     f"at most {limit}{room}: tokenize with --max-len {limit} or less, or raise "
                     "--max-model-len (up to the model's context)")


def batches(lengths: np.ndarray, batch_tokens: int) -> Iterator[slice]:
    """Consecutive runs of sequences holding about ``batch_tokens`` tokens each."""
    start, acc = 0, 0
    for i, n in enumerate(lengths):
        acc += int(n)
        if acc >= batch_tokens:
            yield slice(start, i + 1)
            start, acc = i + 1, 0
    if start < len(lengths):
        yield slice(start, len(lengths))


def harvest(
    tokens_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: HarvestConfig = HarvestConfig(),
    *,
    worker_index: int = 0,
    num_workers: int = 1,
    progress: bool = True,
    engine_factory: Callable[[], TeacherEngine] | None = None,
) -> HarvestSummary:
    """Run the teacher over this worker's pending parts; finalise the store if it is complete.

    The tokens parts this worker will read are checked (sha256) before the engine starts, and
    the engine is built before the output store is created, so a refused configuration (k
    above the engine's cap, a bad dtype, an unloadable model) leaves no store behind that a
    corrected rerun would then disagree with. With ``config.vocab_map`` the map is built and
    every tokens part checked for unmappable ids first; ``engine_factory`` then returns the
    engine in teacher ids, which is wrapped in a :class:`MappedEngine`. In own tokens
    (``config.tokenization``) the engine reads the teacher's tokens of each window's text.
    ``model_dir``: a local directory or a hub id (its snapshot in the Hugging Face cache).
    """
    # sizes here; below, the sha256 of the parts this worker reads (the store is hashed once)
    tokens = open_store(tokens_dir, TOKENS, verify="size")
    check_store_dir(out)  # a bad --out said at once, not after the engine's start-up
    model_dir = resolve_pretrained(model_dir, "model", MODEL_FILES)
    tokenization = choose_tokenization(tokens, model_dir, config)
    vmap, teacher, teacher_hash = None, None, None
    engine_k = config.k
    if tokenization == OWN_TOKENS:
        teacher = prepare_own(tokens, model_dir, config)
    else:
        vmap, teacher_hash = check_tokenizer(tokens, model_dir, config.vocab_map)
    if vmap is not None:
        check_mappable(tokens, vmap)
        engine_k += engine_extra(vmap.teacher_size - vmap.mapped, config.k,
                                 MAX_K if config.engine == "vllm" else vmap.teacher_size)
    attrs = {
        "teacher": str(Path(model_dir).resolve()),
        "teacher_revision": model_fingerprint(model_dir),
        "tokenizer_hash": tokens.attrs["tokenizer_hash"],
        "vocab_size": tokens.attrs["vocab_size"],
        "tokens_fingerprint": tokens.manifest["checksum"],
        "engine": config.engine,
        "dtype": config.dtype,
    }
    if config.num_samples:  # the draws follow softmax(logits / T); reproducible from the seed
        attrs |= {"sample_temperature": config.sample_temperature, "sample_seed": config.seed,
                  "sample_rest": config.sample_rest}
    if vmap is not None:
        attrs["vocab_map"] = vmap.attrs(engine_k, teacher_hash)
    if teacher is not None:
        size = teacher_vocab_size(model_dir, teacher.loaded.tokenizer)
        attrs |= own_attrs(teacher, size)
    begun = begun_header(out)  # a store being resumed keeps its own codings
    resumed = begun_options(begun)
    config = config.resolved(int(attrs["vocab_size"]), resumed)
    check_resumed_coding(config, resumed, out)
    header = teacher_header(tokens.num_parts, config.k, attrs, temperatures=config.temperatures,
                            num_samples=config.num_samples, logprob_dtype=config.logprob_dtype,
                            codec=config.codec, own_tokens=teacher is not None,
                            id_table=read_id_table(tokens, teacher, config.id_table),
                            tail_step=config.tail_step, stream_rows=config.q64r_stream_rows,
                            **q64r_choices(begun))
    start = time.perf_counter()
    engine = None

    def make_engine() -> TeacherEngine:
        inner = engine_factory() if engine_factory else build_engine(model_dir, config, engine_k)
        if teacher is None:  # own tokens leave a window too long for the engine out instead
            check_room(tokens, inner, share)
        return inner if vmap is None else MappedEngine(inner, vmap, config.k)

    share = pending_parts(out, tokens.num_parts, worker_index, num_workers)
    for part in share:
        tokens.verify_part(part)
    if share and not (Path(out) / HEADER_FILE).exists():  # a new store: the engine first
        engine = make_engine()
    writer = StoreWriter(out, header)
    pending = writer.pending_parts(worker_index, num_workers)
    total_tokens = 0
    engine_name = ""
    unreadable: Counter[str] = Counter()
    if pending:
        if engine is None:
            engine = make_engine()
        engine_name = engine.name
        todo = int(sum(tokens.seq_lengths[tokens.part_sequences(p)].sum() for p in pending))
        bar = tqdm(total=todo, desc=f"harvest ({engine.name})", unit="tok", unit_scale=True,
                   disable=not progress)
        # one engine for all parts, in this process: parts are read and committed around it
        done = run_parts(pending, HarvestParts(tokens, engine, writer, config, bar, teacher),
                         desc="harvest", progress=False)
        total_tokens = sum(n for n, _ in done.values())
        for _, why in done.values():
            unreadable.update(why)
        bar.close()
    seconds = time.perf_counter() - start
    complete = writer.finalize()
    size = bytes_on_disk(out)
    return HarvestSummary(tokens.num_parts, len(pending), total_tokens, seconds, size, complete,
                          engine_name, tokenization, dict(unreadable), config.logprob_dtype)


@dataclass
class PartInputs:
    """One part as the engine reads it: its sequences (an empty one where the teacher cannot
    read it), their tokens in the tokens store (for progress), and per-row arrays that do not
    come from the engine (own tokenization: ``context_end``, ``next_id``)."""

    seq_ids: np.ndarray
    sequences: list[np.ndarray]
    store_lengths: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    unreadable: Counter[str] | None = None  # own tokenization: sequences left out, by reason


@dataclass
class HarvestParts:
    """The harvest as a part job: the tokens of a part in, the teacher's rows out.

    ``teacher``: the teacher's own tokenizer, which reads each window's text instead of the
    tokens store's ids (``own_tokens``); None: the store's ids.
    """

    tokens: Store
    engine: TeacherEngine
    writer: StoreWriter
    config: HarvestConfig
    bar: tqdm | None = None  # counts tokens, as the engine finishes each batch
    teacher: TeacherTokenizer | None = None

    def read(self, part: int) -> PartInputs:
        if self.teacher is not None:
            seq_ids, texts, store_lengths = window_texts(self.tokens, part)
            own = self.teacher.read(texts, getattr(self.engine, "max_sequence_len", None))
            return PartInputs(seq_ids, own.sequences, store_lengths,
                              {CONTEXT_END: own.context_end, NEXT_ID: own.next_id},
                              own.unreadable)
        batch = self.tokens.read_part(part, [TOKEN_IDS])
        flat, offsets = batch[TOKEN_IDS], batch.offsets
        seqs = [flat[offsets[i]:offsets[i + 1]] for i in range(len(batch.seq_ids))]
        return PartInputs(batch.seq_ids, seqs, np.diff(offsets))

    def compute(self, part: int, inputs: PartInputs) -> tuple[PartWriter, int, Counter[str]]:
        """The part's rows, batch by batch through the engine, checked and appended to its
        (not yet committed) part writer; with the tokens processed and the sequences left out."""
        engine, writer = self.engine, self.writer
        lengths = np.array([len(s) for s in inputs.sequences], dtype=np.int64)
        rows_per_seq = np.maximum(lengths - 1, 0)
        names = [a.name for a in writer.header.written_arrays]
        from_engine = [n for n in names if n not in inputs.extra]
        mapped = engine if isinstance(engine, MappedEngine) else None
        filled = mapped.filled_rows if mapped else 0
        pw = writer.open_part(part)
        try:
            pw.stats = {"engine": engine.name}
            row = 0
            for sel in batches(lengths, self.config.batch_tokens):
                seqs = inputs.sequences[sel]
                if inputs.unreadable is not None:  # own tokens: what the teacher cannot read
                    seqs = [s for s in seqs if len(s)]
                rows = engine.harvest(seqs) if seqs else empty_rows(writer.header)
                _check_rows(rows, from_engine, seqs, engine.name, part, engine.vocab_size)
                count = int(rows_per_seq[sel].sum())
                rows = {**rows, **{k: v[row:row + count] for k, v in inputs.extra.items()}}
                row += count
                pw.append({n: rows[n] for n in names}, rows_per_seq[sel], inputs.seq_ids[sel])
                if self.bar is not None:
                    self.bar.update(int(inputs.store_lengths[sel].sum()))
            if mapped is not None:
                pw.stats["vocab_map_filled_rows"] = mapped.filled_rows - filled
            if inputs.unreadable is not None:
                pw.stats["unreadable_sequences"] = sum(inputs.unreadable.values())
                pw.stats["unreadable"] = dict(inputs.unreadable)
        except BaseException:
            pw.discard()
            raise
        return pw, int(lengths.sum()), inputs.unreadable or Counter()

    def write(self, part: int, outputs: tuple[PartWriter, int, Counter[str]]
              ) -> tuple[int, Counter[str]]:
        pw, tokens, unreadable = outputs
        pw.commit()
        return tokens, unreadable


def empty_rows(header: Header) -> dict[str, np.ndarray]:
    """No rows of every array of ``header`` (a batch of sequences the teacher cannot read)."""
    k = int(header.attrs["k"])
    rows = {a.name: np.zeros((0, *a.row_shape), a.dtype) for a in header.written_arrays}
    rows[TOPK_IDS] = np.zeros((0, k), np.int32)  # as engines return them (the writer codes them)
    rows[TOPK_LOGPROBS] = np.zeros((0, k), np.float32)
    return rows


def _check_rows(rows: dict[str, np.ndarray], names: Sequence[str], seqs: Sequence[np.ndarray],
                engine: str, part: int, vocab_size: int | None = None) -> None:
    missing = [n for n in names if n not in rows]
    if missing:
        raise StoreError(f"engine {engine} did not return {missing} (part {part})")
    ids = np.asarray(rows[TOPK_IDS])
    if ids.size and vocab_size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise StoreError(f"engine {engine} returned token ids outside [0, {vocab_size}) in "
                         f"topk_ids for part {part}; refusing to store them")
    for name in (TOPK_LOGPROBS, TARGET_LOGPROB):
        values = np.asarray(rows[name], dtype=np.float64)
        if np.isnan(values).any() or np.isposinf(values).any() or (values > LOGPROB_SLACK).any():
            raise StoreError(f"engine {engine} returned invalid log-probs in {name} "
                             f"(NaN, +inf or > 0) for part {part}; refusing to store them")
    want = sum(max(len(s) - 1, 0) for s in seqs)
    if len(rows[TOPK_IDS]) != want:
        raise StoreError(f"engine {engine} returned {len(rows[TOPK_IDS])} rows for "
                         f"{want} target positions (part {part})")

