"""The demo's experiments: students compared on held-out data, and the papers' claims measured.

1. Quality: held-out CE of teachers, their mixture, and students of one size and token budget
   (CE only, from single teachers, from fused targets, top-k + tail vs full vocabulary …), in
   nats per token and, when the held-out tokens store has ``byte_end``, in bits per byte.
2. Variance reduction: variance of the fused target under independent teacher noise vs Σ w_k².
3. Objectives: L_mix vs L_multi from identical starts (forward and reverse KL).
4. Safety attenuation: unsafe-token mass of q vs the safety teacher's weight, against the bound
   q(i) ≤ (1−w*)·max_j p_j(i) + w*·p*(i), and in the distilled students.

Numbers come from the run; the report only renders them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtkd.distill.aggregate.job import target_logprobs, teacher_rows
from mtkd.distill.aggregate.operators import get_operator
from mtkd.distill.aggregate.tempering import temper
from mtkd.distill.aggregate.union import to_union
from mtkd.distill.aggregate.weights import fit_mixture_weights
from mtkd.distill.train.bits_per_byte import bits_per_byte, label_bytes
from mtkd.recipes.run import Run, TrainJob, is_complete, train_job, train_models
from mtkd.store import open_store
from mtkd.store.schema import BYTE_END, has_byte_ends

SAFETY_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
VARIANCE_WEIGHTINGS = ((1 / 3, 1 / 3, 1 / 3), (0.5, 0.3, 0.2), (0.6, 0.2, 0.2), (0.7, 0.2, 0.1),
                       (0.8, 0.1, 0.1), (0.9, 0.05, 0.05), (1.0, 0.0, 0.0))
SAMPLE_POSITIONS = 4096
#: The hybrid target's exact head (``--experiments all``): the best teacher's top-8 plus ``k``
#: draws from the rest (``bench/hybrid_heads.py``: heads 4, 16 and 32 and fewer draws did worse).
HYBRID_HEAD = 8


def static_weights(run: Run) -> np.ndarray:
    k = len(run.size.teachers)
    return np.full(k, 1.0 / k)


def targets(run: Run, name: str, teachers: list[int], *, k_out: int | None = None,
            extra: tuple[str, ...] = (), suffix: str = "student") -> str:
    """Aggregate the given demo teachers' stores into ``stores/<name>`` (skipped when done)."""
    specs = [run.size.teachers[j] for j in teachers]
    return aggregate(run, name, [f"{t.name}-{suffix}" for t in specs],
                     [t.temperature for t in specs], k_out=k_out, extra=extra)


def aggregate(run: Run, name: str, stores: list[str], temperatures: list[float], *,
              k_out: int | None = None, extra: tuple[str, ...] = ()) -> str:
    """``mtkd aggregate`` of the teacher stores ``stores/<stores…>`` (each at its temperature)
    over the student's tokens into ``stores/<name>`` (skipped when done)."""
    out = run.path("stores", name)
    if not is_complete(out):
        run.mtkd("aggregate", *[run.path("stores", s) for s in stores],
                 "--tokens", run.path("stores", "tokens-student"), "--out", out,
                 "--temperatures", ",".join(str(t) for t in temperatures),
                 "--k-out", str(k_out or run.size.k), *extra)
    return name


def sampled_targets(run: Run, teacher: int) -> str:
    """Random-sampling targets of one teacher at (at most) the top-k targets' bytes: the ``k``
    draws per position its vLLM harvest made, fused as their empirical distribution into a
    store of the same width ``k``."""
    t = run.size.teachers[teacher]
    return targets(run, f"single-{t.name}-sampled", [teacher], extra=("--source", "samples"))


def harvest_teacher(run: Run, teacher: str, store: str, *options: str) -> None:
    """``mtkd harvest`` of the demo teacher ``teacher`` over the student's tokens into
    ``stores/<store>`` (float32, eager: small models), with ``options`` (skipped when done)."""
    out = run.path("stores", store)
    if not is_complete(out):
        run.mtkd("harvest", run.path("stores", "tokens-student"), "--model",
                 run.path("teachers", teacher, "final"), "--out", out, *options,
                 "--dtype", "float32", "--enforce-eager")


def harvest_hybrid(run: Run) -> None:
    """The best teacher over the student's tokens once more, as the hybrid: its exact top-
    :data:`HYBRID_HEAD` and ``k`` draws from the rest of its softmax (``--sample-rest``), so
    that no draw lands in the head (run after :func:`measure_teachers`)."""
    best = run.results["best_teacher"]
    harvest_teacher(run, best, f"{best}-hybrid", "--k", str(HYBRID_HEAD),
                    "--num-samples", str(run.size.k), "--sample-rest")


def hybrid_targets(run: Run, teacher: int) -> str:
    """The hybrid targets of one teacher (its exact head plus the draws from the rest, fused
    by ``--source samples``) in a store of width ``k``."""
    t = run.size.teachers[teacher]
    return aggregate(run, f"single-{t.name}-hybrid", [f"{t.name}-hybrid"], [t.temperature],
                     extra=("--source", "samples"))


def target_bytes_per_position(run: Run, name: str) -> float:
    """Bytes on disk of a target store per target position."""
    from mtkd.store import bytes_on_disk

    store = open_store(run.path("stores", name), verify="none")
    return bytes_on_disk(store.root) / store.num_rows


def student(run: Run, name: str, target_store: str | None, *, objective: str = "mix",
            loss: str = "fkl_tail", teacher: str | None = None,
            heldout: str = "tokens-heldout", folder: str = "students") -> TrainJob:
    """The training of one student of the common size and budget (run by
    :func:`train_students`) into ``<folder>/<name>``, evaluated on ``heldout``.

    Targets come from ``target_store``, or (``teacher``: a teacher's name) from that teacher
    run online over the full vocabulary; with neither the student is trained on CE only.
    """
    size = run.size
    distilled = target_store is not None or teacher is not None
    extra: tuple[str, ...] = ("--loss", loss) if distilled else ()
    if teacher is not None:
        extra += ("--teacher", str(run.path("teachers", teacher, "final")))
    return train_job(run, run.path(folder, name), tokens="tokens-student",
                     steps=size.student_steps, batch=size.student_batch, seed=0,
                     shape=size.student, targets=target_store, heldout=heldout,
                     objective=objective if distilled else "ce", extra=extra,
                     evals=size.student_evals)


def train_students(run: Run, jobs: list[TrainJob]) -> None:
    """Train the students (side by side where the cores allow) and record their final
    metrics under ``results["students"]``."""
    for job, metrics in zip(jobs, train_models(run, jobs), strict=True):
        run.results.setdefault("students", {})[job.name] = metrics
    run.save()


def measure_teachers(run: Run) -> None:
    """The teachers and their mixtures on held-out tokens, the fitted mixture weights, and
    the best teacher (``results["best_teacher"]``), whose targets the students compare."""
    teachers = run.size.teachers
    with run.timed("measure teachers and their mixtures"):
        fitted = fitted_weights(run)
        run.results["mix_weights"] = dict(zip([t.name for t in teachers], fitted.tolist(),
                                              strict=True))
        run.results["quality"] = mixture_quality(run, {"uniform": static_weights(run),
                                                       "fitted": fitted})
    best = int(np.argmin(list(run.results["quality"]["teacher_ce"].values())))
    run.results["best_teacher"] = teachers[best].name
    run.save()


def plan_experiments(run: Run, which: str = "default") -> list[TrainJob]:
    """Make the students' targets (after :func:`measure_teachers`, and with ``all`` after
    :func:`harvest_hybrid`); return the students to train (``which``: ``default``, or ``all``
    for every student), the longest (its teacher run online) first, so that side by side
    they finish together."""
    teachers = run.size.teachers
    safety = next(j for j, t in enumerate(teachers) if t.safety)
    best = next(j for j, t in enumerate(teachers) if t.name == run.results["best_teacher"])

    mix = targets(run, "mix-linear", list(range(len(teachers))),
                  extra=("--safety", str(safety), "--teacher-blocks"))
    jobs = [student(run, f"single-{teachers[best].name}-full", None, teacher=teachers[best].name),
            student(run, "ce-only", None)]
    single_ids = range(len(teachers)) if which == "all" else [best]
    jobs += [student(run, f"single-{teachers[j].name}",
                     targets(run, f"single-{teachers[j].name}", [j])) for j in single_ids]
    jobs.append(student(run, "mix-linear", mix))
    one = f"single-{teachers[best].name}"
    jobs.append(student(run, f"{one}-sampled", sampled_targets(run, best)))
    if which == "all":
        everyone = list(range(len(teachers)))
        jobs += [
            student(run, f"{one}-hybrid", hybrid_targets(run, best)),
            student(run, "mix-geometric", targets(run, "mix-geometric", everyone,
                                                  extra=("--operator", "geometric"))),
            student(run, "mix-adaptive", targets(run, "mix-adaptive", everyone,
                                                 extra=("--token", "entropy", "--safety",
                                                        str(safety)))),
            student(run, "mix-fitted", targets(run, "mix-fitted", everyone,
                                               extra=("--weights", "fit"))),
            student(run, "mix-linear-renorm", mix, loss="fkl_renorm"),
            student(run, f"{one}-label", targets(run, f"{one}-label", [best],
                                                 extra=("--label-entry",))),
            *(student(run, f"objective-{objective}-{loss}", mix, objective=objective, loss=loss)
              for loss in ("fkl_tail", "rkl_tail") for objective in ("mix", "multi")),
        ]
    return jobs


def measure_experiments(run: Run) -> None:
    """The papers' claims on the trained students and the teachers' targets: tail mass, the
    safety bound, variance reduction, and every student's unsafe-token mass."""
    safety = next(j for j, t in enumerate(run.size.teachers) if t.safety)
    one = f"single-{run.results['best_teacher']}"
    run.results["target_bytes_per_position"] = {
        name: target_bytes_per_position(run, name)
        for name in (one, f"{one}-label", f"{one}-hybrid", f"{one}-sampled")
        if is_complete(run.path("stores", name))
    }
    with run.timed("measure tails, safety, variance and students' unsafe mass"):
        run.results["teacher_tail_mass"] = teacher_tail_mass(run)
        run.results["safety"] = safety_sweep(run, safety)
        run.results["variance"] = variance_reduction(run)
        run.results["student_unsafe_mass"] = {
            name: unsafe_mass(run.path("students", name, "final"),
                              run.path("stores", "tokens-heldout"), run.results["unsafe_ids"])
            for name in run.results.get("students", {})
        }
    run.save()


# --------------------------------------------------------------------------- measurements


def heldout_logprobs(run: Run) -> np.ndarray:
    """[N,K] each teacher's log-prob of the actual next token on the held-out tokens.

    Computed in-process with the full-vocabulary reference engine (no vLLM start needed).
    """
    from mtkd.harvest.hf_engine import HfReferenceEngine

    store = open_store(run.path("stores", "tokens-heldout"), verify="none")
    batch = store.read(np.arange(store.num_sequences), ["token_ids"])
    seqs = [batch["token_ids"][a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:],
                                                      strict=True)]
    cols = []
    for t in run.size.teachers:
        engine = HfReferenceEngine(str(run.path("teachers", t.name, "final")), k=1)
        cols.append(engine.harvest(seqs)["target_logprob"].astype(np.float64))
    return np.stack(cols, axis=1)


def heldout_bytes(run: Run, positions: int) -> int | None:
    """UTF-8 bytes of the held-out tokens that :func:`heldout_logprobs` scores (its
    ``positions`` rows); None when the tokens store has no ``byte_end``."""
    store = open_store(run.path("stores", "tokens-heldout"), verify="none")
    if not has_byte_ends(store):
        return None
    batch = store.read(np.arange(store.num_sequences), [BYTE_END])
    sizes = label_bytes(batch[BYTE_END], batch.offsets)
    if len(sizes) != positions:
        raise ValueError(f"{store.root}: {len(sizes)} labelled tokens, {positions} log-probs")
    return int(sizes.sum())


def mixture_quality(run: Run, weightings: dict[str, np.ndarray]) -> dict[str, Any]:
    """Held-out CE of each teacher and of their (temperature-1) mixtures, one per weighting;
    also in bits per byte when the held-out store says where its tokens end."""
    lp = heldout_logprobs(run)
    ce = -lp.mean(axis=0)
    mixture_lp = {name: np.log(np.exp(lp) @ np.asarray(w)) for name, w in weightings.items()}
    mixtures = {name: float(-np.mean(m)) for name, m in mixture_lp.items()}
    names = [t.name for t in run.size.teachers]
    out: dict[str, Any] = {"teacher_ce": dict(zip(names, ce.tolist(), strict=True)),
                           "mixture_ce": mixtures, "positions": len(lp)}
    n_bytes = heldout_bytes(run, len(lp))
    if n_bytes is not None:
        out["teacher_bpb"] = {name: bits_per_byte(float(-lp[:, j].sum()), n_bytes)
                              for j, name in enumerate(names)}
        out["mixture_bpb"] = {name: bits_per_byte(float(-m.sum()), n_bytes)
                              for name, m in mixture_lp.items()}
        out["bytes"] = n_bytes
    return out


def _teacher_sample(run: Run, positions: int = SAMPLE_POSITIONS) -> list[Any]:
    rows = []
    for t in run.size.teachers:
        store = open_store(run.path("stores", f"{t.name}-student"), verify="none")
        batch = store.read_part(0, ["topk_ids", "topk_logprobs", "tail_logmass",
                                    "target_logprob"])
        rows.append(teacher_rows(batch, store.attrs).rows(0, positions))
    return rows


def fitted_weights(run: Run) -> np.ndarray:
    """Maximum-likelihood mixture weights on the student set (what ``--weights fit`` uses)."""
    stores = [open_store(run.path("stores", f"{t.name}-student"), verify="none")
              for t in run.size.teachers]
    return fit_mixture_weights(target_logprobs(stores))


def teacher_tail_mass(run: Run) -> dict[str, dict[str, float]]:
    """Per teacher, over the student's positions: mean mass outside its top-k, and how often
    the actual next token is inside the top-k (what sparse targets leave out)."""
    out = {}
    for t in run.size.teachers:
        store = open_store(run.path("stores", f"{t.name}-student"), verify="none")
        batch = store.read_part(0, ["tail_logmass", "target_rank"])
        out[t.name] = {
            "mean_tail_mass": float(np.exp(batch["tail_logmass"].astype(np.float64)).mean()),
            "target_in_topk": float((batch["target_rank"] < store.attrs["k"]).mean()),
        }
    return out


def _union(run: Run) -> tuple[Any, np.ndarray]:
    teachers = run.size.teachers
    rows = _teacher_sample(run)
    vocab = run.size.vocab_size
    tempered = [temper(r, t.temperature, "lump", vocab) for r, t in zip(rows, teachers,
                                                                        strict=True)]
    block = to_union(tempered, vocab)
    return block, block.stack.probs


def safety_sweep(run: Run, safety: int) -> dict[str, Any]:
    """Unsafe mass of the linear mixture vs the safety weight, and the attenuation bound."""
    block, probs = _union(run)
    unsafe = np.isin(block.ids, run.results["unsafe_ids"])
    size = block.ids.shape[1]
    others = [j for j in range(probs.shape[0]) if j != safety]
    op = get_operator("linear")
    points = []
    for w_star in SAFETY_GRID:
        w = np.full(probs.shape[0], (1 - w_star) / len(others))
        w[safety] = w_star
        q = op(block.stack, np.broadcast_to(w, (probs.shape[1], len(w))))[:, :size]
        bound = (1 - w_star) * probs[others, :, :size].max(axis=0) + w_star * probs[safety, :,
                                                                                    :size]
        slack = np.where(unsafe, bound - q, np.inf)
        points.append({
            "w_safety": w_star,
            "unsafe_mass": float(np.where(unsafe, q, 0).sum(axis=1).mean()),
            "bound_mass": float(np.where(unsafe, bound, 0).sum(axis=1).mean()),
            "violations": int((slack < -1e-9).sum()),
            "checked": int(unsafe.sum()),
        })
    teacher_mass = {t.name: float(np.where(unsafe, probs[j, :, :size], 0).sum(axis=1).mean())
                    for j, t in enumerate(run.size.teachers)}
    return {"points": points, "teacher_unsafe_mass": teacher_mass,
            "bound_holds": all(p["violations"] == 0 for p in points)}


def variance_reduction(run: Run, sigma: float = 0.5, draws: int = 16, seed: int = 0
                       ) -> dict[str, Any]:
    """Token-level variance of linear q under independent log-normal teacher noise.

    Theory (Flouro & Chadwick, Thm IV.2): Var q(i) = Σ_k w_k² Var p̃_k(i) for independent noise,
    so the measured variance should track the prediction from each teacher's own variance.
    """
    _, probs = _union(run)
    rng = np.random.default_rng(seed)
    noisy = probs[None] * np.exp(sigma * rng.standard_normal((draws, *probs.shape)))
    noisy /= noisy.sum(axis=-1, keepdims=True)
    per_teacher = noisy.var(axis=0).mean(axis=(1, 2))  # [K]
    points = []
    for w in VARIANCE_WEIGHTINGS:
        w = np.asarray(w)
        q = np.einsum("k,rknu->rnu", w, noisy)
        points.append({"weights": w.tolist(), "sum_w2": float(w @ w),
                       "measured": float(q.var(axis=0).mean()),
                       "predicted": float((w**2) @ per_teacher)})
    return {"sigma": sigma, "draws": draws, "points": points,
            "per_teacher_variance": per_teacher.tolist()}


def unsafe_mass(model_dir: Any, tokens_dir: Any, unsafe_ids: list[int],
                max_sequences: int = 64) -> float:
    """Mean probability a model puts on the unsafe tokens over held-out positions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    store = open_store(tokens_dir, verify="none")
    batch = store.read(np.arange(min(max_sequences, store.num_sequences)), ["token_ids"])
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(len(batch.offsets) - 1):
            ids = torch.from_numpy(batch["token_ids"][batch.offsets[s]:batch.offsets[s + 1]])
            probs = model(ids[None].long()).logits[0].float().softmax(-1)
            total += float(probs[:, unsafe_ids].sum())
            count += probs.shape[0]
    return total / max(count, 1)
