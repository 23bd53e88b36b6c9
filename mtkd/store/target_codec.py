"""Compact coding ``q64v2`` of a target store's sparse columns, for training reads.

A target row is the fused distribution on its support: ``ids [k_out]`` (−1 padding) and
``probs``, plus the tail mass; the L_multi teacher blocks (``teacher<j>_ids`` / ``_probs``) have
the same form. Stored plainly (int32 + float32) a k_out = 64 row costs 512 bytes. Coded, the
pair is a teacher store's top-k row (:mod:`mtkd.store.topk_codec`, q64v2): the ids ascending as
gaps in the fewest bytes the vocabulary needs, log q on the q64 grid as distances to the row's
floor, both as byte planes; small zstd chunks (:data:`CHUNK_ROWS`) then keep shuffled reads to
about a sequence's rows.

Error: |log q̂ − log q| ≤ 1/128 nat where q ≥ 1e-3 (≤ 1/32 below), so a row's Σ q̂ + tail is
1 within 0.8% (the tail mass is stored exactly, float32; the losses take q̂ as given). Readers
see int32 ids and float32 probs in descending order, as from a plain store. A store records
the coding in ``attrs.target_coding``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mtkd.store import q64_grid as grid
from mtkd.store import topk_codec as tc

Q64V2 = tc.Q64V2
CODINGS = (Q64V2,)
#: Header attribute naming the coding of a target store's sparse columns (absent: plain).
CODING_ATTR = "target_coding"
#: Rows per zstd chunk of a coded target store: a shuffled read of one sequence decodes about
#: its own rows (8,192-row chunks made such reads 28× slower than raw ones).
CHUNK_ROWS = 1024


def teacher_block(j: int) -> tuple[str, str, str]:
    """The arrays of teacher ``j``'s block in a target store (``teacher_blocks``, for
    L_multi): its ids, probs and tail mass."""
    return f"teacher{j}_ids", f"teacher{j}_probs", f"teacher{j}_tail_mass"


def block_names(attrs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(ids, probs) array names of each sparse block: the fused target, then the per-teacher
    blocks a store with ``teacher_blocks`` holds."""
    blocks = [("ids", "probs")]
    if attrs.get("teacher_blocks"):
        blocks += [teacher_block(j)[:2] for j in range(int(attrs.get("num_teachers", 0)))]
    return blocks


def coding(attrs: Mapping[str, Any]) -> str | None:
    """The coding a target store's attrs name (None: plain); refuses unknown ones."""
    name = attrs.get(CODING_ATTR)
    if name is not None and name not in CODINGS:
        raise ValueError(f"unknown {CODING_ATTR} {name!r} (this mtkd reads {list(CODINGS)}; "
                         "a newer mtkd wrote it)")
    return name


def stored_arrays(k: int, vocab_size: int | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Stored (dtype, row shape) of a coded block's ids and probs columns."""
    width = tc.delta_width(vocab_size, Q64V2)
    return ("uint8", (width, k)), ("uint8", (grid.CODE_WIDTH, k + 1))


def encode_rows(rows: Mapping[str, Any], attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """``rows`` with every sparse block coded (unchanged for a plain store)."""
    if coding(attrs) is None:
        return rows
    out = dict(rows)
    for ids, probs in block_names(attrs):
        if ids in rows:
            p = np.asarray(rows[probs], dtype=np.float64)
            with np.errstate(divide="ignore"):
                logq = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), -np.inf)
            out[ids], out[probs] = tc.encode(np.asarray(rows[ids]), np.minimum(logq, 0.0),
                                             vocab_size=attrs.get("vocab_size"), coding=Q64V2)
    return out


def stored_names(names: Iterable[str], attrs: Mapping[str, Any]) -> list[str]:
    """The arrays to read for ``names``: a coded block decodes from its ids and codes."""
    names = list(names)
    if coding(attrs) is None:
        return names
    for ids, probs in block_names(attrs):
        if ids in names or probs in names:
            names += [n for n in (ids, probs) if n not in names]
    return names


def decode_rows(arrays: dict[str, np.ndarray],
                attrs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Arrays as read → ids int32 and probs float32 in descending order (unchanged for a
    plain store)."""
    if coding(attrs) is None:
        return arrays
    out = dict(arrays)
    for ids, probs in block_names(attrs):
        if ids in arrays:
            out[ids], logq = tc.decode(arrays[ids], arrays[probs], Q64V2)
            out[probs] = np.exp(logq)
    return out
