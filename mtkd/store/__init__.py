"""On-disk formats of mtkd: tokens, teacher and target stores (torch-free)."""

from mtkd.store.core import (
    ArraySpec,
    Batch,
    CorruptStoreError,
    Header,
    IncompleteStoreError,
    PartWriter,
    Store,
    StoreError,
    StoreWriter,
    open_store,
    verify_store,
)

__all__ = [
    "ArraySpec",
    "Batch",
    "CorruptStoreError",
    "Header",
    "IncompleteStoreError",
    "PartWriter",
    "Store",
    "StoreError",
    "StoreWriter",
    "open_store",
    "verify_store",
]
