"""``mtkd report RUN_DIR``: an HTML page with PNG plots and a markdown table of a demo run.

Everything shown is read from the run directory (``results.json``, the students' metric logs
and the target stores); nothing is hard-coded.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from mtkd.recipes.figures import FIGURE_GOALS, NOT_SINGLE, figure_lines
from mtkd.recipes.run import read_results
from mtkd.store import StoreError, open_store

GOAL_CE_GAIN = 0.05  # mixture student ≥ 5% below the CE-only student
GOAL_TOPK_GAP = 0.02  # top-k + tail within 2% of full-vocabulary KD


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's goals with the measured numbers and whether each is met."""
    students = {k: v.get("heldout_ce") for k, v in results.get("students", {}).items()}
    out: list[dict[str, Any]] = []
    ce, mix = students.get("ce-only"), students.get("mix-linear")
    if ce and mix:
        gain = 1 - mix / ce
        out.append({"goal": "mixture student ≥ 5% lower held-out CE than the CE-only student",
                    "measured": f"{mix:.4f} vs {ce:.4f} ({gain:+.1%})",
                    "met": gain >= GOAL_CE_GAIN})
    singles = {k: v for k, v in students.items()
               if k.startswith("single-") and not k.endswith(NOT_SINGLE) and v}
    if mix and singles:
        best = min(singles, key=singles.__getitem__)
        out.append({"goal": "mixture student below every single-teacher student",
                    "measured": f"{mix:.4f} vs best single {best} {singles[best]:.4f}",
                    "met": all(mix < v for v in singles.values())})
    full = {k: v for k, v in students.items() if k.endswith("-full") and v}
    for name, value in full.items():
        topk = students.get(name.removesuffix("-full"))
        if topk:
            gap = topk / value - 1
            teacher = name.removeprefix("single-").removesuffix("-full")
            tail = results.get("teacher_tail_mass", {}).get(teacher)
            note = (f"; this teacher leaves {tail['mean_tail_mass']:.1%} of its mass outside "
                    f"the top-k, and the next token in {1 - tail['target_in_topk']:.1%} of "
                    "positions" if tail else "")
            out.append({"goal": "top-k + tail bucket within 2% of full-vocabulary KD",
                        "measured": f"{topk:.4f} vs {value:.4f} ({gap:+.2%}){note}",
                        "met": abs(gap) <= GOAL_TOPK_GAP})
        for suffix, kind in (("-hybrid", "the hybrid (exact top-8 + draws from the rest)"),
                             ("-sampled", "random draws")):
            sampled = students.get(name.replace("-full", suffix))
            if sampled:  # the same teacher's sampled targets (the hybrid: --experiments all)
                gap = sampled / value - 1
                out.append({"goal": f"(experiment) {kind}, targets of the same width, within "
                                    "2% of full-vocabulary KD",
                            "measured": f"{sampled:.4f} vs {value:.4f} ({gap:+.2%})",
                            "met": abs(gap) <= GOAL_TOPK_GAP})
    safety = results.get("safety")
    if safety:
        checked = sum(p["checked"] for p in safety["points"])
        bad = sum(p["violations"] for p in safety["points"])
        out.append({"goal": "safety bound holds at every measured point",
                    "measured": f"{bad} violations in {checked} checks",
                    "met": safety["bound_holds"]})
    return out + figure_goals(results.get("figures", {}))


FIGURE_GOAL_TEXT = {
    "cross_tokenizer_recovery": "cross-tokenizer recovery: (CE-only − student of the cross "
                                "teacher) ÷ (CE-only − student of the same-tokenizer teacher), "
                                "bits/byte, both from their random-sampling targets",
    "real_teacher_gain_pct": "student distilled from SmolLM2 vs CE-only student, bits/byte",
    "mixture_vs_best_single_pct": "student of the mixture with SmolLM2 vs the best "
                                  "single-teacher student, bits/byte",
    "sampled_vllm_vs_full_kd_pct": "student of vLLM's random draws (k per position) vs the "
                                   "full-vocabulary KD student of the same teacher, bits/byte",
    "demo_seconds": "mtkd demo's wall time",
}


def figure_goals(figures: dict[str, float]) -> list[dict[str, Any]]:
    """Goal rows of the headline figures the run measured (``figures.FIGURE_GOALS``)."""
    rows = []
    for name, (target, met) in FIGURE_GOALS.items():
        if name in figures:
            rows.append({"goal": f"{FIGURE_GOAL_TEXT[name]} {target}",
                         "measured": figure_lines({name: figures[name]})[0],
                         "met": met(figures[name])})
    return rows


def _bpb(value: float | None) -> str:
    """A bits-per-byte cell: blank where the run could not measure it (no ``byte_end``)."""
    return "" if value is None else f"{value:.4f}"


def sparse_targets_table(results: dict[str, Any]) -> list[str]:
    """Top-k + tail vs random-sampling targets of one teacher: bytes on disk and the student."""
    sizes = results.get("target_bytes_per_position", {})
    if not sizes:
        return []
    students = results.get("students", {})
    rows = ["## Sparse targets of one teacher", "",
            "| targets | bytes per position | student held-out CE | student held-out bits/byte |",
            "|---|---|---|---|"]
    for name, size in sizes.items():
        ce = students.get(name, {}).get("heldout_ce")
        rows.append(f"| {name} | {size:.1f} | {'' if ce is None else f'{ce:.4f}'} | "
                    f"{_bpb(students.get(name, {}).get('heldout_bpb'))} |")
    return [*rows, ""]


def own_tokens_table(results: dict[str, Any]) -> list[str]:
    """Teachers that read the text with their own tokenizer: their bits per byte on the
    student's text and how their rows aligned to the student's positions."""
    own = results.get("own_tokens", {})
    if not own:
        return []
    rows = ["## Teachers with their own tokenizer", "",
            "| teacher | bits/byte on the student's text | student positions covered | "
            "shared boundary | interior | fallback |", "|---|---|---|---|---|---|"]
    for name, s in own.items():
        n = sum(s.get(f"aligned_{k}") or 0 for k in ("shared", "interior", "fallback")) or 1
        cells = [_bpb(s.get("bpb_student_text")), _share(s.get("coverage_fraction")),
                 *(_share((s.get(f"aligned_{k}") or 0) / n)
                   for k in ("shared", "interior", "fallback"))]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*rows, ""]


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def quality_table(results: dict[str, Any]) -> str:
    """Held-out quality of every model: nats per token, and bits per byte where measured."""
    rows = ["| model | held-out CE (nats/token) | held-out bits/byte | vs CE-only |",
            "|---|---|---|---|"]
    quality = results.get("quality", {})
    teacher_bpb, mixture_bpb = quality.get("teacher_bpb", {}), quality.get("mixture_bpb", {})
    for name, ce in quality.get("teacher_ce", {}).items():
        rows.append(f"| teacher {name} | {ce:.4f} | {_bpb(teacher_bpb.get(name))} | |")
    weights = results.get("mix_weights", {})
    for name, ce in quality.get("mixture_ce", {}).items():
        shown = (" " + ", ".join(f"{w:.2f}" for w in weights.values())
                 if name == "fitted" and weights else "")
        rows.append(f"| teachers' mixture ({name} weights{shown}, T=1) | {ce:.4f} | "
                    f"{_bpb(mixture_bpb.get(name))} | |")
    base = results.get("students", {}).get("ce-only", {}).get("heldout_ce")
    for name, m in results.get("students", {}).items():
        ce = m.get("heldout_ce")
        if ce is None:
            continue
        rel = f"{ce / base - 1:+.2%}" if base else ""
        rows.append(f"| student {name} | {ce:.4f} | {_bpb(m.get('heldout_bpb'))} | {rel} |")
    return "\n".join(rows)


def _plot_students(run: Path, out: Path) -> str | None:
    """Training loss and held-out CE (and bits per byte, where measured) of every student,
    against the step."""
    plt = _plt()
    logs = {name: read_metrics(run / "students" / name / "metrics.jsonl")
            for name in sorted(p.name for p in (run / "students").glob("*") if p.is_dir())}
    per_byte = any("eval_bpb" in m for rows in logs.values() for m in rows)
    fig, axes = plt.subplots(1, 3 if per_byte else 2, figsize=(16 if per_byte else 11, 4))
    train_ax, eval_ax = axes[0], axes[1]
    drawn = False
    for name, rows in logs.items():
        train = [m for m in rows if m.get("split") == "train"]
        evals = [m for m in rows if m.get("split") == "eval"]
        if train:
            train_ax.plot([m["step"] for m in train], [m["loss"] for m in train], label=name,
                          lw=1)
        if evals:
            eval_ax.plot([m["step"] for m in evals], [m["eval_ce"] for m in evals], label=name,
                         marker="o", ms=3)
        bpb = [m for m in evals if "eval_bpb" in m]
        if bpb:
            axes[2].plot([m["step"] for m in bpb], [m["eval_bpb"] for m in bpb], label=name,
                         marker="o", ms=3)
        drawn = drawn or bool(train or evals)
    if not drawn:
        plt.close(fig)
        return None
    train_ax.set(xlabel="step", ylabel="training loss (its own objective)", title="Training")
    eval_ax.set(xlabel="step", ylabel="held-out CE (nats/token)", title="Held-out")
    eval_ax.legend(fontsize=7)
    if per_byte:
        axes[2].set(xlabel="step", ylabel="held-out bits per byte", title="Held-out, per byte")
    fig.tight_layout()
    fig.savefig(out / "students.png", dpi=110)
    plt.close(fig)
    return "students.png"


def _plot_objectives(run: Path, out: Path) -> str | None:
    plt = _plt()
    names = sorted(p.name for p in (run / "students").glob("objective-*"))
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        key = "l_multi" if "-multi-" in name else "l_mix"
        logs = [m for m in read_metrics(run / "students" / name / "metrics.jsonl") if key in m]
        ax.plot([m["step"] for m in logs], [m[key] for m in logs], label=f"{name} ({key})")
    ax.set(xlabel="step", ylabel="training objective", title="L_mix vs L_multi")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "objectives.png", dpi=110)
    plt.close(fig)
    return "objectives.png"


def _plot_diagnostics(run: Path, out: Path) -> list[str]:
    plt = _plt()
    figures = []
    for store_name in ("mix-linear", "mix-adaptive"):
        try:
            store = open_store(run / "stores" / store_name, verify="none")
        except StoreError:
            continue
        batch = store.read_part(0, ["jensen_gap", "disagreement", "weights"])
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        axes[0].hist(batch["jensen_gap"], bins=60)
        axes[0].set(title="Jensen gap Σ w_k KL(p_k‖q)", xlabel="nats")
        axes[1].hist(batch["disagreement"], bins=60)
        axes[1].set(title="teacher disagreement", xlabel="mean pairwise TV")
        for j in range(batch["weights"].shape[1]):
            axes[2].hist(batch["weights"][:, j], bins=50, alpha=0.5, label=f"teacher {j}")
        axes[2].set(title="weights per position", xlabel="w_k")
        axes[2].legend(fontsize=7)
        fig.suptitle(store_name)
        fig.tight_layout()
        name = f"diagnostics-{store_name}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figures.append(name)
    return figures


def _plot_safety(results: dict[str, Any], out: Path) -> str | None:
    safety = results.get("safety")
    if not safety:
        return None
    plt = _plt()
    pts = safety["points"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["w_safety"] for p in pts], [p["unsafe_mass"] for p in pts], "o-",
            label="q: unsafe mass")
    ax.plot([p["w_safety"] for p in pts], [p["bound_mass"] for p in pts], "--",
            label="bound (1−w*)·max_j p_j + w*·p*")
    for name, mass in results.get("student_unsafe_mass", {}).items():
        ax.axhline(mass, lw=0.8, alpha=0.6, label=f"student {name}")
    ax.set(xlabel="safety teacher weight w*", ylabel="mean mass on unsafe tokens",
           title="Safety attenuation", yscale="log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "safety.png", dpi=110)
    plt.close(fig)
    return "safety.png"


def _plot_variance(results: dict[str, Any], out: Path) -> str | None:
    var = results.get("variance")
    if not var:
        return None
    plt = _plt()
    pts = var["points"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p["sum_w2"] for p in pts]
    ax.plot(x, [p["measured"] for p in pts], "o", label="measured Var q")
    ax.plot(x, [p["predicted"] for p in pts], "x--", label="Σ w_k² Var p_k (theory)")
    ax.set(xlabel="Σ w_k²", ylabel="token-level variance", title="Variance reduction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "variance.png", dpi=110)
    plt.close(fig)
    return "variance.png"


def environment_line(env: dict[str, Any] | None) -> list[str]:
    """The report's line on what the figures were measured on (none for older runs)."""
    if not env:
        return []
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())
    return [f"measured on Python {env.get('python')}, {env.get('cpus')} cores; {packages}"]


def write_report(run_dir: str | Path) -> Path:
    """Render ``RUN_DIR/report/index.html`` (+ ``report.md``) from what the run measured."""
    run = Path(run_dir)
    results_path = run / "results.json"
    if not results_path.exists():
        raise FileNotFoundError(f"{results_path}: no results; run `mtkd demo` first")
    results = read_results(results_path)
    out = run / "report"
    out.mkdir(exist_ok=True)
    figures = [f for f in (_plot_students(run, out), _plot_objectives(run, out),
                           *_plot_diagnostics(run, out), _plot_safety(results, out),
                           _plot_variance(results, out)) if f]
    goal_rows = goals(results)
    md = ["# mtkd demo report", "",
          f"size: {results.get('size')}, wall time {results.get('seconds', 0):.0f} s",
          *environment_line(results.get("environment")), "",
          "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    md += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**MISSED**'} |"
           for g in goal_rows]
    figures_block = figure_lines(results.get("figures", {}))
    if figures_block:
        md += ["", "## Figures", "", "```", *figures_block, "```"]
    md += ["", "## Quality (held-out)", "", quality_table(results), ""]
    md += sparse_targets_table(results)
    md += own_tokens_table(results)
    if "variance" in results:
        md += ["## Variance reduction", "", "| weights | Σw² | measured | predicted |",
               "|---|---|---|---|"]
        md += [f"| {np.round(p['weights'], 3).tolist()} | {p['sum_w2']:.3f} | "
               f"{p['measured']:.3e} | {p['predicted']:.3e} |"
               for p in results["variance"]["points"]]
        md.append("")
    if "safety" in results:
        md += ["## Safety attenuation", "", "| w* | unsafe mass of q | bound | violations |",
               "|---|---|---|---|"]
        md += [f"| {p['w_safety']:.1f} | {p['unsafe_mass']:.3e} | {p['bound_mass']:.3e} | "
               f"{p['violations']}/{p['checked']} |" for p in results["safety"]["points"]]
        md.append("")
        for name, mass in results.get("student_unsafe_mass", {}).items():
            md.append(f"- student {name}: unsafe mass {mass:.3e}")
        md.append("")
    md += ["## Commands", "", "```", *results.get("commands", []), "```", ""]
    (out / "report.md").write_text("\n".join(md))
    body = "\n".join(f'<h3>{html.escape(f)}</h3><img src="{f}">' for f in figures)
    page = (f"<!doctype html><meta charset='utf-8'><title>mtkd demo</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
            f"img{{max-width:100%}}</style><h1>mtkd demo</h1>"
            f"<pre>{html.escape(chr(10).join(md))}</pre>{body}")
    (out / "index.html").write_text(page)
    return out / "index.html"
