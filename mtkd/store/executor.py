"""Running a store's pending parts: in this process, or in a pool of local processes.

Across machines, each worker runs with its own ``worker_index`` out of ``num_workers`` and gets a
disjoint, round-robin share of the parts (Slurm array index, Ray task, k8s completion index).
Locally, ``processes`` spreads this worker's share over a process pool.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def run_parts(
    parts: Sequence[int],
    work: Callable[[int], T],
    *,
    processes: int = 1,
    desc: str = "parts",
    progress: bool = True,
) -> dict[int, T]:
    """Call ``work(part)`` for each part; ``work`` must be picklable when ``processes > 1``."""
    results: dict[int, T] = {}
    bar = tqdm(total=len(parts), desc=desc, unit="part", disable=not progress or not parts)
    if processes <= 1 or len(parts) <= 1:
        for part in parts:
            results[part] = work(part)
            bar.update()
    else:
        ctx = mp.get_context("spawn")  # safe with torch and threads in the parent
        with ProcessPoolExecutor(min(processes, len(parts)), mp_context=ctx) as pool:
            futures = {pool.submit(work, part): part for part in parts}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    return results
