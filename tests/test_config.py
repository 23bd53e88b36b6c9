"""Config files as flag defaults: parsing, sections, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from mtkd.cli import app
from mtkd.config import ConfigError, command_defaults, read_config_file


@pytest.fixture(scope="module")
def commands() -> dict:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_read_toml_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('max-len = 64\nexclude = ["test*"]\n[harvest]\nk = 8\n')
    assert read_config_file(tmp_path / "a.toml") == {"max-len": 64, "exclude": ["test*"],
                                                     "harvest": {"k": 8}}
    (tmp_path / "a.yml").write_text("max_len: 64\nstrict: yes\n")
    assert read_config_file(tmp_path / "a.yml") == {"max_len": 64, "strict": True}
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(("name", "text", "match"), [
    ("bad.toml", "max_len = = 3", "not valid TOML"),
    ("bad.yaml", "a: [1, 2", "not valid YAML"),
    ("list.yaml", "- 1\n- 2\n", "top level must be a table"),
    ("nope.toml", None, "cannot read"),
])
def test_unusable_files(tmp_path: Path, name: str, text: str | None, match: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_config_file(tmp_path / name)


def test_command_defaults(commands: dict) -> None:
    tokenize = commands["tokenize"]
    sections = frozenset(commands)
    flat = {"max-len": 64, "task_field": "task", "exclude": ["a"]}
    assert command_defaults(flat, tokenize, "f", sections) == {
        "max_len": 64, "task_field": "task", "exclude": ["a"]}
    tables = {"tokenize": {"max-len": 64}, "harvest": {"k": 8, "nonsense": 1}}
    assert command_defaults(tables, tokenize, "f", sections) == {"max_len": 64}
    # a flat file may carry other commands' tables too
    assert command_defaults({"overlap": 4, "harvest": {"k": 8}}, tokenize, "f",
                            sections) == {"overlap": 4}


@pytest.mark.parametrize(("data", "match"), [
    ({"max_len": 64, "bogus": 1}, r"unknown key 'bogus' for `mtkd tokenize` \(known: .*max_len"),
    ({"tokenize": {"k": 8}}, "unknown key 'k'"),
    ({"tokenize": 3}, r"\[tokenize\] must be a table"),
    ({"max_len": 3, "tokenize": {"overlap": 1}}, r"outside any command's table"),
    ({"config": "other.toml"}, "unknown key 'config'"),
])
def test_command_defaults_refuses(commands: dict, data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        command_defaults(data, commands["tokenize"], "f", frozenset(commands))
