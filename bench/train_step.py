"""Benchmark a training step of a Llama-style student on CPU: KD against CE, ours against
dense targets, and the loader against the step.

Student: hidden 512, 4 layers, 8 heads, vocab 32000; batches of 8 × 512 packed tokens from
real stores on disk (top-64 fused targets). Prints, last line last:

* ``kd_vs_ce_peak_mem``: peak RSS growth of a KD step ÷ that of a plain CE step (steady state:
  the second step, after AdamW's state exists), each in a fresh subprocess;
* ``naive_vs_chunked_peak_mem``: peak RSS growth of a dense KD loss (forward + backward) that
  materialises the teacher's and the student's [N, V] distributions ÷ the chunked loss's;
* ``loader_vs_step``: token positions/s the loader delivers (synchronously, from the stores,
  the target store coded ``q64v2``) ÷ positions/s a KD step consumes (``loader_vs_step_raw``:
  from a raw target store);
* ``kd_vs_ce_step``: median KD step time ÷ median CE step time, steps interleaved in one
  process so that load on the machine hits both alike.

Goals: kd_vs_ce_step ≤ 1.10, kd_vs_ce_peak_mem ≤ 1.05, naive_vs_chunked_peak_mem ≥ 3,
loader_vs_step ≥ 10.

    .venv/bin/python bench/train_step.py            # ~3–5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mtkd.distill.train.config import TrainConfig
from mtkd.distill.train.dense_reference import dense_kd_loss
from mtkd.distill.train.distributed import Dist
from mtkd.distill.train.loader import PackedBatch, PackedLoader
from mtkd.distill.train.loop import train_step
from mtkd.distill.train.losses import sparse_kd_loss
from mtkd.distill.train.objective import LossSpec, StudentLoss
from mtkd.distill.train.optimizer import make_optimizer
from mtkd.distill.train.targets import SparseTargets
from mtkd.store import StoreWriter, open_store
from mtkd.store.schema import target_header, tokens_header

VOCAB, HIDDEN, LAYERS, HEADS, INTER = 32000, 512, 4, 8, 1408
SEQ_LEN, BATCH, TOPK = 512, 8, 64
CPU = Dist(0, 1, torch.device("cpu"), False)


# --------------------------------------------------------------------------------------------
# Stores and batches


def build_stores(root: Path, sequences: int = 320, seed: int = 0,
                 coding: str | None = None) -> tuple[Path, Path]:
    """A tokens store of random sequences (64–1024 tokens) and a top-64 target store
    (``coding``: the target store's sparse columns coded, see ``target_codec``)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(64, 1025, size=sequences)
    tokens_path, targets_path = root / "tokens", root / "targets"
    tw = StoreWriter(tokens_path, tokens_header(2, {"vocab_size": VOCAB, "eos_id": 0}))
    halves = np.array_split(np.arange(sequences), 2)
    seqs = [rng.integers(1, VOCAB, size=n).astype(np.int32) for n in lengths]
    for p, idx in enumerate(halves):
        with tw.open_part(p) as pw:
            pw.append({"token_ids": np.concatenate([seqs[i] for i in idx])}, lengths[idx], idx)
    assert tw.finalize()
    tokens = open_store(tokens_path, "tokens")
    attrs = {"tokens_fingerprint": tokens.manifest["checksum"], "vocab_size": VOCAB}
    gw = StoreWriter(targets_path, target_header(2, TOPK, 2, attrs, coding=coding))
    probs = 1.0 / np.arange(1, TOPK + 1)
    probs = (0.9 * probs / probs.sum()).astype(np.float32)
    for p, idx in enumerate(halves):
        nxt = np.concatenate([seqs[i][1:] for i in idx]).astype(np.int64)
        n = len(nxt)
        rows = {
            "ids": ((nxt[:, None] + 7919 * np.arange(TOPK)) % VOCAB).astype(np.int32),
            "probs": np.broadcast_to(probs, (n, TOPK)),
            "tail_mass": np.full(n, 0.1, np.float32),
            "weights": np.full((n, 2), 0.5, np.float32),
            "jensen_gap": np.zeros(n, np.float32),
            "disagreement": np.zeros(n, np.float32),
        }
        with gw.open_part(p) as pw:
            pw.append(rows, lengths[idx] - 1, idx)
    assert gw.finalize()
    return tokens_path, targets_path


def loader(stores: tuple[Path, Path], kd: bool, seq_len: int = SEQ_LEN,
           batch_size: int = BATCH) -> PackedLoader:
    tokens = open_store(stores[0], "tokens")
    targets = open_store(stores[1], "target") if kd else None
    return PackedLoader(tokens, targets, seq_len=seq_len, batch_size=batch_size, seed=0,
                        vocab_size=VOCAB)


def batches(stores: tuple[Path, Path], kd: bool) -> tuple[PackedBatch, PackedBatch]:
    """(a 1 × 16 warm-up batch, a full 8 × 512 batch)."""
    return next(loader(stores, kd, 16, 1).stream()), next(loader(stores, kd).stream())


def student() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=SEQ_LEN,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).train()


# --------------------------------------------------------------------------------------------
# Measurements (the memory ones run in fresh subprocesses: ``--child MODE``)


def rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_growth_mb(fn: Callable[[], object]) -> float:
    """Peak RSS during ``fn()`` minus RSS before it (the kernel's high-water mark is reset)."""
    before = rss_kb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (rss_kb("VmHWM") - before) / 1024


def step_fn(model: torch.nn.Module, mode: str,
            stores: tuple[Path, Path]) -> Callable[[], float]:
    """A training step of the trainer (``train_step``) on a fixed full batch, after a tiny
    warm-up step that creates AdamW's state."""
    kd = mode == "kd"
    cfg = TrainConfig(tokens=str(stores[0]), out="", student={},
                      targets=str(stores[1]) if kd else None, objective="mix" if kd else "ce")
    net = StudentLoss(model, LossSpec.from_config(cfg))
    opt = make_optimizer(model, cfg)
    warm, batch = batches(stores, mode == "kd")
    train_step(net, model, opt, [warm], CPU, grad_clip=1.0)
    return lambda: train_step(net, model, opt, [batch], CPU, grad_clip=1.0)


def child_step_memory(stores: tuple[Path, Path], mode: str) -> dict[str, float]:
    return {"peak_mb": peak_growth_mb(step_fn(student(), mode, stores))}


def child_loss_memory(stores: tuple[Path, Path], mode: str) -> dict[str, float]:
    """Loss forward + backward alone, on the lm_head: dense [N,V] targets or our chunks."""
    _, batch = batches(stores, True)
    gen = torch.Generator().manual_seed(0)
    n = BATCH * SEQ_LEN
    hidden = torch.randn(n, HIDDEN, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(VOCAB, HIDDEN, generator=gen)).requires_grad_()
    labels = batch.labels.reshape(-1)
    assert batch.targets is not None
    flat = batch.targets.flatten()

    def dense() -> None:
        probs, support = flat.to_dense(VOCAB)  # the teacher's full distribution: top-k + tail
        off = (~support).sum(-1, keepdim=True).clamp_min(1)
        probs += torch.where(support, 0.0, flat.tail_mass[:, None] / off)
        logits = hidden @ weight.T
        dense_kd_loss(logits, probs, labels).loss.backward()

    def chunked() -> None:
        targets = SparseTargets(flat.ids, flat.probs, flat.tail_mass)
        sparse_kd_loss(hidden, weight, targets, labels).loss.backward()

    return {"peak_mb": peak_growth_mb(dense if mode == "dense" else chunked)}


def in_child(kind: str, mode: str, stores: tuple[Path, Path]) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--child", kind, mode, str(stores[0]), str(stores[1])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_times(stores: tuple[Path, Path], steps: int) -> dict[str, list[float]]:
    """Wall and process-CPU seconds per optimizer step, CE and KD interleaved (order
    alternating); CPU time is the steadier figure on a shared machine."""
    model = student()
    fns = {mode: step_fn(model, mode, stores) for mode in ("ce", "kd")}
    times: dict[str, list[float]] = {"ce": [], "kd": [], "ce_cpu": [], "kd_cpu": []}
    for i in range(steps):
        for mode in ("ce", "kd") if i % 2 else ("kd", "ce"):
            t, c = time.perf_counter(), time.process_time()
            fns[mode]()
            times[mode].append(time.perf_counter() - t)
            times[f"{mode}_cpu"].append(time.process_time() - c)
    return times


def loader_rate(stores: tuple[Path, Path], batches: int = 30) -> float:
    """Real token positions per second delivered by the KD loader (no prefetch thread)."""
    ld = loader(stores, True)
    it = ld.stream()
    next(it)  # the epoch's packing plan
    t = time.perf_counter()
    n = sum(next(it).num_tokens for _ in range(batches))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, mode, tok, tgt = args.child
        fn = child_step_memory if kind == "step" else child_loss_memory
        print(json.dumps(fn((Path(tok), Path(tgt)), mode)))
        return

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="mtkd-bench-") as tmp:
        t0 = time.perf_counter()
        stores = build_stores(Path(tmp))
        print(f"stores: {open_store(stores[0]).num_rows} tokens, top-{TOPK} targets, "
              f"built in {time.perf_counter() - t0:.1f}s", flush=True)
        mem = {m: in_child("step", m, stores)["peak_mb"] for m in ("ce", "kd")}
        print(f"step peak RSS growth: ce {mem['ce']:.0f} MB, kd {mem['kd']:.0f} MB", flush=True)
        loss_mem = {m: in_child("loss", m, stores)["peak_mb"] for m in ("dense", "chunked")}
        print(f"loss peak RSS growth: dense {loss_mem['dense']:.0f} MB, "
              f"chunked {loss_mem['chunked']:.0f} MB", flush=True)
        times = step_times(stores, args.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        ce_t, kd_t = med["ce"], med["kd"]
        for k in ("", "_cpu"):
            print(f"step{k or '_wall'} seconds: ce {[round(x, 2) for x in times['ce' + k]]}, "
                  f"kd {[round(x, 2) for x in times['kd' + k]]}", flush=True)
        print(f"kd_vs_ce_step_cpu={med['kd_cpu'] / med['ce_cpu']:.3f} (process CPU time)")
        load_raw = loader_rate(stores)
        coded = build_stores(Path(tmp) / "coded", coding="q64v2")
        load = loader_rate(coded)  # the compact target store (aggregate --codec q64v2)
        step_rate = BATCH * SEQ_LEN / kd_t
        print(f"loader {load:,.0f} positions/s from q64v2 targets, {load_raw:,.0f} from raw; "
              f"KD step {step_rate:,.0f} positions/s")
        print(f"loader_vs_step_raw={load_raw / step_rate:.1f}")
        print(f"kd_vs_ce_peak_mem={mem['kd'] / mem['ce']:.3f}")
        print(f"naive_vs_chunked_peak_mem={loss_mem['dense'] / loss_mem['chunked']:.2f}")
        print(f"loader_vs_step={load / step_rate:.1f}")
        print(f"kd_vs_ce_step={kd_t / ce_t:.3f}")


if __name__ == "__main__":
    main()
