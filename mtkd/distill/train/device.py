"""Which device a training process runs on, and how many rows a loss chunk may hold there.

Both are pure functions of what the process can see (the ``--device`` value, torchrun's local
rank, the GPUs and their free memory), so they are unit-tested without a GPU.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports this module: it stays free of torch at import
    import torch

DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")
#: bytes per logit row element held by a chunk: three float32 [chunk, V] buffers (softmax,
#: gradient, scratch) plus transient bf16 copies of the logits and of the gradient
CHUNK_BYTES_PER_LOGIT = 3 * 4 + 2 * 2
CPU_CHUNK_ROWS = 1024
GPU_CHUNK_ROWS = (256, 8192)  # bounds of the chunk sized from free memory
GPU_CHUNK_MEMORY_SHARE = 1 / 8  # of the device's free memory, for the loss's buffers


def check_device_spec(spec: str) -> None:
    """Refuse a ``--device`` value that is not auto, cpu, cuda or cuda:N."""
    if not DEVICE_SPEC.fullmatch(spec):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N a GPU index), got {spec!r}")


def resolve_device(spec: str, local_rank: int = 0, local_world: int = 1,
                   cuda_count: int | None = None) -> torch.device:
    """The device of this process for ``--device spec``.

    ``auto`` is this rank's GPU if there is one, else the CPU; ``cuda`` is this rank's GPU
    (``cuda:<local rank>``: torchrun starts one process per local GPU); ``cuda:N`` is GPU N,
    for one process per node only (several local ranks on one GPU would share it and NCCL
    refuses that). ``cuda_count`` is the number of visible GPUs (default: ask torch).
    """
    import torch

    check_device_spec(spec)
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "cpu" or (spec == "auto" and cuda_count == 0):
        return torch.device("cpu")
    if cuda_count == 0:
        raise ValueError(f"device {spec!r}: no CUDA GPU is visible to this process "
                         "(use --device cpu or auto)")
    if spec in ("auto", "cuda"):
        index = local_rank
    else:
        index = int(spec.split(":")[1])
        if local_world > 1:
            raise ValueError(f"device {spec!r} names one GPU for {local_world} local ranks; "
                             "use --device cuda (each rank on its local GPU)")
    if index >= cuda_count:
        raise ValueError(f"device {spec!r}: GPU {index} asked for (local rank {local_rank}) but "
                         f"{cuda_count} visible")
    return torch.device("cuda", index)


def chunk_rows(vocab: int, free_bytes: int | None) -> int:
    """Rows per chunk of the chunked losses when none is given.

    On the CPU (``free_bytes`` None) a fixed 1024 rows: larger chunks buy nothing there. On a
    GPU, where larger chunks amortise kernel launches, the largest power of two whose buffers
    (:data:`CHUNK_BYTES_PER_LOGIT` per logit) fit in 1/8 of the free memory, within
    [256, 8192] rows: 4096 rows at V = 128,256 with 130 GB free.
    """
    if free_bytes is None:
        return CPU_CHUNK_ROWS
    budget_rows = int(free_bytes * GPU_CHUNK_MEMORY_SHARE) // (CHUNK_BYTES_PER_LOGIT * vocab)
    low, high = GPU_CHUNK_ROWS
    rows = 1 << max(budget_rows, 1).bit_length() - 1
    return min(max(rows, low), high)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a GPU in bytes; None on the CPU."""
    if device.type != "cuda":
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def native_bf16() -> bool:
    """Whether bfloat16 matmuls run natively in this process: on a CUDA GPU that supports them,
    or on a CPU whose oneDNN kernels do (AVX-512 or AMX; measured on an AVX-512 BF16 CPU: the
    demo's models train 1.35–1.7× faster under bf16 autocast than in float32). Elsewhere
    autocast would emulate them and run slower than float32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
