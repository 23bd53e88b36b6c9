"""Tail models and imputation measured against exact answers from a real (tiny) teacher.

Trains a small Llama teacher on the standard library's ``.py`` files (a byte-level BPE from
``mtkd.recipes.models``, a plain torch cross-entropy loop, about two minutes of CPU), harvests
held-out text with :class:`mtkd.harvest.hf_engine.HfReferenceEngine` (full logits, exact
tempered tail masses) and compares, per position:

* tail models (``renormalise``, ``lump``, ``zipf``; ``exact`` as a check) at T ∈ {1, 2, 3}:
  the tempered teacher distribution q over its top-k + one tail bucket against the exact
  full-vocabulary tempered distribution collapsed the same way —
  ``tv_<model>_T<T>`` = mean total variation, ``tailerr_<model>_T<T>`` = mean |q_tail − exact
  tail|, ``tailrel_<model>_T<T>`` = mean |log q_tail − log exact tail|;
  ``tv_f16_T<T>``: the floor from storing log-probs as float16 (exact tails);
* imputation (``even`` / ``rank``) when fusing three teachers (checkpoints at 1/3, 2/3 and the
  end of the run), linear and geometric operators, exact tails, temperatures 2, 2, 1 — the fused
  sparse target against the exact dense fusion collapsed to the target's support + tail:
  ``tv_fuse_<op>_<imputation>``;
* entropy monotonicity: the share of positions where the entropy of the uniform linear mixture
  of the teachers tempered at one common T falls as T rises through 1, 1.5, 2, 3
  (``linear_entropy_falls_frac``); the same for geometric pooling (0 in theory).

    .venv/bin/python bench/tails.py                      # trains, then measures (≈2-4 min)
    .venv/bin/python bench/tails.py --dir runs/tails     # keep (and reuse) the teachers
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtkd.distill.aggregate.fuse import fuse
from mtkd.distill.aggregate.tempering import TeacherRows, temper
from mtkd.distill.aggregate.union import union_support
from mtkd.recipes.models import EOS_TOKEN, init_llama, train_bpe_tokenizer
from mtkd.recipes.stdlib_corpus import stdlib_texts

TEMPERATURES = (1.0, 2.0, 3.0)
MODELS = ("renormalise", "lump", "zipf", "exact")


def token_stream(tokenizer: object, texts: list[str]) -> np.ndarray:
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)  # type: ignore[attr-defined]
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [eos]  # type: ignore[operator]
    return np.asarray(ids, dtype=np.int64)


def train(model_dir: Path, tokenizer: object, stream: np.ndarray, *, hidden: int, layers: int,
          steps: int, snapshots: tuple[int, ...], seed: int, seq_len: int = 128,
          batch: int = 8, lr: float = 3e-3) -> list[Path]:
    """A plain cross-entropy loop on random windows; saves the model at each snapshot step."""
    from transformers import LlamaForCausalLM

    vocab = len(tokenizer)  # type: ignore[arg-type]
    init_llama(model_dir / "init", vocab, hidden, layers, heads=hidden // 64 or 1,
               max_position=seq_len + 1, seed=seed, tokenizer=tokenizer)
    model = LlamaForCausalLM.from_pretrained(str(model_dir / "init"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = np.random.default_rng(seed)
    saved = []
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(stream) - seq_len - 1, size=batch)
        x = torch.from_numpy(np.stack([stream[s:s + seq_len + 1] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step in snapshots:
            out = model_dir / f"step{step}"
            model.save_pretrained(str(out), safe_serialization=True)
            tokenizer.save_pretrained(str(out))  # type: ignore[attr-defined]
            saved.append(out)
            print(f"# {model_dir.name} step {step}: train loss {loss.item():.3f}", flush=True)
    return saved


def dense_tempered(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Exact tempered log-probs [R,V] (float64)."""
    x = logits.astype(np.float64) / temperature
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def collapsed_tv(ids: np.ndarray, probs: np.ndarray, tail: np.ndarray, exact: np.ndarray
                 ) -> np.ndarray:
    """TV between (probs at ids, tail) and the exact dense rows collapsed to the same ids +
    the rest; ids −1 are padding."""
    real = ids >= 0
    on = np.where(real, np.take_along_axis(exact, np.maximum(ids, 0), axis=1), 0.0)
    rest = np.maximum(1.0 - on.sum(axis=1), 0.0)
    return 0.5 * (np.abs(np.where(real, probs, 0.0) - on).sum(axis=1) + np.abs(tail - rest))


def entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=8e-3)
    ap.add_argument("--eval-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = args.dir or Path(tempfile.mkdtemp(prefix="mtkd-bench-tails-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run(root, args)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from mtkd.harvest.hf_engine import HfReferenceEngine

    texts = list(stdlib_texts(max_files=None))
    train_texts, eval_texts = texts[:-40], texts[-40:]
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_bpe_tokenizer(train_texts[:120], args.vocab, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    t0 = time.process_time()
    w0 = time.perf_counter()
    snaps = (args.steps // 3, 2 * args.steps // 3, args.steps)
    teachers = [root / "a" / f"step{s}" for s in snaps]
    if not all((d / "config.json").exists() for d in teachers):
        stream = token_stream(tokenizer, train_texts)
        train(root / "a", tokenizer, stream, hidden=args.hidden, layers=2, steps=args.steps,
              snapshots=snaps, seed=0, lr=args.lr)
    print(f"train_cpu_s={time.process_time() - t0:.1f}")
    print(f"train_wall_s={time.perf_counter() - w0:.1f}")

    held = token_stream(tokenizer, eval_texts)
    step = len(held) // args.eval_seqs
    seqs = [held[i * step:i * step + 129] for i in range(args.eval_seqs)]
    harvested, logits = [], []
    for d in teachers:
        engine = HfReferenceEngine(d, args.k, temperatures=TEMPERATURES, batch_size=8)
        harvested.append(engine.harvest(seqs))
        logits.append(np.concatenate([x.numpy() for x in engine.logits(seqs)]))
    vocab = logits[0].shape[1]
    n = len(logits[0])
    print(f"vocab={vocab}")
    print(f"k={args.k}")
    print(f"positions={n}")
    for j, h in enumerate(harvested):
        print(f"teacher{j}_mean_tail_mass={np.exp(h['tail_logmass']).mean():.4f}")
        print(f"teacher{j}_heldout_ce={-h['target_logprob'].mean():.3f}")

    # ---- tail models on the best teacher (the last checkpoint)
    h, lg = harvested[-1], logits[-1]
    rows = TeacherRows(h["topk_ids"], h["topk_logprobs"].astype(np.float64),
                       h["tail_logmass"].astype(np.float64), None,
                       h["tempered_tail_logmass"].astype(np.float64), TEMPERATURES)
    half = TeacherRows(rows.ids, h["topk_logprobs"].astype(np.float16), rows.tail_logmass,
                       None, rows.tempered_tail_logmass, TEMPERATURES)
    for t in TEMPERATURES:
        exact = np.exp(dense_tempered(lg, t))
        on = np.take_along_axis(exact, rows.ids.astype(np.intp), axis=1)
        exact_tail = np.maximum(1.0 - on.sum(axis=1), 1e-300)
        for model in MODELS:
            q = temper(rows, t, model, vocab)
            tv = collapsed_tv(rows.ids, q.probs, q.tail_mass, exact)
            tail = q.tail_mass
            with np.errstate(divide="ignore"):
                rel = np.abs(np.log(np.maximum(tail, 1e-300)) - np.log(exact_tail))
            print(f"tv_{model}_T{t:g}={tv.mean():.3e}")
            print(f"tailerr_{model}_T{t:g}={np.abs(tail - exact_tail).mean():.3e}")
            if model != "renormalise":  # its tail is 0: the log error is infinite
                print(f"tailrel_{model}_T{t:g}={rel.mean():.3e}")
        q = temper(half, t, "exact", vocab)
        print(f"tv_f16_T{t:g}={collapsed_tv(rows.ids, q.probs, q.tail_mass, exact).mean():.3e}")

    # ---- imputation: fuse three teachers, compare with the exact dense fusion
    temps = (2.0, 2.0, 1.0)
    w = np.full(3, 1 / 3)
    trows = [TeacherRows(x["topk_ids"], x["topk_logprobs"].astype(np.float16),
                         x["tail_logmass"].astype(np.float64), None,
                         x["tempered_tail_logmass"].astype(np.float64), TEMPERATURES)
             for x in harvested]
    dense = [np.exp(dense_tempered(lg, t)) for lg, t in zip(logits, temps, strict=True)]
    exact_ops = {"linear": sum(wj * p for wj, p in zip(w, dense, strict=True))}
    log_geo = sum(wj * np.log(np.maximum(p, 1e-300)) for wj, p in zip(w, dense, strict=True))
    log_geo -= log_geo.max(axis=1, keepdims=True)
    geo = np.exp(log_geo)
    exact_ops["geometric"] = geo / geo.sum(axis=1, keepdims=True)
    sizes = union_support([x["topk_ids"] for x in harvested], vocab)[1]
    print(f"union_mean_size={sizes.mean():.1f}")
    for op, exact in exact_ops.items():
        for mode in ("even", "rank"):
            out = fuse(trows, w, temps, op, "exact", args.k, vocab, imputation=mode)
            tv = collapsed_tv(out["ids"], out["probs"].astype(np.float64),
                              out["tail_mass"].astype(np.float64), exact)
            print(f"tv_fuse_{op}_{mode}={tv.mean():.3e}")

    # ---- entropy of a linear mixture vs one common temperature
    grid = (1.0, 1.5, 2.0, 3.0)
    falls = {"linear": 0, "geometric": 0}
    for a, b in itertools.pairwise(grid):
        h_lo, h_hi = {}, {}
        for t, store in ((a, h_lo), (b, h_hi)):
            ps = [np.exp(dense_tempered(lg, t)) for lg in logits]
            store["linear"] = entropy(sum(p for p in ps) / 3)
            lgeo = sum(np.log(np.maximum(p, 1e-300)) for p in ps) / 3
            g = np.exp(lgeo - lgeo.max(axis=1, keepdims=True))
            store["geometric"] = entropy(g / g.sum(axis=1, keepdims=True))
        for op in falls:
            falls[op] += int((h_hi[op] < h_lo[op] - 1e-9).sum())
    for op, count in falls.items():
        print(f"{op}_entropy_falls_frac={count / (n * (len(grid) - 1)):.4f}")


if __name__ == "__main__":
    main()
