"""SIGKILL the real CLI (``python -m mtkd …`` in its own process group) at seeded random
instants in every stage, rerun, and compare with the uninterrupted run.

After every kill: committed parts verify, nothing incomplete opens, every committed checkpoint
loads. After the final rerun: the same sequences (none lost or duplicated), ``mtkd verify``
passes, no temp files are left, and the values equal the uninterrupted run's (tokenize and
aggregate exactly, harvest exactly for the hf engine and within engine tolerance for vLLM,
train within 1e-6 with each resume starting from the newest checkpoint).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.store import open_store

from .conftest import AGGREGATE, HARVEST, PIPELINE_MAX_LEN, Pipeline, write_corpus
from .harness import (
    TALLY,
    VLLM_KILLS,
    Cli,
    KillPlan,
    check_store_after_kill,
    checkpoint_progress,
    compare_stores,
    kill_at,
    kills_for,
    leftovers,
    read_metrics,
    rng_for,
    run_cli,
    store_progress,
)

pytestmark = pytest.mark.torture

LOG_EVERY = 10  # TrainConfig.log_every (not a CLI option)
STUDENT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}


def cli_ok(*args: object) -> str:
    """Run a command in this process (no start-up cost); return its output."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def torture_store(stage: str, args: list[object], out: Path, kills: int, rng: random.Random,
                  log: Path, compare: Callable[[], None], start_max: float,
                  timeout: float = 300.0) -> None:
    """Start the command, kill it at a drawn instant, check what it left, repeat; a run that
    finishes first is compared and its store removed, so every kill hits a store in progress.
    Then one uninterrupted rerun completes the store."""
    done = runs = 0
    while done < kills:
        runs += 1
        assert runs <= 4 * kills + 10, f"{stage}: could not place {kills} kills"
        cli = Cli(args, log)
        if kill_at(cli, KillPlan.draw(rng, start_max), lambda: store_progress(out), timeout):
            done += 1
            TALLY.killed(stage)
            check_store_after_kill(out)
        else:
            assert cli.proc.returncode == 0, cli.tail()
            compare()
            shutil.rmtree(out)
    cli = run_cli(args, log, timeout)
    assert cli.proc.returncode == 0, cli.tail()
    assert "OK" in cli_ok("verify", out)
    assert leftovers(out) == []
    compare()


def test_tokenize_survives_kills(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", files=24, chars=1_000_000)
    args: list[object] = ["tokenize", corpus, "--tokenizer", tokenizer_dir, "--max-len", 128,
                          "--num-parts", 24, "--task-field", "tag", "--out"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    cli_ok(*args, ref)

    def compare() -> None:
        compare_stores(ref, out)
        # byte for byte: the manifest's checksum covers every file of every part
        assert open_store(out).manifest["checksum"] == open_store(ref).manifest["checksum"]

    torture_store("tokenize", [*args, out], out, kills_for("tokenize"), rng_for("tokenize"),
                  tmp_path / "tokenize.log", compare, start_max=2.0)


def test_harvest_survives_kills(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "teacher0"
    args: list[object] = ["harvest", pipeline.tokens, "--model", pipeline.teachers[0], "--out",
                          out, *HARVEST]
    torture_store("harvest", args, out, kills_for("harvest"), rng_for("harvest"),
                  tmp_path / "harvest.log", lambda: compare_stores(pipeline.teacher_stores[0],
                                                                   out),
                  start_max=8.0)


def test_harvest_q64r_survives_kills(pipeline: Pipeline, tmp_path: Path) -> None:
    """The compact coding under kills: q64r's range-coded streams (over several sequences),
    its draws and actual-token log-probs coded against the top-k; the rerun's store equals an
    uninterrupted q64r harvest's, every array."""
    options = [*HARVEST, "--logprob-dtype", "q64r", "--tail-nats", "0.25", "--num-samples", "8"]
    reference = tmp_path / "reference"
    cli_ok("harvest", pipeline.tokens, "--model", pipeline.teachers[0], "--out", reference,
           *options)
    out = tmp_path / "teacher0-q64r"
    args: list[object] = ["harvest", pipeline.tokens, "--model", pipeline.teachers[0], "--out",
                          out, *options]
    torture_store("harvest-q64r", args, out, kills_for("harvest-q64r"),
                  rng_for("harvest-q64r"), tmp_path / "q64r.log",
                  lambda: compare_stores(reference, out), start_max=8.0)


@pytest.mark.engine
@pytest.mark.skipif(VLLM_KILLS == 0, reason="vLLM start-up takes 20-60 s here; set "
                    "MTKD_TORTURE_VLLM_KILLS=N to kill vLLM harvests N times")
def test_harvest_vllm_survives_kills(pipeline: Pipeline, tmp_path: Path) -> None:
    """vLLM's engine core and workers are separate processes: the group kill takes them too,
    and the rerun's store matches the reference engine's within engine tolerance."""
    out = tmp_path / "teacher0-vllm"
    args: list[object] = ["harvest", pipeline.tokens, "--model", pipeline.teachers[0], "--out",
                          out, "--engine", "vllm", *HARVEST[2:], "--max-model-len", 256]
    torture_store("harvest-vllm", args, out, VLLM_KILLS, rng_for("harvest-vllm"),
                  tmp_path / "vllm.log",
                  # engine tolerance 2e-4; ids may swap where float16 steps (~4e-3) tie
                  lambda: compare_stores(pipeline.teacher_stores[0], out, atol=2e-4,
                                         tie_tol=1e-2),
                  start_max=40.0, timeout=400.0)


def test_aggregate_survives_kills(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "targets"
    args: list[object] = ["aggregate", *pipeline.teacher_stores, "--tokens", pipeline.tokens,
                          "--out", out, *AGGREGATE]
    torture_store("aggregate", args, out, kills_for("aggregate"), rng_for("aggregate"),
                  tmp_path / "aggregate.log", lambda: compare_stores(pipeline.targets, out),
                  start_max=3.0)


def _params(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _check_checkpoints(out: Path) -> None:
    """Every committed checkpoint (``step-N/state.pt``) is whole: a resume could use it."""
    for state in sorted((out / "checkpoints").glob("step-*/state.pt")):
        try:
            torch.load(state, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or damaged checkpoint
            TALLY.corrupt_accepted += 1
            raise AssertionError(f"{state}: committed but unreadable ({e!r})") from e


def test_train_survives_kills_and_resumes_from_the_newest_checkpoint(
        pipeline: Pipeline, tmp_path: Path) -> None:
    """Checkpoints every 10 steps, where the trainer also logs (its fixed log period): a
    resume from an older checkpoint, or from scratch, would rewrite a kept metrics line."""
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    steps = 40
    args: list[object] = ["train", "--tokens", pipeline.tokens, "--targets", pipeline.targets,
                          "--student-config", student, "--seq-len", PIPELINE_MAX_LEN,
                          "--batch-size", 4, "--steps", steps, "--save-every", LOG_EVERY,
                          "--eval-every", 0, "--lr", "3e-3", "--warmup", 2, "--seed", 3, "--out"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    try:
        cli_ok(*args, ref)
    finally:
        torch.set_num_threads(threads)
    log = tmp_path / "train.log"
    rng = rng_for("train")
    kills = kills_for("train")

    def run_once(kill: bool) -> bool:
        """One (re)start; the metrics up to the newest checkpoint must survive it untouched:
        a resume from an older checkpoint, or from scratch, would rewrite them."""
        newest, _ = checkpoint_progress(out)
        kept = [r for r in read_metrics(out) if r["step"] <= newest]
        cli = Cli([*args, out], log)
        plan = KillPlan.draw(rng, start_max=8.0, weights=(0.1, 0.3, 0.6))
        killed = kill and kill_at(cli, plan,
                                  lambda: checkpoint_progress(out), timeout=300)
        if not killed:
            cli.wait(300)
            assert cli.proc.returncode == 0, cli.tail()
        assert [r for r in read_metrics(out) if r["step"] <= newest] == kept, \
            f"resume did not start from the newest checkpoint (step {newest})"
        _check_checkpoints(out)
        return killed

    done = runs = 0
    while done < kills:
        runs += 1
        assert runs <= 4 * kills + 10, "train: could not place the kills"
        if run_once(kill=True):
            done += 1
            TALLY.killed("train")
        else:  # finished before its kill instant: start over for the remaining kills
            shutil.rmtree(out)
    run_once(kill=False)
    got, want = read_metrics(out), read_metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for x, y in zip(got, want, strict=True):
        for key in ("loss", "ce", "l_mix", "eval_ce", "eval_kl", "tokens_seen"):
            if key in y:
                assert abs(x[key] - y[key]) <= 1e-6, (key, x, y)
    a, b = _params(ref), _params(out)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, f"parameters differ from the uninterrupted run by {diff}"
    assert not list((out / "checkpoints").glob(".tmp-*"))
