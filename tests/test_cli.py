"""The command line: help, verify exit codes, info, config files under flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.store import ArraySpec, Header, StoreWriter, open_store

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
    assert "teacher: tiny" in out and "bytes on disk" in out
    as_json = runner.invoke(app, ["info", str(store), "--json"])
    manifest = json.loads(as_json.output)
    assert manifest["num_rows"] == 20 and manifest == open_store(store).manifest
    (store / "manifest.json").unlink()
    incomplete = runner.invoke(app, ["info", str(store)])
    assert incomplete.exit_code == 1 and "not complete" in incomplete.output
    assert runner.invoke(app, ["info", str(tmp_path / "nothing")]).exit_code == 1


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
