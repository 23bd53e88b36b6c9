"""File-system primitives of the commit protocol: durable atomic files, temp names that say
who writes them (so a rerun can tell a dead writer's debris from a live writer's work),
checksums and sizes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from mtkd.store.format import TMP_PREFIX, canonical_json, part_name

#: This host's name as temp names carry it (only letters, digits and dots).
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
STALE_TMP_SECONDS = 3600  # a temp part of another host untouched this long is abandoned


def fsync(path: Path) -> None:
    """Make a file's data, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(f: BinaryIO, data: bytes) -> None:
    """Write ``data`` and make it durable before the caller renames or links the file."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def create_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` unless it exists (then leave it as it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        write_synced(f, data)


def tmp_file(path: Path) -> Path:
    """``.tmp-<name>-<host>-<pid>-<random>`` next to ``path``: a killed writer's leftover is
    recognised as stale like a temp part (see :func:`tmp_is_stale`)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{HOST}-{os.getpid()}-{uuid.uuid4().hex}")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` via a temporary file, fsync and rename."""
    tmp = tmp_file(path)
    try:
        with open(tmp, "wb") as f:
            write_synced(f, canonical_json(obj))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tmp_part_dir(parts_dir: Path, part: int) -> Path:
    """``.tmp-<part>-<host>-<pid>-<random>``: who writes it, so reruns can tell dead from live."""
    return parts_dir / f"{TMP_PREFIX}{part_name(part)}-{HOST}-{os.getpid()}-{uuid.uuid4().hex}"


def remove_settled(path: Path, quiet: float = 0.2, limit: float = 5.0) -> None:
    """Delete the tree at ``path`` and keep it deleted for ``quiet`` seconds (within ``limit``).

    Why: zarr writes an array's chunks concurrently, and when one write fails (a full disk) the
    call raises while its sibling writes still run and recreate directories under ``path``; a
    single ``rmtree`` then leaves a temp part behind."""
    deadline = time.monotonic() + limit
    gone_since = None
    while time.monotonic() < deadline:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= quiet:
            return
        time.sleep(0.01)
    shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host is running (or not ours to ask)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_is_stale(tmp: Path) -> bool:
    """A temp part is abandoned if its writer (this host) is dead or nothing in it changed
    for ``STALE_TMP_SECONDS`` (writers on other hosts cannot be asked)."""
    fields = tmp.name[len(TMP_PREFIX):].rsplit("-", 3)
    if len(fields) == 4 and fields[1] == HOST and fields[2].isdigit() \
            and not pid_alive(int(fields[2])):
        return True
    try:
        newest = max(q.lstat().st_mtime for q in [tmp, *tmp.rglob("*")])
    except OSError:  # vanished meanwhile (its writer committed or cleaned up)
        return False
    return time.time() - newest > STALE_TMP_SECONDS


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bytes_on_disk(root: str | os.PathLike[str]) -> int:
    """Bytes of the files under ``root``, tolerating files that vanish meanwhile (other
    workers' temp parts are renamed or removed while this one counts)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def unfit_output_dir(root: Path, what: str, fits: Callable[[list[str]], bool]) -> str | None:
    """Why the directory ``root`` cannot take the output ``what`` (None: it can): it is a file,
    or it holds entries that ``fits`` rejects (the user's own files, which the output would
    mix with). A missing or empty directory fits."""
    if root.is_file():
        return f"{root} is a file, not {what}; give a new or empty directory"
    try:
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    except OSError as e:
        return f"{root}: cannot read the directory ({e.strerror or e})"
    if not names or fits(names):
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{root} exists and is not {what} (it holds {shown}); give a new or empty directory"
