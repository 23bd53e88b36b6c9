"""``mtkd train``: the training loop of a Hugging Face causal LM on cached targets (or plain CE).

:func:`train` reads top to bottom like nanoGPT's loop: join the ranks, open the stores, build
the student and its objective, resume from the newest checkpoint, then step — accumulate the
micro-batches, clip, update, log a window, evaluate, checkpoint — and save the final student.
Its parts live beside it: :mod:`~mtkd.distill.train.objective` (what a step minimises),
:mod:`~mtkd.distill.train.student`, :mod:`~mtkd.distill.train.distributed` (ranks, DDP/FSDP),
:mod:`~mtkd.distill.train.optimizer`, :mod:`~mtkd.distill.train.metrics`,
:mod:`~mtkd.distill.train.checkpoint` and :mod:`~mtkd.distill.train.loader`.

Normalisation: a step's loss is the sum over every labelled position of the step (all ranks,
all accumulation micro-batches) divided by their global count, so W ranks × batch B give the
same step as one process with batch W·B (DDP averages gradients, so each rank scales its sum
by W / count).

The entry point is ``mtkd train`` (options by flag or ``--config FILE``); under
``torchrun --nproc_per_node N -m mtkd train …`` it runs DDP over the ranks (gloo on CPU, nccl
on GPU), or FSDP2 with ``fsdp``.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from mtkd.distill.train.bits_per_byte import bits_per_byte
from mtkd.distill.train.checkpoint import (
    check_run_dir,
    checkpoint_dirs,
    restore,
    save_checkpoint,
    training_state,
)
from mtkd.distill.train.config import TrainConfig
from mtkd.distill.train.device import chunk_rows, free_device_bytes
from mtkd.distill.train.distributed import (
    Dist,
    deferred_grad_sync,
    distribute,
    open_verified,
    setup_distributed,
)
from mtkd.distill.train.loader import (
    LoaderState,
    PackedBatch,
    PackedLoader,
    Prefetcher,
    heldout_split,
    token_budget,
)
from mtkd.distill.train.metrics import Meter, MetricsLog, records_at
from mtkd.distill.train.objective import LossSpec, StudentLoss
from mtkd.distill.train.optimizer import make_optimizer, make_scheduler
from mtkd.distill.train.student import (
    check_same_tokenizer,
    check_same_tokens,
    check_vocab,
    load_student,
    load_teacher,
    save_student,
    student_vocab,
    with_teacher_targets,
)
from mtkd.store import Store
from mtkd.store.schema import TARGET, TOKENS, has_byte_ends

FINAL_METRICS = "final_metrics.json"


@dataclass
class TrainResult:
    """What a finished run reports (the files are in ``out``)."""

    out: Path
    model_dir: Path  # the final student (save_pretrained + tokenizer files)
    steps: int
    tokens: int  # tokens trained on, all ranks
    elapsed_s: float
    resumed_from: int | None
    last_log: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)
    already_finished: bool = False  # a rerun of a finished run: nothing trained or written


class DivergedError(RuntimeError):
    """A step's gradient norm was not finite: the weights it would leave are garbage."""


def finished(out: Path, steps: int, tokens: int) -> TrainResult:
    """The result of a run that already finished, from its final metrics (kept as they are:
    a rerun of a finished run trains nothing and rewrites nothing)."""
    final = json.loads((out / FINAL_METRICS).read_text())
    last_eval = {k: v for k, v in final.items() if k.startswith("eval_")}
    return TrainResult(out, out / "final", steps, tokens, 0.0, steps, final.get("train", {}),
                       last_eval, already_finished=True)


def open_data(cfg: TrainConfig, d: Dist, tokens: Store, targets: Store | None, vocab: int,
              pad_id: int) -> tuple[PackedLoader, PackedLoader | None]:
    """Training and held-out loaders (held-out: explicit store, or a doc_id-hash split)."""
    objective = cfg.resolved_objective
    blocks = objective == "multi" or (cfg.monitor and targets is not None
                                      and bool(targets.attrs.get("teacher_blocks")))
    common = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, rank=d.rank,
                  world_size=d.world, open_rows=cfg.open_rows, vocab_size=vocab, pad_id=pad_id)
    if cfg.eval_tokens is not None:
        train_idx = None
        eval_tokens = open_verified(cfg.eval_tokens, TOKENS, d)
        eval_targets = open_verified(cfg.eval_targets, TARGET, d) if cfg.eval_targets else None
        eval_idx = None
        check_vocab(vocab, [eval_tokens, eval_targets])
        check_same_tokens([eval_tokens, eval_targets], tokens)
    else:
        train_idx, eval_idx = heldout_split(tokens, cfg.eval_fraction)
        eval_tokens, eval_targets = tokens, targets
    train_idx = token_budget(tokens, train_idx, cfg.max_tokens, cfg.seed)
    train = PackedLoader(tokens, targets, train_idx, seed=cfg.seed, teacher_blocks=blocks,
                         **common)
    train.require_sequences()
    held = None
    if eval_idx is None or len(eval_idx):
        eval_blocks = blocks and eval_targets is not None and bool(
            eval_targets.attrs.get("teacher_blocks"))
        held = PackedLoader(eval_tokens, eval_targets, eval_idx, shuffle=False,
                            teacher_blocks=eval_blocks, count_bytes=has_byte_ends(eval_tokens),
                            **common)
    return train, held


@torch.no_grad()
def evaluate(net: nn.Module, loader: PackedLoader, d: Dist, max_batches: int | None,
             chunk_size: int, bf16: bool, fused: str = "auto") -> dict[str, float]:
    """Held-out CE (nats/token), bits per byte when the loader counts bytes, and, with
    targets, KL(q‖s) (+ L_multi with blocks).

    ``net`` is the (wrapped) :class:`~mtkd.distill.train.objective.StudentLoss`: under FSDP
    its forward gathers the shards. Every rank runs the same number of batches (the loader
    pads ranks to equal counts).
    """
    spec = LossSpec.held_out(loader.targets is not None, chunk_size, fused)
    meter = Meter(d.device)
    nats_bytes = torch.zeros(2, dtype=torch.float64, device=d.device)  # Σ CE, Σ label bytes
    was_training = net.training
    net.eval()
    for batch in itertools.islice(loader.epoch(0), max_batches):
        batch = batch.to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(batch, spec)
            meter.add(out, batch, 0.0)
        if batch.label_bytes is not None and out.ce is not None:
            nats_bytes[0] += out.ce.to(nats_bytes)
            nats_bytes[1] += batch.label_bytes.sum().to(nats_bytes)
    net.train(was_training)
    stats = meter.reduce(d, "mix", loader.targets is not None, loader.num_teachers > 0)
    res = {"eval_ce": stats["ce"], "eval_ppl": math.exp(min(stats["ce"], 50.0))}
    if loader.count_bytes:
        bpb = bits_per_byte(*d.all_sum(nats_bytes).tolist())
        if bpb is not None:
            res["eval_bpb"] = bpb
    if "l_mix" in stats:
        res["eval_kl"] = stats["l_mix"]
    if "l_multi" in stats:
        res["eval_kl_multi"] = stats["l_multi"]
    return res


def train_step(net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer,
               micro: list[PackedBatch], d: Dist, *, bf16: bool = False, grad_clip: float = 0.0,
               meter: Meter | None = None) -> float:
    """One optimizer step over ``micro`` (gradient accumulation); returns the gradient norm.

    Each rank scales its summed loss by world / (labelled positions of the step on all ranks):
    after DDP's (or FSDP's) gradient average that is the mean over every position of the
    global batch.
    """
    n_labels = max(d.sum(float(sum(b.num_labels for b in micro))), 1.0)
    for i, batch in enumerate(micro):
        batch = batch.to(d.device)
        with deferred_grad_sync(net, i < len(micro) - 1):
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(batch)
            (out.loss * (d.world / n_labels)).backward()
        if meter is not None:
            meter.add(out, batch, 1.0 / n_labels)
    if meter is not None:
        meter.step()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          grad_clip if grad_clip > 0 else float("inf"))
    if isinstance(norm, DTensor):  # FSDP: the norm over all shards, replicated on every rank
        norm = norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def check_student(cfg: TrainConfig, model: nn.Module, vocab: int) -> None:
    """Refuse options the student cannot take: ids it lacks, rows longer than its positions."""
    outside = [i for i in cfg.suppress_ids if i >= vocab]
    if outside:
        raise ValueError(f"suppress_ids {outside} are outside the student's vocabulary of "
                         f"{vocab} ids")
    if cfg.seq_len > getattr(model.config, "max_position_embeddings", cfg.seq_len):
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the student's max_position_embeddings")


def run_notes(cfg: TrainConfig, d: Dist, no_held_out: bool, targets: Store | None) -> list[str]:
    """What the run tells its user before it starts: options that act otherwise than they
    might expect (none refuses the run)."""
    notes = []
    if cfg.fsdp and d.world == 1:
        notes.append("--fsdp shards the student over torchrun's ranks; this run is one "
                     "process, so it trains unsharded")
    if no_held_out and cfg.eval_fraction > 0:
        notes.append(f"--eval-fraction {cfg.eval_fraction:g} picks none of this store's "
                     "documents (the split is by document): no held-out evaluation; give a "
                     "larger fraction or --heldout")
    source = None if targets is None else (  # stores before target_source: their config's
        targets.attrs.get("target_source") or (targets.attrs.get("config") or {}).get("source"))
    if source == "samples" and cfg.resolved_objective != "ce" and not cfg.loss.startswith("fkl"):
        notes.append(f"{cfg.targets} holds sampled targets, an unbiased estimate of the "
                     f"teachers' mixture for forward KL only; --loss {cfg.loss} trains towards "
                     "the draws' empirical distribution instead (use fkl_tail)")
    return notes


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the student described by ``cfg``; returns where it was saved."""
    if not cfg.progress:  # transformers' own bars (loading and saving weights) too
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    d = setup_distributed(cfg)
    out = Path(cfg.out)
    try:
        return _train(cfg, d, out)
    finally:
        if d.owns_group:
            # free the run's cycles (model, optimizer, FSDP state) while the group and the
            # interpreter are alive: collective work they still hold, freed at interpreter
            # exit instead, can abort the process from gloo's threads (seen once in CI)
            gc.collect()
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, out: Path) -> TrainResult:
    """The run itself, on this process's place ``d`` in the job."""
    check_run_dir(out)
    # Data and models (load_student seeds torch's RNG with cfg.seed)
    objective = cfg.resolved_objective
    tokens = open_verified(cfg.tokens, TOKENS, d)
    targets = open_verified(cfg.targets, TARGET, d) if cfg.targets else None
    if isinstance(cfg.student, str):
        check_same_tokenizer(cfg.student, tokens, "the student")
    if cfg.teacher:
        check_same_tokenizer(cfg.teacher, tokens, "the teacher")
    model = load_student(cfg.student, cfg.seed, tokens)  # on the CPU until distribute()
    vocab = student_vocab(model)
    check_vocab(vocab, [tokens, targets])
    check_student(cfg, model, vocab)
    pad_id = int(tokens.attrs.get("eos_id") or 0)
    loader, held = open_data(cfg, d, tokens, targets, vocab, pad_id)
    teacher = load_teacher(cfg.teacher, d.device) if cfg.teacher else None
    if teacher is not None and student_vocab(teacher) != vocab:
        raise ValueError(f"teacher {cfg.teacher} has vocabulary {student_vocab(teacher)}, "
                         f"the student {vocab}")
    has_targets = loader.targets is not None or teacher is not None
    has_monitor = loader.num_teachers > 0
    if objective == "multi" and not has_monitor:
        raise ValueError(f"{cfg.targets} has no per-teacher blocks; objective 'multi' needs them")
    # The objective, the wrapping for the ranks, the optimizer
    chunk_size = cfg.chunk_size or chunk_rows(vocab, free_device_bytes(d.device))
    net = distribute(StudentLoss(model, LossSpec.from_config(cfg, chunk_size)), d, cfg.fsdp)
    opt = make_optimizer(model, cfg)  # after distribute: FSDP replaces parameters by shards
    sched = make_scheduler(opt, cfg)
    meter = Meter(d.device)

    # Resume from the newest checkpoint, if any
    step, state, tokens_seen, resumed = 0, LoaderState(), 0, None
    ckpts = checkpoint_dirs(out)
    if ckpts and not cfg.resume:
        raise ValueError(f"{out} holds checkpoints; resume or choose a new output directory")
    if ckpts:
        step, state, tokens_seen = restore(ckpts[-1], cfg, model, opt, sched, meter, d.main,
                                           d.world)
        resumed = step
        if step >= cfg.max_steps and (out / FINAL_METRICS).exists():
            return finished(out, step, tokens_seen)  # a rerun of a finished run (a requeue)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        for note in run_notes(cfg, d, held is None, targets):
            print(f"note: {note}", file=sys.stderr)
    log = MetricsLog(out, resumed, cfg.tensorboard) if d.main else None

    def held_out_record() -> dict[str, Any]:  # the held-out measure at this step, logged
        record = {"step": step, "split": "eval", **evaluate(
            net, held, d, cfg.eval_batches, chunk_size, cfg.bf16, cfg.fused_loss)}
        if log is not None:
            log.write(record)
        return record

    net.train()
    batches = Prefetcher(loader.stream(state), cfg.prefetch)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step",
               disable=not (d.main and cfg.progress))
    last_log: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    if step >= cfg.max_steps:  # trained to the end, killed before the final metrics: rebuild
        last_log, last_eval = records_at(out, step)
        if held is not None and not last_eval:
            last_eval = held_out_record()
    t0 = t_window = time.perf_counter()
    # The loop: step, log a window, evaluate, checkpoint
    try:
        while step < cfg.max_steps:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            if teacher is not None:  # the teacher's forward under the student's autocast
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    micro = [with_teacher_targets(b.to(d.device), teacher) for b in micro]
            norm = train_step(net, model, opt, micro, d, bf16=cfg.bf16,
                              grad_clip=cfg.grad_clip, meter=meter)
            if not math.isfinite(norm):  # the same norm on every rank: all stop together
                raise DivergedError(
                    f"step {step + 1}: the gradient norm is {norm} (the loss diverged); "
                    f"nothing from this step on is saved, the checkpoints before it are "
                    f"kept. Lower --lr (now {cfg.lr:g}) or lengthen --warmup-steps (now "
                    f"{cfg.warmup}), in a new --out")
            sched.step()
            step += 1
            state = LoaderState.following(micro[-1])
            bar.update()

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                stats = meter.reduce(d, objective, has_targets, has_monitor)
                window_tokens = int(stats.pop("tokens"))
                tokens_seen += window_tokens
                now = time.perf_counter()
                last_log = {"step": step, "split": "train", **stats,
                            "lr": sched.get_last_lr()[0], "grad_norm": norm,
                            "epoch": micro[-1].epoch, "tokens_seen": tokens_seen,
                            "tokens_per_s": window_tokens / max(now - t_window, 1e-9),
                            "elapsed_s": now - t0}
                t_window = now
                bar.set_postfix(loss=f"{stats['loss']:.4f}",
                                tok_s=f"{last_log['tokens_per_s']:.0f}")
                if log is not None:
                    log.write(last_log)
            if held is not None and (step == cfg.max_steps
                                     or (cfg.eval_every and step % cfg.eval_every == 0)):
                last_eval = held_out_record()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                ckpt = training_state(step, model, opt, sched, state, tokens_seen, meter, cfg, d)
                if d.main:
                    save_checkpoint(out, step, ckpt, cfg.keep_checkpoints)
    finally:
        batches.close()
        bar.close()
        if log is not None:
            log.close()
    # The end: a last checkpoint, the final student and its metrics
    model_dir = out / "final"
    ckpt = training_state(step, model, opt, sched, state, tokens_seen, meter, cfg, d)
    if d.main:
        save_checkpoint(out, step, ckpt, cfg.keep_checkpoints)
        model_dir = save_student(model, out, tokens.attrs.get("tokenizer"), ckpt["model"])
        final = {"steps": step, "tokens": tokens_seen, "elapsed_s": time.perf_counter() - t0,
                 "resumed_from": resumed, "train": last_log, **last_eval}
        final |= {f"heldout_{k}": last_eval[f"eval_{k}"] for k in ("ce", "bpb")
                  if f"eval_{k}" in last_eval}
        (out / FINAL_METRICS).write_text(json.dumps(final, indent=1))
    if d.world > 1:
        dist.barrier()
    return TrainResult(out, model_dir, step, tokens_seen, time.perf_counter() - t0, resumed,
                       last_log, last_eval)

