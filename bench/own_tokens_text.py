"""How much of a non-Latin text a teacher with its own tokenizer covers (``--tokenization own``).

A student whose byte-level BPE was trained on Python sources splits most non-ASCII characters
over several byte tokens, so its windows of ``--max-len`` tokens often start or end inside a
character. The teacher (SmolLM2, its own 49,152-id tokenizer) must still read each window's
text and give the student's rows targets there. Builds its own input, then runs the commands a
user runs:

* the student tokenizer: a 2,048-id byte-level BPE trained on standard-library sources;
* the text: the UTF-8 samples of Chinese, Japanese and Korean that CPython's test suite ships
  (``test/cjkencodings/*-utf8.txt``, 11 kB), one document per file;
* ``mtkd tokenize --max-len 128``, ``mtkd harvest --model <SmolLM2> --tokenization own --k 8``
  (vLLM, ``--enforce-eager``), ``mtkd aggregate``.

Prints ``name=value`` lines: the windows and the student rows, the windows the teacher could not
read by reason (``unreadable_<reason>``; the aggregate falls back to CE on all their rows), and
the share of student rows the teacher gives a distribution, ``coverage_fraction`` (headline,
last). Before 2026-12-08 a window cut inside a character was refused whole (``undecodable``).

    .venv/bin/python bench/own_tokens_text.py                   # ≈ 1 min on 2 cores
    .venv/bin/python bench/own_tokens_text.py --max-len 64 --dir /tmp/own-text
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mtkd.distill.aggregate.summary import summarize
from mtkd.harvest.own_tokens import unreadable_counts
from mtkd.recipes.models import train_bpe_tokenizer
from mtkd.recipes.real_teacher import ensure_smollm2
from mtkd.recipes.stdlib_corpus import stdlib_root, stdlib_texts
from mtkd.store import open_store

SAMPLES = "test/cjkencodings"


def mtkd(*args: object) -> None:
    """One ``mtkd`` command, as a user runs it; its output is shown only if it fails."""
    done = subprocess.run([sys.executable, "-m", "mtkd", *map(str, args)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"mtkd {args[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                 f"{done.stderr[-3000:]}")


def write_corpus(path: Path) -> int:
    """The test suite's UTF-8 CJK samples as a JSONL corpus; the number of documents."""
    files = sorted((stdlib_root() / SAMPLES).glob("*-utf8.txt"))
    if not files:
        sys.exit(f"{stdlib_root() / SAMPLES}: no *-utf8.txt samples (this Python was installed "
                 "without its test suite)")
    with path.open("w", encoding="utf-8") as f:
        for file in files:
            f.write(json.dumps({"text": file.read_text(encoding="utf-8")}) + "\n")
    return len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-len", type=int, default=128, help="student tokens per window")
    ap.add_argument("--vocab", type=int, default=2048, help="the student BPE's vocabulary")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="mtkd-own-text-"))
    root.mkdir(parents=True, exist_ok=True)
    teacher = ensure_smollm2()
    student = root / "student-tokenizer"
    if not (student / "tokenizer.json").exists():
        train_bpe_tokenizer(stdlib_texts(max_files=200), args.vocab, student)
    documents = write_corpus(root / "text.jsonl")
    mtkd("tokenize", root / "text.jsonl", "--tokenizer", student, "--out", root / "tokens",
         "--max-len", args.max_len)
    mtkd("harvest", root / "tokens", "--model", teacher, "--out", root / "teacher",
         "--tokenization", "own", "--k", 8, "--dtype", "bfloat16", "--enforce-eager")
    mtkd("aggregate", root / "teacher", "--tokens", root / "tokens", "--out", root / "targets")
    tokens = open_store(root / "tokens")
    unread = unreadable_counts(open_store(root / "teacher"))
    figures = summarize(root / "targets")
    print(f"documents={documents}")
    print(f"windows={tokens.num_sequences}")
    print(f"student_rows={int(figures['positions'])}")
    for reason, n in sorted(unread.items()):
        print(f"unreadable_{reason}={n}")
    print(f"unreadable_windows={sum(unread.values())}")
    print(f"ce_only_fraction={figures['ce_only_fraction']:.4f}")
    print(f"coverage_fraction={figures['coverage_fraction_0']:.4f}")


if __name__ == "__main__":
    main()
