"""CPU threads of a harvest process: the row-parallel pool and its OpenMP settings.

The top-k kernel, the tail masses and the rest of the per-position work run on contiguous row
ranges in a thread pool as large as torch's intra-op pool (the worker's cores; numba kernels
are nogil, numpy and ATen release the GIL). Two OpenMP effects would take those cores back:

* after each parallel region libgomp's idle threads spin for 300,000 iterations (about 5 ms
  here) before they sleep, so right after the model's forward pass they competed with the
  kernel (0.5 µs per position on the overhead bench): :func:`limit_openmp_spinning` lowers
  that to 30,000 (about 0.5 ms, still spanning the gaps between the forward's own regions);
  it must run before torch is imported;
* an ATen op called from a pool thread would start an OpenMP team of its own, whose threads
  spin beside the model's and slowed its next forward pass (+2 µs per position): the pool's
  threads run ATen ops inline (:func:`_torch_ops_inline`).

This module imports torch only when the pool is first used.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

#: libgomp's ``GOMP_SPINCOUNT`` for harvest processes.
HARVEST_SPIN_COUNT = 30_000
#: Fewer rows than this per thread are not worth a thread.
MIN_ROWS_PER_THREAD = 64

_POOLS: dict[int, ThreadPoolExecutor] = {}
_WARNED: list[bool] = []
log = logging.getLogger(__name__)


def limit_openmp_spinning() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process and its children (vLLM's workers) unless the
    user set the spin policy or torch is already imported (too late); returns whether set."""
    if "torch" in sys.modules or {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(HARVEST_SPIN_COUNT)
    return True


def num_threads() -> int:
    """Threads for row-parallel work: torch's intra-op count (what the worker was given)."""
    import torch

    return max(1, torch.get_num_threads())


def over_rows(start: int, stop: int, fn: Callable[[int, int], None],
              threads: int | None = None) -> None:
    """``fn(lo, hi)`` over contiguous row ranges of [start, stop), one per thread, in parallel
    (``threads``: default :func:`num_threads`); fn must release the GIL to gain anything."""
    threads = threads or num_threads()
    threads = min(threads, max(1, (stop - start) // MIN_ROWS_PER_THREAD))
    if threads == 1:
        fn(start, stop)
        return
    cuts = [start + (stop - start) * i // threads for i in range(threads + 1)]
    list(pool(threads).map(lambda i: fn(cuts[i], cuts[i + 1]), range(threads)))


def pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the life of the process."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(
            threads, thread_name_prefix="mtkd-rows", initializer=_torch_ops_inline)
    return _POOLS[threads]


def _torch_ops_inline() -> None:
    """Make the calling thread run ATen ops without an OpenMP team of its own.

    OpenMP's thread count is per thread, so the model's threads keep theirs, where
    ``torch.set_num_threads`` would also change the default of every thread started later.
    Without an OpenMP runtime in the process there is nothing to do.
    """
    import torch

    torch.get_num_threads()  # torch's lazy per-thread OpenMP set-up first: it would undo this
    try:  # a failing initializer would break the pool for good: never raise here
        set_threads = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
        if set_threads is not None:
            set_threads(1)
    except (OSError, TypeError, AttributeError):
        pass
    if torch.get_num_threads() != 1 and not _WARNED:
        _WARNED.append(True)
        log.warning("mtkd's row threads could not turn off OpenMP teams for their ATen ops "
                    "(no omp_set_num_threads in the process): results are unchanged, the "
                    "harvest may be slower")
