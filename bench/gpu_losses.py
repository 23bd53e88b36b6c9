"""GPU benchmark of the lm_head + loss step: mtkd's sparse KD and CE against fused CE anchors.

One process, one device, one set of inputs (bfloat16: hidden ``[N, H]``, lm_head ``[V, H]``,
labels, top-k targets), forward + backward of lm_head and loss, each method warmed up (its
``torch.compile`` included) then timed round-robin, the median of ``--repeat`` steps (CUDA
events). ``peak_extra_mib``: the peak allocated memory of a step above what was allocated
before it, less the gradients of hidden and lm_head that every method returns (so it counts
what the loss needs besides its result). Methods:

* ``naive_ce``: full logits and ``F.cross_entropy`` (float32 softmax);
* ``liger_ce``: Liger-Kernel's fused linear cross-entropy (when ``liger_kernel`` is installed);
* ``cce``: Cut Cross-Entropy's ``linear_cross_entropy`` (when ``cut_cross_entropy`` is);
* ``mtkd_ce`` / ``mtkd_kd``: ``chunked_cross_entropy`` / ``sparse_kd_loss`` (``fkl_tail``,
  top-k targets) with the fused chunk body compiled (``fused="compiled"``);
* ``mtkd_ce_ref`` / ``mtkd_kd_ref``: the same with the reference chunk body (chunk 1024).

Prints one ``method.<name>.ms=`` and ``.peak_extra_mib=`` line per method, then
``gpu_kd_vs_ce_step=`` (mtkd_kd ÷ mtkd_ce), ``gpu_kd_peak_extra_mib=`` and, with Liger, the
headline ``gpu_kd_vs_liger_ce_step=`` (mtkd_kd ÷ liger_ce) last. Goals (issue 17): ≤ 1.0 with
≤ 512 MiB, and ≤ 1.05 against mtkd's own CE.

    python bench/gpu_losses.py                       # N=16384, H=2048, V=128256, k=64
    python bench/gpu_losses.py --n 2048 --v 32000    # smaller
    python bench/gpu_losses.py --device cpu --n 256 --h 64 --v 4096 --repeat 1  # the code path
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mtkd.distill.train.losses import FusedMode, chunked_cross_entropy, sparse_kd_loss
from mtkd.distill.train.targets import SparseTargets

#: rows per chunk of the fused body: its buffers (bf16 logits and gradient, the support mask,
#: the float32 logits inductor may keep) stay near this budget
FUSED_CHUNK_BUDGET = 384 * 2**20
FUSED_BYTES_PER_LOGIT = 2 + 2 + 1 + 4


def inputs(args: argparse.Namespace,
           device: torch.device) -> dict[str, torch.Tensor | SparseTargets]:
    """bf16 hidden and lm_head, labels and top-k targets (built on the device in pieces)."""
    g = torch.Generator(device=device).manual_seed(0)
    n, h, v, k = args.n, args.h, args.v, args.k
    hidden = torch.randn(n, h, generator=g, device=device, dtype=torch.bfloat16)
    weight = torch.randn(v, h, generator=g, device=device, dtype=torch.bfloat16) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    ids = torch.empty(n, k, dtype=torch.long, device=device)
    for a in range(0, n, 1024):
        rows = min(1024, n - a)
        ids[a:a + rows] = torch.rand(rows, v, generator=g, device=device).topk(k).indices
    probs = torch.softmax(2 * torch.randn(n, k + 1, generator=g, device=device), -1)
    targets = SparseTargets(ids, probs[:, :k].contiguous(), probs[:, k].contiguous())
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(),
            "labels": labels, "targets": targets}


def steps(inp: dict, args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    """Each available method's loss as a closure (forward only; the caller runs backward)."""
    hidden, weight, labels, targets = (inp["hidden"], inp["weight"], inp["labels"],
                                       inp["targets"])
    fused_chunk = args.chunk or max(64, FUSED_CHUNK_BUDGET // (FUSED_BYTES_PER_LOGIT * args.v))

    def mtkd(kd: bool, fused: FusedMode) -> Callable[[], torch.Tensor]:
        chunk = fused_chunk if fused == "compiled" else 1024
        if kd:
            return lambda: sparse_kd_loss(hidden, weight, targets, labels, kind="fkl_tail",
                                          chunk_size=chunk, fused=fused).loss
        return lambda: chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk,
                                             fused=fused).loss

    out = {"naive_ce": lambda: F.cross_entropy((hidden @ weight.T).float(), labels),
           "mtkd_ce": mtkd(False, "compiled"), "mtkd_kd": mtkd(True, "compiled"),
           "mtkd_ce_ref": mtkd(False, "off"), "mtkd_kd_ref": mtkd(True, "off")}
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger_ce"] = lambda: liger(weight, hidden, labels)
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = lambda: linear_cross_entropy(hidden, weight, labels)
    return out


def measure(fn: Callable[[], torch.Tensor], inp: dict, device: torch.device) -> tuple[float, float]:
    """(milliseconds, peak extra MiB) of one forward + backward."""
    hidden, weight = inp["hidden"], inp["weight"]
    hidden.grad = weight.grad = None
    grads_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn().backward()
        stop.record()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before - grads_bytes
        return start.elapsed_time(stop), peak / 2**20
    t0 = time.perf_counter()
    fn().backward()
    return (time.perf_counter() - t0) * 1e3, float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (code path only)")
    ap.add_argument("--n", type=int, default=16384, help="rows (positions) per step")
    ap.add_argument("--h", type=int, default=2048, help="hidden size")
    ap.add_argument("--v", type=int, default=128256, help="vocabulary size")
    ap.add_argument("--k", type=int, default=64, help="support size (top-k)")
    ap.add_argument("--chunk", type=int, default=0, help="rows per fused chunk (0: by budget)")
    ap.add_argument("--repeat", type=int, default=5, help="timed steps per method (median)")
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    device = torch.device(args.device)
    inp = inputs(args, device)
    fns = steps(inp, args)
    if args.methods:
        fns = {m: fns[m] for m in args.methods.split(",") if m in fns}
    print(f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"shape=N{args.n} H{args.h} V{args.v} k{args.k} bf16 torch={torch.__version__}")
    for fn in fns.values():  # warm-up: kernels, autotuning, torch.compile
        measure(fn, inp, device)
        measure(fn, inp, device)
    times: dict[str, list[float]] = {m: [] for m in fns}
    peaks: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, fn in fns.items():
            ms, peak = measure(fn, inp, device)
            times[name].append(ms)
            peaks[name] = max(peaks.get(name, peak), peak)
    ms = {m: statistics.median(t) for m, t in times.items()}
    for name in fns:
        print(f"method.{name}.ms={ms[name]:.2f}")
        print(f"method.{name}.peak_extra_mib={peaks[name]:.0f}")
    if "mtkd_kd" in ms and "mtkd_ce" in ms:
        print(f"gpu_kd_vs_ce_step={ms['mtkd_kd'] / ms['mtkd_ce']:.3f}")
        print(f"gpu_kd_peak_extra_mib={peaks['mtkd_kd']:.0f}")
    if "mtkd_kd" in ms and "liger_ce" in ms:
        print(f"gpu_kd_vs_liger_ce_step={ms['mtkd_kd'] / ms['liger_ce']:.3f}")


if __name__ == "__main__":
    main()
