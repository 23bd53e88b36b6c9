"""Checkpoints: everything a run needs to resume exactly, written atomically by rank 0.

A checkpoint (``out/checkpoints/step-NNNNNNNN/state.pt``, written to a temporary directory and
renamed) holds model, optimizer, scheduler, RNG and loader state, the logging window and the
run's options; it is read with ``torch.load(weights_only=True)``. Model and optimizer state are
full (unsharded, keyed by parameter name, through ``torch.distributed.checkpoint.state_dict``)
in every mode, so a checkpoint written by one process, DDP or FSDP resumes under any of them
with the same number of ranks (the loader's position is per rank).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mtkd.distill.train.config import TrainConfig
from mtkd.distill.train.distributed import Dist
from mtkd.distill.train.loader import LoaderState
from mtkd.distill.train.metrics import Meter
from mtkd.store.format import HEADER_FILE
from mtkd.store.fs import unfit_output_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
# Options that may change when a run resumes (everything else must match the checkpoint);
# a changed max_steps reshapes the cosine from there on (resume is exact only without it).
# ``out`` is the run being resumed, wherever it now lies (a copied or moved run resumes).
RESUMABLE_CHANGES = frozenset({"out", "max_steps", "eval_every", "eval_batches", "save_every",
                               "keep_checkpoints", "resume", "log_every", "progress",
                               "tensorboard", "prefetch", "threads", "device", "fsdp"})
# Checkpoints hold full (unsharded) model and optimizer state, gathered to rank 0 on the CPU.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


#: What a run directory holds (a directory holding none of them, but other files, is not one).
RUN_FILES = frozenset({CHECKPOINTS, "final", "final_metrics.json", "metrics.jsonl",
                       "train_config.json", "tensorboard"})


def check_run_dir(out: Path) -> None:
    """Refuse an ``out`` that is a file, a store or a directory of other files, before anything
    is read or written: a run written into a store (``--tokens`` and ``--out`` swapped) or into
    the user's own directory would mix with their files."""
    header = out / HEADER_FILE
    if header.is_file():
        try:
            kind = json.loads(header.read_bytes()).get("kind", "?")
        except (OSError, ValueError, AttributeError):
            kind = "?"
        raise ValueError(f"{out} is an mtkd {kind} store, not a run directory; give train "
                         "an --out of its own")
    why = unfit_output_dir(out, "a run directory", lambda names: bool(RUN_FILES & set(names)))
    if why:
        raise ValueError(why)


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
            "tokens": tokens, "meter": meter.state(d), "world_size": d.world,
            "config": json.dumps(resolved_paths(cfg.to_dict()))}


def resolved_paths(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the stores and models they name as absolute paths: a resume compares
    what they name, not how a path was spelt (from another working directory, say)."""
    named = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("path")}
    named.add("student")  # a checkpoint directory, or a table of config kwargs
    return {k: os.path.abspath(v) if k in named and isinstance(v, str) else v
            for k, v in options.items()}


def restore(path: Path, cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, meter: Meter,
            main: bool = True, world_size: int = 1) -> tuple[int, LoaderState, int]:
    """Load a checkpoint into the objects (every rank; FSDP ranks keep their shards of the full
    state); returns (step, loader state, tokens)."""
    # mmap: the ranks of a node share the file's pages instead of each holding a copy
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    saved = resolved_paths(json.loads(state["config"]))  # older checkpoints: as spelt
    differ = sorted(k for k, v in resolved_paths(cfg.to_dict()).items()
                    if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if differ:
        raise ValueError(f"{path} was written with different options {differ}; "
                         "resume with the same options or use a new output directory")
    world = int(state.get("world_size", world_size))
    if world != world_size:  # each rank's loader position is its own share of the data
        raise ValueError(f"{path} was written by {world} ranks and this run has {world_size}: "
                         f"a resume continues each rank's share of the data where it stopped, "
                         f"so it needs the same number of ranks (torchrun --nproc-per-node "
                         f"{world} over as many nodes as before)")
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

