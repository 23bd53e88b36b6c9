"""What the commands print of a target store's diagnostics: after ``mtkd aggregate`` and in
``mtkd info``, the same lines."""

from __future__ import annotations

from collections.abc import Mapping


def target_diagnostics(d: Mapping[str, float], teachers: int) -> list[str]:
    """The mean diagnostics of a target store (``aggregate.summary.summarize``), a line each; the
    Jensen gap is ≥ 0, so a rounding's −0.0000 is shown as 0."""
    lines = [f"  mean jensen_gap {max(d['jensen_gap'], 0.0):.4f}  disagreement "
             f"{d['disagreement']:.4f}  n_eff {d['n_eff']:.3f}  tail_mass {d['tail_mass']:.4f}",
             "  mean weights " + " ".join(f"{d[f'mean_weight_{j}']:.3f}"
                                          for j in range(teachers))]
    if "ce_only_fraction" in d:  # a teacher with its own tokenizer: rows each one covers
        lines.append("  coverage " + " ".join(
            f"{d[f'coverage_fraction_{j}']:.3f}" for j in range(teachers))
            + f"  ce_only {d['ce_only_fraction']:.4f}"
            + (" (the means above: over the other rows)" if d["ce_only_fraction"] else ""))
    return lines
