"""``mtkd train``: a Hugging Face causal LM trained on cached targets (or plain cross-entropy).

Objectives (``TrainConfig.objective``):

* ``ce`` — cross-entropy on the actual next tokens (teachers, the CE-only baseline); with a
  target store, KL to the fused targets is logged as a monitor;
* ``mix`` — L_mix = (1−α)·D(q, s) + α·CE against the fused targets q;
* ``multi`` — L_multi = (1−α)·Σ_k w_k·D(p_k, s) + α·CE against the per-teacher blocks.

With per-teacher blocks in the target store the other objective is logged too (``l_mix`` /
``l_multi``), with the stored Jensen gap. The loss is computed from the final hidden states
(``model.base_model``) and the lm_head weight by the chunked losses of
:mod:`mtkd.distill.train.losses`: the ``[N, V]`` logits of a batch never exist.

Normalisation: a step's loss is the sum over every labelled position of the step (all ranks,
all accumulation micro-batches) divided by their global count, so W ranks × batch B give the
same step as one process with batch W·B (DDP averages gradients, so each rank scales its sum
by W / count).

Checkpoints (``out/checkpoints/step-NNNNNNNN/state.pt``, written to a temporary directory and
renamed) hold model, optimizer, scheduler, RNG and loader state and resume exactly; they are
read with ``torch.load(weights_only=True)``. Model and optimizer state are full (unsharded,
keyed by parameter name, through ``torch.distributed.checkpoint.state_dict``) in every mode, so
a checkpoint written by one process, DDP or FSDP resumes under any of them. Only rank 0 writes.

Run under ``torchrun --nproc_per_node N -m mtkd.distill.train.loop CONFIG`` for DDP (gloo on CPU,
nccl on GPU), or with ``fsdp`` for FSDP2 (``fully_shard``: parameters, gradients and optimizer
state sharded over the ranks, for students that do not fit one device); ``CONFIG`` is a
JSON/TOML/YAML file of :class:`TrainConfig` fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mtkd.distill.train.config import TrainConfig
from mtkd.distill.train.loader import (
    LoaderState,
    PackedBatch,
    PackedLoader,
    Prefetcher,
    heldout_split,
    token_budget,
)
from mtkd.distill.train.losses import (
    IGNORE_INDEX,
    LossOutput,
    SparseTargets,
    chunked_cross_entropy,
    sparse_kd_loss,
)
from mtkd.store import Store, StoreError, open_store
from mtkd.store.schema import TARGET, TOKENS

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
FINAL_METRICS = "final_metrics.json"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "*.model", "chat_template*")
# Options that may change when a run resumes (everything else must match the checkpoint);
# a changed max_steps reshapes the cosine from there on (resume is exact only without it).
RESUMABLE_CHANGES = frozenset({"max_steps", "eval_every", "eval_batches", "save_every",
                               "keep_checkpoints", "resume", "log_every", "progress",
                               "tensorboard", "prefetch", "threads", "device", "fsdp"})
# Checkpoints hold full (unsharded) model and optimizer state, gathered to rank 0 on the CPU.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)




@dataclass
class TrainResult:
    out: Path
    model_dir: Path  # the final student (save_pretrained + tokenizer files)
    steps: int
    tokens: int  # tokens trained on, all ranks
    elapsed_s: float
    resumed_from: int | None
    last_log: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The loss of a batch


@dataclass(frozen=True)
class LossSpec:
    """What to compute on a batch: objective, divergence kind and its parameters."""

    objective: str
    kind: str = "fkl_tail"
    alpha: float = 0.0
    temperature: float = 1.0
    beta: float = 0.5
    chunk_size: int = 1024
    suppress_ids: tuple[int, ...] = ()
    suppress_weight: float = 0.0


def suppression_penalty(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                        labels: Tensor, ids: tuple[int, ...], chunk_size: int) -> Tensor:
    """Σ over labelled positions of −log(1 − Σ_{u∈ids} s_u): unlikelihood on a set of tokens.

    Used to train a *safety teacher* that gives chosen tokens low probability. It needs the
    softmax normaliser, so it forms [chunk, V] logits with autograd — meant for the small
    vocabularies of teachers trained in place, not for large students.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])[labels.reshape(-1) != IGNORE_INDEX]
    index = torch.tensor(ids, device=hidden.device)
    total = rows.new_zeros((), dtype=torch.float32)
    for chunk in rows.split(chunk_size):
        logits = (chunk @ weight.T + (0 if bias is None else bias)).float()
        lse = logits.logsumexp(-1)
        log_unsafe = logits.index_select(-1, index).logsumexp(-1) - lse
        total = total - torch.log1p(-log_unsafe.exp().clamp(max=1 - 1e-6)).sum()
    return total


def batch_loss(model: PreTrainedModel, batch: PackedBatch, spec: LossSpec) -> LossOutput:
    """Sum-reduced loss of ``spec`` on ``batch``, from hidden states and the lm_head weight.

    ``kd`` is the trained divergence (for ``ce`` with targets: KL to the fused targets, no
    gradient); ``monitor`` the other objective when the batch carries the blocks it needs.
    """
    hidden = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if spec.objective == "ce" and batch.targets is None:
        out = chunked_cross_entropy(hidden, weight, batch.labels, chunk_size=spec.chunk_size,
                                    bias=bias, reduction="sum")
        if spec.suppress_ids and spec.suppress_weight > 0:
            penalty = suppression_penalty(hidden, weight, bias, batch.labels, spec.suppress_ids,
                                          spec.chunk_size)
            out = dataclasses.replace(out, loss=out.loss + spec.suppress_weight * penalty)
        return out
    if spec.objective == "multi":
        if batch.teachers is None:
            raise ValueError("objective 'multi' needs a target store with per-teacher blocks")
        train, train_w, mon, mon_w = batch.teachers, batch.teacher_weights, batch.targets, None
    else:
        train, train_w, mon, mon_w = batch.targets, None, batch.teachers, batch.teacher_weights
    assert train is not None
    return sparse_kd_loss(
        hidden, weight, train, batch.labels, kind=spec.kind,
        alpha=1.0 if spec.objective == "ce" else spec.alpha, temperature=spec.temperature,
        beta=spec.beta, teacher_weights=train_w, chunk_size=spec.chunk_size, bias=bias,
        reduction="sum", monitor=mon, monitor_weights=mon_w,
    )


def load_teacher(path: str, device: torch.device) -> PreTrainedModel:
    """A frozen local teacher for online full-vocabulary targets."""
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return teacher.eval().requires_grad_(False)


def with_teacher_targets(batch: PackedBatch, teacher: PreTrainedModel) -> PackedBatch:
    """``batch`` with the teacher's full softmax as targets (support = the whole vocabulary).

    The dense baseline that sparse top-k targets are compared with; it holds [B,T,V] ids and
    probabilities, so it is meant for small vocabularies.
    """
    with torch.no_grad():
        logits = teacher(input_ids=batch.input_ids, position_ids=batch.position_ids,
                         use_cache=False).logits
        probs = torch.softmax(logits.float(), dim=-1)
    ids = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape)
    tail = probs.new_zeros(probs.shape[:-1])
    return dataclasses.replace(batch, targets=SparseTargets(ids, probs, tail))


class StudentLoss(nn.Module):
    """The student and its objective as one module: DDP sees the lm_head used in forward, and
    as FSDP's root it holds the lm_head weight unsharded while the chunked loss reads it."""

    def __init__(self, model: PreTrainedModel, spec: LossSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, batch: PackedBatch, spec: LossSpec | None = None) -> LossOutput:
        """The loss of ``spec`` (default: the training objective) on ``batch``."""
        return batch_loss(self.model, batch, spec or self.spec)


def distribute(net: StudentLoss, d: Dist, fsdp: bool = False) -> nn.Module:
    """``net`` on ``d.device``, wrapped for the job: as is (one process), DDP, or FSDP2.

    FSDP2 (as torchtune shards Llama): one ``fully_shard`` group per decoder layer (the
    model's ``_no_split_modules`` classes), then ``net`` itself as the root group, which holds
    the embeddings, the final norm and the lm_head. The root is gathered for the whole of
    ``net.forward``, where the chunked loss reads ``lm_head.weight`` outside the lm_head's own
    forward. ``fully_shard`` moves each group's shard to the device as it shards it, so the
    whole student never sits on one accelerator (each rank does build it in CPU memory).
    """
    if d.world == 1:
        return net.to(d.device)
    if not fsdp:
        return DistributedDataParallel(net.to(d.device), broadcast_buffers=False,
                                       device_ids=[d.device] if d.device.type == "cuda" else None)
    mesh = init_device_mesh(d.device.type, (d.world,))
    layer_types = set(getattr(net.model, "_no_split_modules", None) or ())
    layers = [m for m in net.model.modules() if type(m).__name__ in layer_types]
    if not layers:
        warnings.warn(f"{type(net.model).__name__} names no decoder layer classes "
                      "(_no_split_modules); FSDP shards it as a single group", stacklevel=2)
    for layer in reversed(layers):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def deferred_grad_sync(net: nn.Module, defer: bool) -> contextlib.AbstractContextManager[Any]:
    """Context of one micro-batch's backward: DDP's ``no_sync`` for all but the last.

    FSDP reduce-scatters after every micro-batch into the sharded gradients instead: deferring
    it (``set_requires_gradient_sync(False)``) would keep every layer's whole unsharded
    gradient on each rank until the last micro-batch, the memory FSDP is there to save.
    """
    if defer and isinstance(net, DistributedDataParallel):
        return net.no_sync()
    return contextlib.nullcontext()


class Meter:
    """Sums of a logging window, kept on the device (no host sync per micro-batch);
    ``reduce`` adds them over ranks and turns them into means."""

    KEYS = ("loss", "ce", "n_ce", "kd", "monitor", "n_kd", "gap", "tokens", "steps")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.tokens = self.steps = 0  # host-side counts

    def add(self, out: LossOutput, batch: PackedBatch, loss_scale: float) -> None:
        """Add one micro-batch (``batch`` on the loss's device)."""
        zero = out.kd.new_zeros(())
        gap = zero
        if batch.jensen_gap is not None and batch.targets is not None:
            kd_rows = (batch.labels != IGNORE_INDEX) & (batch.targets.ids >= 0).any(-1)
            gap = batch.jensen_gap[kd_rows].sum()
        values = [out.loss.detach() * loss_scale, zero if out.ce is None else out.ce,
                  out.n_ce_rows, out.kd, zero if out.monitor is None else out.monitor,
                  out.n_kd_rows, gap]
        self.sums[:len(values)] += torch.stack([v.to(self.sums) for v in values])
        self.tokens += batch.num_tokens

    def step(self) -> None:
        self.steps += 1

    def reduce(self, d: Dist, objective: str, has_targets: bool,
               has_monitor: bool) -> dict[str, float]:
        """Means over the window (all ranks); resets the sums."""
        sums = self.sums.clone()
        sums[-2:] = torch.tensor([self.tokens, self.steps], dtype=sums.dtype)
        s = dict(zip(self.KEYS, d.all_sum(sums).tolist(), strict=True))  # steps: × world
        self.sums.zero_()
        self.tokens = self.steps = 0
        out = {"loss": s["loss"] / max(s["steps"] / d.world, 1),
               "ce": s["ce"] / max(s["n_ce"], 1), "tokens": s["tokens"]}
        if has_targets:
            trained, other = ("l_multi", "l_mix") if objective == "multi" else ("l_mix", "l_multi")
            out[trained] = s["kd"] / max(s["n_kd"], 1)
            if has_monitor:
                out[other] = s["monitor"] / max(s["n_kd"], 1)
                out["jensen_gap"] = s["gap"] / max(s["n_kd"], 1)
        return out

    def state(self, d: Dist) -> Tensor:
        """The window summed over ranks, as one CPU tensor (for checkpoints; every rank
        calls it)."""
        sums = self.sums.clone()
        sums[-2:] = torch.tensor([self.tokens, self.steps], dtype=sums.dtype)
        total = d.all_sum(sums).cpu()
        total[-1] = self.steps  # the same on every rank
        return total

    def load(self, state: Tensor, main: bool = True) -> None:
        """Resume a window: the main rank takes the sums, every rank the step count."""
        self.sums.copy_(state if main else torch.zeros_like(state))
        self.tokens, self.steps = int(state[-2]) if main else 0, int(state[-1])


# --------------------------------------------------------------------------------------------
# Setup


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over ranks (through this rank's device, as NCCL needs)."""
        if self.world == 1:
            return t
        on_dev = t.to(self.device)
        dist.all_reduce(on_dev)
        return on_dev.to(t.device)

    def sum(self, value: float) -> float:
        return float(self.all_sum(torch.tensor([value], dtype=torch.float64)).item())


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Read torchrun's environment, pick the device, init the process group, set threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cfg.threads
    if threads is None and world > 1:
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if threads:
        torch.set_num_threads(threads)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device, owns)


def open_verified(root: str, kind: str, d: Dist) -> Store:
    """Open a store, hashing its files once per job rather than once per rank.

    Rank 0 opens it with the default verification (sha256 of every file unless
    ``$MTKD_VERIFY`` says otherwise) while the other ranks wait at a barrier (an all-reduce
    that also carries whether rank 0 succeeded); they then check sizes and metadata only.
    """
    if d.world == 1:
        return open_store(root, kind)
    store, error = None, None
    if d.main:
        try:
            store = open_store(root, kind)
        except Exception as e:  # re-raised below, once every rank has heard of it
            error = e
    if d.sum(float(error is not None)) > 0:
        raise error if error is not None else StoreError(f"{root}: rank 0 failed to open it")
    return store if store is not None else open_store(root, kind, verify="size")


def load_student(spec: str | dict[str, Any], seed: int, tokens: Store) -> PreTrainedModel:
    """A local checkpoint, or a fresh model from config kwargs initialised with ``seed``.

    Config kwargs default ``model_type`` to llama and take ``vocab_size`` and the eos id from
    the tokens store when absent.
    """
    torch.manual_seed(seed)
    if isinstance(spec, dict):
        kwargs = dict(spec)
        model_type = kwargs.pop("model_type", "llama")
        kwargs.setdefault("vocab_size", tokens.attrs.get("vocab_size"))
        eos = tokens.attrs.get("eos_id")
        if eos is not None:
            for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                kwargs.setdefault(key, eos)
        config = AutoConfig.for_model(model_type, **kwargs)
        model = AutoModelForCausalLM.from_config(config)
    else:
        if not (Path(spec) / "config.json").exists():
            raise FileNotFoundError(f"{spec}: no config.json (a local Hugging Face model dir)")
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, attr, None) not in (None, 1.0):
            raise ValueError(f"student config sets {attr}; the chunked losses assume plain "
                             "logits = hidden @ lm_head.weight.T")
    return model


def student_vocab(model: PreTrainedModel) -> int:
    """Ids the student can both embed and predict."""
    return min(model.get_output_embeddings().weight.shape[0],
               model.get_input_embeddings().weight.shape[0])


def check_vocab(vocab: int, stores: list[Store | None]) -> None:
    """Refuse a student vocabulary smaller than any store's."""
    for store in stores:
        need = store.attrs.get("vocab_size") if store is not None else None
        if need is not None and vocab < int(need):
            raise ValueError(f"the student's vocabulary has {vocab} entries but {store.root} "
                             f"uses {need}; build the student with vocab_size ≥ {need}")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=1e-8)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(opt: torch.optim.Optimizer,
                   cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
    else:
        train_idx, eval_idx = heldout_split(tokens, cfg.eval_fraction)
        eval_tokens, eval_targets = tokens, targets
    train_idx = token_budget(tokens, train_idx, cfg.max_tokens, cfg.seed)
    train = PackedLoader(tokens, targets, train_idx, seed=cfg.seed, teacher_blocks=blocks,
                         **common)
    held = None
    if eval_idx is None or len(eval_idx):
        eval_blocks = blocks and eval_targets is not None and bool(
            eval_targets.attrs.get("teacher_blocks"))
        held = PackedLoader(eval_tokens, eval_targets, eval_idx, shuffle=False,
                            teacher_blocks=eval_blocks, **common)
    return train, held


# --------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    root = out / CHECKPOINTS
    if not root.exists():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` to ``out/checkpoints/step-N`` atomically; keep the newest ``keep``.

    A killed writer leaves only a ``.tmp-*`` directory, never read and removed here.
    """
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def alias_tied(state_dict: dict[str, Tensor], model: nn.Module) -> None:
    """Point the entries of a tied parameter (e.g. lm_head and embeddings) at one tensor again:
    gathering to the CPU copies them apart, and ``save_pretrained`` drops only aliases."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state_dict:
            state_dict[name] = state_dict[first.setdefault(id(param), name)]


def training_state(step: int, model: nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, loader: LoaderState,
                   tokens: int, meter: Meter, cfg: TrainConfig, d: Dist) -> dict[str, Any]:
    """Everything a resume needs; only tensors, numbers, strings and containers.

    Every rank calls it (under FSDP it gathers the shards); model and optimizer state are full,
    on the CPU and keyed by parameter name on rank 0, empty on the other ranks.
    """
    model_state, optim_state = get_state_dict(model, opt, options=FULL_STATE)
    alias_tied(model_state, model)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"step": step, "model": model_state, "optimizer": optim_state,
            "scheduler": sched.state_dict(), "loader": dataclasses.asdict(loader), "rng": rng,
            "tokens": tokens, "meter": meter.state(d), "config": json.dumps(cfg.to_dict())}


def restore(path: Path, cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, meter: Meter,
            main: bool = True) -> tuple[int, LoaderState, int]:
    """Load a checkpoint into the objects (every rank; FSDP ranks keep their shards of the full
    state); returns (step, loader state, tokens)."""
    # mmap: the ranks of a node share the file's pages instead of each holding a copy
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    saved = json.loads(state["config"])
    differ = sorted(k for k, v in cfg.to_dict().items()
                    if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if differ:
        raise ValueError(f"{path} was written with different options {differ}; "
                         "resume with the same options or use a new output directory")
    set_state_dict(model, opt, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    for per_param in opt.state.values():  # own the CPU state the optimizer kept from the mapping
        for key, value in per_param.items():
            if type(value) is Tensor and value.device.type == "cpu":
                per_param[key] = value.clone()
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    meter.load(state["meter"], main)
    return int(state["step"]), LoaderState(**state["loader"]), int(state["tokens"])


def save_student(model: PreTrainedModel, out: Path, tokenizer_dir: str | None,
                 state_dict: dict[str, Tensor] | None = None) -> Path:
    """save_pretrained into ``out/final`` plus the tokens store's tokenizer files.

    ``state_dict``: the full weights (under FSDP, gathered by :func:`training_state`);
    default ``model.state_dict()``.
    """
    final = out / "final"
    model.save_pretrained(str(final), state_dict=state_dict, safe_serialization=True)
    src = Path(tokenizer_dir) if tokenizer_dir else None
    if src is None or not src.is_dir():
        warnings.warn(f"tokenizer dir {tokenizer_dir!r} not found; {final} has no tokenizer",
                      stacklevel=2)
        return final
    for pattern in TOKENIZER_FILES:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, final / f.name)
    return final


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when importable); rank 0 only."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed by close())
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


# --------------------------------------------------------------------------------------------
# Evaluation and the loop


@torch.no_grad()
def evaluate(net: nn.Module, loader: PackedLoader, d: Dist, max_batches: int | None,
             chunk_size: int, bf16: bool) -> dict[str, float]:
    """Held-out CE (nats/token) and, with targets, KL(q‖s) (+ L_multi with blocks).

    ``net`` is the (wrapped) :class:`StudentLoss`: under FSDP its forward gathers the shards.
    Every rank runs the same number of batches (the loader pads ranks to equal counts).
    """
    spec = LossSpec("mix" if loader.targets is not None else "ce", chunk_size=chunk_size)
    meter = Meter(d.device)
    was_training = net.training
    net.eval()
    for batch in itertools.islice(loader.epoch(0), max_batches):
        batch = batch.to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16):
            meter.add(net(batch, spec), batch, 0.0)
    net.train(was_training)
    stats = meter.reduce(d, "mix", loader.targets is not None, loader.num_teachers > 0)
    res = {"eval_ce": stats["ce"], "eval_ppl": math.exp(min(stats["ce"], 50.0))}
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


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the student described by ``cfg``; returns where it was saved."""
    d = setup_distributed(cfg)
    out = Path(cfg.out)
    try:
        return _train(cfg, d, out)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, out: Path) -> TrainResult:
    objective = cfg.resolved_objective
    tokens = open_verified(cfg.tokens, TOKENS, d)
    targets = open_verified(cfg.targets, TARGET, d) if cfg.targets else None
    model = load_student(cfg.student, cfg.seed, tokens)  # on the CPU until distribute()
    vocab = student_vocab(model)
    check_vocab(vocab, [tokens, targets])
    if cfg.seq_len > getattr(model.config, "max_position_embeddings", cfg.seq_len):
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the student's max_position_embeddings")
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
    if cfg.suppress_ids and objective != "ce":
        raise ValueError("suppress_ids applies to the ce objective (training a safety teacher)")
    spec = LossSpec(objective, cfg.loss, cfg.alpha, cfg.temperature, cfg.beta, cfg.chunk_size,
                    cfg.suppress_ids, cfg.suppress_weight)
    net = distribute(StudentLoss(model, spec), d, cfg.fsdp)
    opt = make_optimizer(model, cfg)  # after distribute: FSDP replaces parameters by shards
    sched = make_scheduler(opt, cfg)
    meter = Meter(d.device)

    step, state, tokens_seen, resumed = 0, LoaderState(), 0, None
    ckpts = checkpoint_dirs(out)
    if ckpts and not cfg.resume:
        raise ValueError(f"{out} holds checkpoints; resume or choose a new output directory")
    if ckpts:
        step, state, tokens_seen = restore(ckpts[-1], cfg, model, opt, sched, meter, d.main)
        resumed = step
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    log = MetricsLog(out, resumed, cfg.tensorboard) if d.main else None
    net.train()
    batches = Prefetcher(loader.stream(state), cfg.prefetch)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step",
               disable=not (d.main and cfg.progress))
    last_log: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    t0 = t_window = time.perf_counter()
    try:
        while step < cfg.max_steps:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            if teacher is not None:
                micro = [with_teacher_targets(b.to(d.device), teacher) for b in micro]
            norm = train_step(net, model, opt, micro, d, bf16=cfg.bf16,
                              grad_clip=cfg.grad_clip, meter=meter)
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
                last_eval = {"step": step, "split": "eval",
                             **evaluate(net, held, d, cfg.eval_batches, cfg.chunk_size,
                                        cfg.bf16)}
                if log is not None:
                    log.write(last_eval)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                ckpt = training_state(step, model, opt, sched, state, tokens_seen, meter, cfg, d)
                if d.main:
                    save_checkpoint(out, step, ckpt, cfg.keep_checkpoints)
    finally:
        batches.close()
        bar.close()
        if log is not None:
            log.close()
    model_dir = out / "final"
    ckpt = training_state(step, model, opt, sched, state, tokens_seen, meter, cfg, d)
    if d.main:
        save_checkpoint(out, step, ckpt, cfg.keep_checkpoints)
        model_dir = save_student(model, out, tokens.attrs.get("tokenizer"), ckpt["model"])
        final = {"steps": step, "tokens": tokens_seen, "elapsed_s": time.perf_counter() - t0,
                 "train": last_log, **last_eval}
        if "eval_ce" in last_eval:
            final["heldout_ce"] = last_eval["eval_ce"]
        (out / FINAL_METRICS).write_text(json.dumps(final, indent=1))
    if d.world > 1:
        dist.barrier()
    return TrainResult(out, model_dir, step, tokens_seen, time.perf_counter() - t0, resumed,
                       last_log, last_eval)


def main(argv: list[str] | None = None) -> None:
    """``python -m mtkd.distill.train.loop CONFIG`` (what torchrun launches)."""
    from mtkd.config import read_config_file

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m mtkd.distill.train.loop CONFIG(.json|.toml|.yaml)")
    path = Path(args[0])
    data = json.loads(path.read_text()) if path.suffix == ".json" else read_config_file(path)
    result = train(TrainConfig.from_dict(data.get("train", data)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"model_dir": str(result.model_dir), "steps": result.steps,
                          "tokens": result.tokens, **result.last_eval}))


if __name__ == "__main__":
    main()
