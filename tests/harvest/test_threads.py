"""The harvest's CPU threads: row ranges, the pool's OpenMP setting, the spin limit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from mtkd.harvest import threads as harvest_threads


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("stop", [0, 1, 63, 64, 200, 1001])
def test_over_rows_covers_each_row_once(threads: int, stop: int) -> None:
    seen = []
    lock = threading.Lock()

    def fn(lo: int, hi: int) -> None:
        with lock:
            seen.extend(range(lo, hi))

    harvest_threads.over_rows(5, 5 + stop, fn, threads)
    assert sorted(seen) == list(range(5, 5 + stop))


def test_pool_threads_run_torch_ops_inline_and_leave_other_threads_alone() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert harvest_threads.pool(2).submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(threads)


SPIN = """
import os, sys
from mtkd.harvest.threads import limit_openmp_spinning
first = limit_openmp_spinning()
import torch
print(first, limit_openmp_spinning(), os.environ.get("GOMP_SPINCOUNT"))
"""


@pytest.mark.parametrize(("env", "want"), [
    ({}, "True False 30000"),
    ({"GOMP_SPINCOUNT": "5"}, "False False 5"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "False False None"),
])
def test_spin_limit_is_set_before_torch_only_and_never_over_the_user(
    env: dict[str, str], want: str
) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SPIN], env=base | env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert " ".join(out) == want
