"""Fixtures of the store tests: stores in memory, one small store of every codec."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtkd.store import Header

from .stores import SMALL_SPECS, write_store


@pytest.fixture
def tmp_path(memory_tmp_path: Path) -> Path:
    """Stores in memory where possible (see conftest.memory_tmp_path)."""
    return memory_tmp_path


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[Path, list[dict]]:
    root = tmp_path / "store"
    header = Header("test", 3, SMALL_SPECS, {"answer": 42})
    written = write_store(root, header, [[3, 0, 5, 2], [4, 1], [6]])
    return root, written
