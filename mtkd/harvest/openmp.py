"""OpenMP settings of a harvest process; they must be made before torch is imported.

After each parallel region, libgomp's idle threads spin for 300,000 iterations (about 5 ms
here) before they sleep. The harvest runs its top-k kernel in its own threads right after the
model's forward pass, so those spinning threads took a core from it: on the overhead bench the
kernel ran 0.5 µs per position slower than on a quiet core. A spin count of 30,000 (about
0.5 ms) still spans the gaps between the forward pass's own regions.
"""

from __future__ import annotations

import os
import sys

#: libgomp's ``GOMP_SPINCOUNT`` for harvest processes.
HARVEST_SPIN_COUNT = 30_000


def limit_openmp_spinning() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process and its children (vLLM's workers) unless the
    user set the spin policy or torch is already imported (too late); returns whether set."""
    if "torch" in sys.modules or {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(HARVEST_SPIN_COUNT)
    return True
