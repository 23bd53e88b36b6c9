"""Where a process runs: torchrun's ranks, the device, threads, and the DDP/FSDP wrapping.

Without torchrun a job is one process (world 1). Under ``torchrun --nproc_per_node N`` the ranks
form a process group (gloo on CPU, nccl on GPU) and the student is wrapped by DDP (replicas)
or, with ``fsdp``, FSDP2 (parameters, gradients and optimizer state sharded over the ranks,
for students that do not fit one device).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from mtkd.distill.train.config import TrainConfig
from mtkd.distill.train.device import resolve_device
from mtkd.distill.train.objective import StudentLoss
from mtkd.store import Store, StoreError, open_store


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
        """Sum of a number over ranks (float64)."""
        return float(self.all_sum(torch.tensor([value], dtype=torch.float64)).item())


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Read torchrun's environment, pick the device, init the process group, set threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = resolve_device(cfg.device, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cfg.threads
    if threads is None and world > 1:
        threads = max(1, (os.cpu_count() or 1) // local_world)
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


#: DDP without the broadcast of buffers before every forward (the student's buffers, rotary
#: frequencies, are equal on every rank): torch 2.13 renamed the option and warns on the old.
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


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
        return DistributedDataParallel(net.to(d.device), **NO_FORWARD_BUFFER_SYNC,
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
