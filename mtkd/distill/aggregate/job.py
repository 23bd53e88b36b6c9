"""``mtkd aggregate``: K teacher stores over one tokens store → one target store, part by part.

This is the I/O shell around :func:`~.fuse.fuse`: it checks that the teachers can be
fused (same tokens store, same tokenizer or aligned from their own, complete), builds each
part's weight policy from the tokens store's task tags and sequence boundaries, fuses, and
commits the part. A teacher with its own tokenizer (``cross``) is aligned to the student's
positions first; rows it does not cover are handled by ``coverage`` (its weight 0 there, the
CE fallback where no teacher covers a row) and the target store then records a ``coverage``
bitmask per row. Parts are independent, so workers (local processes or machines) share them
like harvest does, through the part executor (``mtkd.store.executor``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from mtkd.distill.aggregate.align import AlignedRows
from mtkd.distill.aggregate.config import AggregateConfig
from mtkd.distill.aggregate.coverage import (
    COVERAGE,
    MAX_TEACHERS,
    MaskedWeights,
    complete_rows,
    coverage_bits,
    coverage_stats,
    covered_rows,
    fill_placeholders,
    fuse_partial_rows,
    one_hot,
    uncovered,
)
from mtkd.distill.aggregate.cross import (
    OwnTeacherPart,
    StudentPart,
    align_own_part,
    check_own_part,
    check_own_teacher,
    is_own,
    read_own_part,
    read_student_part,
)
from mtkd.distill.aggregate.fuse import fuse
from mtkd.distill.aggregate.operators import get_operator
from mtkd.distill.aggregate.own_samples import estimated_rows, fuse_own_samples
from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples, head_and_draws
from mtkd.distill.aggregate.summary import part_stats, summarize
from mtkd.distill.aggregate.targets import add_label_entry
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.weights import (
    fit_mixture_weights,
)
from mtkd.store import ArraySpec, Header, Store, StoreError, StoreWriter, open_store
from mtkd.store.executor import run_parts
from mtkd.store.schema import (
    NEXT_ID,
    SAMPLE_COUNTS,
    SAMPLE_IDS,
    TAIL_LOGMASS,
    TARGET_LOGPROB,
    TEACHER,
    TEMPERED_TAIL_LOGMASS,
    TOKEN_IDS,
    TOKENS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    check_aligned,
    target_header,
)
from mtkd.store.target_codec import Q64V2 as TARGET_CODING
from mtkd.store.writer import pending_parts

#: What fusing reads of each teacher store: its top-k rows, or its sampled targets.
TEACHER_ARRAYS = (TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGMASS, TARGET_LOGPROB)
SAMPLE_ARRAYS = (SAMPLE_IDS, SAMPLE_COUNTS)


@dataclass
class AggregateSummary:
    parts: int
    parts_written: int
    positions: int
    complete: bool
    diagnostics: dict[str, float] = field(default_factory=dict)
    weights: tuple[float, ...] | None = None  # the static weights fused with (fitted or given)


def open_teachers(tokens: Store, teacher_dirs: Sequence[str | os.PathLike[str]]) -> list[Store]:
    """Open the teacher stores and refuse any that cannot be fused with the others."""
    stores = []
    for path in teacher_dirs:
        # sizes here; each part's sha256 when a worker reads it (_read_part)
        store = open_store(path, TEACHER, verify="size")
        check_aligned(tokens, store)
        if is_own(store):
            check_own_teacher(tokens, store)
        elif store.attrs.get("tokenizer_hash") != tokens.attrs.get("tokenizer_hash"):
            raise StoreError(f"{path} was harvested with a different tokenizer than {tokens.root}")
        stores.append(store)
    return stores


def check_own_settings(teachers: Sequence[Store], config: AggregateConfig) -> None:
    """Refuse what teachers of their own tokenizer cannot do: exact tempered tails are in the
    teacher's ids (aligned rows carry none), draws at another temperature than the stored
    log-probs' cannot be aligned, and a coverage bitmask holds at most 31 teachers."""
    own = [str(t.root) for t in teachers if is_own(t)]
    if not own:
        return
    hot = [str(t.root) for t in teachers if config.source == "samples" and is_own(t)
           and float(t.attrs.get("sample_temperature") or 1.0) != 1.0]
    if hot:
        raise StoreError(f"{hot[0]} drew at a sampling temperature ≠ 1: the actual "
                         "token's exact probability, which aligning its draws keeps, is known "
                         "at T = 1 only (harvest its draws at --sample-temperature 1)")
    tempered = [str(t.root) for t, temp in zip(teachers, config.teacher_temperatures,
                                               strict=True) if is_own(t) and temp != 1.0]
    if config.tail_model == "exact" and tempered:
        raise StoreError(f"tail model 'exact' at T ≠ 1 for {tempered[0]}, a teacher with its "
                         "own tokenizer: exact tempered tails do not survive the alignment "
                         "(use zipf or lump)")
    if len(teachers) > MAX_TEACHERS:
        raise StoreError(f"at most {MAX_TEACHERS} teachers when one has its own tokenizer "
                         f"(the coverage bitmask), got {len(teachers)}")


def check_own_parts(tokens: Store, teachers: Sequence[Store], parts: Sequence[int]) -> None:
    """Refuse, before anything is written, parts whose own-tokens teachers do not cover the
    same texts as the tokens store or whose tokens do not spell them (offsets only)."""
    for part in parts:
        student = None
        for store in teachers:
            if is_own(store):
                student = student or read_student_part(tokens, part)
                check_own_part(student, read_own_part(store, part, student, tokens.attrs, None),
                               part)


def aggregate(
    tokens_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: AggregateConfig,
    *,
    processes: int = 1,
    worker_index: int = 0,
    num_workers: int = 1,
    progress: bool = True,
    pipeline: bool = True,
) -> AggregateSummary:
    """Fuse this worker's pending parts; finalise the target store once every part is in.

    Each local process takes an equal share of the pending parts and, with ``pipeline``, reads
    the next part and commits the previous one in background threads while it fuses the
    current one (the kernels and the I/O release the GIL), so a part's wall time is about the
    larger of its I/O and its computation rather than their sum; at most two parts' inputs and
    outputs are in memory at once. Results do not depend on ``processes`` or ``pipeline``.
    """
    tokens = open_store(tokens_dir, TOKENS, verify="size")
    teachers = open_teachers(tokens, config.teachers)
    check_own_settings(teachers, config)
    vocab = int(tokens.attrs["vocab_size"])
    if config.k_out > vocab:  # refused before the target store is begun
        raise ValueError(f"--k-out {config.k_out} is more than the student's vocabulary of "
                         f"{vocab} ids ({tokens.root})")
    config = fitted_config(config, tokens, teachers)
    if config.source == "samples":
        for t in teachers:
            if SAMPLE_IDS not in t.array_names:
                raise StoreError(f"{t.root} holds no sampled targets (harvest with "
                                 "--num-samples N)")
            if config.sample_head and t.attrs.get("sample_rest"):
                raise StoreError(f"{t.root} is a hybrid (harvest --sample-rest): its head is "
                                 "stored already; drop --sample-head")
            drawn_at = float(t.attrs.get("sample_temperature") or 1.0)
            if config.sample_head and drawn_at != 1.0:  # the head and rest mass are at T = 1
                raise StoreError(f"--sample-head keeps the exact top-H at T = 1, and {t.root} "
                                 f"drew at --sample-temperature {drawn_at:g}: the two would "
                                 "estimate neither distribution (drop --sample-head)")
            if config.sample_head > int(t.attrs.get("k") or 0):
                raise StoreError(f"--sample-head {config.sample_head} is more than the top-k "
                                 f"{t.root} holds (k = {t.attrs.get('k')})")
    elif config.tail_model == "exact":
        check_exact_tails(teachers, config.teacher_temperatures)
    check_task_tags(tokens, config.task_weights)
    header = target_store_header(tokens, teachers, config)
    if any(is_own(t) for t in teachers):
        check_own_parts(tokens, teachers,
                        pending_parts(out, tokens.num_parts, worker_index, num_workers))
    writer = StoreWriter(out, header)
    pending = writer.pending_parts(worker_index, num_workers)
    stats = run_parts(pending, AggregateParts(str(tokens_dir), str(out), config, header),
                      processes=processes, pipeline=pipeline, desc="aggregate",
                      progress=progress)
    complete = writer.finalize()
    return AggregateSummary(tokens.num_parts, len(pending),
                            sum(s["positions"] for s in stats.values()), complete,
                            summarize(out) if complete else {}, config.weights)


def check_exact_tails(teachers: Sequence[Store], temperatures: np.ndarray) -> None:
    """Refuse a teacher that lacks the exact tempered tail at its own temperature (at T = 1
    its tail is the stored tail; a teacher of its own tokenizer is refused elsewhere)."""
    for t, temp in zip(teachers, temperatures, strict=True):
        stored = {float(x) for x in t.attrs.get("temperatures", [])}
        if temp != 1.0 and float(temp) not in stored and not is_own(t):
            raise StoreError(f"tail model 'exact' needs the tempered tail at T = {temp:g} in "
                             f"{t.root} (it holds {sorted(stored) or 'none'}): harvest it with "
                             "--engine hf --temperature T, or choose another --tail-model")


def store_task_tags(tokens: Store) -> set[str]:
    """The task tags the tokens store's sequences carry (``""``, no tag, left out): only the
    metadata's task column is read."""
    meta = tokens.read_meta(columns=["task"])
    return set() if meta is None else set(meta.column("task").to_pylist()) - {"", None}


def check_task_tags(tokens: Store, task_weights: Mapping[str, Sequence[float]]) -> None:
    """Refuse ``--task-weight`` tags that no sequence of the tokens store carries: a typo
    would leave the weights static and the run would pass for the one asked."""
    if not task_weights:
        return
    held = store_task_tags(tokens)
    if not held:
        raise StoreError(f"--task-weight weighs sequences by their task tag, and the tokens "
                         f"store {tokens.root} holds none (tokenize with --task-field or "
                         "--task): drop --task-weight")
    unknown = sorted(set(task_weights) - held)
    if unknown:
        shown = ", ".join(sorted(held)[:20]) + (", …" if len(held) > 20 else "")
        raise StoreError(f"--task-weight tags {unknown} are not tasks of the tokens store "
                         f"{tokens.root}, which holds: {shown}; check the spelling")


def fitted_config(config: AggregateConfig, tokens: Store,
                  teachers: Sequence[Store]) -> AggregateConfig:
    """``config`` with its static weights fitted, when it asks for that.

    The weights maximise the likelihood of the actual next tokens under the untempered
    mixture, over every position of every part (each worker computes the same fit, so their
    headers agree). A teacher of its own tokenizer enters with its aligned log-prob of the
    student's actual token; rows where that is unknown (its fallback rows) are left out of the
    fit for all teachers (``coverage.complete_rows``).
    """
    if not config.fit_weights or config.weights is not None:
        return config
    lp = target_logprobs(teachers, tokens, fit_parts(tokens, config.fit_positions))
    complete = complete_rows(lp, [is_own(t) for t in teachers])
    weights = fit_mixture_weights(lp if complete.all() else lp[complete])
    return replace(config, weights=tuple(float(w) for w in weights))


def fit_parts(tokens: Store, positions: int) -> range:
    """The parts the weights' fit reads: every ``stride``-th, the stride the smallest that
    keeps them within about ``positions`` (all parts of a store that small)."""
    rows = int(tokens.num_rows)
    return range(0, tokens.num_parts, max(math.ceil(rows / positions), 1))


def target_logprobs(teachers: Sequence[Store], tokens: Store | None = None,
                    parts: Sequence[int] | None = None) -> np.ndarray:
    """[N,K]: each teacher's log-prob of the actual next token at every position of
    ``parts`` (default all; aligned to the student's positions for a teacher of its own
    tokenizer, which needs the ``tokens`` store; −inf where unknown)."""
    columns = []
    for store in teachers:
        parts_read = []
        for p in range(store.num_parts) if parts is None else parts:
            if is_own(store):
                if tokens is None:
                    raise ValueError(f"{store.root} has its own tokenizer: aligning its "
                                     "target log-probs needs the tokens store")
                student = read_student_part(tokens, p)
                rows = teacher_rows(store.read_part(p, list(TEACHER_ARRAYS)), store.attrs)
                own = read_own_part(store, p, student, tokens.attrs, rows)
                parts_read.append(align_own_part(student, own, p).rows.target_logprob)
            else:
                parts_read.append(store.read_part(p, [TARGET_LOGPROB])[TARGET_LOGPROB])
        columns.append(np.concatenate(parts_read).astype(np.float64))
    return np.stack(columns, axis=1)


def _attrs(tokens: Store, teachers: Sequence[Store], config: AggregateConfig) -> dict[str, Any]:
    return {
        "tokens_fingerprint": tokens.manifest["checksum"],
        "tokenizer_hash": tokens.attrs["tokenizer_hash"],
        "vocab_size": tokens.attrs["vocab_size"],
        # the teachers are what their manifests hold, not paths (any spelling resumes)
        "teacher_stores": [
            {"teacher": t.attrs.get("teacher"),
             "revision": t.attrs.get("teacher_revision"), "manifest": t.manifest["checksum"]}
            | ({"tokenization": "own", "teacher_tokenizer": t.attrs["teacher_tokenizer"],
                "teacher_tokenizer_hash": t.attrs["teacher_tokenizer_hash"]} if is_own(t)
               else {})
            for t in teachers
        ],
        "config": {k: v for k, v in asdict(config).items() if k != "teachers"},
        "target_source": config.source,  # what the trainer reads: top-k targets or draws
    }


def teacher_rows(batch: Any, attrs: Mapping[str, Any]) -> TeacherRows:
    """A teacher store part as the maths sees it. The store has decoded coded top-k columns
    (q64: int32 ids, float32 log-probs); plain log-probs keep their stored dtype, e.g.
    float16: the tempering converts block by block."""
    tempered = batch.arrays.get(TEMPERED_TAIL_LOGMASS)
    return TeacherRows(
        ids=batch[TOPK_IDS],
        logprobs=batch[TOPK_LOGPROBS],
        tail_logmass=batch[TAIL_LOGMASS].astype(np.float64),
        target_logprob=batch[TARGET_LOGPROB].astype(np.float64),
        tempered_tail_logmass=None if tempered is None else tempered.astype(np.float64),
        temperatures=tuple(attrs.get("temperatures", ())) if tempered is not None else (),
    )


def target_store_header(tokens: Store, teachers: Sequence[Store], config: AggregateConfig
                        ) -> Header:
    """The target store's header: ``config.codec`` (``q64v2``: coded sparse columns in small
    zstd chunks), the label entry's extra column, teacher blocks, and the per-row coverage
    flags when a teacher reads the text with its own tokenizer."""
    width = config.k_out + config.label_entry  # the label entry is one more column
    coded = config.codec == TARGET_CODING
    codec = "zstd" if coded else config.codec
    header = target_header(tokens.num_parts, width, len(teachers),
                           _attrs(tokens, teachers, config),
                           teacher_ks=[t.attrs["k"] for t in teachers]
                           if config.teacher_blocks else (), codec=codec,
                           coding=TARGET_CODING if coded else None)
    if any(is_own(t) for t in teachers):
        header = replace(header, arrays=(*header.arrays, ArraySpec(COVERAGE, "int32", (), codec)))
    return header


def sampled_rows(batch: Any, attrs: Mapping[str, Any], head: int = 0) -> SampledRows:
    """A teacher store part's random-sampling targets (ids of the draws and their counts;
    for a hybrid store, ``attrs.sample_rest``, also its exact top-k head and tail mass; with
    ``head`` > 0, the hybrid's estimator from a plain store's top-k and draws)."""
    if head and not attrs.get("sample_rest"):
        return head_and_draws(batch[TOPK_IDS], batch[TOPK_LOGPROBS], batch[SAMPLE_IDS],
                              batch[SAMPLE_COUNTS], int(attrs["num_samples"]), head)
    if not attrs.get("sample_rest"):
        return SampledRows(ids=batch[SAMPLE_IDS], counts=batch[SAMPLE_COUNTS],
                           num_samples=int(attrs["num_samples"]))
    return SampledRows(ids=batch[SAMPLE_IDS], counts=batch[SAMPLE_COUNTS],
                       num_samples=int(attrs["num_samples"]), head_ids=batch[TOPK_IDS],
                       head_probs=np.exp(batch[TOPK_LOGPROBS].astype(np.float64)),
                       rest_mass=np.exp(batch[TAIL_LOGMASS].astype(np.float64)))


def own_rows(rows: TeacherRows | SampledRows, batch: Any) -> TeacherRows:
    """What is aligned of a teacher of its own tokenizer: its top-k rows, or its draws as
    estimated rows (``own_samples.estimated_rows``)."""
    if isinstance(rows, TeacherRows):
        return rows
    return estimated_rows(rows, batch[NEXT_ID], batch[TARGET_LOGPROB].astype(np.float64))


@dataclass
class _PartInputs:
    """One part's teacher rows, sequence boundaries and per-row task index; with teachers of
    their own tokenizer, the student's tokens and those teachers' rows before alignment
    (``own``: by teacher index; ``rows`` holds their unaligned rows until ``compute``)."""

    part: int
    rows: list[TeacherRows] | list[SampledRows]
    offsets: np.ndarray
    seq_ids: np.ndarray
    task_index: np.ndarray
    labels: np.ndarray | None = None  # the actual next token of every row (label entry, CE)
    student: StudentPart | None = None
    own: dict[int, OwnTeacherPart] = field(default_factory=dict)


def _read_part(tokens_dir: str, config: AggregateConfig, part: int) -> _PartInputs:
    tokens = open_store(tokens_dir, TOKENS, verify="none")
    teachers = [open_store(t, TEACHER, verify="none") for t in config.teachers]
    for store in (tokens, *teachers):  # sha256 of what this part reads: each file hashed once
        store.verify_part(part)
    student = read_student_part(tokens, part) if any(map(is_own, teachers)) else None
    rows, ref, ref_root, own = [], None, None, {}
    for j, store in enumerate(teachers):
        names = list(SAMPLE_ARRAYS if config.source == "samples" else TEACHER_ARRAYS)
        if config.source == "samples" and store.attrs.get("sample_rest"):
            names += [TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGMASS]  # the hybrid's exact head
        elif config.source == "samples" and config.sample_head:
            names += [TOPK_IDS, TOPK_LOGPROBS]
        if config.source == "samples" and is_own(store):
            names += [NEXT_ID, TARGET_LOGPROB]  # the actual token stays exact (own_samples)
        if TEMPERED_TAIL_LOGMASS in store.array_names and config.source == "topk" \
                and not is_own(store):
            names.append(TEMPERED_TAIL_LOGMASS)
        batch = store.read_part(part, names)
        rows.append(sampled_rows(batch, store.attrs, config.sample_head)
                    if config.source == "samples"
                    else teacher_rows(batch, store.attrs))
        if student is not None and is_own(store):
            aligned = own_rows(rows[-1], batch)
            own[j] = read_own_part(store, part, student, tokens.attrs, aligned)
            if aligned is not rows[-1]:  # estimated rows: keep every entry (up to V) aligned
                own[j] = replace(own[j], k=min(aligned.k, own[j].student_size))
        elif ref is None:
            ref, ref_root = batch, store.root
        elif not np.array_equal(batch.offsets, ref.offsets):
            raise StoreError(f"{store.root} part {part}: sequences differ from {ref_root}")
    if student is not None:
        if ref is not None and not np.array_equal(ref.offsets, student.spans.row_offsets):
            raise StoreError(f"{ref_root} part {part}: its rows are not the tokens store's "
                             "(L − 1 per sequence)")
        offsets, seq_ids = student.spans.row_offsets, student.seq_ids
    else:
        assert ref is not None
        offsets, seq_ids = ref.offsets, ref.seq_ids
    lengths = np.diff(offsets)
    tags = sorted(config.task_weights)
    seq_task = np.full(len(lengths), len(tags), dtype=np.int64)
    meta = tokens.read_meta(part) if tags else None
    if meta is not None and "task" in meta.column_names:
        lookup = {t: i for i, t in enumerate(tags)}
        seq_task = np.array([lookup.get(t, len(tags)) for t in meta.column("task").to_pylist()],
                            dtype=np.int64)
    labels = None if student is None else student.labels
    if config.label_entry and student is None:
        tok = tokens.read_part(part, [TOKEN_IDS])
        labels = np.delete(tok[TOKEN_IDS], tok.offsets[:-1])  # row j of a sequence: token j+1
        if len(labels) != offsets[-1]:
            raise StoreError(f"part {part}: {len(labels)} labels for {offsets[-1]} rows")
    return _PartInputs(part, rows, offsets, seq_ids, np.repeat(seq_task, lengths), labels,
                       student, own)


def _fuse_part(inputs: _PartInputs, config: AggregateConfig, vocab_size: int
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The part's fused targets, and the coverage counts for its commit record (none when
    every teacher is in the student's tokens)."""
    weights = config.policy(inputs.task_index, inputs.offsets)
    rows = inputs.rows
    aligned = _align(inputs)
    if config.source == "samples" and aligned is not None:
        assert inputs.labels is not None
        return fuse_own_samples(rows, aligned, weights, config.k_out,  # type: ignore[arg-type]
                                vocab_size, inputs.labels)
    if config.source == "samples":
        fused = fuse_samples(rows, weights, config.k_out, vocab_size)  # type: ignore[arg-type]
        return _label_entry(fused, rows, inputs.labels), {}
    if aligned is not None:
        return _fuse_covered(inputs, aligned, weights, config, vocab_size)
    fused = fuse(rows, weights, config.teacher_temperatures,
                 get_operator(config.operator, **config.operator_params), config.tail_model,
                 config.k_out, vocab_size, keep_teacher_blocks=config.teacher_blocks,
                 imputation=config.imputation)
    return _label_entry(fused, rows, inputs.labels), {}


def _label_entry(fused: dict[str, np.ndarray], rows: Sequence[Any],
                 labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """``fused`` with the label entry added when ``labels`` are given (``--label-entry``)."""
    if labels is not None:
        p_label = np.stack([np.exp(r.target_logprob) for r in rows], axis=1)
        label_probs = np.einsum("nk,nk->n", fused["weights"].astype(np.float64), p_label)
        fused["ids"], fused["probs"], fused["tail_mass"] = add_label_entry(
            fused["ids"], fused["probs"], fused["tail_mass"], labels, label_probs)
    return fused


def _align(inputs: _PartInputs) -> list[AlignedRows | None] | None:
    """Each teacher of its own tokenizer aligned to the student's positions (None for the
    others); None when there is none."""
    if not inputs.own:
        return None
    assert inputs.student is not None
    return [align_own_part(inputs.student, inputs.own[j], inputs.part) if j in inputs.own
            else None for j in range(len(inputs.rows))]


def _fuse_covered(inputs: _PartInputs, aligned: Sequence[AlignedRows | None],
                  weights: Any, config: AggregateConfig, vocab_size: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fusion with teachers that do not cover every row (``coverage``): masked weights, rows
    missing a teacher fused from the others alone, the CE fallback where none is left."""
    assert inputs.labels is not None
    n = len(inputs.labels)
    covered = np.stack([np.ones(n, bool) if a is None else covered_rows(a) for a in aligned],
                       axis=1)
    rows = [fill_placeholders(r if a is None else a.rows, covered[:, j])
            for j, (r, a) in enumerate(zip(inputs.rows, aligned, strict=True))]
    masked = MaskedWeights(weights, covered, np.array([a is not None for a in aligned]),
                           inputs.offsets)
    op = get_operator(config.operator, **config.operator_params)
    temps = config.teacher_temperatures

    def fuse_rows(some: list[TeacherRows], w: np.ndarray | MaskedWeights,
                  cols: np.ndarray | slice = slice(None), keep: bool = False
                  ) -> dict[str, np.ndarray]:
        return fuse(some, w, temps[cols], op, config.tail_model, config.k_out,
                    vocab_size, keep_teacher_blocks=keep, imputation=config.imputation)

    fused = fuse_rows(rows, masked if callable(weights) else masked.static(),
                      keep=config.teacher_blocks)
    assert masked.weights is not None
    fuse_partial_rows(fused, rows, masked.weights, covered, fuse_rows)
    fused = _label_entry(fused, rows, inputs.labels if config.label_entry else None)
    one_hot(fused, uncovered(masked.weights, covered), inputs.labels)
    fused[COVERAGE] = coverage_bits(covered)
    return fused, coverage_stats(aligned, covered, masked.weights)


@dataclass
class _PartOutputs:
    """One part's fused targets, the sequence boundaries they are committed with, and counts
    for its commit record beyond the diagnostics' (coverage)."""

    part: int
    offsets: np.ndarray
    seq_ids: np.ndarray
    fused: dict[str, np.ndarray]
    stats: dict[str, Any] = field(default_factory=dict)


def _write_part(out: str, header: Header, outputs: _PartOutputs) -> dict[str, Any]:
    writer = StoreWriter(out, header)
    names = [a.name for a in writer.header.arrays]
    with writer.open_part(outputs.part) as pw:
        pw.stats = part_stats(outputs.fused) | outputs.stats
        pw.append({n: outputs.fused[n] for n in names}, np.diff(outputs.offsets),
                  outputs.seq_ids)
    return pw.stats


@dataclass(frozen=True)
class AggregateParts:
    """Aggregation as a part job: read the teachers' rows, fuse them, commit the targets.

    Picklable (paths, not open stores): each local process opens what it reads itself.
    """

    tokens_dir: str
    out: str
    config: AggregateConfig
    header: Header

    def read(self, part: int) -> _PartInputs:
        return _read_part(self.tokens_dir, self.config, part)

    def compute(self, part: int, inputs: _PartInputs) -> _PartOutputs:
        fused, stats = _fuse_part(inputs, self.config, int(self.header.attrs["vocab_size"]))
        return _PartOutputs(part, inputs.offsets, inputs.seq_ids, fused, stats)

    def write(self, part: int, outputs: _PartOutputs) -> dict[str, Any]:
        return _write_part(self.out, self.header, outputs)
