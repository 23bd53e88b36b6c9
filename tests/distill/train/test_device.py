"""The device a training process resolves to and the chunk it sizes, without a GPU."""

from __future__ import annotations

import pytest
import torch

from mtkd.distill.train.config import TrainConfig
from mtkd.distill.train.device import chunk_rows, free_device_bytes, resolve_device

CPU, GPU0, GPU1, GPU3 = (torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1),
                         torch.device("cuda", 3))


@pytest.mark.parametrize(
    ("spec", "local_rank", "local_world", "gpus", "expected"),
    [
        ("auto", 0, 1, 0, CPU),
        ("auto", 1, 2, 0, CPU),
        ("cpu", 0, 1, 4, CPU),
        ("auto", 0, 1, 1, GPU0),
        ("auto", 1, 2, 2, GPU1),  # torchrun: each rank on its local GPU
        ("cuda", 0, 1, 1, GPU0),  # the value that used to fail ("specified index")
        ("cuda", 1, 4, 4, GPU1),
        ("cuda:3", 0, 1, 4, GPU3),
        ("cuda:0", 0, 1, 1, GPU0),
    ],
)
def test_resolves(spec: str, local_rank: int, local_world: int, gpus: int,
                  expected: torch.device) -> None:
    assert resolve_device(spec, local_rank, local_world, gpus) == expected


@pytest.mark.parametrize(
    ("spec", "local_rank", "local_world", "gpus", "message"),
    [
        ("gpu", 0, 1, 1, "auto, cpu, cuda or cuda:N"),
        ("cuda:x", 0, 1, 1, "auto, cpu, cuda or cuda:N"),
        ("CUDA", 0, 1, 1, "auto, cpu, cuda or cuda:N"),
        ("cuda", 0, 1, 0, "no CUDA GPU is visible"),
        ("cuda:0", 0, 1, 0, "no CUDA GPU is visible"),
        ("cuda:2", 0, 1, 2, "GPU 2 asked for"),
        ("cuda", 2, 4, 2, "GPU 2 asked for"),  # more local ranks than GPUs
        ("cuda:0", 1, 2, 2, "names one GPU for 2 local ranks"),
    ],
)
def test_refuses(spec: str, local_rank: int, local_world: int, gpus: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_device(spec, local_rank, local_world, gpus)


def test_config_refuses_a_bad_device_before_anything_runs(tmp_path) -> None:
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        TrainConfig(tokens=str(tmp_path), out=str(tmp_path), student={}, device="gpu:0")


def test_this_machine_resolves_auto_and_refuses_cuda_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert resolve_device("auto") == CPU
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_chunk_rows() -> None:
    assert chunk_rows(128_256, None) == 1024  # the CPU keeps its measured default
    assert free_device_bytes(CPU) is None
    assert chunk_rows(128_256, 130 * 10**9) == 4096  # an H200 with a small student
    assert chunk_rows(128_256, 40 * 10**9) == 2048  # an H100 holding a larger student
    assert chunk_rows(262_144, 10**9) == 256  # floor: never fewer rows than that
    assert chunk_rows(512, 130 * 10**9) == 8192  # cap: small vocabularies
    for free in (10**8, 10**9, 10**10, 10**11):
        rows = chunk_rows(49_152, free)
        assert rows & (rows - 1) == 0  # a power of two
        assert 256 <= rows <= 8192
        assert rows == 256 or rows * 49_152 * 16 <= free / 8
