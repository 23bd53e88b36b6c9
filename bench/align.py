"""Benchmark of the cross-tokenizer alignment (``align_rows``) and its coverage.

Builds its own input: a student and a teacher byte-level BPE of different sizes trained on
standard-library text (``mtkd.recipes.stdlib_corpus``, ``tokenizers``), held-out standard-library
files cut into windows of ``--window`` student tokens (plus the end-of-text token, as
``mtkd tokenize`` writes them), each window's text tokenised by the teacher its own way, and
random but valid teacher rows (k distinct ids, descending log-probs, a tail, the actual next
token's log-prob, inside the top-k for 70% of rows). Then the projection is built the way the
aggregate job builds it (``cross.projection``: specials paired, σ by the student BPE model's
first token) and ``align_rows`` run on all windows at once, best of ``--repeats`` (after a
warm-up call that compiles the numba kernel).

Prints ``name=value`` lines: sizes, ``projection_s``, the coverage shares (``shared``,
``interior``, ``fallback``, ``chunk``: exact label mass, ``label``: label mass known),
``teacher_tokens_per_student_token``, and ``align_rows_per_s`` (student rows per second, one
core) last.

    .venv/bin/python bench/align.py                          # student 2048, teacher 8192
    .venv/bin/python bench/align.py --teacher-vocab 512 --k 32
    MTKD_NUMBA=0 .venv/bin/python bench/align.py --files 2   # the plain-Python loop
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mtkd.distill.aggregate.align import UNKNOWN, TokenSpans, align_rows
from mtkd.distill.aggregate.cross import projection
from mtkd.distill.aggregate.tempering import TeacherRows
from mtkd.ingest.job import windows
from mtkd.ingest.token_bytes import byte_bounds, token_bytes
from mtkd.ingest.window_text import Spelling, document_bytes
from mtkd.recipes.models import byte_level_bpe
from mtkd.recipes.stdlib_corpus import stdlib_files

EOS = "<|endoftext|>"


def train_bpe(texts: list[str], vocab_size: int, path: Path) -> Tokenizer:
    tok = byte_level_bpe(texts, vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return tok


def student_windows(tok: Tokenizer, texts: list[str], window: int
                    ) -> tuple[TokenSpans, list[bytes]]:
    """Windows of ``window`` tokens of each text plus EOS, as tokenize cuts them: their spans
    (each from byte 0 of its window text) and texts."""
    spelling, eos = Spelling.of(tok), tok.token_to_id(EOS)
    ids_out, bounds_out, window_texts = [], [], []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        doc = document_bytes(ids, 1, text, spelling)
        ids = [*ids, eos]
        for start, stop in windows(len(ids), window, 0):
            if stop - start < 2:
                continue
            _, ends, window_text = doc.window(start, stop)
            ids_out.append(ids[start:stop])
            bounds_out.append(np.concatenate([[0], ends]))
            window_texts.append(window_text)
    return TokenSpans.from_sequences(ids_out, bounds_out), window_texts


def teacher_tokens(tok: Tokenizer, texts: list[bytes]) -> TokenSpans:
    """The teacher's canonical tokens of each window text (a window that is not valid UTF-8
    gets no rows: one token of unknown id over its text, as an unreadable sequence)."""
    spelled = token_bytes(tok)
    ids_out, bounds_out = [], []
    for data in texts:
        try:
            ids = tok.encode(data.decode("utf-8"), add_special_tokens=False).ids
        except UnicodeDecodeError:
            ids_out.append([UNKNOWN])
            bounds_out.append([0, len(data)])
            continue
        ids_out.append(ids)
        bounds_out.append(byte_bounds(ids, spelled, data))
    return TokenSpans.from_sequences(ids_out, bounds_out)


def random_rows(rng: np.random.Generator, spans: TokenSpans, vocab: int, k: int) -> TeacherRows:
    """Valid teacher rows for every teacher row of ``spans``: Zipf-like ids, the actual next
    token among them for 70% of rows, log-probs descending, a tail of 1–30%."""
    seq_first = np.repeat(spans.offsets[:-1], np.diff(spans.offsets))
    nxt = spans.ids[np.arange(len(spans.ids)) != seq_first]  # each row's actual next token
    n = len(nxt)
    popular = np.minimum(rng.zipf(1.3, size=(n, 4 * k)) - 1, vocab - 1)
    ids = np.empty((n, k), np.int64)
    inside = rng.random(n) < 0.7
    for r in range(n):
        pool = np.unique(popular[r])
        pool = pool[pool != nxt[r]]
        if len(pool) < k:
            extra = rng.choice(vocab, size=3 * k, replace=False)
            pool = np.unique(np.concatenate([pool, extra[extra != nxt[r]]]))
        row = rng.permutation(pool)[:k]
        if inside[r]:
            row[rng.integers(0, min(k, 8))] = nxt[r]
        ids[r] = row
    tail = rng.uniform(0.01, 0.3, n)
    weights = np.sort(rng.exponential(1.0, (n, k)) ** 3, axis=1)[:, ::-1]
    probs = weights / weights.sum(axis=1, keepdims=True) * (1 - tail)[:, None]
    logprobs = np.log(probs)
    at = ids == nxt[:, None]
    target = np.where(inside, np.where(at, logprobs, 0).sum(axis=1),
                      np.log(np.minimum(probs[:, -1], tail) * rng.uniform(0.05, 0.9, n)))
    return TeacherRows(ids.astype(np.int32), logprobs.astype(np.float32), np.log(tail),
                       target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student-vocab", type=int, default=2048)
    parser.add_argument("--teacher-vocab", type=int, default=8192)
    parser.add_argument("--train-files", type=int, default=60)
    parser.add_argument("--files", type=int, default=12, help="held-out files aligned")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    files = stdlib_files(args.train_files + args.files, top_level=True)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    train, held_out = texts[:args.train_files], texts[args.train_files:]
    with tempfile.TemporaryDirectory(prefix="mtkd-align-") as tmp:
        student = train_bpe(train, args.student_vocab, Path(tmp) / "student")
        teacher = train_bpe(train[::-1], args.teacher_vocab, Path(tmp) / "teacher")
        s_spans, window_texts = student_windows(student, held_out, args.window)
        t_spans = teacher_tokens(teacher, window_texts)
        rows = random_rows(np.random.default_rng(0), t_spans,
                           teacher.get_vocab_size(with_added_tokens=True), args.k)
        start = time.perf_counter()
        proj = projection(str(Path(tmp) / "student"), str(Path(tmp) / "teacher"),
                          student.get_vocab_size(with_added_tokens=True))
        projection_s = time.perf_counter() - start
    align_rows(s_spans, t_spans, rows, proj)  # compiles the numba kernel
    best = np.inf
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = align_rows(s_spans, t_spans, rows, proj)
        best = min(best, time.perf_counter() - start)
    cov = out.coverage()
    n = cov["rows"]
    print(f"student_vocab={proj.student_size}")
    print(f"teacher_vocab={proj.teacher_size}")
    print(f"k={args.k}")
    print(f"sequences={s_spans.num_sequences}")
    print(f"student_rows={n}")
    print(f"teacher_rows={rows.n}")
    print(f"teacher_tokens_per_student_token={len(t_spans.ids) / len(s_spans.ids):.3f}")
    print(f"projection_s={projection_s:.3f}")
    for kind in ("shared", "interior", "fallback", "chunk", "label"):
        print(f"{kind}={cov[kind] / n:.4f}")
    print(f"align_s={best:.4f}")
    print(f"align_rows_per_s={n / best:.0f}")


if __name__ == "__main__":
    main()
