"""Damaged stores: a flipped byte, a truncated chunk, a missing part, a manifest edited by hand.
Each is found by ``mtkd verify`` (exit 1, naming the file), by ``open_store``, and by the
commands that read the store before they change anything (``train`` refuses to start,
``harvest`` and ``aggregate`` commit nothing from damaged input)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.store import StoreError, open_store

from .conftest import AGGREGATE, HARVEST, PIPELINE_MAX_LEN, Pipeline
from .harness import TALLY, check_store_after_kill
from .test_kills import STUDENT

pytestmark = pytest.mark.torture


def flip_byte(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5])
    return path


def remove_part(path: Path) -> Path:
    shutil.rmtree(path)
    return path


def edit_manifest(path: Path) -> Path:
    """A plausible hand edit: one more row, the JSON still valid, the checksum left alone."""
    manifest = json.loads(path.read_text())
    manifest["num_rows"] += 1
    manifest["parts"][0]["num_rows"] += 1
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


#: (store, file to damage, damage, text the error names)
CASES: dict[str, tuple[str, str, Callable[[Path], Path], str]] = {
    "target-flipped-byte": ("targets", "parts/00001/probs/c/0/0/0", flip_byte, "checksum mismatch"),
    "target-truncated-chunk": ("targets", "parts/00002/ids/c/0/0/0", truncate, "bytes, expected"),
    "target-missing-part": ("targets", "parts/00003", remove_part, "missing or uncommitted"),
    "target-manifest-edited": ("targets", "manifest.json", edit_manifest, "checksum mismatch"),
    "tokens-flipped-byte": ("tokens", "parts/00002/token_ids/c/0", flip_byte,
                            "checksum mismatch"),
    "tokens-flipped-byte-meta": ("tokens", "parts/00000/meta.parquet", flip_byte,
                                 "checksum mismatch"),
    "tokens-truncated-chunk": ("tokens", "parts/00001/token_ids/c/0", truncate,
                               "bytes, expected"),
}


@pytest.fixture
def stores(pipeline: Pipeline, tmp_path: Path) -> dict[str, Path]:
    """Private copies of the pipeline's stores (the damage must not leak into other tests)."""
    return {name: Path(shutil.copytree(src, tmp_path / name)) for name, src in
            (("tokens", pipeline.tokens), ("targets", pipeline.targets),
             ("teacher0", pipeline.teacher_stores[0]), ("teacher1", pipeline.teacher_stores[1]))}


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def refused(where: str, what: Callable[[], object], damaged: Path, text: str) -> None:
    """``what`` must raise a StoreError naming the damaged file."""
    TALLY.corruptions_checked += 1
    TALLY.used = True
    try:
        what()
    except StoreError as e:
        assert str(damaged) in str(e) and text in str(e), (where, str(e))
        return
    TALLY.corrupt_accepted += 1
    raise AssertionError(f"{where} accepted {damaged}")


def cli_refused(where: str, args: list[object], damaged: Path, text: str) -> str:
    TALLY.corruptions_checked += 1
    TALLY.used = True
    code, output = invoke(*args)
    if code == 0:
        TALLY.corrupt_accepted += 1
    flat = " ".join(output.split())
    assert code == 1 and str(damaged) in flat and text in flat, (where, code, output[-2000:])
    assert "Traceback" not in output
    return output


@pytest.mark.parametrize("case", sorted(CASES))
def test_damage_is_found_before_use(case: str, stores: dict[str, Path], pipeline: Pipeline,
                                    tmp_path: Path) -> None:
    store_name, rel, damage, text = CASES[case]
    damaged = damage(stores[store_name] / rel)
    root = stores[store_name]
    cli_refused("mtkd verify", ["verify", root], damaged, text)
    refused("open_store", lambda: open_store(root), damaged, text)

    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    out = tmp_path / "train"
    cli_refused("mtkd train", ["train", "--tokens", stores["tokens"], "--targets",
                               stores["targets"], "--student-config", student, "--out", out,
                               "--seq-len", PIPELINE_MAX_LEN, "--steps", 2], damaged, text)
    assert not (out / "checkpoints").exists() and not (out / "final").exists()

    if store_name == "tokens":  # the other readers of a tokens store
        teacher = tmp_path / "teacher"
        cli_refused("mtkd harvest", ["harvest", root, "--model", pipeline.teachers[0], "--out",
                                     teacher, *HARVEST], damaged, text)
        assert not teacher.exists(), "harvest created a store from damaged input"
        targets = tmp_path / "fused"
        cli_refused("mtkd aggregate", ["aggregate", pipeline.teacher_stores[0],
                                       pipeline.teacher_stores[1], "--tokens", root, "--out",
                                       targets, *AGGREGATE], damaged,
                    "different tokens store" if "manifest" in case else text)


# the q64 top-k coding stores topk_logprobs as uint8 [N, 2, k]: its shard is c/0/0/0
@pytest.mark.parametrize("rel", ["parts/00002/topk_logprobs/c/0/0/0",
                                 "parts/00004/COMMIT.json"])
def test_a_damaged_teacher_store_is_not_fused(rel: str, stores: dict[str, Path],
                                             pipeline: Pipeline, tmp_path: Path) -> None:
    """A flipped byte in a zstd shard or in a commit record of a teacher store: aggregate
    stops at that part naming the file; what it committed before is sound, and the target
    store is not complete."""
    damaged = flip_byte(stores["teacher1"] / rel)
    out = tmp_path / "fused"
    text = "checksum mismatch" if "COMMIT" not in rel else "manifest"
    cli_refused("mtkd aggregate", ["aggregate", stores["teacher0"], stores["teacher1"],
                                   "--tokens", pipeline.tokens, "--out", out, *AGGREGATE],
                damaged, text)
    assert not (out / "manifest.json").exists()
    check_store_after_kill(out)  # whatever was committed is sound; nothing opens as complete
