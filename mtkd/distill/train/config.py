"""The train stage's options: the only home of their defaults and bounds."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from mtkd.distill.train.losses import KINDS

OBJECTIVES = ("auto", "ce", "mix", "multi")


@dataclass
class TrainConfig:
    """Every option of ``mtkd train``; ``from_dict`` loads a config file's table."""

    tokens: str  # tokens store
    out: str  # output directory (checkpoints, metrics.jsonl, final/)
    student: str | dict[str, Any]  # local HF checkpoint dir, or config kwargs (+ "model_type")
    targets: str | None = None  # target store built over ``tokens``
    teacher: str | None = None  # or: a local teacher run online (full-vocabulary targets)
    objective: str = "auto"  # ce | mix | multi | auto (mix with targets, else ce)
    loss: str = "fkl_tail"  # one of losses.KINDS
    alpha: float = 0.0  # weight of CE in (1−α)·KD + α·CE
    temperature: float = 1.0  # student temperature of the KD term
    beta: float = 0.5  # JSD mixing weight
    monitor: bool = True  # read per-teacher blocks to log the other objective
    seq_len: int = 2048
    batch_size: int = 8  # rows per rank per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on ≥2-D parameters only
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    max_tokens: int | None = None  # train on a seeded subset of at most this many tokens
    suppress_ids: tuple[int, ...] = ()  # ids to push towards zero probability (unlikelihood)
    suppress_weight: float = 1.0  # weight of the unlikelihood term −log(1 − Σ_suppressed s)
    eval_fraction: float = 0.01  # held out by doc_id hash (ignored with eval_tokens)
    eval_tokens: str | None = None  # explicit held-out tokens store
    eval_targets: str | None = None  # its target store
    eval_every: int = 200  # 0: only at the end
    eval_batches: int | None = 50  # per rank; None: the whole held-out set
    save_every: int = 500  # 0: no periodic checkpoints
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in ``out``
    log_every: int = 10
    bf16: bool = False  # bfloat16 autocast
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    fsdp: bool = False  # under torchrun: shard the student with FSDP2 instead of DDP replicas
    threads: int | None = None  # torch threads (default: cores / local ranks under torchrun)
    chunk_size: int = 1024  # rows per chunk of the chunked losses
    prefetch: int = 4  # batches prepared ahead by the loader thread
    open_rows: int = 32  # packing window: rows kept open for first-fit
    progress: bool = True
    tensorboard: bool = True  # also log to out/tensorboard if tensorboard is importable

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
        if self.eval_targets is not None and self.eval_tokens is None:
            raise ValueError("eval_targets needs eval_tokens")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1")
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        self.suppress_ids = tuple(int(i) for i in self.suppress_ids)
        if self.suppress_ids and self.suppress_weight < 0:
            raise ValueError("suppress_weight must be ≥ 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be ≥ 1")

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
