"""The errors a store raises: each message names the store (or file) and the reason.

The rule across stages: what a store (or a model) is, or holds, that does not fit what is
asked of it (another kind, an incomplete or damaged store, a tokens store another teacher was
harvested over, a missing array) is a :class:`StoreError`; a value given by the user that no
store could satisfy (an unknown coding, an option out of range) is a ``ValueError``, refused
before any store is opened where it can be. The CLI turns both into exit 1 with the message.
"""

from __future__ import annotations


class StoreError(Exception):
    """A store cannot be used as asked; the message names the store and the reason."""


class IncompleteStoreError(StoreError):
    """The store is not fully committed."""


class CorruptStoreError(StoreError):
    """Files of a committed store do not match their recorded counts or checksums."""


class DamagedRowsError(CorruptStoreError, ValueError):
    """Coded rows that fail their CRC or decode to values their coding cannot hold, found
    by a read (a ValueError too: the codecs raise it on arrays outside any store). ``rows``:
    where in the read, (first, past the last) row, when known."""

    def __init__(self, message: str, rows: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.rows = rows


def io_error(what: str, e: OSError) -> StoreError:
    """An OSError (disk full, file too large, quota, permissions) as a one-line StoreError."""
    where = f" ({e.filename})" if e.filename else ""
    return StoreError(f"{what}: {e.strerror or e}{where}")
