"""A teacher store's optional id table: its vocabulary renumbered so that frequent ids are small.

Why: q64v2 stores a top-k row's ids as the gaps between them in ascending order. A teacher's
top-k ids crowd on frequent tokens; renumbered so that the table's ids (the most frequent
first) become 0, 1, 2, … and every other id follows in ascending order, a row's ids become
small, dense numbers with small gaps (≈ 9.5 bytes less per position of 64 on the SmolLM2
harvest of bench/store_size.py, with the 4096 most frequent tokens of its tokens store).

The table lives in the header (``attrs.topk_id_table``, a list of distinct ids below
``attrs.vocab_size``); the renumbering is a bijection of ``[0, vocab_size)``, so ids come back
exactly. Pure numpy; the lookups are built once per table.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Header attribute holding the table (absent or empty: ids as they are).
ID_TABLE_ATTR = "topk_id_table"


@functools.lru_cache(maxsize=8)
def _lookups(table: tuple[int, ...], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(table, dtype=np.int64)
    if len(np.unique(t)) != len(t) or (t < 0).any() or (t >= vocab_size).any():
        raise ValueError(f"{ID_TABLE_ATTR} must hold distinct ids in [0, vocab_size "
                         f"{vocab_size})")
    new_to_old = np.concatenate([t, np.setdiff1d(np.arange(vocab_size), t)])
    old_to_new = np.empty(vocab_size, dtype=np.int64)
    old_to_new[new_to_old] = np.arange(vocab_size)
    # entry i + 1 holds id i's image, entry 0 the padding's (−1): one gather renumbers a row
    padded = tuple(np.concatenate([[-1], lookup]).astype(np.int32)
                   for lookup in (old_to_new, new_to_old))
    for lookup in padded:
        lookup.flags.writeable = False
    return padded


#: The last tables looked up, by object: every read of a store asks again for the same header
#: list, and checking and hashing its thousands of ids each time cost as much as the decode.
#: Each entry holds its list, so the key cannot be reused while it is cached.
_SEEN: dict[int, tuple[Sequence[int], int, tuple[np.ndarray, np.ndarray]]] = {}


def lookups(attrs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(old → new, new → old)`` id lookups of the table ``attrs`` hold (None: no table);
    ValueError for a table that is not a set of ids below ``attrs.vocab_size``."""
    table = attrs.get(ID_TABLE_ATTR)
    if not table:
        return None
    vocab = attrs.get("vocab_size")
    seen = _SEEN.get(id(table))
    if seen is not None and seen[0] is table and seen[1] == vocab:
        return seen[2]
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"{ID_TABLE_ATTR} needs attrs.vocab_size")
    if not isinstance(table, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in table):
        raise ValueError(f"{ID_TABLE_ATTR} must be a list of ids")
    found = _lookups(tuple(table), vocab)
    if len(_SEEN) >= 8:
        _SEEN.clear()
    _SEEN[id(table)] = (table, vocab, found)
    return found


def renumber(ids: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """int32 ``ids`` (−1 = padding, kept) through one of :func:`lookups`' arrays; ValueError
    for ids it does not cover."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < -1 or ids.max() >= len(lookup) - 1):
        raise ValueError(f"ids in [{ids.min()}, {ids.max()}] outside [-1, {len(lookup) - 2}] "
                         "(the id table's vocabulary)")
    return lookup[ids + 1]


def frequency_table(counts: np.ndarray, size: int = 4096) -> list[int]:
    """The ``size`` most frequent ids of ``counts`` (per id, e.g. a tokens store's
    ``np.bincount``), most frequent first, ties by id; ids never seen are left out."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")[:size]
    return order[counts[order] > 0].tolist()
