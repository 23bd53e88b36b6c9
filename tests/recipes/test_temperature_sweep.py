"""The validation split that chooses the real teacher's temperature: train documents the
student never trains on, seeded, cut short, and tokenised by the public command."""

from __future__ import annotations

import json
from pathlib import Path

from mtkd.recipes import temperature_sweep
from mtkd.recipes.models import train_bpe_tokenizer
from mtkd.recipes.run import Run
from mtkd.recipes.sizes import SIZES
from mtkd.store import open_store


def test_validation_split_holds_only_documents_outside_the_students_budget(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(temperature_sweep, "VALIDATION_DOCUMENTS", 5)
    monkeypatch.setattr(temperature_sweep, "VALIDATION_CHARS", 40)
    docs = [{"text": f"def f{i}(x):\n    return x * {i}\n" * 20, "task": "t", "path": f"{i}.py"}
            for i in range(12)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (corpus / "student.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:4]))
    train_bpe_tokenizer((d["text"] for d in docs), 300, tmp_path / "tokenizer")
    run = Run(tmp_path, SIZES["tiny"])

    assert temperature_sweep.write_validation(run) == "tokens-validation"

    picked = [json.loads(line) for line in (corpus / "validation.jsonl").open()]
    assert len(picked) == 5
    assert {d["path"] for d in picked} <= {d["path"] for d in docs[4:]}  # never the student's
    assert all(len(d["text"]) == 40 for d in picked)
    store = open_store(tmp_path / "stores" / "tokens-validation", verify="full")
    assert store.num_rows == run.results["tokens"]["tokens-validation"] > 0
    again = Run(tmp_path, SIZES["tiny"])
    temperature_sweep.write_validation(again)  # made once: the same documents
    assert [json.loads(line) for line in (corpus / "validation.jsonl").open()] == picked
