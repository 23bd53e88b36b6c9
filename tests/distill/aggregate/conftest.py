"""Shared fixtures of the aggregate tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distill.aggregate.test_job import make_teacher, make_tokens


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tokens store (tasks code, prose, math) and two teachers over it."""
    root = tmp_path_factory.mktemp("refusals")
    tokens = make_tokens(root)
    return tokens, [make_teacher(root, tokens, f"t{j}", seed=20 + j, scale=1.0 + j)
                    for j in range(2)]
