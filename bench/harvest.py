"""Benchmark of the vLLM harvest path against plain prefill (vLLM CPU, k=64, bfloat16).

For each of two models built here in a temp dir, ONE engine in this process runs, warmed up,
the median of ``--repeats`` interleaved rounds: plain prefill (``prompt_logprobs`` off,
``max_tokens=1``), ``VllmEngine.harvest`` (prompt log-probs → the contract's arrays) and the same
harvest with ``--num-samples`` draws per position made in the worker, on the same sequences.

* ``teacher``: Llama-style hidden 512, 8 layers, 8 heads, vocab 8192, 64 × 512 tokens.
  ``flops_bound`` = prefill FLOPs ÷ (prefill FLOPs + lm_head over every row) (plain prefill
  runs the lm_head on the last row only); ``harvest_efficiency`` = harvest_tok_s ÷
  prefill_tok_s ÷ flops_bound (goal ≥ 0.95).
* ``overhead``: hidden 128, 2 layers, 2 heads (head_dim 64), vocab 512, 64 × 500 tokens.
  ``extra_us_per_position`` = 1/harvest_tok_s − 1/prefill_tok_s in µs (goal ≤ 2.0).
* ``sampled_vs_topk_cost`` = top-k harvest tok/s ÷ sampled harvest tok/s (goal ≤ 1.10).

``cpu_*`` lines repeat both figures from the CPU time of the busiest process (the model worker,
the critical path) instead of wall time: on a shared machine, wall time moves with other load.

Prints ``name=value`` lines prefixed by the model, the headline ``extra_us_per_position=`` last.

    .venv/bin/python bench/harvest.py                  # fast path, both models
    .venv/bin/python bench/harvest.py --path public --quick
    .venv/bin/python bench/harvest.py --spawn       # engine core in spawned processes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtkd.harvest.threads import limit_openmp_spinning

limit_openmp_spinning()  # as `mtkd harvest` does, before torch is imported
K = 64


@dataclass(frozen=True)
class BenchModel:
    name: str
    hidden: int
    layers: int
    heads: int
    vocab: int
    seq_len: int


TEACHER = BenchModel("teacher", hidden=512, layers=8, heads=8, vocab=8192, seq_len=512)
OVERHEAD = BenchModel("overhead", hidden=128, layers=2, heads=2, vocab=512, seq_len=500)


def prefill_flops(m: BenchModel, intermediate: int, lm_head_rows: int) -> float:
    """Forward FLOPs of one sequence: projections, MLP, causal attention, lm_head rows."""
    h, n = m.hidden, m.seq_len
    dense = n * m.layers * 2 * (4 * h * h + 3 * h * intermediate)
    attention = m.layers * 2 * 2 * h * n * (n + 1) / 2
    return dense + attention + lm_head_rows * 2 * h * m.vocab


def busiest_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of this process and every child process, by pid."""
    import psutil

    out = {}
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
    return out


def median_times(fns: list[Callable[[], object]],
                 repeats: int) -> tuple[list[float], list[float]]:
    """Median wall time of each function over ``repeats`` interleaved rounds (after a warm-up
    round), and its median CPU time in the busiest process (the model worker: the critical
    path, and unlike wall time hardly moved by other load on a shared machine)."""
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        for i, fn in enumerate(fns):
            before = busiest_cpu_seconds()
            t = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t
            after = busiest_cpu_seconds()
            busiest = max(after[pid] - before.get(pid, 0.0) for pid in after)
            if r:
                wall[i].append(elapsed)
                cpu[i].append(busiest)
    return [statistics.median(w) for w in wall], [statistics.median(c) for c in cpu]


def harvest_with(engine: object, draws: bool, seqs: list[np.ndarray]) -> Callable[[], object]:
    """A harvest of ``seqs`` with or without the engine's draws."""

    def run() -> object:
        engine.use_draws(draws)  # type: ignore[attr-defined]
        return engine.harvest(seqs)  # type: ignore[attr-defined]

    return run


def run_model(m: BenchModel, workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    from vllm import SamplingParams

    from mtkd.harvest.vllm_engine import VllmEngine
    from mtkd.recipes.models import init_llama, llama_intermediate, train_bpe_tokenizer
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    tokenizer = train_bpe_tokenizer(stdlib_texts(), m.vocab)
    model_dir = init_llama(
        workdir / m.name, m.vocab, m.hidden, m.layers, m.heads, tokenizer=tokenizer
    )
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, m.vocab, m.seq_len) for _ in range(args.sequences)]
    tokens = args.sequences * m.seq_len
    engine = VllmEngine(
        model_dir, K, dtype="bfloat16", fast_path=args.path, max_model_len=m.seq_len + 16,
        in_process=not args.spawn, num_samples=args.num_samples,
    )
    plain = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    runs = [lambda: engine.generate(seqs, plain), harvest_with(engine, False, seqs)]
    if args.num_samples:
        runs.append(harvest_with(engine, True, seqs))
    try:
        wall, cpu = median_times(runs, args.repeats)
    finally:
        engine.close()
    (prefill, harvest), (prefill_cpu, harvest_cpu) = wall[:2], cpu[:2]
    inter = llama_intermediate(m.hidden)
    base = prefill_flops(m, inter, 1)
    bound = base / (base + (m.seq_len - 1) * 2 * m.hidden * m.vocab)
    res = {
        "prefill_tok_s": tokens / prefill,
        "harvest_tok_s": tokens / harvest,
        "flops_bound": bound,
        "harvest_efficiency": prefill / harvest / bound,
        "extra_us_per_position": (harvest - prefill) / tokens * 1e6,
        "cpu_harvest_efficiency": prefill_cpu / harvest_cpu / bound,
        "cpu_extra_us_per_position": (harvest_cpu - prefill_cpu) / tokens * 1e6,
    }
    if args.num_samples:
        res |= {"sampled_tok_s": tokens / wall[2], "sampled_vs_topk_cost": wall[2] / harvest,
                "cpu_sampled_vs_topk_cost": cpu[2] / harvest_cpu}
    print(f"{m.name}.engine={engine.name}", flush=True)
    for key, value in res.items():
        print(f"{m.name}.{key}={value:.4g}", flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", choices=("fast", "public"), default="fast")
    parser.add_argument("--quick", action="store_true", help="16 sequences, 1 repeat")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median)")
    parser.add_argument("--num-samples", type=int, default=64,
                        help="draws per position of the sampled harvest (0: none)")
    parser.add_argument("--models", default="teacher,overhead")
    parser.add_argument(
        "--spawn",
        action="store_true",
        help="run vLLM's engine core in spawned processes (default on CPU: in this process)",
    )
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.repeats = 16, 1
    import vllm

    print(f"vllm={vllm.__version__}")
    print(f"engine_core={'spawned' if args.spawn else 'in-process'}")
    print(f"k={K} sequences={args.sequences} repeats={args.repeats} path={args.path}")
    models = {m.name: m for m in (TEACHER, OVERHEAD)}
    results = {}
    with tempfile.TemporaryDirectory(prefix="mtkd-bench-harvest-") as tmp:
        for name in args.models.split(","):
            results[name] = run_model(models[name], Path(tmp), args)
            gc.collect()
    if "teacher" in results:
        if args.num_samples:
            cost = results["teacher"]["sampled_vs_topk_cost"]
            print(f"sampled_vs_topk_cost={cost:.4g}")
        print(f"harvest_efficiency={results['teacher']['harvest_efficiency']:.4g}")
    if "overhead" in results:
        print(f"extra_us_per_position={results['overhead']['extra_us_per_position']:.4g}")


if __name__ == "__main__":
    main()
