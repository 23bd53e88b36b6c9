"""The command line: help, verify exit codes, info, config files under flags."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.distill.aggregate.config import AggregateConfig
from mtkd.distill.train.config import TrainConfig
from mtkd.harvest.config import MAX_K, HarvestConfig
from mtkd.ingest.config import TokenizeConfig
from mtkd.store import ArraySpec, Header, StoreWriter, bytes_on_disk, open_store

runner = CliRunner()
@pytest.fixture
def tmp_path(memory_tmp_path: Path) -> Path:
    """Stores in memory where possible (see conftest.memory_tmp_path)."""
    return memory_tmp_path


COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_top_level_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("tokenize", "verify", "info"):
        assert name in result.output
    assert "...\n" not in result.output.split("Commands:")[1]  # every command's summary whole


def test_version() -> None:
    from mtkd import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"mtkd {__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and command in result.output


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    header = Header("teacher", 2, (ArraySpec("ids", "int32", (4,)),
                                   ArraySpec("logp", "float16", (4,), "zstd")),
                    {"teacher": "tiny", "k": 4})
    writer = StoreWriter(root, header)
    for part in range(2):
        with writer.open_part(part) as pw:
            pw.append({"ids": np.zeros((10, 4)), "logp": np.zeros((10, 4))}, [4, 6],
                      [part << 32, (part << 32) + 1])
    assert writer.finalize()
    return root


def test_verify_exit_codes(store: Path, tmp_path: Path) -> None:
    ok = runner.invoke(app, ["verify", str(store)])
    assert ok.exit_code == 0 and ok.output == f"{store}: OK\n"
    assert runner.invoke(app, ["verify", str(store), "--quick"]).exit_code == 0
    chunk = store / "parts" / "00001" / "ids" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 1
    chunk.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(store)])
    assert bad.exit_code == 1
    assert f"{chunk}: checksum mismatch" in bad.output and "1 problem(s)" in bad.output
    assert runner.invoke(app, ["verify", str(store), "--quick"]).exit_code == 0  # sizes agree
    missing = runner.invoke(app, ["verify", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "not an mtkd store" in missing.output


def test_info(store: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(store)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"teacher store {store}" in out
    assert "sequences 4  rows 20  parts 2" in out
    assert "ids:int32[4]/raw" in out and "logp:float16[4]/zstd" in out
    assert "teacher: tiny" in out
    size = bytes_on_disk(store)
    assert f"bytes on disk {size:,} ({size / 20:,.1f} per row)" in out
    as_json = runner.invoke(app, ["info", str(store), "--json"])
    manifest = json.loads(as_json.output)
    assert manifest["num_rows"] == 20 and manifest == open_store(store).manifest
    (store / "manifest.json").unlink()
    incomplete = runner.invoke(app, ["info", str(store)])
    assert incomplete.exit_code == 1 and "not complete" in incomplete.output
    assert runner.invoke(app, ["info", str(tmp_path / "nothing")]).exit_code == 1


def test_info_of_a_damaged_store_says_so(store: Path) -> None:
    """info printed a store with a missing or truncated chunk, or an edited header, as sound
    (exit 0); it checks sizes and headers now (checksums: `mtkd verify`)."""
    chunk = store / "parts" / "00001" / "ids" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    result = runner.invoke(app, ["info", str(store)])
    assert result.exit_code == 1 and f"{chunk}: " in result.output, result.output
    assert "mtkd verify" in result.output
    chunk.unlink()
    assert runner.invoke(app, ["info", str(store)]).exit_code == 1


@pytest.mark.parametrize("suffix", ["toml", "yaml"])
def test_config_file_gives_defaults_flags_override(tmp_path: Path, tokenizer_dir: Path,
                                                   suffix: str) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": "def f(x):\n    return x * 2\n" * 5,
                                            "kind": "code"}) for _ in range(3)))
    if suffix == "toml":
        text = (f'[tokenize]\ntokenizer = "{tokenizer_dir}"\nmax-len = 16\noverlap = 4\n'
                'text_field = "body"\ntask-field = "kind"\n\n[harvest]\nk = 8\n')
    else:
        text = (f"tokenizer: {tokenizer_dir}\nmax_len: 16\noverlap: 4\ntext-field: body\n"
                "task_field: kind\n")
    config = tmp_path / f"mtkd.{suffix}"
    config.write_text(text)

    def run(out: str, *flags: str) -> dict:
        result = runner.invoke(app, ["tokenize", str(corpus), "--out", str(tmp_path / out),
                                     "--config", str(config), *flags])
        assert result.exit_code == 0, result.output
        return dict(open_store(tmp_path / out).attrs["config"])

    from_file = run("a")
    assert (from_file["max_len"], from_file["overlap"], from_file["text_field"],
            from_file["task_field"]) == (16, 4, "body", "kind")
    overridden = run("b", "--max-len", "32", "--overlap", "0")
    assert (overridden["max_len"], overridden["overlap"], overridden["text_field"]) == \
        (32, 0, "body")
    assert set(open_store(tmp_path / "b").read_meta()["task"].to_pylist()) == {"code"}


@pytest.mark.parametrize(("suffix", "text"), [
    ("toml", "[tokenize]\nmax-len = 16\nmax_lenn = 3\n"),
    ("yaml", "max_len: 16\nmax_lenn: 3\n"),
])
def test_config_unknown_key_refused(tmp_path: Path, suffix: str, text: str) -> None:
    config = tmp_path / f"c.{suffix}"
    config.write_text(text)
    result = runner.invoke(app, ["tokenize", "x", "--out", "y", "--tokenizer", "z",
                                 "--config", str(config)], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    output = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # rich may box and wrap
    assert "unknown key 'max_lenn'" in output and "mtkd tokenize" in output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("suffix", "text", "said"), [
    ("toml", '[train]\nmax_steps = "ten"\n', "max_steps = 'ten'"),
    ("yaml", "train:\n  batch_size: [1, 2]\n", "batch_size = [1, 2]"),
    ("json", '{"train": {"batch_size": 0}}', "batch_size = 0"),
])
def test_config_value_of_the_wrong_type_names_the_file(tmp_path: Path, suffix: str, text: str,
                                                       said: str) -> None:
    """Refused before the command runs, naming the file and its key (not only the flag)."""
    config = tmp_path / f"c.{suffix}"
    config.write_text(text)
    result = runner.invoke(app, ["train", "--tokens", "t", "--out", "o", "--student", "s",
                                 "--config", str(config)], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    output = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    assert f"{config}: {said}: " in output, output


# --------------------------------------------------------------- options from the stage configs

JOBS = {"tokenize": ("mtkd.ingest.job", "tokenize_corpus"),
        "harvest": ("mtkd.harvest.job", "harvest"),
        "aggregate": ("mtkd.distill.aggregate.job", "aggregate"),
        "train": ("mtkd.distill.train.loop", "train")}
REQUIRED = {"tokenize": ["corpus", "--tokenizer", "tok", "--out", "o"],
            "harvest": ["tokens", "--model", "m", "--out", "o", "--engine", "hf"],
            "aggregate": ["a", "b", "--tokens", "t", "--out", "o"],
            "train": ["--tokens", "t", "--out", "o", "--student", "s"]}


@pytest.fixture
def configs(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``made(command, *args)``: the stage config the command builds (its job is not run)."""
    seen: list[Any] = []

    def job(*args: Any, **_: Any) -> None:
        seen.append(next(a for a in args if dataclasses.is_dataclass(a)))
        raise ValueError("job not run")

    for module, name in JOBS.values():  # the real modules (the CLI imports more from them)
        monkeypatch.setattr(f"{module}.{name}", job)

    def made(command: str, *args: str, required: bool = True) -> Any:
        result = runner.invoke(app, [command, *(REQUIRED[command] if required else ()), *args])
        assert result.exit_code == 1 and "job not run" in result.output, result.output
        return seen.pop()

    return made


def test_defaults_are_the_configs(configs: Any) -> None:
    assert configs("tokenize") == TokenizeConfig()
    assert configs("harvest") == HarvestConfig(engine="hf")
    assert configs("aggregate") == AggregateConfig(teachers=("a", "b"))
    assert configs("train") == TrainConfig(tokens="t", out="o", student="s")
    assert configs("train", "--steps", "50").warmup == 5  # 10% of the steps
    assert configs("train", "--max-steps", "5").warmup == 1  # at least 1


def test_every_train_option_has_a_flag(configs: Any) -> None:
    cfg = configs("train", "--steps", "7", "--warmup", "3", "--heldout", "h", "--beta", "0.3",
                  "--targets", "q", "--loss", "jsd_tail",
                  "--chunk-size", "16", "--eval-batches", "4", "--prefetch", "2", "--open-rows",
                  "8", "--min-lr-ratio", "0.2", "--weight-decay", "0", "--adam-betas", "0.8",
                  "0.9", "--grad-clip", "0.5", "--eval-targets", "et",
                  "--keep-checkpoints", "3", "--no-resume", "--log-every", "2", "--threads", "1",
                  "--no-monitor", "--no-progress", "--no-tensorboard")
    assert cfg == TrainConfig(
        tokens="t", out="o", student="s", max_steps=7, warmup_steps=3, eval_tokens="h",
        targets="q", loss="jsd_tail",
        beta=0.3, chunk_size=16, eval_batches=4, prefetch=2, open_rows=8, min_lr_ratio=0.2,
        weight_decay=0.0, adam_betas=(0.8, 0.9), grad_clip=0.5,
        eval_targets="et", keep_checkpoints=3, resume=False, log_every=2, threads=1,
        monitor=False, progress=False, tensorboard=False)
    flags = {p.name for p in typer.main.get_command(app).commands["train"].params}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags


def test_train_config_file_with_the_configs_own_keys(configs: Any, tmp_path: Path) -> None:
    """A TrainConfig written out (JSON, null and all) is what `mtkd train --config` builds."""
    want = TrainConfig(tokens="t", out="o", student={"model_type": "llama", "vocab_size": 9},
                       max_steps=9, warmup_steps=2, eval_batches=None, suppress_ids=(5,),
                       adam_betas=(0.9, 0.99), threads=1, progress=False)
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"train": want.to_dict()}))
    assert configs("train", "--config", str(path), required=False) == want
    path.write_text(json.dumps(want.to_dict()))  # the same at top level
    assert configs("train", "--config", str(path), required=False) == want
    assert configs("train", "--config", str(path)) == dataclasses.replace(want, student="s")
    assert configs("train", "--config", str(path), "--eval-batches", "3").eval_batches == 3
    toml = tmp_path / "train.toml"
    toml.write_text('[train]\nsteps = 20\nwarmup = 4\nheldout = "h"\nbeta = 0.1\n'
                    'targets = "q"\nloss = "jsd_tail"\n')
    cfg = configs("train", "--config", str(toml))
    assert (cfg.max_steps, cfg.warmup_steps, cfg.eval_tokens, cfg.beta) == (20, 4, "h", 0.1)


@pytest.mark.parametrize(("command", "text", "said"), [
    ("train", '[train]\nsuppress_ids = "1,x"\n', "suppress_ids must be token ids"),
    ("aggregate", '[aggregate]\nweights = [0.5, "a"]\n', "weights must be numbers"),
])
def test_a_value_a_command_parses_itself_names_the_config_file(command: str, text: str,
                                                               said: str,
                                                               tmp_path: Path) -> None:
    """A config file's value that the command's own parser refuses was reported against the
    flag (``--suppress-ids must be …``), which the user had not given."""
    config = tmp_path / "c.toml"
    config.write_text(text)
    result = runner.invoke(app, [command, *REQUIRED[command], "--config", str(config)])
    assert result.exit_code == 2
    assert f"{config}: {said}" in result.output, result.output
    flag = "--suppress-ids" if command == "train" else "--weights"
    given = runner.invoke(app, [command, *REQUIRED[command], flag, "1,x"])  # as a flag: the flag
    assert f"error: {flag} must be" in given.output, given.output


def test_a_repeatable_option_given_one_value_in_a_config_file(configs: Any,
                                                                tmp_path: Path) -> None:
    """`exclude = "*.txt"` was refused ("Value must be an iterable"); a list still works."""
    path = tmp_path / "t.toml"
    path.write_text('[tokenize]\nexclude = "*.txt"\n')
    assert configs("tokenize", "--config", str(path)).exclude == ("*.txt",)
    path.write_text('[tokenize]\nexclude = ["*.txt", "*.md"]\n')
    assert configs("tokenize", "--config", str(path)).exclude == ("*.txt", "*.md")


@pytest.mark.parametrize("text", [
    'task_weight = {code = [1, 0.5], prose = "0.5,1"}\n',  # a table: each tag's factors
    'task-weight = ["code=1,0.5", "prose=0.5,1"]\n',  # the flags' own form
])
def test_aggregate_task_weights_from_a_config_file(configs: Any, tmp_path: Path,
                                                   text: str) -> None:
    """The table form was refused (its tags were read as one TAG=... string)."""
    path = tmp_path / "agg.toml"
    path.write_text(text)
    cfg = configs("aggregate", "--config", str(path))
    assert cfg.task_weights == {"code": (1.0, 0.5), "prose": (0.5, 1.0)}


def test_bounds_come_from_the_configs() -> None:
    for k in (0, MAX_K + 1):  # a usage error before anything runs
        result = runner.invoke(app, ["harvest", "t", "--model", "m", "--out", "o", "--k", str(k)],
                               env={"COLUMNS": "200"})
        assert result.exit_code == 2 and "Invalid value for '--k'" in result.output
    help_text = runner.invoke(app, ["harvest", "--help"], env={"COLUMNS": "200"}).output
    assert f"1<=x<={MAX_K}]" in help_text  # "[default: 64; 1<=x<=256]"
    with pytest.raises(ValueError, match=rf"k must be in \[1, {MAX_K}\] \(the vLLM engine"):
        HarvestConfig(k=MAX_K + 1)
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "x>=2]" in result.output and "--max-steps, --steps" in result.output


def test_an_interrupt_says_what_is_kept(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) in the middle of a command: exit 130, and a line saying that committed
    work is kept and the same command resumes (typer alone exits silently)."""
    corpus = tmp_path / "c.jsonl"
    line = json.dumps({"text": "def f(x):\n    return x + 1\n" * 40})
    corpus.write_text("\n".join([line] * 8000))
    out = tmp_path / "tok"
    proc = subprocess.Popen([sys.executable, "-m", "mtkd", "tokenize", str(corpus),
                             "--tokenizer", str(tokenizer_dir), "--out", str(out),
                             "--num-parts", "40"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "parts").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "interrupted; committed parts and checkpoints are kept" in err.decode()
    assert "Traceback" not in err.decode()
