"""Microbenchmark: vLLM 0.32's prompt log-probs against mtkd's kernel (one thread, CPU).

vLLM: ``Sampler.compute_logprobs`` (float32 log_softmax over ``[n, V]``) then
``Sampler.gather_logprobs`` (``torch.topk``, the target's log-prob, its rank from the compiled
full-row count). mtkd: :func:`mtkd.harvest.prompt_logprobs.prompt_logprobs_fast`, what the vLLM
plugin runs in the worker. Random logits ``randn * 3``, random targets, ``n`` rows, ``k``.

Per V: the best of ``--repeats`` runs as µs per position, CPU time of this thread (``*_us``; on a
shared machine wall time moves with other load) and wall time (``*_wall_us``), and how much of
mtkd's time its blocked log-softmax takes (``mtkd_log_softmax_us``); then the max abs
differences of the log-probs, the ranks, and the ids where no tie explains a difference, the
share of id cells that differ (ties ordered differently: equal log-probs), and the max abs
difference between mtkd's log-probs and the full log-softmax at mtkd's ids.

    .venv/bin/python bench/logprobs_kernel.py
    .venv/bin/python bench/logprobs_kernel.py --vocab 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def best_times(
    fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...], repeats: int
) -> tuple[float, float, tuple[torch.Tensor, ...]]:
    """Best thread CPU time and best wall time of ``fn(*inputs)`` over ``repeats`` runs, and
    the last result."""
    cpu = wall = float("inf")
    out: tuple[torch.Tensor, ...] = ()
    for _ in range(repeats):
        c, w = time.thread_time(), time.perf_counter()
        out = fn(*inputs)
        cpu = min(cpu, time.thread_time() - c)
        wall = min(wall, time.perf_counter() - w)
    return cpu, wall, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", default="512,8192,32000")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import vllm
    from vllm.v1.sample.sampler import Sampler

    from mtkd.harvest.prompt_logprobs import _MIN_CHUNK_ROWS, CHUNK_ELEMENTS, prompt_logprobs_fast

    def vllm_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(Sampler.gather_logprobs(Sampler.compute_logprobs(logits), args.k, targets))

    def mtkd_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return prompt_logprobs_fast(logits, args.k, targets)

    def log_softmax_only(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The log-softmax blocks of ``mtkd_rows`` alone (the same ATen kernel as vLLM's)."""
        step = max(_MIN_CHUNK_ROWS, CHUNK_ELEMENTS // logits.shape[1])
        return tuple(
            logits[a : a + step].log_softmax(-1, dtype=torch.float32)
            for a in range(0, len(logits), step)
        )[-1:]

    print(f"vllm={vllm.__version__} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"rows={args.rows} k={args.k} dtype={args.dtype} repeats={args.repeats}")
    dtype = getattr(torch, args.dtype)
    for vocab in (int(v) for v in args.vocab.split(",")):
        gen = torch.Generator().manual_seed(vocab)
        logits = (torch.randn(args.rows, vocab, generator=gen) * 3).to(dtype)
        targets = torch.randint(0, vocab, (args.rows,), generator=gen)
        for fn in (vllm_rows, mtkd_rows):  # warm-up: torch.compile, numba's cache
            fn(logits[:8], targets[:8])
        v_cpu, v_wall, v_out = best_times(vllm_rows, (logits, targets), args.repeats)
        m_cpu, m_wall, m_out = best_times(mtkd_rows, (logits, targets), args.repeats)
        s_cpu = best_times(log_softmax_only, (logits,), args.repeats)[0]
        v_ids, v_lps, v_ranks = v_out[:3]
        ids, lps, ranks = m_out
        differ = ids != v_ids
        untied = differ & (lps != v_lps)  # a differing id with a differing log-prob
        # mtkd's ids looked up in the full log-softmax: they carry the log-probs reported
        at_ids = logits.log_softmax(-1, dtype=torch.float32).gather(1, ids.long())
        per = 1e6 / args.rows
        res = {
            "vllm_us": v_cpu * per,
            "mtkd_us": m_cpu * per,
            "speedup": v_cpu / m_cpu,
            "mtkd_log_softmax_us": s_cpu * per,  # of mtkd_us; the rest: top-k, rank, sort
            "vllm_wall_us": v_wall * per,
            "mtkd_wall_us": m_wall * per,
            "max_abs_diff_logprobs": (lps.double() - v_lps.double()).abs().max().item(),
            "max_abs_diff_ranks": (ranks - v_ranks).abs().max().item(),
            "max_abs_diff_ids_untied": (
                (ids.long() - v_ids.long()).abs()[untied].max().item() if untied.any() else 0
            ),
            "ids_differ_tied_fraction": differ.double().mean().item(),
            "max_abs_diff_logprobs_at_ids": (at_ids.double() - lps.double()).abs().max().item(),
        }
        for key, value in res.items():
            print(f"V{vocab}.{key}={value:.4g}", flush=True)


if __name__ == "__main__":
    main()
