"""Fixtures of the harvest tests: the 'successor' teacher model, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

VOCAB = 512
MAX_LEN = 1024


@pytest.fixture(scope="session")
def successor_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Llama, hidden 128, 2 layers, 2 heads (head_dim 64): argmax after x is (x + 1) mod V."""
    from transformers import AutoTokenizer

    from mtkd.recipes.models import init_llama

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = tmp_path_factory.mktemp("successor")
    return init_llama(
        out,
        VOCAB,
        hidden=128,
        layers=2,
        heads=2,
        max_position=MAX_LEN,
        seed=1,
        tokenizer=tokenizer,
        successor=True,
    )
