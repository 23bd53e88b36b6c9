"""Deprecated alias of :mod:`mtkd.harvest.threads` (its name until 0.1; removed in the next
release): docs of that release showed ``mtkd.harvest.parallel.limit_openmp_spinning()``."""

from __future__ import annotations

import warnings

from mtkd.harvest.threads import limit_openmp_spinning, over_rows, pool

warnings.warn("mtkd.harvest.parallel is now mtkd.harvest.threads", DeprecationWarning,
              stacklevel=2)

__all__ = ["limit_openmp_spinning", "over_rows", "pool"]
