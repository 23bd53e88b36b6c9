"""Bits per byte: held-out quality in a unit that does not depend on the tokenizer.

Nats per token compare models that share a tokenizer; models with different tokenizers cut
the same text into different numbers of tokens, so only a per-byte figure compares them. A
tokens store with the ``byte_end`` array (``mtkd tokenize``) says where every token ends in its
window's UTF-8 text: token i spans ``[byte_end[i-1], byte_end[i])`` with ``byte_end[-1] := 0``,
special tokens spanning 0 bytes. Over a set of predicted (label) tokens

    bpb = Σ nats of the labels ÷ (ln 2 · Σ bytes of the labels),

the first token of a window being context only (it is never a label). Stores without
``byte_end`` (an older mtkd, or ``--no-byte-offsets``) give no bits per byte, and no error.
"""

from __future__ import annotations

import math

import numpy as np

from mtkd.store import StoreError


def token_bytes(byte_end: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bytes of every token of a read (sequences cut by ``offsets``): ``byte_end[i] −
    byte_end[i−1]`` within a sequence, ``byte_end[i]`` for its first token."""
    ends = byte_end.astype(np.int64)
    starts = np.empty_like(ends)
    starts[1:] = ends[:-1]
    starts[offsets[:-1][offsets[:-1] < len(ends)]] = 0
    sizes = ends - starts
    if sizes.size and int(sizes.min()) < 0:
        raise StoreError("byte_end decreases within a sequence: the tokens store is damaged")
    return sizes


def label_bytes(byte_end: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bytes of each target row's token, L−1 rows per sequence of L tokens in read order
    (row j of a sequence predicts its token j+1): the layout of teacher and target stores."""
    sizes = token_bytes(byte_end, offsets)
    is_label = np.ones(len(sizes), dtype=bool)
    is_label[offsets[:-1][offsets[:-1] < len(sizes)]] = False
    return sizes[is_label]


def bits_per_byte(nats: float, n_bytes: float) -> float | None:
    """``nats`` spread over ``n_bytes`` bytes, in bits per byte (None for no bytes)."""
    return nats / (math.log(2) * n_bytes) if n_bytes > 0 else None
