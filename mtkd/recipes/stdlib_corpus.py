"""The standard library's own source files: a deterministic corpus that needs no download
(the demo's corpus, the local tokenizers of the tests and the bench)."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

EXCLUDED = ("site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
            "ensurepip", "__pycache__", "pydoc_data")


def stdlib_root() -> Path:
    """Where this interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_files: int | None = None, *, top_level: bool = False) -> list[Path]:
    """The standard library's own ``.py`` files in sorted order, the first ``max_files`` of them.

    Tests, third-party packages and GUI/legacy packages (``EXCLUDED``) are left out.
    ``top_level``: only the files directly in the library's root (its packages left out).
    """
    root = stdlib_root()
    found = root.glob("*.py") if top_level else root.rglob("*.py")
    files = sorted(p for p in found
                   if not any(part in EXCLUDED or part.startswith("test")
                              for part in p.relative_to(root).parts))
    return files[:max_files]


def stdlib_texts(max_files: int | None = 200, max_chars: int | None = None) -> Iterator[str]:
    """Yield the text of the standard library's top-level ``.py`` files, in sorted order, the
    last one cut so that at most ``max_chars`` characters are yielded in all."""
    total = 0
    for path in stdlib_files(max_files, top_level=True):
        text = path.read_text(encoding="utf-8", errors="replace")
        if max_chars is not None:
            text = text[: max_chars - total]
        total += len(text)
        yield text
        if max_chars is not None and total >= max_chars:
            return
