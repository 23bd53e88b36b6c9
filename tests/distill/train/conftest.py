"""The train tests' data: a tokens store of standard-library text, its targets, and a held-out
store with the bytes each token spells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from mtkd.ingest.token_bytes import token_bytes
from mtkd.recipes.stdlib_corpus import stdlib_texts

from .test_loader import write_targets, write_tokens


@pytest.fixture(scope="module")
def data(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tokens store of standard-library text (windows of 20–60 tokens) and its targets."""
    root = tmp_path_factory.mktemp("train-data")
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    rng = np.random.default_rng(0)
    seqs, docs = [], []
    for text in stdlib_texts(max_files=12, max_chars=60_000):
        ids = np.array([*tok.encode(text).ids, eos], dtype=np.int32)
        start = 0
        while start < len(ids) - 2 and len(seqs) < 240:
            n = int(rng.integers(20, 60))
            seqs.append(ids[start : start + n])
            docs.append(len(seqs) // 4)  # "documents" of four windows
            start += n
    vocab = tok.get_vocab_size()
    attrs = {"tokenizer": str(tokenizer_dir), "vocab_size": vocab, "eos_id": eos}
    tokens = write_tokens(root / "tokens", seqs, attrs, parts=2, doc_ids=docs)
    write_targets(root / "targets", tokens, vocab)
    seqs, ends = heldout_windows(tok, eos)
    write_tokens(root / "heldout", seqs, attrs, parts=2, byte_ends=ends)
    return {"tokens": str(root / "tokens"), "targets": str(root / "targets"),
            "heldout": str(root / "heldout")}


def heldout_windows(tok: Tokenizer, eos: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Windows of ≤ 64 tokens of other standard-library text, each the text of a span of
    characters after an ``eos`` (0 bytes, so every byte of the text is in a label; some also
    end with one), and the ``byte_end`` of their tokens from what each token spells."""
    spelled = token_bytes(tok)
    rng = np.random.default_rng(1)
    seqs, ends = [], []
    for text in list(stdlib_texts(max_files=16))[12:]:
        start = 0
        while start < len(text) and len(seqs) < 40:
            n = int(rng.integers(60, 180))
            ids = [eos, *tok.encode(text[start : start + n], add_special_tokens=False).ids]
            if len(seqs) % 3 == 0:
                ids.append(eos)
            start += n
            if len(ids) <= 64:
                seqs.append(np.array(ids, dtype=np.int32))
                ends.append(np.cumsum([len(spelled[i] or b"") for i in ids]))
    return seqs, ends
