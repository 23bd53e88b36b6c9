"""Config fields (help, bounds) and config files as flag defaults: parsing, sections, keys."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from mtkd.config import (
    ConfigError,
    check_bounds,
    command_defaults,
    option,
    read_config_file,
)

#: accepted key → parameter name, an alias ("steps") among them
OPTIONS = {"max_len": "max_len", "overlap": "overlap", "task_field": "task_field",
           "exclude": "exclude", "steps": "max_steps"}
SECTIONS = frozenset({"tokenize", "harvest", "train"})


def test_read_toml_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('max-len = 64\nexclude = ["test*"]\n[harvest]\nk = 8\n')
    assert read_config_file(tmp_path / "a.toml") == {"max-len": 64, "exclude": ["test*"],
                                                     "harvest": {"k": 8}}
    (tmp_path / "a.yml").write_text("max_len: 64\nstrict: yes\n")
    assert read_config_file(tmp_path / "a.yml") == {"max_len": 64, "strict": True}
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}
    (tmp_path / "a.json").write_text('{"train": {"eval_batches": null, "student": {"a": 1}}}')
    assert read_config_file(tmp_path / "a.json") == {"train": {"eval_batches": None,
                                                               "student": {"a": 1}}}


@pytest.mark.parametrize(("name", "text", "match"), [
    ("bad.toml", "max_len = = 3", "not valid TOML"),
    ("bad.yaml", "a: [1, 2", "not valid YAML"),
    ("bad.json", "{", "not valid JSON"),
    ("list.yaml", "- 1\n- 2\n", "top level must be a table"),
    ("nope.toml", None, "cannot read"),
])
def test_unusable_files(tmp_path: Path, name: str, text: str | None, match: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_config_file(tmp_path / name)


def test_config_error_is_no_usage_error_of_a_cli_library() -> None:
    assert ConfigError.__mro__[1:] == (ValueError, Exception, BaseException, object)


def test_command_defaults() -> None:
    flat = {"max-len": 64, "task_field": "task", "exclude": ["a"], "steps": 3}
    assert command_defaults(flat, "tokenize", OPTIONS, "f", SECTIONS) == {
        "max_len": 64, "task_field": "task", "exclude": ["a"], "max_steps": 3}
    tables = {"tokenize": {"max-len": 64}, "harvest": {"k": 8, "nonsense": 1}}
    assert command_defaults(tables, "tokenize", OPTIONS, "f", SECTIONS) == {"max_len": 64}
    # a flat file may carry other commands' tables too
    assert command_defaults({"overlap": 4, "harvest": {"k": 8}}, "tokenize", OPTIONS, "f",
                            SECTIONS) == {"overlap": 4}


@pytest.mark.parametrize(("data", "match"), [
    ({"max_len": 64, "bogus": 1}, r"unknown key 'bogus' for `mtkd tokenize` \(known: .*max_len"),
    ({"tokenize": {"k": 8}}, "unknown key 'k'"),
    ({"tokenize": 3}, r"\[tokenize\] must be a table"),
    ({"max_len": 3, "tokenize": {"overlap": 1}}, r"outside any command's table"),
    ({"config": "other.toml"}, "unknown key 'config'"),
])
def test_command_defaults_refuses(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        command_defaults(data, "tokenize", OPTIONS, "f", SECTIONS)


def test_fields_declare_help_and_bounds() -> None:
    @dataclass(frozen=True)
    class Stage:
        n: int = option(4, "How many.", min=1, max=8, why="eight at most")
        low: float = option(0.5, "At least a half.", min=0.5)
        high: int | None = option(None, "At most 3.", max=3)
        name: str = option("x", "A name.", path=True)

    assert [f.metadata["help"] for f in fields(Stage)] == ["How many.", "At least a half.",
                                                           "At most 3.", "A name."]
    check_bounds(Stage())
    check_bounds(Stage(8, 0.5, 3))
    with pytest.raises(ValueError, match=r"n must be in \[1, 8\] \(eight at most\), got 9"):
        check_bounds(Stage(9))
    with pytest.raises(ValueError, match=r"low must be ≥ 0\.5, got 0\.4"):
        check_bounds(Stage(low=0.4))
    with pytest.raises(ValueError, match=r"high must be ≤ 3, got 4"):
        check_bounds(Stage(high=4))
