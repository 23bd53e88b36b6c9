"""Reading corpora: jsonl, parquet and plain-text files or directories, split into work units.

A *unit* is a piece of one input file that one worker reads on its own (a byte range of a
jsonl file cut at line starts, a parquet row group, a whole text file, a whole ``.gz`` file).
Units are planned deterministically from the inputs, so every worker and every rerun agrees on
them. A gzip file (``x.jsonl.gz``, ``x.txt.gz``) is read decompressed, as the file its name
less ``.gz`` would be; the byte offsets that name its documents (``x.jsonl.gz@120``) are
offsets in the decompressed stream. Other compressed files, and ``.json``/``.jsonl`` files
holding a JSON array rather than JSON Lines, are refused when the units are planned.
Problems (unreadable file, invalid UTF-8, bad JSON, missing field, empty document) are counted
by name, never silently dropped; ``strict`` turns the first one into an error. Documents kept
with the default task (no ``task_field`` in their record) are counted as notes, not problems.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import sys
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import pyarrow.parquet as pq

UnitKind = Literal["text", "jsonl", "parquet"]
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
JSONL_SPLIT_BYTES = 32 << 20
GZIP_SUFFIX = ".gz"
#: Compressed files tokenize cannot read (only gzip is read as it is).
UNREAD_COMPRESSED = (".zst", ".zstd", ".bz2", ".xz", ".lz4", ".zip", ".7z", ".tar", ".tgz")
#: Bytes peeked at the start of a JSON Lines file for a JSON array's ``[``.
PEEK_BYTES = 1 << 16


class CorpusError(Exception):
    """The corpus cannot be read as asked (or, with ``strict``, has a bad document)."""


@dataclass(frozen=True)
class Unit:
    """A piece of one input file: bytes [start, stop) of a jsonl file, row groups, or a file."""

    path: str
    kind: UnitKind
    start: int
    stop: int
    size: int  # bytes this unit covers, for balancing parts
    gzipped: bool = False  # the whole file, read through gzip (start and stop unused)

    @property
    def shown(self) -> str:
        """The path as messages and metadata show it (see :func:`shown`)."""
        return shown(self.path)


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the file (as :func:`shown`)
    task: str
    where: str = ""  # the file and where the document is in it (``path@offset``, ``path#rg0/3``)


@dataclass
class Problems:
    """Documents or files that were not used, counted by reason, with a few examples."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    strict: bool = False
    #: kept documents worth a count (``defaulted_task``: no task field, the default task)
    notes: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, where: str, hint: str = "") -> None:
        """Count a skipped document or file; with ``strict``, refuse it (``hint``: what to do)."""
        if self.strict:
            raise CorpusError(f"{where}: {reason.replace('_', ' ')} (refused with --strict)"
                              + (f"; {hint}" if hint else ""))
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")


def shown(path: str | os.PathLike[str]) -> str:
    """A path as valid UTF-8 text: a file name that is not UTF-8 (``bad\\xffname.txt``, read
    by Python as a lone surrogate) has its bad bytes written ``\\xff``, so messages, commit
    stats and the metadata's ``source`` can hold it."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def list_files(inputs: Sequence[str | os.PathLike[str]], pattern: str = "*",
               exclude: Sequence[str] = ()) -> list[Path]:
    """Input files in a stable order: files as given, directories walked and sorted.

    In directories, file names must match ``pattern`` and no path component below the directory
    may match any of the ``exclude`` patterns (e.g. ``site-packages``, ``test*``).
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(_walk(path, pattern, exclude)))
        elif path.exists():
            files.append(path)
        else:
            raise CorpusError(f"{path}: no such file or directory")
    if not files:
        raise CorpusError(f"no input files found in {', '.join(map(str, inputs))}")
    return files


def _walk(root: Path, pattern: str, exclude: Sequence[str]) -> Iterator[Path]:
    """Files under ``root`` matching ``pattern``; excluded directories are not even entered."""

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatch(name, x) for x in exclude)

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not excluded(d)]
        for name in filenames:
            path = Path(dirpath, name)
            if fnmatch.fnmatch(name, pattern) and not excluded(name) and path.is_file():
                yield path


def file_kind(path: Path) -> UnitKind:
    """How a file is read, by its name (a ``.gz`` file: by its name less ``.gz``)."""
    name = path.name.lower().removesuffix(GZIP_SUFFIX)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def plan_units(files: Sequence[Path], split_bytes: int = JSONL_SPLIT_BYTES) -> list[Unit]:
    """Cut the files into units; unreadable files still get a unit so they are reported."""
    units: list[Unit] = []
    for path in files:
        kind = file_kind(path)
        try:
            size = path.stat().st_size
        except OSError:
            units.append(Unit(str(path), "text", 0, 0, 0))
            continue
        gzipped = check_readable(path, kind)
        if gzipped:
            units.append(Unit(str(path), kind, 0, size, size, gzipped=True))
        elif kind == "jsonl" and size > split_bytes:
            starts = range(0, size, split_bytes)
            units += [Unit(str(path), kind, s, min(s + split_bytes, size),
                           min(split_bytes, size - s)) for s in starts]
        elif kind == "parquet":
            try:
                groups = pq.ParquetFile(path).num_row_groups
            except Exception:  # reported when the unit is read
                groups = 1
            per = max(size // max(groups, 1), 1)
            units += [Unit(str(path), kind, g, g + 1, per) for g in range(groups)]
        else:
            units.append(Unit(str(path), kind, 0, size, size))
    return units


def check_readable(path: Path, kind: UnitKind) -> bool:
    """Whether the file is gzipped (read decompressed); refuse (``CorpusError``) a compressed
    file of another kind, a gzipped parquet file, and a JSON Lines file holding a JSON array,
    which would be read as text or half parsed."""
    name = path.name.lower()
    gzipped = name.endswith(GZIP_SUFFIX)
    if name.endswith(UNREAD_COMPRESSED) or (gzipped and kind == "parquet"):
        raise CorpusError(f"{shown(path)}: a compressed file that tokenize cannot read (it reads "
                          "gzip, .jsonl.gz or .txt.gz, as it is, and parquet compresses itself): "
                          "decompress it, or leave it out with --exclude")
    if kind == "jsonl" and _first_byte(path, gzipped) == b"[":
        raise CorpusError(f"{shown(path)}: holds a JSON array ('[' first), and .json/.jsonl "
                          "files are read as JSON Lines, one JSON object per line: convert it "
                          "(e.g. jq -c '.[]' FILE > FILE.jsonl) or leave it out with --exclude")
    return gzipped


def _first_byte(path: Path, gzipped: bool) -> bytes:
    """The first byte that is not white space in the first ``PEEK_BYTES`` (b"" if none or
    unreadable: the unit reports it when read)."""
    try:
        with _open(str(path), gzipped) as f:
            head = f.read(PEEK_BYTES)
    except (OSError, EOFError, zlib.error):
        return b""
    return head.lstrip()[:1]


def _open(path: str, gzipped: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


#: The rule of :func:`group_units`, recorded in a tokens store's header (``part_split``)
PART_SPLIT = "middle-byte"


def group_units(units: Sequence[Unit], num_parts: int) -> list[list[Unit]]:
    """Split units into ``min(num_parts, len(units))`` contiguous, non-empty groups of about
    equal bytes: each unit goes to the part its middle byte falls in, kept contiguous (at most
    one part further than the last unit's) and leaving a unit for every part still to fill."""
    num_parts = max(1, min(num_parts, len(units)))
    sizes = [max(u.size, 1) for u in units]
    total = sum(sizes)
    groups: list[list[Unit]] = [[] for _ in range(num_parts)]
    acc, index = 0, 0
    for i, (u, size) in enumerate(zip(units, sizes, strict=True)):
        middle = (2 * acc + size) * num_parts // (2 * total)
        fill = num_parts - (len(units) - i)  # the parts the units left must still fill
        index = min(max(middle, fill, index), index + 1 if groups[index] else index)
        groups[index].append(u)
        acc += size
    return [g for g in groups if g] or [[]]


def fingerprint(files: Sequence[Path]) -> str:
    """Hash of every input file's name and content, in order: equal inputs give equal tokens
    stores. Only base names enter the hash, so workers that see the corpus under different
    mount points agree."""
    h = hashlib.blake2b(digest_size=16)
    for path in files:
        h.update(os.fsencode(Path(path).name) + b"\0")
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()


def read_unit(unit: Unit, problems: Problems, text_field: str = "text",
              task_field: str | None = None, default_task: str = "") -> Iterator[Document]:
    """Documents of one unit, in file order."""
    try:
        if unit.kind == "jsonl":
            yield from _read_jsonl(unit, problems, text_field, task_field, default_task)
        elif unit.kind == "parquet":
            yield from _read_parquet(unit, problems, text_field, task_field, default_task)
        else:
            yield from _read_text(unit, problems, default_task)
    except (OSError, EOFError, zlib.error) as e:  # EOFError, zlib: a damaged gzip file
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        problems.add("unreadable_file", f"{unit.shown} ({why})")


def _read_text(unit: Unit, problems: Problems, task: str) -> Iterator[Document]:
    with _open(unit.path, unit.gzipped) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.add("invalid_utf8", f"{unit.shown} (byte {e.start})")
        return
    if not text.strip():
        problems.add("empty_document", unit.shown)
        return
    yield Document(text, unit.shown, task, unit.shown)


def _read_jsonl(unit: Unit, problems: Problems, text_field: str, task_field: str | None,
                default_task: str) -> Iterator[Document]:
    stop = sys.maxsize if unit.gzipped else unit.stop  # a gzip file: to its end
    with _open(unit.path, unit.gzipped) as f:
        if unit.start:
            f.seek(unit.start - 1)
            f.readline()  # finish the line that started before this unit: its owner reads it
        line_no_hint = f.tell()
        while f.tell() < stop:
            line = f.readline()
            if not line:
                break
            where = f"{unit.shown}@{line_no_hint}"
            line_no_hint = f.tell()
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                problems.add("invalid_utf8", where)
                continue
            except ValueError:
                problems.add("bad_json", where)
                continue
            doc = _document(record, (unit.shown, where), problems, text_field, task_field,
                            default_task)
            if doc is not None:
                yield doc


def _read_parquet(unit: Unit, problems: Problems, text_field: str, task_field: str | None,
                  default_task: str) -> Iterator[Document]:
    try:
        table = pq.ParquetFile(unit.path).read_row_group(unit.start)
    except Exception as e:  # pyarrow raises several types for damaged files
        problems.add("unreadable_file", f"{unit.shown} ({e})")
        return
    if text_field not in table.column_names:
        problems.add("missing_field", f"{unit.shown} row group {unit.start} (no {text_field!r})")
        return
    for i, record in enumerate(table.to_pylist()):
        where = f"{unit.shown}#rg{unit.start}/{i}"
        doc = _document(record, (unit.shown, where), problems, text_field, task_field,
                        default_task)
        if doc is not None:
            yield doc


def _document(record: object, at: tuple[str, str], problems: Problems, text_field: str,
              task_field: str | None, default_task: str) -> Document | None:
    """The document of a record; ``at``: its file and where it is in the file."""
    source, where = at
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        problems.add("missing_field", f"{where} (no text field {text_field!r})")
        return None
    text = record[text_field]
    if not _is_utf8(text):  # JSON can spell lone surrogates ("\ud800"), which no tokenizer takes
        problems.add("invalid_utf8", f"{where} (lone surrogate in {text_field!r})")
        return None
    if not text.strip():
        problems.add("empty_document", where)
        return None
    task = default_task
    if task_field is not None:
        value = record.get(task_field)
        if value is None:
            problems.notes["defaulted_task"] += 1  # kept, with the default task
        else:
            task = str(value)
    return Document(text, source, task, where)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
