"""The on-disk layout of a store, its header and the JSON every record is written as.

A store is a directory::

    store.json              header: kind, schema version, attributes, number of parts
    parts/00000/            a committed part: one Zarr v3 group written by one writer
        zarr.json, <array>/ Zarr v3 arrays; row-level arrays share a leading "rows" axis
        seq_offsets/        int64 [S+1] row offsets of the part's sequences
        seq_ids/            int64 [S] global sequence ids
        meta.parquet        optional per-sequence metadata
        COMMIT.json         counts and sha256 of every file, written last
    parts/.tmp-00001-<host>-<pid>-<random>/   a part being written (never read)
    manifest.json           written once every part is committed; its presence means complete

docs/FORMAT.md is the full specification; ``writer`` commits parts, ``reader`` reads them and
``verify`` rechecks them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mtkd.store.errors import CorruptStoreError, StoreError
from mtkd.store.topk_codec import (
    ID_RANKING_ATTR,
    SAMPLE_CODING_ATTR,
    SCALAR_CODING_ATTR,
    coding,
    internal_arrays,
    ranked,
    virtual_arrays,
)

FORMAT_NAME = "mtkd-store"
#: The newest schema version this mtkd reads; a store is written with the oldest version that
#: describes it (``Header.schema_version``), so older readers keep reading what they can.
SCHEMA_VERSION = 7
HEADER_FILE = "store.json"
MANIFEST_FILE = "manifest.json"
COMMIT_FILE = "COMMIT.json"
META_FILE = "meta.parquet"
PARTS_DIR = "parts"
TMP_PREFIX = ".tmp-"
#: Arrays every part holds besides the schema's (a schema may not use these names).
RESERVED_ARRAYS = ("seq_offsets", "seq_ids")

Codec = Literal["raw", "zstd"]


def part_name(part: int) -> str:
    """The directory name of a committed part: ``00042``."""
    return f"{part:05d}"


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store's schema: rows × ``row_shape`` of ``dtype``, stored with ``codec``."""

    name: str
    dtype: str
    row_shape: tuple[int, ...] = ()
    codec: Codec = "raw"

    def __post_init__(self) -> None:
        # Plain numbers only: raw chunks are memory-mapped, and an object dtype would turn the
        # file's bytes into Python object pointers (a crafted store could crash the reader).
        try:
            dt = np.dtype(self.dtype)
        except TypeError as e:
            raise StoreError(f"array {self.name!r}: unknown dtype {self.dtype!r}") from e
        if dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
            raise StoreError(f"array {self.name!r}: dtype {self.dtype!r} is not allowed "
                             "(booleans, integers and floats only)")
        if any(not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0
               for n in self.row_shape):
            raise StoreError(f"array {self.name!r}: bad row shape {list(self.row_shape)}")

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "row_shape": list(self.row_shape), "codec": self.codec}

    @classmethod
    def from_json(cls, name: str, spec: Mapping[str, Any]) -> ArraySpec:
        return cls(name, spec["dtype"], tuple(spec["row_shape"]), spec["codec"])


@dataclass(frozen=True)
class Header:
    """What every writer of a store must agree on; compared field by field on reopen.

    ``schema_version``: 1, 2 for a teacher store whose top-k columns are coded
    (``attrs.topk_coding``, see ``topk_codec``), which a version-1 reader would misread, 3
    for a teacher store in the teacher's own tokens (``attrs.tokenization == "own"``), 4 for
    q64r streams over several sequences (``attrs.topk_stream_rows``), 5 for q64r's seen ids
    numbered by count (``attrs.topk_id_ranking``), 6 for q64r's draws coded against the top-k
    (``attrs.sample_coding``), or 7 for q64r's actual-token log-prob and tail coded against it
    (``attrs.scalar_coding``).
    """

    kind: str
    num_parts: int
    arrays: tuple[ArraySpec, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "kind": self.kind,
            "num_parts": self.num_parts,
            "arrays": {a.name: a.to_json() for a in self.arrays},
            "attrs": jsonable(self.attrs),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: Path) -> Header:
        if obj.get("format") != FORMAT_NAME:
            raise StoreError(f"{where}: not an mtkd store (format={obj.get('format')!r})")
        version = obj.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) \
                or not 1 <= version <= SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema version {version} is not supported "
                f"(this mtkd reads versions 1 to {SCHEMA_VERSION})"
            )
        try:
            arrays = tuple(ArraySpec.from_json(n, s) for n, s in obj["arrays"].items())
            attrs = obj.get("attrs", {})
            coding(attrs)
            if ranked(attrs) and version < 5:  # an older reader would take it for first sight
                raise ValueError(f"attrs.{ID_RANKING_ATTR} needs schema version 5, not {version}")
            for attr, needs in ((SAMPLE_CODING_ATTR, 6), (SCALAR_CODING_ATTR, 7)):
                if attr in attrs and version < needs:  # an older reader would not find them
                    raise ValueError(f"attrs.{attr} needs schema version {needs}, not {version}")
        except (StoreError, ValueError) as e:
            raise StoreError(f"{where / HEADER_FILE}: {e}") from e
        return cls(obj["kind"], int(obj["num_parts"]), arrays, attrs, version)

    @property
    def written_arrays(self) -> tuple[ArraySpec, ...]:
        """The arrays a writer's caller gives and a read returns: all but those the top-k
        coding makes itself (q64v3's ``topk_recur``, q64r's ``topk_stream``), and those it
        keeps inside them (q64r's top-k columns)."""
        internal = internal_arrays(self.attrs)
        virtual = [ArraySpec(name, dtype, shape)
                   for name, (dtype, shape) in virtual_arrays(self.attrs).items()]
        return (*virtual, *(a for a in self.arrays if a.name not in internal))

    def spec(self, name: str) -> ArraySpec:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(name)


# --------------------------------------------------------------------------- JSON records


def jsonable(obj: Any) -> Any:
    """Round-trip through JSON so that headers compare equal however they were built."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def canonical_json(obj: Any) -> bytes:
    """The bytes every record is written as (sorted keys): equal objects, equal checksums."""
    return json.dumps(obj, sort_keys=True, indent=1, default=_json_default).encode()


def read_json(path: Path) -> Any:
    """A record; ``CorruptStoreError`` if it is unreadable (FileNotFoundError passes)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CorruptStoreError(f"{path}: unreadable JSON ({e})") from e


_MISSING = object()


#: Header attrs that say where a store's makers were found (a tokenizer's or a teacher's path),
#: each beside the identity that is compared (``tokenizer_hash``, ``teacher_revision``,
#: ``teacher_tokenizer_hash``): a worker or a resume that finds them elsewhere (another mount,
#: a node-local copy) joins the store, which keeps its creator's paths.
LOCATION_ATTRS = frozenset({"tokenizer", "teacher", "teacher_tokenizer"})


def identity(header: Any) -> Any:
    """A header's JSON as a joining writer must match it: all but :data:`LOCATION_ATTRS`."""
    if not isinstance(header, dict) or not isinstance(header.get("attrs"), dict):
        return header
    attrs = {k: v for k, v in header["attrs"].items() if k not in LOCATION_ATTRS}
    return {**header, "attrs": attrs}


def diff_fields(found: Any, wanted: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted names of the fields where two JSON objects differ (``attrs.k``, ``num_parts``)."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(found) | set(wanted)):
            a, b = found.get(key, _MISSING), wanted.get(key, _MISSING)
            if a != b:
                out += diff_fields(a, b, f"{prefix}{key}.")
        return out
    return [(prefix.rstrip("."), None if found is _MISSING else found,
             None if wanted is _MISSING else wanted)]


def short_json(value: Any, width: int = 60) -> str:
    """``value`` as JSON, cut to ``width`` characters for a one-line message."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."
