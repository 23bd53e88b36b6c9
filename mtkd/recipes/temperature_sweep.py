"""The real teacher's temperature, chosen on a validation split (``--experiments all``).

The held-out files judge the demo's students, so a setting chosen on them would flatter the
demo. The temperature at which SmolLM2 teaches the student (``cross_experiments.
REAL_TEMPERATURE``) is chosen instead on documents of the train split that the student never
trains on: ``VALIDATION_DOCUMENTS`` of them drawn with a fixed seed from those after the
student's budget, each cut to its first ``VALIDATION_CHARS`` characters (many short pieces
rather than a few long files). A CE-only student and one student per temperature, trained as
in the demo, are evaluated there; the results go to ``results["real_temperature_sweep"]``.
"""

from __future__ import annotations

import json
import random
from typing import Any

from mtkd.recipes.experiments import aggregate, student
from mtkd.recipes.run import Run, tokenize_into, train_models

VALIDATION = "tokens-validation"
VALIDATION_DOCUMENTS = 60
VALIDATION_CHARS = 3000
TEMPERATURES = (1.0, 1.5, 2.0)


def write_validation(run: Run, seed: int = 0) -> str:
    """The validation tokens store (``stores/tokens-validation``), made once."""
    corpus = run.path("corpus", "validation.jsonl")
    if not corpus.exists():
        with open(run.path("corpus", "student.jsonl")) as f:
            used = sum(1 for _ in f)
        with open(run.path("corpus", "train.jsonl")) as f:
            unseen = f.read().splitlines()[used:]
        picked = random.Random(seed).sample(unseen, min(VALIDATION_DOCUMENTS, len(unseen)))
        with open(corpus, "w") as out:
            for line in picked:
                doc = json.loads(line)
                out.write(json.dumps(doc | {"text": doc["text"][:VALIDATION_CHARS]}) + "\n")
    tokenize_into(run, run.path("tokenizer"), ((VALIDATION, corpus.name),))
    return VALIDATION


def temperature_sweep(run: Run, teacher_store: str, teacher: str) -> dict[str, Any]:
    """Validation bits per byte of the CE-only student and of students distilled from
    ``teacher_store`` at each of ``TEMPERATURES``; the best temperature is ``chosen``."""
    validation = write_validation(run)
    names = {t: f"{teacher}-T{t:g}" for t in TEMPERATURES}
    jobs = [student(run, "ce-only", None, heldout=validation, folder="validation")]
    jobs += [student(run, name, aggregate(run, f"single-{name}", [teacher_store], [t]),
                     heldout=validation, folder="validation") for t, name in names.items()]
    bpb = [m["heldout_bpb"] for m in train_models(run, jobs)]
    by_t = dict(zip(TEMPERATURES, bpb[1:], strict=True))
    sweep = {"validation_tokens": run.results["tokens"][validation], "ce_only_bpb": bpb[0],
             "bpb": {f"{t:g}": v for t, v in by_t.items()},
             "chosen": min(by_t, key=lambda t: by_t[t])}
    run.results["real_temperature_sweep"] = sweep
    run.save()
    return sweep
