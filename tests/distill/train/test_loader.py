"""The training loader: packing, alignment, determinism, resume, sharding, held-out split."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtkd.distill.train.loader import (
    LoaderState,
    PackedBatch,
    PackedLoader,
    Prefetcher,
    heldout_split,
    pack,
)
from mtkd.distill.train.targets import IGNORE_INDEX
from mtkd.store import Store, StoreError, StoreWriter, open_store
from mtkd.store.schema import BYTE_END, target_header, tokens_header

K_OUT, K_TEACHER = 6, 4  # fused support width (2 padding columns), per-teacher width


def write_tokens(root: Path, seqs: list[np.ndarray], attrs: dict, parts: int = 2,
                 doc_ids: list[int] | None = None,
                 byte_ends: list[np.ndarray] | None = None) -> Store:
    """A tokens store of ``seqs`` split over ``parts`` parts (optional doc_id metadata, and
    the ``byte_end`` of every token)."""
    writer = StoreWriter(root, tokens_header(parts, attrs, byte_offsets=byte_ends is not None))
    bounds = np.linspace(0, len(seqs), parts + 1).astype(int)
    for p in range(parts):
        chunk = seqs[bounds[p]:bounds[p + 1]]
        ids = np.arange(bounds[p], bounds[p + 1], dtype=np.int64) + (p << 32)
        meta = None
        if doc_ids is not None:
            meta = pa.table({"seq_id": ids, "doc_id": doc_ids[bounds[p]:bounds[p + 1]]})
        with writer.open_part(p) as pw:
            flat = np.concatenate(chunk) if chunk else np.zeros(0, np.int32)
            arrays = {"token_ids": flat}
            if byte_ends is not None:
                ends = byte_ends[bounds[p]:bounds[p + 1]]
                arrays[BYTE_END] = (np.concatenate(ends) if ends else flat).astype(np.int32)
            pw.append(arrays, [len(s) for s in chunk], ids, meta)
    assert writer.finalize()
    return open_store(root, "tokens")


def teacher_rows(next_tokens: np.ndarray, vocab: int, row0: int) -> dict[str, np.ndarray]:
    """Two teachers sharing the support {y, y+1, y+2, y+3} of the actual next token y, their
    per-row weights, the linear mixture (padded to K_OUT) and its exact Jensen gap."""
    n = len(next_tokens)
    ids = (next_tokens[:, None] + np.arange(K_TEACHER)) % vocab
    p0 = np.tile([0.6, 0.1, 0.05, 0.05], (n, 1))
    p1 = np.tile([0.3, 0.2, 0.15, 0.15], (n, 1))
    r0, r1 = 1 - p0.sum(1), 1 - p1.sum(1)
    w0 = 0.3 + 0.4 * ((np.arange(n) + row0) % 2)
    w = np.stack([w0, 1 - w0], 1)
    q = w[:, :1] * p0 + w[:, 1:] * p1
    rq = w0 * r0 + (1 - w0) * r1
    cat = [np.concatenate([p, r[:, None]], 1) for p, r in ((p0, r0), (p1, r1), (q, rq))]
    kl = [(c * np.log(c / cat[2])).sum(1) for c in cat[:2]]
    pad = K_OUT - K_TEACHER
    return {
        "ids": np.concatenate([ids, np.full((n, pad), -1)], 1),
        "probs": np.concatenate([q, np.zeros((n, pad))], 1),
        "tail_mass": rq,
        "weights": w,
        "jensen_gap": w0 * kl[0] + (1 - w0) * kl[1],
        "disagreement": np.zeros(n),
        "teacher0_ids": ids, "teacher0_probs": p0, "teacher0_tail_mass": r0,
        "teacher1_ids": ids, "teacher1_probs": p1, "teacher1_tail_mass": r1,
    }


def write_targets(root: Path, tokens: Store, vocab: int, fingerprint: str | None = None,
                  attrs: dict[str, Any] | None = None) -> Store:
    """A target store over ``tokens`` whose rows are built from the actual next tokens
    (``attrs``: more header attrs, e.g. the aggregate's ``config``)."""
    attrs = {"tokens_fingerprint": fingerprint or tokens.manifest["checksum"],
             "vocab_size": vocab} | (attrs or {})
    header = target_header(tokens.num_parts, K_OUT, 2, attrs, teacher_ks=(K_TEACHER, K_TEACHER))
    writer = StoreWriter(root, header)
    row0 = 0
    for p in range(tokens.num_parts):
        part = tokens.read_part(p)
        lengths = np.diff(part.offsets)
        nxt = np.concatenate([part["token_ids"][a + 1:b]
                              for a, b in zip(part.offsets[:-1], part.offsets[1:], strict=True)])
        with writer.open_part(p) as pw:
            pw.append(teacher_rows(nxt.astype(np.int64), vocab, row0), lengths - 1, part.seq_ids)
        row0 += len(nxt)
    assert writer.finalize()
    return open_store(root, "target")


def counting_stores(tmp: Path, lengths: list[int]) -> tuple[Store, Store]:
    """Stores whose token values are their global row numbers (so batches can be traced)."""
    seqs, start = [], 0
    for n in lengths:
        seqs.append(np.arange(start, start + n, dtype=np.int32))
        start += n
    vocab = start + 8
    tokens = write_tokens(tmp / "tok", seqs, {"vocab_size": vocab, "eos_id": None})
    return tokens, write_targets(tmp / "tgt", tokens, vocab)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Store, Store]:
    rng = np.random.default_rng(0)
    return counting_stores(tmp_path, rng.integers(2, 40, size=57).tolist())


def loader(tokens: Store, targets: Store | None, **kw: object) -> PackedLoader:
    args: dict = dict(seq_len=16, batch_size=3, seed=1, pad_id=-1, teacher_blocks=True)
    args.update(kw)
    return PackedLoader(tokens, targets, **args)


def same_batch(a: PackedBatch, b: PackedBatch) -> bool:
    return all(torch.equal(x, y) for x, y in [
        (a.input_ids, b.input_ids), (a.labels, b.labels), (a.position_ids, b.position_ids),
        (a.targets.ids, b.targets.ids), (a.targets.probs, b.targets.probs),
        (a.teacher_weights, b.teacher_weights)])


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("open_rows", [1, 3, 8])
def test_pack_places_every_token_once(open_rows: int) -> None:
    lengths = np.random.default_rng(open_rows).integers(1, 50, size=300)
    row, col, item, start, length = pack(lengths, 16, open_rows)
    assert (col + length <= 16).all() and (length >= 1).all()
    cells = np.concatenate([r * 16 + c + np.arange(n) for r, c, n in zip(row, col, length,
                                                                          strict=True)])
    assert len(np.unique(cells)) == len(cells) == lengths.sum()  # no overlap
    covered = {(i, s + j) for i, s, n in zip(item, start, length, strict=True) for j in range(n)}
    assert covered == {(i, j) for i, n in enumerate(lengths) for j in range(n)}
    assert (np.diff(row * 16 + col) > 0).all()  # sorted by (row, col)


def test_epoch_covers_every_token_once_with_aligned_targets(stores: tuple[Store, Store]) -> None:
    tokens, targets = stores
    ld = loader(tokens, targets)
    seen = []
    for b in ld.epoch(0):
        real = b.input_ids != -1
        seen.append(b.input_ids[real])
        has = b.labels != IGNORE_INDEX
        # the label is the next token of the same sequence: token values count up by one
        assert torch.equal(b.labels[has], b.input_ids[has] + 1)
        # target row j is the distribution of token j+1: its first support id is the label
        assert torch.equal(b.targets.ids[..., 0][has], b.labels[has])
        assert (b.targets.ids[~has] == -1).all() and (b.targets.tail_mass[~has] == 0).all()
        assert (b.teacher_weights[has].sum(-1) - 1).abs().max() < 1e-6
        # positions restart at 0 for each piece and count up inside it
        pos, ids = b.position_ids, b.input_ids
        inside = (pos[:, 1:] != 0) & real[:, 1:]
        assert torch.equal(pos[:, 1:][inside], pos[:, :-1][inside] + 1)
        assert torch.equal(ids[:, 1:][inside], ids[:, :-1][inside] + 1)
        assert (pos[~real] == 0).all()
        assert b.num_tokens == int(real.sum()) and b.num_labels == int(has.sum())
    seen = torch.cat(seen).sort().values
    assert torch.equal(seen, torch.arange(tokens.num_rows))  # nothing lost or duplicated
    # the last token of every sequence has no label; every other token has one
    n_labels = sum(b.num_labels for b in ld.epoch(0))
    assert n_labels == tokens.num_rows - tokens.num_sequences


def test_long_sequences_are_cut_without_losing_targets(tmp_path: Path) -> None:
    tokens, targets = counting_stores(tmp_path, [40, 5, 33])
    ld = loader(tokens, targets, seq_len=8, batch_size=2)
    labels = torch.cat([b.labels[b.labels != IGNORE_INDEX] for b in ld.epoch(0)])
    assert len(labels) == 40 + 5 + 33 - 3
    assert (ld.plan(0).length <= 8).all()


def test_deterministic_and_resumes_mid_epoch(stores: tuple[Store, Store]) -> None:
    tokens, targets = stores
    full = [b for _, b in zip(range(40), loader(tokens, targets).stream(), strict=False)]
    again = [b for _, b in zip(range(40), loader(tokens, targets).stream(), strict=False)]
    assert all(same_batch(a, b) for a, b in zip(full, again, strict=True))
    n0 = loader(tokens, targets).batches_in_epoch(0)
    assert n0 < 40  # the stream crossed into later epochs
    k = n0 + 3  # resume in the middle of epoch 1
    state = LoaderState.following(full[k - 1])
    resumed = [b for _, b in zip(range(40 - k), loader(tokens, targets).stream(state),
                                 strict=False)]
    assert all(same_batch(a, b) for a, b in zip(full[k:], resumed, strict=True))
    other_seed = next(loader(tokens, targets, seed=2).stream())
    assert not same_batch(full[0], other_seed)
    assert not torch.equal(full[0].input_ids, full[n0].input_ids)  # epochs reshuffle


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_cover_and_match_a_bigger_batch(
        stores: tuple[Store, Store], world: int) -> None:
    tokens, targets = stores
    ranks = [list(loader(tokens, targets, rank=r, world_size=world).epoch(0))
             for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # same number of batches per rank
    single = list(loader(tokens, targets, batch_size=3 * world).epoch(0))
    assert len(single) == len(ranks[0])
    for i, big in enumerate(single):
        joined = torch.cat([ranks[r][i].input_ids for r in range(world)])
        assert torch.equal(joined, big.input_ids)
        joined_t = torch.cat([ranks[r][i].targets.ids for r in range(world)])
        assert torch.equal(joined_t, big.targets.ids)
    values = torch.cat([b.input_ids[b.input_ids >= 0] for r in ranks for b in r])
    assert torch.equal(values.sort().values, torch.arange(tokens.num_rows))


def test_heldout_split_by_document(tmp_path: Path) -> None:
    seqs = [np.arange(5, dtype=np.int32) for _ in range(400)]
    docs = [i // 4 for i in range(400)]  # four windows per document
    tokens = write_tokens(tmp_path / "tok", seqs, {"vocab_size": 8}, doc_ids=docs)
    train, held = heldout_split(tokens, 0.2)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 400
    assert 40 <= len(held) <= 120
    held_docs = {docs[i] for i in held}
    assert not held_docs & {docs[i] for i in train}  # a document is on one side only
    again = heldout_split(tokens, 0.2)
    assert np.array_equal(again[1], held)
    assert len(heldout_split(tokens, 0.0)[1]) == 0


def test_refuses_a_target_store_of_other_tokens(tmp_path: Path,
                                                stores: tuple[Store, Store]) -> None:
    tokens, _ = stores
    bad = write_targets(tmp_path / "bad", tokens, 10_000, fingerprint="not-this-one")
    with pytest.raises(StoreError, match="different tokens store"):
        loader(tokens, bad)


def test_refuses_ids_beyond_the_student_vocabulary(stores: tuple[Store, Store]) -> None:
    tokens, targets = stores
    with pytest.raises(StoreError, match="vocabulary"):
        loader(tokens, targets, vocab_size=10).batch(0, 0)


def test_packed_rows_do_not_attend_across_sequences(stores: tuple[Store, Store]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, _ = stores
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokens.attrs["vocab_size"], hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    b = loader(tokens, None, pad_id=0, teacher_blocks=False).batch(0, 0)
    with torch.no_grad():
        # use_cache=False matters: with a cache transformers skips the packed-sequence mask
        packed = model.base_model(input_ids=b.input_ids, position_ids=b.position_ids,
                                  use_cache=False).last_hidden_state
        row = int((b.position_ids == 0).sum(1).argmax())
        starts = [*(b.position_ids[row] == 0).nonzero().flatten().tolist(), b.input_ids.shape[1]]
        assert len(starts) > 3  # several sequences share the row
        for a, z in itertools.pairwise(starts):
            alone = model.base_model(input_ids=b.input_ids[row:row + 1, a:z]).last_hidden_state
            torch.testing.assert_close(packed[row, a:z], alone[0], atol=1e-5, rtol=1e-5)


def test_prefetcher_keeps_order_and_raises() -> None:
    assert list(Prefetcher(iter(range(100)), depth=3)) == list(range(100))

    def broken():
        yield 1
        raise RuntimeError("boom")

    it = Prefetcher(broken(), depth=2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    endless = Prefetcher(iter(int, 1), depth=2)  # never exhausts: close must still return
    next(endless)
    endless.close()
