"""The house rules that no linter checks: module size (import rules: `lint-imports`)."""

from __future__ import annotations

from pathlib import Path

import mtkd

MAX_LINES = 650
PACKAGE = Path(mtkd.__file__).parent


def test_no_module_is_over_650_lines() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 30
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_every_stage_has_one_config_module() -> None:
    for stage in ("ingest", "harvest", "distill/aggregate", "distill/train"):
        assert (PACKAGE / stage / "config.py").is_file(), stage
