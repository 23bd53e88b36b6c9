"""On-disk formats of mtkd: tokens, teacher and target stores (torch-free).

``format`` (layout, header, records), ``errors``, ``fs`` (durable files, temp names),
``writer`` / ``part_writer`` (atomic part commits, the manifest), ``reader`` / ``part_reader``
(``Store``), ``verify`` (rechecks), ``schema`` (the three store kinds and their arrays),
``topk_codec`` (coded top-k columns), ``executor`` (running a store's parts).
"""

from mtkd.store.errors import CorruptStoreError, IncompleteStoreError, StoreError
from mtkd.store.format import ArraySpec, Header
from mtkd.store.fs import bytes_on_disk
from mtkd.store.part_writer import PartWriter
from mtkd.store.reader import Batch, Store, open_store
from mtkd.store.verify import verify_store
from mtkd.store.writer import StoreWriter, check_store_dir

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
    "bytes_on_disk",
    "check_store_dir",
    "open_store",
    "verify_store",
]
