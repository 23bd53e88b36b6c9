"""Bits per byte: byte counts of labels by hand, and carried through packing, cuts and ranks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mtkd.distill.train.bits_per_byte import bits_per_byte, label_bytes, token_bytes
from mtkd.distill.train.loader import PackedLoader
from mtkd.distill.train.targets import IGNORE_INDEX
from mtkd.store import Store, StoreError, open_store
from mtkd.store.schema import BYTE_END, has_byte_ends

from .test_loader import counting_stores, write_tokens

SPAN = 5  # token r of the counting store spans r % SPAN bytes


def test_token_and_label_bytes_by_hand() -> None:
    byte_end = np.array([3, 5, 5, 9, 2, 4], dtype=np.int32)  # two windows: 4 and 2 tokens
    offsets = np.array([0, 4, 6])
    assert token_bytes(byte_end, offsets).tolist() == [3, 2, 0, 4, 2, 2]
    assert label_bytes(byte_end, offsets).tolist() == [2, 0, 4, 2]  # first tokens are context
    with_empty = np.array([0, 4, 4, 6, 6])  # empty windows in the middle and at the end
    assert label_bytes(byte_end, with_empty).tolist() == [2, 0, 4, 2]
    with pytest.raises(StoreError, match="decreases"):
        token_bytes(np.array([3, 2]), np.array([0, 2]))


def test_bits_per_byte_is_nats_over_ln2_bytes() -> None:
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert bits_per_byte(1.0, 0) is None


def counting_with_bytes(tmp: Path, lengths: list[int]) -> Store:
    """The counting tokens store (token values = global row numbers) with ``byte_end``."""
    tokens, _ = counting_stores(tmp, lengths)
    part = tokens.read(np.arange(tokens.num_sequences))
    seqs = np.split(part["token_ids"], part.offsets[1:-1])
    ends = [np.cumsum(s % SPAN) for s in seqs]
    return write_tokens(tmp / "tok-bytes", seqs, dict(tokens.attrs), byte_ends=ends)


@pytest.mark.parametrize("world", [1, 2])
def test_loader_gives_every_label_its_token_bytes(tmp_path: Path, world: int) -> None:
    """Through shuffling, packing, cuts of long windows and rank sharding, each label carries
    the bytes of its own token, positions without a label carry 0, and an epoch counts every
    label's bytes once."""
    rng = np.random.default_rng(3)
    tokens = counting_with_bytes(tmp_path, rng.integers(1, 40, size=41).tolist())
    total = 0
    for rank in range(world):
        loader = PackedLoader(tokens, None, seq_len=16, batch_size=3, seed=1, rank=rank,
                              world_size=world, pad_id=-1, count_bytes=True)
        for batch in loader.epoch(0):
            labelled = batch.labels != IGNORE_INDEX
            assert batch.label_bytes is not None
            assert (batch.label_bytes[labelled] == batch.labels[labelled] % SPAN).all()
            assert (batch.label_bytes[~labelled] == 0).all()
            total += int(batch.label_bytes.sum())
    everything = tokens.read(np.arange(tokens.num_sequences), ["token_ids", BYTE_END])
    want = label_bytes(everything[BYTE_END], everything.offsets)
    assert total == int(want.sum()) > 0


def test_training_loader_reads_no_bytes_and_old_stores_have_none(tmp_path: Path) -> None:
    with_bytes = counting_with_bytes(tmp_path, [5, 9, 3])
    batch = next(PackedLoader(with_bytes, None, seq_len=8, batch_size=2).stream())
    assert batch.label_bytes is None and batch.to("cpu").label_bytes is None
    old = open_store(tmp_path / "tok", "tokens")  # the same tokens without byte_end
    assert has_byte_ends(with_bytes) and not has_byte_ends(old)
    with pytest.raises(StoreError, match=BYTE_END):
        PackedLoader(old, None, seq_len=8, batch_size=2, count_bytes=True)
