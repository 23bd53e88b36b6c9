"""Benchmark of the chunked sparse KD losses: peak memory and step time.

Prints ``name=value`` lines. Every measurement runs in a fresh subprocess: the inputs are built
(in small pieces, so building them sets no high-water mark), freed heap pages are returned to
the OS (``malloc_trim``, so reusing them counts as growth), the peak-RSS counter is reset
(``/proc/self/clear_refs``; falling back to ``ru_maxrss``), one forward+backward runs, and the
peak RSS growth over the RSS before the step is reported. Timings are the median of
``--repeat`` rounds after one warm-up step, all methods round-robin in one subprocess (so
load from other processes hits them alike). Both wall and process CPU time are reported; on a
shared machine compare the CPU-time ratios, best with ``--threads 1``.

    python bench/losses.py                      # N=8*512, V=32000, H=512, top-64
    python bench/losses.py --n 1024 --v 8192    # quicker
    python bench/losses.py --device cuda        # a GPU: bench/gpu_losses.py (its own options)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mtkd.distill.train.dense_reference import dense_kd_loss
from mtkd.distill.train.losses import chunked_cross_entropy, sparse_kd_loss
from mtkd.distill.train.targets import SparseTargets

# name -> what it runs (printed as method.<name>=...)
METHODS = {
    "kd_chunked": "sparse_kd_loss fkl_tail, chunked (one target block)",
    "kd_chunked_k3": "sparse_kd_loss fkl_tail, chunked, L_multi over 3 teacher blocks",
    "jsd_chunked": "sparse_kd_loss jsd_tail, chunked",
    "ce_chunked": "chunked_cross_entropy",
    "kd_naive": "full logits + dense [N,V] targets, F.kl_div (tail dropped)",
    "kd_dense_ref": "full logits + dense [N,V] targets, dense_kd_loss fkl_tail",
    "ce_naive": "full logits + F.cross_entropy",
}


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so reused memory counts as growth too."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kib(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _inputs(args: argparse.Namespace, blocks: int) -> dict[str, object]:
    """Student hidden/weight, labels and top-k sparse targets, built in row pieces."""
    g = torch.Generator().manual_seed(0)
    n, v, h, k = args.n, args.v, args.h, args.k
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    targets = []
    for _ in range(blocks):
        ids = torch.empty(n, k, dtype=torch.long)
        for start in range(0, n, 256):
            ids[start : start + 256] = torch.rand(min(256, n - start), v, generator=g).topk(k)[1]
        probs = torch.softmax(torch.randn(n, k + 1, generator=g) * 2, -1)
        targets.append(SparseTargets(ids, probs[:, :k].contiguous(), probs[:, k].contiguous()))
    return {"hidden": hidden, "weight": weight, "labels": labels, "targets": targets}


def _step_fn(method: str, inp: dict, args: argparse.Namespace) -> Callable[[], None]:
    """A closure running one forward+backward of ``method``."""
    hidden, weight, labels = inp["hidden"], inp["weight"], inp["labels"]
    targets: list[SparseTargets] = inp["targets"]  # type: ignore[assignment]
    v = args.v

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        hidden.grad = None
        weight.grad = None

    if method in ("kd_chunked", "jsd_chunked", "kd_chunked_k3"):
        kind = "jsd_tail" if method == "jsd_chunked" else "fkl_tail"
        tgt = targets if method == "kd_chunked_k3" else targets[0]
        return lambda: backward(
            sparse_kd_loss(hidden, weight, tgt, labels, kind=kind, chunk_size=args.chunk).loss
        )
    if method == "ce_chunked":
        return lambda: backward(
            chunked_cross_entropy(hidden, weight, labels, chunk_size=args.chunk).loss
        )
    if method == "ce_naive":
        return lambda: backward(F.cross_entropy(hidden @ weight.T, labels))

    def naive(reference: bool) -> None:
        logits = hidden @ weight.T
        dense, support = targets[0].to_dense(v)
        if reference:
            loss = dense_kd_loss(logits, dense, kind="fkl_tail", support=support).loss
        else:
            loss = F.kl_div(torch.log_softmax(logits, -1), dense, reduction="batchmean")
        backward(loss)

    if method == "kd_naive":
        return lambda: naive(False)
    if method == "kd_dense_ref":
        return lambda: naive(True)
    raise ValueError(method)


def child(args: argparse.Namespace) -> None:
    """Run one measurement in this (fresh) process and print a JSON line.

    memory: one method, one step. time: the listed methods round-robin on shared inputs, so
    that load from other processes hits all of them alike; medians per method.
    """
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.method.split(",")
    inp = _inputs(args, 3 if "kd_chunked_k3" in methods else 1)
    steps = {m: _step_fn(m, inp, args) for m in methods}
    # touch the kernels once on a tiny problem so library initialisation is not counted
    torch.softmax(torch.randn(4, 8) @ torch.randn(8, 16), -1).sum()
    if args.mode == "memory":
        gc.collect()
        _release_free_heap()
        rss0 = _rss_kib()
        ok = _reset_peak()
        steps[methods[0]]()
        print(json.dumps({"peak_mib": (_peak_kib(ok) - rss0) / 1024, "reset": ok}))
        return
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for m in methods:
        steps[m]()
    for _ in range(args.repeat):
        for m in methods:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[m]()
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    print(json.dumps({m: [statistics.median(wall[m]), statistics.median(cpu[m])] for m in methods}))


def _measure(method: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--method",
        method,
        "--mode",
        mode,
        "--n",
        str(args.n),
        "--v",
        str(args.v),
        "--h",
        str(args.h),
        "--k",
        str(args.k),
        "--chunk",
        str(args.chunk),
        "--repeat",
        str(args.repeat),
        "--threads",
        str(args.threads),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--device" in sys.argv:  # a GPU: the one-process bench with the fused-CE anchors
        from pathlib import Path

        gpu = Path(__file__).with_name("gpu_losses.py")
        sys.exit(subprocess.run([sys.executable, str(gpu), *sys.argv[1:]], check=False).returncode)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8 * 512, help="rows (positions) per step")
    ap.add_argument("--v", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--h", type=int, default=512, help="hidden size")
    ap.add_argument("--k", type=int, default=64, help="support size (top-k)")
    ap.add_argument("--chunk", type=int, default=1024, help="chunk size (rows)")
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per method")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--no-time", action="store_true", help="memory only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(
        f"config=N={args.n} V={args.v} H={args.h} k={args.k} chunk={args.chunk} "
        f"threads={args.threads or torch.get_num_threads()} torch={torch.__version__}"
    )
    methods = args.methods.split(",")
    for m in methods:
        print(f"method.{m}={METHODS[m]}")
    mem = {m: _measure(m, "memory", args)["peak_mib"] for m in methods}
    for m in methods:
        print(f"peak_mib.{m}={mem[m]:.0f}")
    if "kd_chunked" in mem and "kd_naive" in mem:
        print(f"peak_ratio.kd_naive_over_kd_chunked={mem['kd_naive'] / mem['kd_chunked']:.2f}")
    if args.no_time:
        return
    times = _measure(",".join(methods), "time", args)
    for m in methods:
        print(f"step_wall_s.{m}={times[m][0]:.3f}")
        print(f"step_cpu_s.{m}={times[m][1]:.3f}")
    for m in methods:
        if m != "ce_chunked" and "ce_chunked" in times:
            ratio = times[m][1] / times["ce_chunked"][1]
            print(f"step_cpu_ratio.{m}_over_ce_chunked={ratio:.2f}")


if __name__ == "__main__":
    main()
