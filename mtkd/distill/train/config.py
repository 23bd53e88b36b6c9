"""The train stage's options: the only home of their defaults, help texts and bounds."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from mtkd.config import changed_options, check_bounds, option
from mtkd.distill.train.device import CPU_CHUNK_ROWS, check_device_spec

OBJECTIVES = ("auto", "ce", "mix", "multi")
#: a loss kind is "<divergence>_<collapse>" (mtkd.distill.train.divergences)
DIVERGENCES = ("fkl", "rkl", "jsd")
COLLAPSES = ("tail", "renorm")
KINDS = tuple(f"{d}_{c}" for d in DIVERGENCES for c in COLLAPSES)
#: chunk bodies of the losses (mtkd.distill.train.losses.FusedMode)
FUSED_MODES = ("auto", "off", "eager", "compiled")


@dataclass
class TrainConfig:
    """Every option of ``mtkd train``; ``from_dict`` loads a config file's table."""

    tokens: str = option(help="Tokens store to train on.", path=True)
    out: str = option(help="Run directory (checkpoints, metrics.jsonl, final/).", path=True)
    student: str | dict[str, Any]  # local HF checkpoint dir, or config kwargs (+ "model_type")
    targets: str | None = option(
        None, "Target store from `mtkd aggregate` (none: cross-entropy only).", path=True
    )
    teacher: str | None = option(
        None,
        "Local teacher checkpoint run online for full-vocabulary targets (the dense baseline "
        "of the demo; small vocabularies) instead of a target store.",
        path=True,
    )
    objective: str = option(
        "auto",
        "ce | mix (KL to fused targets) | multi (Σ w_k KL to each teacher) | auto (mix with "
        "targets or a teacher, else ce).",
    )
    loss: str = option(
        "fkl_tail", "fkl_tail | fkl_renorm | rkl_tail | rkl_renorm | jsd_tail | jsd_renorm."
    )
    alpha: float = option(0.0, "Weight of CE: (1−α)·KD + α·CE.", min=0, max=1)
    temperature: float = option(1.0, "Student temperature of the KD term (> 0).")
    beta: float = option(0.5, "JSD mixing weight, in (0, 1).")
    monitor: bool = option(True, "Read per-teacher blocks to log the other objective.")
    seq_len: int = option(2048, "Packed row length.", min=2)
    batch_size: int = option(8, "Rows per rank per micro-batch.", min=1)
    grad_accum: int = option(1, "Micro-batches per step.", min=1)
    max_steps: int = option(1000, "Optimizer steps.", min=1)
    lr: float = option(3e-4, "Peak learning rate.", min=0)
    min_lr_ratio: float = option(
        0.1, "The cosine schedule decays to lr · min_lr_ratio.", min=0, max=1
    )
    warmup_steps: int | None = option(
        None, "Linear warmup steps (default: 10% of max_steps, at least 1).", min=0
    )
    weight_decay: float = option(0.1, "AdamW weight decay (of ≥2-D parameters only).", min=0)
    adam_betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas, each in [0, 1).")
    grad_clip: float = option(1.0, "Gradient-norm clipping (0: none).", min=0)
    seed: int = option(0, "Seed of initialisation and data order.")
    max_tokens: int | None = option(
        None, "Train on a seeded subset of at most this many tokens.", min=1
    )
    suppress_ids: tuple[int, ...] = option(
        (), "Token ids to push to low probability (training a safety teacher)."
    )
    suppress_weight: float = option(
        1.0, "Weight of the unlikelihood term −log(1 − Σ s over suppress_ids).", min=0
    )
    eval_fraction: float = option(
        0.01, "Fraction held out by doc_id hash (without a held-out tokens store)."
    )
    eval_tokens: str | None = option(None, "Held-out tokens store.", path=True)
    eval_targets: str | None = option(None, "Target store of the held-out tokens.", path=True)
    eval_every: int = option(200, "Held-out evaluation period (0: at the end only).", min=0)
    eval_batches: int | None = option(
        50, "Held-out batches per rank (a config file's null: the whole held-out set).",
        min=1,
    )
    save_every: int = option(
        500, "Checkpoint period (0: only the last one, at the end of the run).", min=0
    )
    keep_checkpoints: int = option(2, "Checkpoints kept (0: all).", min=0)
    resume: bool = option(True, "Continue from the latest checkpoint in the run directory.")
    log_every: int = option(10, "Metrics logging period (steps).", min=1)
    bf16: bool = option(False, "bfloat16 autocast.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    fsdp: bool = option(
        False,
        "Under torchrun: shard parameters, gradients and optimizer state over the ranks "
        "(FSDP2) instead of replicating the student (DDP); for students that do not fit "
        "one device.",
    )
    threads: int | None = option(
        None, "Torch threads (default: the cores / local ranks under torchrun).", min=1
    )
    fused_loss: str = option(
        "auto",
        "Chunk body of the losses: auto (the fused body compiled with torch.compile on a GPU, "
        "the reference elsewhere) | compiled | eager | off (the reference).",
    )
    chunk_size: int | None = option(
        None,
        f"Rows per chunk of the chunked losses (default: {CPU_CHUNK_ROWS} on the CPU; on a GPU "
        "sized from its free memory and the vocabulary).",
        min=1,
    )
    prefetch: int = option(4, "Batches prepared ahead by the loader thread.", min=1)
    open_rows: int = option(32, "Packing window: rows kept open for first-fit.", min=1)
    progress: bool = option(True, "Show a progress bar.")
    tensorboard: bool = option(
        True, "Also log to <out>/tensorboard if tensorboard is importable."
    )

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.loss not in KINDS:
            raise ValueError(f"loss must be one of {KINDS}, got {self.loss!r}")
        if self.targets is not None and self.teacher is not None:
            raise ValueError("give a target store (targets) or an online teacher, not both")
        if self.objective == "multi" and self.targets is None:
            raise ValueError("objective 'multi' needs a target store with per-teacher blocks")
        if self.objective == "mix" and self.targets is None and self.teacher is None:
            raise ValueError("objective 'mix' needs a target store (targets) or a teacher")
        check_device_spec(self.device)
        if self.fused_loss not in FUSED_MODES:
            raise ValueError(f"fused_loss must be one of {FUSED_MODES}, got {self.fused_loss!r}")
        if self.eval_targets is not None and self.eval_tokens is None:
            raise ValueError("eval_targets needs eval_tokens")
        check_bounds(self)
        self._check_open_bounds()
        self._check_unused()
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        self.suppress_ids = tuple(int(i) for i in self.suppress_ids)
        if any(i < 0 for i in self.suppress_ids):
            raise ValueError(f"suppress_ids must be token ids ≥ 0, got {self.suppress_ids}")

    def _check_open_bounds(self) -> None:
        """The bounds that :func:`check_bounds` cannot say (open or per element): refused here,
        before a store is opened or the run directory written, not at the first step."""
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
        if not 0 < self.beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must each be in [0, 1), got {self.adam_betas}")

    def _check_unused(self) -> None:
        """Refuse an option this run would silently ignore: a user who set it expects it to
        act (the KD options of a cross-entropy run, β without the JSD, …)."""
        changed = changed_options(self)
        if self.resolved_objective == "ce":
            kd = sorted(changed & {"alpha", "temperature", "loss", "beta"})
            if kd:
                verb = "shapes" if len(kd) == 1 else "shape"
                raise ValueError(f"{', '.join('--' + n for n in kd)} {verb} the KD term, and "
                                 "this run trains on cross-entropy only (no --targets or "
                                 "--teacher): drop them or give targets")
        if "beta" in changed and not self.loss.startswith("jsd"):
            raise ValueError(f"--beta weighs the JSD; --loss {self.loss} does not use it")
        if self.suppress_ids and self.resolved_objective != "ce":
            raise ValueError("--suppress-ids applies to the ce objective (training a safety "
                             "teacher), and this run distils")
        if "suppress_weight" in changed and not self.suppress_ids:
            raise ValueError("--suppress-weight needs --suppress-ids (the ids it pushes down)")
        if "eval_fraction" in changed and self.eval_tokens is not None:
            raise ValueError("--eval-fraction splits the training store when no --heldout is "
                             "given; with --heldout it is unused: give one of them")
        if self.warmup_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} exceeds --max-steps "
                             f"{self.max_steps}: the learning rate would never reach its peak")

    @property
    def warmup(self) -> int:
        """Warmup steps: as given, else 10% of ``max_steps`` (at least 1). Kept unresolved in
        the config, so that a resumed run given more steps keeps its options."""
        return self.warmup_steps if self.warmup_steps is not None else max(self.max_steps // 10, 1)

    @property
    def resolved_objective(self) -> str:
        if self.objective == "auto":
            return "mix" if self.targets is not None or self.teacher is not None else "ce"
        return self.objective

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (keys with ``-`` or ``_``); unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        norm = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(norm) - names)
        if unknown:
            raise ValueError(f"unknown train option(s) {unknown}; known: {sorted(names)}")
        return cls(**norm)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))
