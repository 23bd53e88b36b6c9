"""A target store's diagnostics: per-part sums at commit (in the part's record) and their means
over the store, which ``mtkd aggregate`` prints at the end and ``mtkd info`` shows."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mtkd.store import open_store
from mtkd.store.schema import TARGET

#: A target row holds a tail when its entries leave more than this mass out (float32 sums).
TAIL_ROW_MASS = 1e-6


def part_stats(fused: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Sums and histograms of the diagnostics, combined over parts by :func:`summarize`."""
    n = len(fused["tail_mass"])
    stats: dict[str, Any] = {"positions": n}
    for name in ("jensen_gap", "disagreement", "n_eff", "tail_mass"):
        stats[f"sum_{name}"] = float(np.sum(fused[name], dtype=np.float64))
    stats["sum_weights"] = np.sum(fused["weights"], axis=0, dtype=np.float64).tolist()
    stats["tail_rows"] = int(np.count_nonzero(fused["tail_mass"] > TAIL_ROW_MASS))
    return stats


def summarize(out: str | os.PathLike[str]) -> dict[str, float]:
    """Mean diagnostics over the target store's rows that its teachers gave targets (all but
    the CE-only ones), from the parts' commit records; with teachers of their own tokenizer
    also each teacher's ``coverage_fraction_{j}`` (rows it
    gives a distribution), ``aligned_{shared,interior,fallback}_{j}`` (row counts) and
    ``ce_only_fraction`` (rows with the one-hot target)."""
    store = open_store(out, TARGET, verify="none")
    totals: dict[str, Any] = {}
    for p in range(store.num_parts):
        for key, value in store.part_stats(p).items():
            totals[key] = np.add(totals.get(key, 0), value)
    n = max(int(totals.get("positions", 0)), 1)
    fused = max(n - int(totals.get("ce_only_rows", 0)), 1)  # rows the teachers gave targets
    summary = {k.removeprefix("sum_"): float(v) / fused for k, v in totals.items()
               if k.startswith("sum_") and np.ndim(v) == 0}
    for j, w in enumerate(np.atleast_1d(totals.get("sum_weights", []))):
        summary[f"mean_weight_{j}"] = float(w) / fused
    # with teachers of their own tokenizer (coverage.coverage_stats): per teacher j
    for j, c in enumerate(np.atleast_1d(totals.get("covered_rows", []))):
        summary[f"coverage_fraction_{j}"] = float(c) / n
        for kind in ("shared", "interior", "fallback"):
            summary[f"aligned_{kind}_{j}"] = float(totals[f"aligned_{kind}"][j])
    if "tail_rows" in totals:  # stores aggregated before it was counted lack it
        summary["tail_rows_fraction"] = float(totals["tail_rows"]) / n
    if "ce_only_rows" in totals:
        summary["ce_only_fraction"] = float(totals["ce_only_rows"]) / n
    summary["positions"] = float(totals.get("positions", 0))
    return summary
