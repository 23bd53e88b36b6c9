"""``mtkd aggregate``: K teacher stores over one tokens store → one target store, part by part.

This is the I/O shell around :func:`~.fuse.fuse`: it checks that the teachers can be
fused (same tokens store, same tokenizer, complete), builds each part's weight policy from the
tokens store's task tags and sequence boundaries, fuses, and commits the part. Parts are
independent, so workers (local processes or machines) share them like harvest does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from mtkd.distill.aggregate.fuse import IMPUTATIONS, add_label_entry, fuse
from mtkd.distill.aggregate.operators import get_operator
from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples
from mtkd.distill.aggregate.tails import get_tail_model
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.distill.aggregate.weights import (
    SUM_TOL,
    AdaptiveWeights,
    fit_mixture_weights,
    validate_temperatures,
    validate_weights,
)
from mtkd.store import Header, Store, StoreError, StoreWriter, open_store
from mtkd.store.executor import run_parts
from mtkd.store.schema import TARGET, TEACHER, TOKENS, check_aligned, target_header

TEACHER_ARRAYS = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob")
SAMPLE_ARRAYS = ("sample_ids", "sample_counts")
SOURCES = ("topk", "samples")
STORED_DIAGNOSTICS = ("jensen_gap", "disagreement")


@dataclass(frozen=True)
class AggregateConfig:
    """Everything that decides the targets; every worker of one target store must agree on it.

    ``weights`` are static per-teacher priors (sum to 1); adaptive weighting multiplies them by
    token-level (``token``: entropy | target), task-level (``task_weights``: task tag → K
    factors) and context-level (``context``: loss) factors and renormalises
    (product-structure normalisation). ``safety`` names the safety teacher, whose weight never
    drops below ``safety_floor`` (default: its static weight). ``imputation``: how a teacher's
    mass on a union id outside its top-k is imputed (``fuse.impute_logs``: "even" share of its
    tail, or "rank": the id takes its next ranks under a Zipf fit). ``source="samples"`` fuses
    the teachers' random-sampling targets (harvested with ``--num-samples``) instead of their
    top-k: static weights and the linear operator at temperature 1 only (see
    :mod:`mtkd.distill.aggregate.sampled`). ``label_entry`` stores the actual next token's exact
    probability in one more column wherever the support lacks it
    (:func:`~mtkd.distill.aggregate.fuse.add_label_entry`; linear operator at temperature 1).
    """

    teachers: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    fit_weights: bool = False  # static weights fitted by maximum likelihood (see fitted_config)
    temperatures: tuple[float, ...] | None = None
    operator: Literal["linear", "geometric", "power_mean"] = "linear"
    alpha: float = 0.5
    tail_model: Literal["renormalise", "lump", "zipf", "exact"] = "lump"
    k_out: int = 64
    token: Literal["none", "entropy", "target"] = "none"
    token_sharpness: float = 1.0
    task_weights: Mapping[str, Sequence[float]] = field(default_factory=dict)
    context: Literal["none", "loss"] = "none"
    context_sharpness: float = 1.0
    eps: float = 0.0
    safety: int | None = None
    safety_floor: float | None = None
    teacher_blocks: bool = False
    imputation: Literal["even", "rank"] = "even"
    source: Literal["topk", "samples"] = "topk"
    label_entry: bool = False
    codec: Literal["raw", "zstd"] = "raw"  # of the target store (see schema.target_header)

    def __post_init__(self) -> None:
        k = len(self.teachers)
        if k == 0:
            raise ValueError("aggregate needs at least one teacher store")
        if self.weights is not None and len(self.weights) == k \
                and np.isfinite(self.weights).all() and abs(sum(self.weights) - 1) > SUM_TOL:
            raise ValueError(f"weights {','.join(f'{w:g}' for w in self.weights)} sum to "
                             f"{sum(self.weights):g}; give {k} weights that sum to 1")
        validate_weights(self.static_weights, k)
        validate_temperatures(self.teacher_temperatures, k)
        get_operator(self.operator, **self.operator_params)
        get_tail_model(self.tail_model)
        if self.imputation not in IMPUTATIONS:
            raise ValueError(f"unknown imputation {self.imputation!r}; "
                             f"choose one of {list(IMPUTATIONS)}")
        if self.k_out < 1:
            raise ValueError(f"k_out must be >= 1, got {self.k_out}")
        if self.safety is not None and not 0 <= self.safety < k:
            raise ValueError(f"safety teacher index {self.safety} is not in [0, {k})")
        for tag, factors in self.task_weights.items():
            if len(factors) != k or any(not np.isfinite(f) or f < 0 for f in factors):
                raise ValueError(f"task weights for {tag!r} must be {k} finite factors >= 0")
            if not any(f > 0 for f in factors):
                raise ValueError(f"task weights for {tag!r} need a positive factor "
                                 "(every teacher would get weight 0)")
        # the policy validates its own fields (token/context names, sharpness)
        self.policy(np.zeros(1, np.int64), np.zeros(2, np.int64))
        tempered = bool(np.any(self.teacher_temperatures != 1))
        if self.label_entry and (self.operator != "linear" or self.source != "topk" or tempered):
            raise ValueError("the label entry is for top-k targets fused by the linear operator "
                             "at temperature 1 (the stores hold each teacher's untempered "
                             "p(label))")
        if self.codec not in ("raw", "zstd"):
            raise ValueError(f"unknown codec {self.codec!r}; choose raw or zstd")
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; choose one of {list(SOURCES)}")
        if self.source == "samples":
            unsupported = [name for name, bad in (
                ("operator " + self.operator, self.operator != "linear"),
                ("temperatures other than 1", tempered),
                ("adaptive or safety weights", self.adaptive or self.safety is not None),
                ("teacher blocks", self.teacher_blocks),
            ) if bad]
            if unsupported:
                raise ValueError("sampled targets are fused linearly with static weights at "
                                 "temperature 1 (the sampling temperature is the harvest's); "
                                 f"not supported with: {', '.join(unsupported)}")

    @property
    def static_weights(self) -> np.ndarray:
        k = len(self.teachers)
        return np.full(k, 1.0 / k) if self.weights is None else np.asarray(self.weights, float)

    @property
    def teacher_temperatures(self) -> np.ndarray:
        k = len(self.teachers)
        return np.ones(k) if self.temperatures is None else np.asarray(self.temperatures, float)

    @property
    def operator_params(self) -> dict[str, float]:
        return {"alpha": self.alpha} if self.operator == "power_mean" else {}

    @property
    def adaptive(self) -> bool:
        return self.token != "none" or bool(self.task_weights) or self.context != "none"

    def policy(self, task_index: np.ndarray, seq_offsets: np.ndarray
               ) -> AdaptiveWeights | np.ndarray:
        """The weights of one part: static, or an adaptive policy over its rows."""
        if not self.adaptive and self.safety is None:
            return self.static_weights
        table = None
        if self.task_weights:
            tags = sorted(self.task_weights)
            table = np.array([self.task_weights[t] for t in tags] + [[1.0] * len(self.teachers)])
        return AdaptiveWeights(
            base=tuple(self.static_weights),
            token=self.token,
            token_sharpness=self.token_sharpness,
            task_table=table,
            task_index=task_index if table is not None else None,
            context=self.context,
            context_sharpness=self.context_sharpness,
            seq_offsets=seq_offsets,
            eps=self.eps,
            safety_index=self.safety,
            safety_floor=self.safety_floor,
        )


@dataclass
class AggregateSummary:
    parts: int
    parts_written: int
    positions: int
    complete: bool
    diagnostics: dict[str, float] = field(default_factory=dict)


def open_teachers(tokens: Store, teacher_dirs: Sequence[str | os.PathLike[str]]) -> list[Store]:
    """Open the teacher stores and refuse any that cannot be fused with the others."""
    stores = []
    for path in teacher_dirs:
        # sizes here; each part's sha256 when a worker reads it (_read_part)
        store = open_store(path, TEACHER, verify="size")
        check_aligned(tokens, store)
        if store.attrs.get("tokenizer_hash") != tokens.attrs.get("tokenizer_hash"):
            raise StoreError(f"{path} was harvested with a different tokenizer than {tokens.root}")
        stores.append(store)
    return stores


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
    config = fitted_config(config, teachers)
    if config.source == "samples":
        for t in teachers:
            if "sample_ids" not in t.array_names:
                raise StoreError(f"{t.root} holds no sampled targets (harvest with --engine hf "
                                 "--num-samples N)")
    elif config.tail_model == "exact":
        for t in teachers:
            # T = 1 needs nothing stored: its tail is the stored tail
            wanted = {float(x) for x in config.teacher_temperatures if x != 1.0}
            missing = wanted - {float(x) for x in t.attrs.get("temperatures", [])}
            if missing:
                raise StoreError(f"tail model 'exact' needs tempered tails at {sorted(missing)} "
                                 f"in {t.root} (harvest with --engine hf --temperature T)")
    width = config.k_out + config.label_entry  # the label entry is one more column
    header = target_header(tokens.num_parts, width, len(teachers),
                           _attrs(tokens, teachers, config),
                           teacher_ks=[t.attrs["k"] for t in teachers]
                           if config.teacher_blocks else (), codec=config.codec)
    writer = StoreWriter(out, header)
    pending = writer.pending_parts(worker_index, num_workers)
    groups = [pending[i::processes] for i in range(max(1, min(processes, len(pending))))]
    work = partial(_aggregate_parts, str(tokens_dir), str(out), config, header, groups,
                   pipeline=pipeline)
    if len(groups) == 1:
        stats = work(0, progress=progress)
    else:
        done = run_parts(range(len(groups)), work, processes=len(groups), desc="aggregate",
                         progress=progress)
        stats = {p: s for group in done.values() for p, s in group.items()}
    complete = writer.finalize()
    return AggregateSummary(tokens.num_parts, len(pending),
                            sum(s["positions"] for s in stats.values()), complete,
                            summarize(out) if complete else {})


def fitted_config(config: AggregateConfig, teachers: Sequence[Store]) -> AggregateConfig:
    """``config`` with its static weights fitted, when it asks for that.

    The weights maximise the likelihood of the actual next tokens under the untempered
    mixture, over every position of every part (each worker computes the same fit, so their
    headers agree).
    """
    if not config.fit_weights or config.weights is not None:
        return config
    weights = fit_mixture_weights(target_logprobs(teachers))
    return replace(config, weights=tuple(float(w) for w in weights))


def target_logprobs(teachers: Sequence[Store]) -> np.ndarray:
    """[N,K]: each teacher's log-prob of the actual next token at every position, all parts."""
    columns = []
    for store in teachers:
        parts = [store.read_part(p, ["target_logprob"])["target_logprob"]
                 for p in range(store.num_parts)]
        columns.append(np.concatenate(parts).astype(np.float64))
    return np.stack(columns, axis=1)


def _attrs(tokens: Store, teachers: Sequence[Store], config: AggregateConfig) -> dict[str, Any]:
    return {
        "tokens_fingerprint": tokens.manifest["checksum"],
        "tokenizer_hash": tokens.attrs["tokenizer_hash"],
        "vocab_size": tokens.attrs["vocab_size"],
        "teacher_stores": [
            {"path": str(Path(t.root).resolve()), "teacher": t.attrs.get("teacher"),
             "revision": t.attrs.get("teacher_revision"), "manifest": t.manifest["checksum"]}
            for t in teachers
        ],
        "config": asdict(config) | {"teachers": list(config.teachers)},
    }


def teacher_rows(batch: Any, attrs: Mapping[str, Any]) -> TeacherRows:
    """A teacher store part as the maths sees it. The store has decoded coded top-k columns
    (q64: int32 ids, float32 log-probs); plain log-probs keep their stored dtype, e.g.
    float16: the tempering converts block by block."""
    tempered = batch.arrays.get("tempered_tail_logmass")
    return TeacherRows(
        ids=batch["topk_ids"],
        logprobs=batch["topk_logprobs"],
        tail_logmass=batch["tail_logmass"].astype(np.float64),
        target_logprob=batch["target_logprob"].astype(np.float64),
        tempered_tail_logmass=None if tempered is None else tempered.astype(np.float64),
        temperatures=tuple(attrs.get("temperatures", ())) if tempered is not None else (),
    )


def sampled_rows(batch: Any, attrs: Mapping[str, Any]) -> SampledRows:
    """A teacher store part's random-sampling targets (ids of the draws and their counts)."""
    return SampledRows(ids=batch["sample_ids"], counts=batch["sample_counts"],
                       num_samples=int(attrs["num_samples"]))


@dataclass
class _PartInputs:
    """One part's teacher rows, sequence boundaries and per-row task index."""

    part: int
    rows: list[TeacherRows] | list[SampledRows]
    offsets: np.ndarray
    seq_ids: np.ndarray
    task_index: np.ndarray
    labels: np.ndarray | None = None  # the actual next token of every row (label_entry only)


def _read_part(tokens_dir: str, config: AggregateConfig, part: int) -> _PartInputs:
    tokens = open_store(tokens_dir, TOKENS, verify="none")
    teachers = [open_store(t, TEACHER, verify="none") for t in config.teachers]
    for store in (tokens, *teachers):  # sha256 of what this part reads: each file hashed once
        store.verify_part(part)
    rows, ref = [], None
    for store in teachers:
        names = list(SAMPLE_ARRAYS if config.source == "samples" else TEACHER_ARRAYS)
        if "tempered_tail_logmass" in store.array_names and config.source == "topk":
            names.append("tempered_tail_logmass")
        batch = store.read_part(part, names)
        if ref is None:
            ref = batch
        elif not np.array_equal(batch.offsets, ref.offsets):
            raise StoreError(f"{store.root} part {part}: sequences differ from {teachers[0].root}")
        rows.append(sampled_rows(batch, store.attrs) if config.source == "samples"
                    else teacher_rows(batch, store.attrs))
    assert ref is not None
    lengths = np.diff(ref.offsets)
    tags = sorted(config.task_weights)
    seq_task = np.full(len(lengths), len(tags), dtype=np.int64)
    meta = tokens.read_meta(part) if tags else None
    if meta is not None and "task" in meta.column_names:
        lookup = {t: i for i, t in enumerate(tags)}
        seq_task = np.array([lookup.get(t, len(tags)) for t in meta.column("task").to_pylist()],
                            dtype=np.int64)
    labels = None
    if config.label_entry:
        tok = tokens.read_part(part, ["token_ids"])
        labels = np.delete(tok["token_ids"], tok.offsets[:-1])  # row j of a sequence: token j+1
        if len(labels) != ref.offsets[-1]:
            raise StoreError(f"part {part}: {len(labels)} labels for {ref.offsets[-1]} rows")
    return _PartInputs(part, rows, ref.offsets, ref.seq_ids, np.repeat(seq_task, lengths),
                       labels)


def _fuse_part(inputs: _PartInputs, config: AggregateConfig, vocab_size: int
               ) -> dict[str, np.ndarray]:
    weights = config.policy(inputs.task_index, inputs.offsets)
    if config.source == "samples":
        fused = fuse_samples(inputs.rows, weights, config.k_out, vocab_size)  # type: ignore[arg-type]
    else:
        fused = fuse(inputs.rows, weights, config.teacher_temperatures,
                     get_operator(config.operator, **config.operator_params), config.tail_model,
                     config.k_out, vocab_size, keep_teacher_blocks=config.teacher_blocks,
                     imputation=config.imputation)
    if inputs.labels is not None:
        p_label = np.stack([np.exp(r.target_logprob) for r in inputs.rows], axis=1)  # type: ignore[union-attr]
        label_probs = np.einsum("nk,nk->n", fused["weights"].astype(np.float64), p_label)
        fused["ids"], fused["probs"], fused["tail_mass"] = add_label_entry(
            fused["ids"], fused["probs"], fused["tail_mass"], inputs.labels, label_probs)
    return fused


def _write_part(out: str, header: Header, inputs: _PartInputs, fused: Mapping[str, np.ndarray]
                ) -> dict[str, Any]:
    writer = StoreWriter(out, header)
    names = [a.name for a in writer.header.arrays]
    with writer.open_part(inputs.part) as pw:
        pw.stats = part_stats(fused)
        pw.append({n: fused[n] for n in names}, np.diff(inputs.offsets), inputs.seq_ids)
    return pw.stats


def _aggregate_part(tokens_dir: str, out: str, config: AggregateConfig, header: Header,
                    part: int) -> dict[str, Any]:
    """Read, fuse and commit one part."""
    inputs = _read_part(tokens_dir, config, part)
    fused = _fuse_part(inputs, config, int(header.attrs["vocab_size"]))
    return _write_part(out, header, inputs, fused)


def _aggregate_parts(tokens_dir: str, out: str, config: AggregateConfig, header: Header,
                     groups: Sequence[Sequence[int]], group: int, *, pipeline: bool = True,
                     progress: bool = False) -> dict[int, dict[str, Any]]:
    """Read, fuse and commit the parts ``groups[group]`` in order; with ``pipeline``, part
    i+1 is read and part i−1 committed in background threads while part i is fused."""
    parts = list(groups[group])
    vocab = int(header.attrs["vocab_size"])
    bar = tqdm(total=len(parts), desc="aggregate", unit="part",
               disable=not progress or not parts)
    stats: dict[int, dict[str, Any]] = {}
    if not pipeline:
        for part in parts:
            stats[part] = _aggregate_part(tokens_dir, out, config, header, part)
            bar.update()
        bar.close()
        return stats
    with ThreadPoolExecutor(2, thread_name_prefix="aggregate-io") as io:
        reading = io.submit(_read_part, tokens_dir, config, parts[0]) if parts else None
        writing: Future | None = None
        for i in range(len(parts)):
            assert reading is not None
            inputs = reading.result()
            if i + 1 < len(parts):
                reading = io.submit(_read_part, tokens_dir, config, parts[i + 1])
            fused = _fuse_part(inputs, config, vocab)
            if writing is not None:
                stats[parts[i - 1]] = writing.result()
                bar.update()
            writing = io.submit(_write_part, out, header, inputs, fused)
            del inputs, fused
        if writing is not None:
            stats[parts[-1]] = writing.result()
            bar.update()
    bar.close()
    return stats


def part_stats(fused: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Sums and histograms of the diagnostics, combined over parts by :func:`summarize`."""
    n = len(fused["tail_mass"])
    stats: dict[str, Any] = {"positions": n}
    for name in ("jensen_gap", "disagreement", "n_eff", "tail_mass"):
        stats[f"sum_{name}"] = float(np.sum(fused[name], dtype=np.float64))
    stats["sum_weights"] = np.sum(fused["weights"], axis=0, dtype=np.float64).tolist()
    return stats


def summarize(out: str | os.PathLike[str]) -> dict[str, float]:
    """Mean diagnostics over the whole target store, from the parts' commit records."""
    store = open_store(out, TARGET, verify="none")
    totals: dict[str, Any] = {}
    for p in range(store.num_parts):
        for key, value in store.part_stats(p).items():
            totals[key] = np.add(totals.get(key, 0), value)
    n = max(int(totals.get("positions", 0)), 1)
    summary = {k.removeprefix("sum_"): float(v) / n for k, v in totals.items()
               if k.startswith("sum_") and np.ndim(v) == 0}
    for j, w in enumerate(np.atleast_1d(totals.get("sum_weights", []))):
        summary[f"mean_weight_{j}"] = float(w) / n
    summary["positions"] = float(totals.get("positions", 0))
    return summary
