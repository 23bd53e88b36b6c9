"""Security checks: nothing read from a store or checkpoint is unpickled or executed, remote code
is never trusted unless the user asks, a store cannot make its reader touch files outside it,
config files are loaded with ``yaml.safe_load``."""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.store import ArraySpec, CorruptStoreError, Header, StoreError, StoreWriter, open_store
from mtkd.store import verify_store as verify

from .harness import REPO

pytestmark = pytest.mark.torture

SOURCES = sorted((REPO / "mtkd").rglob("*.py"))


def calls(tree: ast.AST) -> Iterator[ast.Call]:
    return (n for n in ast.walk(tree) if isinstance(n, ast.Call))


def dotted(node: ast.AST) -> str:
    """``torch.load`` for ``torch.load(...)``'s func, ``load`` for a bare name."""
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


@pytest.fixture(scope="module")
def trees() -> dict[str, ast.AST]:
    assert len(SOURCES) > 20
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(), str(p)) for p in SOURCES}


def test_no_pickle_on_store_or_checkpoint_content(trees: dict[str, ast.AST]) -> None:
    """No pickle-family module is imported; every ``torch.load`` passes weights_only=True;
    ``np.load`` never allows pickles; nothing is ``eval``'d, ``exec``'d or run by a shell."""
    unsafe_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    found = []
    for where, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{where}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] in unsafe_modules]
            elif isinstance(node, ast.ImportFrom) and node.module \
                    and node.module.split(".")[0] in unsafe_modules:
                found.append(f"{where}: from {node.module} import …")
        for call in calls(tree):
            name = dotted(call.func)
            if name == "torch.load" and not is_const(keyword(call, "weights_only"), True):
                found.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            allow = keyword(call, "allow_pickle")
            if name.split(".")[0] in ("np", "numpy") and allow is not None \
                    and not is_const(allow, False):
                found.append(f"{where}:{call.lineno}: {name} with allow_pickle")
            if name in ("eval", "exec", "os.system", "pd.read_pickle", "pandas.read_pickle"):
                found.append(f"{where}:{call.lineno}: {name}(…)")
            if is_const(keyword(call, "shell"), True):
                found.append(f"{where}:{call.lineno}: a subprocess with shell=True")
    assert not found, found


def test_the_scan_sees_the_checkpoint_reader(trees: dict[str, ast.AST]) -> None:
    """A guard on the scan above: it finds the trainer's ``torch.load`` (so it would find an
    unsafe one) and the safe YAML loader."""
    loads = {w for w, t in trees.items() for c in calls(t) if dotted(c.func) == "torch.load"}
    assert any(w.startswith("mtkd/distill/train/") for w in loads), loads


def test_remote_code_is_never_trusted_by_default(trees: dict[str, ast.AST]) -> None:
    """``trust_remote_code`` appears only as the constant False (keyword or dict entry)."""
    found = []
    for where, tree in trees.items():
        for call in calls(tree):
            value = keyword(call, "trust_remote_code")
            if value is not None and not is_const(value, False):
                found.append(f"{where}:{call.lineno}: trust_remote_code={ast.unparse(value)}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if is_const_str(k, "trust_remote_code") and not is_const(v, False):
                        found.append(f"{where}:{node.lineno}: trust_remote_code: "
                                     f"{ast.unparse(v)}")
    assert not found, found


def is_const_str(node: ast.AST | None, text: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == text


def test_engines_load_models_without_remote_code(tmp_path: Path, tokenizer_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What the engines actually pass, checked at run time: the reference engine's
    ``from_pretrained`` and vLLM's ``LLM`` get trust_remote_code=False (vLLM replaced by a
    stand-in that records its arguments); the command line has no option to change it."""
    import transformers

    from mtkd.harvest.hf_engine import HfReferenceEngine
    from mtkd.harvest.vllm_engine import VllmEngine

    seen: dict[str, Any] = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen["hf"] = kwargs
        return real(*args, **kwargs)

    from mtkd.recipes.models import init_llama

    model = init_llama(tmp_path / "m", 512, hidden=64, layers=1, heads=2, max_position=64,
                       tokenizer=transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    HfReferenceEngine(model, 4)
    assert seen["hf"].get("trust_remote_code") is False

    class FakeLLM:
        def __init__(self, **kwargs: Any) -> None:
            seen["vllm"] = kwargs
            config = types.SimpleNamespace(get_vocab_size=lambda: 512)
            self.llm_engine = types.SimpleNamespace(model_config=config)

    fake = types.ModuleType("vllm")
    fake.__version__ = "0.32.0"
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kw: kw
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    VllmEngine(model, 4, fast_path="public", fast_logprobs=False)  # no plugin: vllm is fake
    assert seen["vllm"]["trust_remote_code"] is False

    result = CliRunner().invoke(app, ["harvest", "x", "--model", "m", "--out", "o",
                                      "--trust-remote-code"])
    assert result.exit_code == 2 and "No such option" in result.output


# ----------------------------------------------------------------- stores pointing outside


class OpenSpy:
    """Records every path opened by this process while active (an audit hook: sees
    ``open``, ``io.open``, ``os.open`` and memory maps alike)."""

    active: OpenSpy | None = None
    installed = False

    def __init__(self) -> None:
        self.paths: list[str] = []
        if not OpenSpy.installed:
            sys.addaudithook(OpenSpy._hook)
            OpenSpy.installed = True

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        spy = OpenSpy.active
        if spy is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
            spy.paths.append(os.path.realpath(os.fsdecode(args[0])))

    def __enter__(self) -> OpenSpy:
        OpenSpy.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        OpenSpy.active = None

    def touched(self, outside: Path) -> list[str]:
        prefix = os.path.realpath(outside)
        return [p for p in self.paths if p == prefix or p.startswith(prefix + os.sep)]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    header = Header("tokens", 2, (ArraySpec("token_ids", "int32"),), {})
    writer = StoreWriter(root, header)
    for part in range(2):
        with writer.open_part(part) as pw:
            pw.append({"token_ids": np.arange(10, dtype=np.int32)}, [4, 6],
                      [part << 32, (part << 32) + 1])
    assert writer.finalize()
    return root


def refused_without_touching(root: Path, outside: Path, text: str) -> None:
    """``verify`` reports it, ``open_store`` refuses it, and even an unverified reader (which
    never uses the commit's file list) reads nothing outside the store."""
    with OpenSpy() as spy:
        problems = verify(root)
        with pytest.raises(StoreError, match=text):
            open_store(root)
        try:
            store = open_store(root, verify="none")
            for part in range(store.num_parts):
                store.read_part(part)
        except StoreError:
            pass
    assert any(text in p for p in problems), problems
    assert spy.touched(outside) == [], spy.touched(outside)


def test_a_commit_record_cannot_point_outside_its_store(store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_bytes(b"x" * 40)
    commit_path = store / "parts" / "00000" / "COMMIT.json"
    commit = json.loads(commit_path.read_text())
    rec = {"bytes": 40, "sha256": "0" * 64}
    commit["files"] |= {"../../../secret/key": rec, str(outside / "key"): rec,
                        "token_ids/../../../../secret/key": rec}
    commit_path.write_text(json.dumps(commit))
    refused_without_touching(store, outside, "escapes the part")


def test_a_linked_directory_cannot_lead_out_of_the_store(store: Path, tmp_path: Path) -> None:
    """The files a commit lists are plain files under the part: a symbolic link on the way
    (an array directory, or the part directory itself, linked elsewhere) is refused."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(store / "parts" / "00000", outside)
    arr = store / "parts" / "00000" / "token_ids"
    shutil.rmtree(arr)
    arr.symlink_to(outside / "token_ids", target_is_directory=True)
    refused_without_touching(store, outside, "escapes the part")

    shutil.rmtree(store / "parts" / "00000")
    (store / "parts" / "00000").symlink_to(outside, target_is_directory=True)
    refused_without_touching(store, outside, "a symbolic link")


def test_a_linked_chunk_file_is_not_followed(store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    chunk = store / "parts" / "00001" / "token_ids" / "c" / "0"
    shutil.copy(chunk, outside / "0")
    chunk.unlink()
    chunk.symlink_to(outside / "0")
    refused_without_touching(store, outside, "a symbolic link")


def test_a_manifest_cannot_point_outside_its_store(store: Path) -> None:
    """Parts are found by number under ``parts/``, never by a path from the manifest: a
    manifest naming other places is reported as edited and nothing is read from them."""
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["parts"][1]["part"] = "../../etc"
    manifest["parts"].append({"part": "/etc/passwd", "num_rows": 1, "num_sequences": 1})
    path.write_text(json.dumps(manifest))
    with OpenSpy() as spy:
        problems = verify(store)
        with pytest.raises(CorruptStoreError, match=r"manifest\.json"):
            open_store(store)
    assert any("manifest.json" in p for p in problems), problems
    assert not [p for p in spy.paths if p.startswith("/etc")]


def test_a_store_cannot_declare_object_arrays(store: Path) -> None:
    """Raw chunks are memory-mapped: an object dtype would read the file's bytes as Python
    object pointers. Only booleans, integers and floats are accepted."""
    header = json.loads((store / "store.json").read_text())
    header["arrays"]["token_ids"]["dtype"] = "object"
    (store / "store.json").write_text(json.dumps(header))
    for rel in ("parts/00000/token_ids/zarr.json", "parts/00001/token_ids/zarr.json"):
        meta = json.loads((store / rel).read_text())
        meta["data_type"] = "object"
        (store / rel).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="dtype 'object' is not allowed"):
        open_store(store, verify="none")
    assert any("not allowed" in p for p in verify(store))
    with pytest.raises(StoreError, match="not allowed"):
        ArraySpec("x", "O")


# ---------------------------------------------------------------------------------- config


def test_yaml_is_loaded_with_safe_load(tmp_path: Path, trees: dict[str, ast.AST]) -> None:
    names = {dotted(c.func) for t in trees.values() for c in calls(t)
             if dotted(c.func).startswith("yaml.")}
    assert names == {"yaml.safe_load"}, names
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"max_len: !!python/object/apply:os.system ['touch {marker}']\n")
    result = CliRunner().invoke(app, ["tokenize", str(tmp_path), "--tokenizer", "t", "--out",
                                      str(tmp_path / "o"), "--config", str(config)],
                                env={"COLUMNS": "300"})
    output = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "not valid YAML" in output, output
    assert not marker.exists()
