"""Training data: packed rows of tokens with aligned sparse targets, streamed from stores.

* **Rows and targets.** A sequence of L tokens has L−1 target rows; target row j is the
  distribution of token j+1 (the student's logits row j). A packed batch holds ``batch_size``
  rows of ``seq_len`` tokens; every token position p carries the label (the next token of its
  own sequence, −100 at a sequence's last token and on padding) and, when distilling, the
  target row of that position (support padded with id −1 where there is none, so the loss
  ignores it).
* **Packing.** Sequences are placed whole, in shuffled order, first-fit into a window of
  ``open_rows`` partly filled rows (the oldest is closed when a new one is needed and the
  window is full; 32 rows fill ~93% for lengths uniform in [50, seq_len], packing 1M
  sequences takes ~2 s per epoch in Python, in the prefetch thread). A sequence longer than
  ``seq_len`` is cut into pieces of ``seq_len`` tokens; the last token of a piece keeps its
  label (the next token of the sequence is known even though it sits in another row), so no
  target is lost — only the context before a cut. Position ids restart at 0 for every piece
  and are 0 on padding; called with no attention mask and ``use_cache=False`` (with a cache
  it skips this), transformers 5 (sdpa / eager / flex) reads restarting position ids as
  packed sequences and builds a block-diagonal causal mask, so nothing attends across a
  packing boundary (tested for Llama).
* **Epochs.** The plan of an epoch is a pure function of (sequence lengths, seed, epoch): the
  permutation comes from ``numpy.random.default_rng([seed, epoch])``. The loader's state is
  ``(epoch, index)`` — the next batch this rank delivers — so resuming recomputes the plan
  and skips nothing and repeats nothing.
* **Sharding.** The rows of an epoch are cut into micro-batches of ``batch_size`` rows, the
  count padded with empty rows to a multiple of ``world_size``; micro-batch m goes to rank
  m mod world_size. Ranks are disjoint, cover every row, and get the same number of batches;
  one process with ``batch_size × world_size`` rows sees exactly the same rows per step.
* **Held-out split.** By document: a sequence is held out when a 64-bit hash of its doc_id
  (the tokens store's metadata; the sequence id when there is none) falls below
  ``fraction``, so windows of one document never straddle the split and the split does not
  depend on the seed. An explicit held-out tokens store can be used instead (trainer option).
* **Bytes.** A loader built with ``count_bytes`` (held-out evaluation, over a tokens store
  with ``byte_end``) also gives every label the UTF-8 bytes of its token, for bits per byte
  (:mod:`~mtkd.distill.train.bits_per_byte`); training loaders read no more than the ids.
* **Reads** are batched: one ``Store.read`` per store per batch, over the batch's sequences.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from mtkd.distill.train.bits_per_byte import token_bytes
from mtkd.distill.train.targets import IGNORE_INDEX, SparseTargets
from mtkd.store import Store, StoreError
from mtkd.store.schema import BYTE_END, check_aligned, require_byte_ends, teacher_block

T = TypeVar("T")


@dataclass
class PackedBatch:
    """One rank's micro-batch: ``[B, T]`` tensors plus targets aligned to the positions."""

    input_ids: Tensor  # [B,T] int64 (padding: pad_id)
    position_ids: Tensor  # [B,T] int64, restarting at 0 per packed piece, 0 on padding
    labels: Tensor  # [B,T] int64, the next token of the same sequence or −100
    targets: SparseTargets | None  # fused targets, ids [B,T,m] (padding −1)
    teachers: list[SparseTargets] | None  # per-teacher blocks for L_multi
    teacher_weights: Tensor | None  # [B,T,K]
    jensen_gap: Tensor | None  # [B,T]
    num_tokens: int  # real (non-padding) tokens
    epoch: int
    index: int  # this rank's batch index within the epoch
    label_bytes: Tensor | None = None  # [B,T] int64: UTF-8 bytes of each label (0: none)

    @property
    def num_labels(self) -> int:
        """Positions that have a next token (and so count in the losses)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        """Copy the tensors to ``device``."""

        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device, non_blocking=True)

        return PackedBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.labels.to(device),
            self.targets.to(device) if self.targets is not None else None,
            [t.to(device) for t in self.teachers] if self.teachers is not None else None,
            move(self.teacher_weights),
            move(self.jensen_gap),
            self.num_tokens,
            self.epoch,
            self.index,
            move(self.label_bytes),
        )


@dataclass
class LoaderState:
    """Where a loader resumes: the next batch ``index`` of ``epoch`` (per rank)."""

    epoch: int = 0
    index: int = 0

    @classmethod
    def following(cls, batch: PackedBatch) -> LoaderState:
        """The state once ``batch`` has been consumed."""
        return cls(batch.epoch, batch.index + 1)


@dataclass(frozen=True)
class EpochPlan:
    """Segments of an epoch sorted by (row, col): ``length`` tokens of store sequence ``seq``
    starting at token ``start`` are placed at ``row``, columns ``col`` onwards."""

    row: np.ndarray
    col: np.ndarray
    seq: np.ndarray
    start: np.ndarray
    length: np.ndarray
    num_rows: int


def pack(lengths: np.ndarray, seq_len: int, open_rows: int = 32) -> tuple[np.ndarray, ...]:
    """First-fit packing of items of ``lengths`` tokens into rows of ``seq_len``.

    Items longer than ``seq_len`` are cut into pieces. Returns the arrays ``(row, col, item,
    start, length)`` of the segments, sorted by (row, col); rows are numbered in the order
    they were opened.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2, got {seq_len}")
    segs: list[tuple[int, int, int, int, int]] = []
    open_: list[list[int]] = []  # [row, used]
    n_rows = 0
    for item, n_tok in enumerate(lengths.tolist()):
        for start in range(0, n_tok, seq_len):
            n = min(seq_len, n_tok - start)
            slot = next((s for s in open_ if s[1] + n <= seq_len), None)
            if slot is None:
                if len(open_) >= open_rows:
                    open_.pop(0)
                slot = [n_rows, 0]
                n_rows += 1
                open_.append(slot)
            segs.append((slot[0], slot[1], item, start, n))
            slot[1] += n
            if slot[1] == seq_len:
                open_.remove(slot)
    arr = np.array(segs, dtype=np.int64).reshape(-1, 5)
    arr = arr[np.lexsort((arr[:, 1], arr[:, 0]))]
    return tuple(arr[:, i] for i in range(5))


def _expand(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment index, offset within the segment) of every element of ragged ``lengths``."""
    seg = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return seg, np.arange(int(lengths.sum()), dtype=np.int64) - starts[seg]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-mixed, platform-independent 64-bit hash of int keys."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def heldout_split(tokens: Store, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) store-order sequence indices, split by a hash of the doc_id."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    keys = tokens.seq_ids
    meta = tokens.read_meta()
    if meta is not None and "doc_id" in meta.column_names and meta.num_rows == len(keys):
        keys = meta.column("doc_id").to_numpy().astype(np.int64)
    with np.errstate(over="ignore"):
        u = (_mix64(keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    held = u < fraction
    return np.flatnonzero(~held), np.flatnonzero(held)


def token_budget(tokens: Store, indices: np.ndarray | None, max_tokens: int | None,
                 seed: int) -> np.ndarray | None:
    """A seeded random subset of ``indices`` (all sequences if None) holding ≤ ``max_tokens``
    tokens: the same data budget for every run that shares the seed."""
    if max_tokens is None:
        return indices
    pool = np.arange(tokens.num_sequences) if indices is None else np.asarray(indices)
    order = np.random.default_rng(seed).permutation(pool)
    keep = np.cumsum(tokens.seq_lengths[order]) <= max_tokens
    if not keep.any():
        raise ValueError(f"max_tokens {max_tokens} is smaller than one sequence")
    return np.sort(order[keep])


def open_targets(tokens: Store, targets: Store) -> int:
    """Check that a target store was built over ``tokens``; return its number of teacher blocks."""
    check_aligned(tokens, targets)
    if not (np.array_equal(targets.seq_ids, tokens.seq_ids)
            and np.array_equal(targets.seq_lengths, np.maximum(tokens.seq_lengths - 1, 0))):
        raise StoreError(f"{targets.root}: sequences do not match {tokens.root} "
                         "(each sequence of L tokens needs L−1 target rows)")
    return int(targets.attrs.get("num_teachers", 0)) if targets.attrs.get("teacher_blocks") else 0


class PackedLoader:
    """Packed, shuffled, rank-sharded batches over a tokens store (+ an aligned target store).

    ``sequences``: the store-order indices to use (e.g. the training side of
    :func:`heldout_split`). ``teacher_blocks``: also read the per-teacher blocks and weights
    (for L_multi or its monitor). ``vocab_size``: refuse ids at or above it. ``count_bytes``:
    give each batch its labels' byte counts (needs a tokens store with ``byte_end``).
    """

    def __init__(
        self,
        tokens: Store,
        targets: Store | None,
        sequences: np.ndarray | None = None,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        teacher_blocks: bool = False,
        open_rows: int = 32,
        vocab_size: int | None = None,
        pad_id: int = 0,
        count_bytes: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 1 or open_rows < 1:
            raise ValueError("batch_size and open_rows must be ≥ 1")
        if count_bytes:
            require_byte_ends(tokens, "bits per byte")
        self.tokens, self.targets, self.count_bytes = tokens, targets, count_bytes
        n_blocks = open_targets(tokens, targets) if targets is not None else 0
        if teacher_blocks and n_blocks == 0:
            raise StoreError("per-teacher blocks were asked for but "
                             f"{targets.root if targets else 'no target store'} has none")
        self.num_teachers = n_blocks if teacher_blocks else 0
        seqs = np.arange(tokens.num_sequences) if sequences is None else np.asarray(sequences)
        self.sequences = seqs[tokens.seq_lengths[seqs] >= 2].astype(np.int64)
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size, self.open_rows = rank, world_size, open_rows
        self.vocab_size, self.pad_id = vocab_size, pad_id
        self._plan: tuple[int, EpochPlan] | None = None

    def plan(self, epoch: int) -> EpochPlan:
        """The packing of ``epoch`` (cached for the latest epoch asked for)."""
        if self._plan is None or self._plan[0] != epoch:
            order = self.sequences
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            row, col, item, start, length = pack(
                self.tokens.seq_lengths[order], self.seq_len, self.open_rows
            )
            n_rows = int(row.max()) + 1 if len(row) else 0
            self._plan = (epoch, EpochPlan(row, col, order[item], start, length, n_rows))
        return self._plan[1]

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches each rank gets in ``epoch`` (equal for all ranks)."""
        micro = -(-self.plan(epoch).num_rows // self.batch_size)
        return -(-micro // self.world_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[PackedBatch]:
        """This rank's batches of ``epoch`` from batch index ``start``."""
        for index in range(start, self.batches_in_epoch(epoch)):
            yield self.batch(epoch, index)

    def require_sequences(self) -> None:
        """Refuse a loader with nothing to train on (checked before a run writes anything)."""
        if not len(self.sequences):
            raise StoreError(f"{self.tokens.root}: no sequences of ≥ 2 tokens to train on")

    def stream(self, state: LoaderState | None = None) -> Iterator[PackedBatch]:
        """Endless batches from ``state`` onwards, epoch after epoch."""
        state = state or LoaderState()
        self.require_sequences()
        epoch, start = state.epoch, state.index
        while True:
            yield from self.epoch(epoch, start)
            epoch, start = epoch + 1, 0

    def batch(self, epoch: int, index: int) -> PackedBatch:
        """This rank's batch ``index`` of ``epoch``."""
        plan = self.plan(epoch)
        bsz, seq_len = self.batch_size, self.seq_len
        lo = (index * self.world_size + self.rank) * bsz
        a, b = np.searchsorted(plan.row, [lo, lo + bsz])
        uniq, inv = np.unique(plan.seq[a:b], return_inverse=True)
        seg, pos = _expand(plan.length[a:b])
        dest = (plan.row[a:b] - lo)[seg] * seq_len + plan.col[a:b][seg] + pos
        in_seq = plan.start[a:b][seg] + pos  # token index within its sequence
        tok = self.tokens.read(uniq, ["token_ids", BYTE_END] if self.count_bytes
                               else ["token_ids"])
        src = tok.offsets[:-1][inv][seg] + in_seq
        has_next = in_seq + 1 < tok.lengths[inv][seg]
        ids = tok["token_ids"].astype(np.int64)
        n = bsz * seq_len
        input_ids = np.full(n, self.pad_id, dtype=np.int64)
        input_ids[dest] = ids[src]
        position_ids = np.zeros(n, dtype=np.int64)
        position_ids[dest] = pos
        labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        labels[dest[has_next]] = ids[src[has_next] + 1]
        self._check_vocab(ids, "token ids")
        label_bytes = None
        if self.count_bytes:
            label_bytes = np.zeros(n, dtype=np.int64)
            label_bytes[dest[has_next]] = token_bytes(tok[BYTE_END], tok.offsets)[
                src[has_next] + 1]

        targets = teachers = weights = gap = None
        if self.targets is not None:
            names = ["ids", "probs", "tail_mass", "jensen_gap"]
            if self.num_teachers:
                names.append("weights")
                names += [name for j in range(self.num_teachers) for name in teacher_block(j)]
            rows = self.targets.read(uniq, names)
            tsrc = (rows.offsets[:-1][inv][seg] + in_seq)[has_next]
            tdest = dest[has_next]

            def place(name: str, fill: float) -> Tensor:
                arr = rows[name]
                out = np.full((n, *arr.shape[1:]), fill, dtype=arr.dtype)
                out[tdest] = arr[tsrc]
                return torch.from_numpy(out.reshape(bsz, seq_len, *arr.shape[1:]))

            def sparse(ids: str, probs: str, tail: str) -> SparseTargets:
                self._check_vocab(rows[ids], "target ids")
                return SparseTargets(place(ids, -1), place(probs, 0.0), place(tail, 0.0))

            targets = sparse("ids", "probs", "tail_mass")
            gap = place("jensen_gap", 0.0)
            if self.num_teachers:
                teachers = [sparse(*teacher_block(j)) for j in range(self.num_teachers)]
                weights = place("weights", 0.0)

        def rows2d(x: np.ndarray) -> Tensor:
            return torch.from_numpy(x.reshape(bsz, seq_len))

        return PackedBatch(rows2d(input_ids), rows2d(position_ids), rows2d(labels), targets,
                           teachers, weights, gap, len(dest), epoch, index,
                           None if label_bytes is None else rows2d(label_bytes))

    def _check_vocab(self, ids: np.ndarray, what: str) -> None:
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise StoreError(f"{what} reach {int(ids.max())} but the student's vocabulary has "
                             f"{self.vocab_size} entries")


class Prefetcher(Generic[T]):
    """Runs an iterator in a background thread, up to ``depth`` items ahead of the consumer."""

    _DONE = object()

    def __init__(self, source: Iterator[T], depth: int = 4) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                        name="mtkd-prefetch")
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the thread (it exits at its next hand-over)."""
        self._stop.set()
        self._thread.join(timeout=10)
