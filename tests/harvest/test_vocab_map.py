"""Vocabulary maps: harvesting a teacher whose tokenizer differs from the tokens store's.

Teachers are tiny Llamas on the session's BPE: the same model with its vocabulary permuted
(rows must come back identical), a teacher with extra tokens the store lacks (their mass must
join the tail), and a store with a token the teacher lacks (refused). The reference engine
runs everything but one vLLM test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.harvest.engine import tail_logmass
from mtkd.harvest.hf_engine import HfReferenceEngine
from mtkd.harvest.job import HarvestConfig, check_tokenizer, harvest
from mtkd.harvest.vocab_map import (
    VocabMap,
    VocabMapError,
    auto_map,
    filler_order,
    map_rows,
    read_map_file,
    translate_sequences,
)
from mtkd.store import Store, open_store

from .test_engines import LOGPROB_ATOL

K = 16
VOCAB = 512
STORE_ONLY = "<|store_only|>"
TEACHER_ONLY = [f"<|teacher_only_{i}|>" for i in range(4)]
#: Plain float32 columns, one raw chunk: rows compare without the q64 grid.
EXACT = {"engine": "hf", "k": K, "dtype": "float32", "logprob_dtype": "float32", "codec": "raw"}
CLI_EXACT = ("--engine", "hf", "--k", str(K), "--dtype", "float32", "--logprob-dtype", "float32",
             "--codec", "raw")


@dataclass(frozen=True)
class Setup:
    tokens: Path  # cut with the session's tokenizer
    tokens_store_only: Path  # its tokenizer has one more token, present in the corpus
    same: Path  # teacher with the store's tokenizer
    permuted: Path  # the same model, ids renumbered by ``perm``
    extra: Path  # a teacher with the store's tokens plus TEACHER_ONLY
    perm: np.ndarray


def _corpus(out: Path, marker: str = "") -> Path:
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    out.mkdir(parents=True)
    texts = list(stdlib_texts(max_files=6, max_chars=12_000))
    for i, text in enumerate(texts):  # two files: two parts
        with open(out / f"c{i % 2}.jsonl", "a") as f:
            for a in range(0, len(text), 1500):
                doc = text[a:a + 1500] + (marker if marker and i % 3 == 0 else "")
                f.write(json.dumps({"text": doc}) + "\n")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Setup:
    from transformers import AutoTokenizer

    from mtkd.ingest.job import TokenizeConfig, tokenize_corpus
    from mtkd.recipes.models import init_llama, permute_vocabulary

    root = tmp_path_factory.mktemp("vocab-map")
    small = {"hidden": 64, "layers": 1, "heads": 2, "max_position": 256}
    same = init_llama(root / "same", VOCAB, seed=3,
                      tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)), **small)
    perm = np.random.default_rng(11).permutation(VOCAB)
    permuted = permute_vocabulary(same, perm, root / "permuted")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(TEACHER_ONLY, special_tokens=True)
    extra = init_llama(root / "extra", VOCAB, seed=4, tokenizer=tok, **small)
    store_only = root / "store-only-tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens([STORE_ONLY], special_tokens=True)
    tok.save_pretrained(str(store_only))
    cfg = TokenizeConfig(max_len=64)
    tokens, tokens_store_only = root / "tokens", root / "tokens-store-only"
    tokenize_corpus([_corpus(root / "corpus")], tokenizer_dir, tokens, cfg, num_parts=2,
                    progress=False)
    tokenize_corpus([_corpus(root / "corpus-marked", STORE_ONLY)], store_only,
                    tokens_store_only, cfg, num_parts=2, progress=False)
    return Setup(tokens, tokens_store_only, same, permuted, extra, perm)


def mtkd(*args: object) -> tuple[int, str]:
    """Run a command in this process: (exit code, output as one line)."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


def all_rows(store: Path | Store) -> dict[str, np.ndarray]:
    s = store if isinstance(store, Store) else open_store(store)
    return dict(s.read(np.arange(s.num_sequences)).arrays)


def sequences(tokens: Path) -> list[np.ndarray]:
    s = open_store(tokens)
    batch = s.read(np.arange(s.num_sequences))
    ids, off = batch["token_ids"], batch.offsets
    return [ids[off[i]:off[i + 1]].astype(np.int64) for i in range(s.num_sequences)]


def _tok(model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model / "tokenizer.json"))


# --- building and reading maps ---------------------------------------------------------------


def test_auto_map_pairs_tokens_by_string(setup: Setup, tmp_path: Path) -> None:
    base, perm = _tok(setup.same), _tok(setup.permuted)
    identity = auto_map(base, base, VOCAB, VOCAB)
    assert identity.is_identity() and identity.mapped == VOCAB
    vmap = auto_map(base, perm, VOCAB, VOCAB)
    np.testing.assert_array_equal(vmap.store_to_teacher, setup.perm)
    np.testing.assert_array_equal(vmap.teacher_to_store()[setup.perm], np.arange(VOCAB))
    assert not vmap.is_identity() and vmap.digest() != identity.digest()
    # the same map written by hand reads back as the same map (same hash)
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"store_to_teacher": {str(i): int(j)
                                                     for i, j in enumerate(setup.perm)}}))
    assert read_map_file(path, VOCAB, VOCAB).digest() == vmap.digest()
    # extra teacher tokens: ids 0..511 pair with themselves, the four extra ones with nothing
    extra = auto_map(base, _tok(setup.extra), VOCAB, VOCAB + 4)
    np.testing.assert_array_equal(extra.store_to_teacher, np.arange(VOCAB))
    assert extra.mapped == VOCAB and not extra.is_identity()
    np.testing.assert_array_equal(extra.teacher_to_store()[VOCAB:], -1)


def test_auto_on_the_stores_own_tokenizer_is_no_map(setup: Setup) -> None:
    tokens = open_store(setup.tokens)
    assert check_tokenizer(tokens, setup.same, "auto")[0] is None
    assert check_tokenizer(tokens, setup.same)[0] is None
    vmap, teacher_hash = check_tokenizer(tokens, setup.permuted, "auto")
    assert vmap is not None and vmap.source == "auto"
    assert teacher_hash != tokens.attrs["tokenizer_hash"]


def test_maps_must_be_one_to_one() -> None:
    with pytest.raises(VocabMapError, match="one to one"):
        VocabMap(np.array([3, 3, -1]), 5, "file")
    with pytest.raises(VocabMapError, match=r"outside \[0, 5\)"):
        VocabMap(np.array([0, 5]), 5, "file")
    with pytest.raises(VocabMapError, match="without a teacher counterpart: \\[1\\]"):
        translate_sequences([np.array([0, 1, 0])], np.array([2, -1]))


def test_map_rows_drops_unmapped_ids_and_fills_short_rows() -> None:
    """Pure row mapping: the first k mappable entries in rank order, the tail from what is
    kept (float64), fillers (−inf) when the engine's top-(k + extra) holds too few."""
    teacher_to_store = np.array([3, -1, 0, 1, -1, 2, 4])  # teacher ids 1 and 4: no store id
    store_to_teacher = np.array([2, 3, 5, 0, 6, -1])  # store id 5: no teacher id
    lp = np.log(np.array([[0.4, 0.3, 0.1, 0.05], [0.5, 0.2, 0.1, 0.1], [0.6, 0.2, 0.1, 0.05]]))
    rows = {"topk_ids": np.array([[0, 1, 2, 3], [1, 4, 0, 2], [1, 0, 4, 6]]),
            "topk_logprobs": lp.astype(np.float32),
            "target_logprob": np.array([-1.0, -2.0, -3.0], np.float32),
            "target_rank": np.array([1, 2, 3], np.int32)}
    out, filled = map_rows(rows, teacher_to_store, 3, filler_order(store_to_teacher))
    assert filled == 2  # rows 1 and 2 hold two mappable ids: store id 5 (p = 0) fills in
    np.testing.assert_array_equal(out["topk_ids"], [[3, 0, 1], [3, 0, 5], [3, 4, 5]])
    with np.errstate(divide="ignore"):
        expect = np.log([[0.4, 0.1, 0.05], [0.1, 0.1, 0], [0.2, 0.05, 0]])
    np.testing.assert_allclose(out["topk_logprobs"], expect.astype(np.float32), rtol=1e-6)
    kept = np.exp(out["topk_logprobs"].astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(np.exp(out["tail_logmass"].astype(np.float64)), 1 - kept,
                               rtol=1e-6)
    np.testing.assert_array_equal(out["tail_logmass"], tail_logmass(out["topk_logprobs"]))
    np.testing.assert_array_equal(out["target_rank"], rows["target_rank"])
    # with no store id lacking a teacher id, fillers are other store ids not in the row
    out, filled = map_rows(rows, teacher_to_store, 3, filler_order(np.array([2, 3, 5, 0, 6])))
    np.testing.assert_array_equal(out["topk_ids"][1], [3, 0, 1])
    np.testing.assert_array_equal(out["topk_ids"][2], [3, 4, 0])
    assert filled == 2 and np.isneginf(out["topk_logprobs"][1:, 2]).all()


# --- harvesting through a map (reference engine) --------------------------------------------


@pytest.fixture(scope="module")
def plain_store(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpermuted teacher, harvested without a map."""
    out = tmp_path_factory.mktemp("plain") / "teacher"
    harvest(setup.tokens, setup.same, out, HarvestConfig(**EXACT), progress=False)
    return out


def test_permuted_teacher_gives_the_same_rows(setup: Setup, plain_store: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "permuted"
    summary = harvest(setup.tokens, setup.permuted, out,
                      HarvestConfig(**EXACT, vocab_map="auto"), progress=False)
    assert summary.complete and summary.engine == "hf-reference+vocab-map"
    store, plain = open_store(out), open_store(plain_store)
    got, want = all_rows(store), all_rows(plain)
    # the logits are bit-identical; log-softmax sums them in another order (≤ 1 float32 ulp)
    for key in ("topk_logprobs", "target_logprob", "tail_logmass"):
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=2e-6, err_msg=key)
    np.testing.assert_array_equal(got["target_rank"], want["target_rank"])
    # ids: the same, except where that ulp turned neighbours into a tie
    assert (np.sort(got["topk_ids"], axis=1) != np.sort(want["topk_ids"], axis=1)).sum() <= 2
    lp = want["topk_logprobs"]
    tied = np.zeros(lp.shape, dtype=bool)
    tied[:, 1:] = lp[:, 1:] >= lp[:, :-1] - 2e-6
    tied[:, :-1] |= tied[:, 1:]
    assert tied.mean() < 1e-3
    np.testing.assert_array_equal(got["topk_ids"][~tied], want["topk_ids"][~tied])
    attrs = store.attrs["vocab_map"]
    assert attrs["source"] == "auto" and attrs["store_coverage"] == 1.0
    assert attrs["teacher_coverage"] == 1.0 and attrs["engine_k"] == K  # nothing to drop
    assert attrs["hash"] == auto_map(_tok(setup.same), _tok(setup.permuted), VOCAB,
                                     VOCAB).digest()
    assert store.attrs["tokenizer_hash"] == plain.attrs["tokenizer_hash"]  # store ids
    assert "vocab_map" not in plain.attrs
    assert store.num_parts == 2
    assert all(store.part_stats(p)["vocab_map_filled_rows"] == 0 for p in range(2))
    # `auto` on the store's own tokenizer is no map: the plain store's rerun is a no-op
    again = harvest(setup.tokens, setup.same, plain_store,
                    HarvestConfig(**EXACT, vocab_map="auto"), progress=False)
    assert again.parts_written == 0 and again.complete


def test_teacher_only_ids_move_their_mass_into_the_tail(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "extra"
    harvest(setup.tokens, setup.extra, out, HarvestConfig(**EXACT, vocab_map="auto"),
            progress=False)
    store = open_store(out)
    rows = all_rows(store)
    attrs = store.attrs["vocab_map"]
    assert attrs["engine_k"] == K + 4 and attrs["teacher_vocab_size"] == VOCAB + 4
    assert attrs["store_coverage"] == 1.0 and attrs["teacher_coverage"] == round(
        VOCAB / (VOCAB + 4), 6)
    # the dense answer: the teacher's full distribution, restricted to the store's ids
    engine = HfReferenceEngine(setup.extra, K)
    logits = torch.cat(list(engine.logits(sequences(setup.tokens))))
    full = torch.log_softmax(logits.double(), dim=-1).numpy()
    dropped = (np.argsort(-full, axis=1)[:, :K] >= VOCAB).any(axis=1)
    assert dropped.sum() > 100, "no row lost a teacher-only id: the test proves nothing"
    ids = rows["topk_ids"].astype(np.int64)
    assert ids.min() >= 0 and ids.max() < VOCAB
    picked = np.take_along_axis(full, ids, 1)
    np.testing.assert_allclose(rows["topk_logprobs"], picked, atol=1e-5)
    outside = full[:, :VOCAB].copy()
    np.put_along_axis(outside, ids, -np.inf, 1)
    assert np.all(picked.min(axis=1) >= outside.max(axis=1) - 1e-5)  # the top-k over store ids
    tail = np.exp(rows["tail_logmass"].astype(np.float64))
    np.testing.assert_allclose(tail, 1 - np.exp(picked).sum(axis=1), atol=1e-6)
    total = np.exp(rows["topk_logprobs"].astype(np.float64)).sum(axis=1) + tail
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert np.all(tail[dropped] >= np.exp(full[dropped, VOCAB:]).sum(axis=1) - 1e-6)
    targets = np.concatenate([s[1:] for s in sequences(setup.tokens)])
    np.testing.assert_allclose(rows["target_logprob"], full[np.arange(len(full)), targets],
                               atol=1e-5)
    assert sum(store.part_stats(p)["vocab_map_filled_rows"] for p in range(store.num_parts)) == 0


# --- refusals (command line) -----------------------------------------------------------------


def test_unmappable_inputs_are_refused(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    # in the store's ids (the default, auto, would harvest it in its own tokens instead)
    code, msg = mtkd("harvest", setup.tokens_store_only, "--model", setup.same, "--out", out,
                     *CLI_EXACT, "--tokenization", "store")
    assert code == 1 and "has a different tokenizer" in msg and "--vocab-map" in msg
    code, msg = mtkd("harvest", setup.tokens_store_only, "--model", setup.same, "--out", out,
                     *CLI_EXACT, "--vocab-map", "auto")
    n = open_store(setup.tokens_store_only).num_sequences
    store = open_store(setup.tokens_store_only)
    spelled = Tokenizer.from_file(str(Path(store.attrs["tokenizer"]) / "tokenizer.json")
                                  ).id_to_token(512)
    assert code == 1 and f"of {n} sequences" in msg, msg
    assert f"1 distinct ids, e.g. [512 {spelled!r}]" in msg, msg  # with its string
    assert "no teacher counterpart" in msg and "nothing was harvested" in msg
    assert "--tokenization own" in msg
    assert not out.exists()


BAD_MAPS = {
    "not json": "not valid JSON",
    "[[1, 2]]": 'expected {"store_to_teacher"',
    '{"store_to_teacher": {}}': "maps no ids",
    '{"store_to_teacher": {"x": 1}}': "store id 'x' is not an integer in [0, 512)",
    '{"store_to_teacher": {"512": 1}}': "store id '512' is not an integer",
    '{"store_to_teacher": {"1": 512}}': "teacher id 512 (store id 1) is not an integer",
    '{"store_to_teacher": {"1": 1.0}}': "teacher id 1.0",
    '{"store_to_teacher": {"1": 5, "2": 5}}': "mapped from several store ids",
}


@pytest.mark.parametrize("text", BAD_MAPS)
def test_bad_map_files_are_refused(setup: Setup, tmp_path: Path, text: str) -> None:
    path = tmp_path / "map.json"
    path.write_text(text)
    out = tmp_path / "teacher"
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.permuted, "--out", out,
                     *CLI_EXACT, "--vocab-map", path)
    assert code == 1 and f"vocabulary map {path}" in msg and BAD_MAPS[text] in msg, msg
    assert not out.exists()


def test_other_refusals(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.permuted, "--out", out,
                     *CLI_EXACT, "--vocab-map", tmp_path / "missing.json")
    assert code == 1 and "cannot read" in msg
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.permuted, "--out", out,
                     *CLI_EXACT, "--vocab-map", "auto", "--temperature", "2")
    assert code == 1 and "not supported with --vocab-map" in msg
    partial = tmp_path / "partial.json"  # valid, but leaves ids the corpus uses unmapped
    partial.write_text(json.dumps({"store_to_teacher": {"0": int(setup.perm[0])}}))
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.permuted, "--out", out,
                     *CLI_EXACT, "--vocab-map", partial)
    assert code == 1 and "no teacher counterpart" in msg
    assert not out.exists()


# --- vLLM ------------------------------------------------------------------------------------


@pytest.mark.engine
def test_vllm_harvest_through_a_map_matches_the_reference(setup: Setup, tmp_path: Path) -> None:
    """The permuted teacher via the command line on vLLM (its own process: the command exits
    without the interpreter's teardown) against the reference engine, with
    test_engines.py's tolerances."""
    ref, out = tmp_path / "ref", tmp_path / "vllm"
    code, msg = mtkd("harvest", setup.tokens, "--model", setup.permuted, "--out", ref,
                     *CLI_EXACT, "--vocab-map", "auto")
    assert code == 0, msg
    args = [*CLI_EXACT[2:], "--engine", "vllm", "--vocab-map", "auto", "--enforce-eager",
            "--max-model-len", "256"]
    # its own process group, killed at the end: vLLM's engine processes can outlive the
    # command (it exits without the interpreter's teardown) or a timeout
    proc = subprocess.Popen([sys.executable, "-m", "mtkd", "harvest", str(setup.tokens),
                             "--model", str(setup.permuted), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=540)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    assert "vllm-fast+vocab-map" in stdout or "vllm-public+vocab-map" in stdout
    got, want = all_rows(out), all_rows(ref)
    for key in ("topk_logprobs", "target_logprob"):
        np.testing.assert_allclose(got[key], want[key], atol=LOGPROB_ATOL, err_msg=key)
    lp = want["topk_logprobs"].astype(np.float64)
    gap = np.full(lp.shape, np.inf)
    gap[:, 1:] = lp[:, :-1] - lp[:, 1:]
    gap[:, :-1] = np.minimum(gap[:, :-1], lp[:, :-1] - lp[:, 1:])
    clear = gap > 2 * LOGPROB_ATOL
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got["topk_ids"][clear], want["topk_ids"][clear])
    # ranks agree up to the entries tied with the target within tolerance (teacher ids)
    teacher_ids = [setup.perm[s] for s in sequences(setup.tokens)]
    logits = HfReferenceEngine(setup.permuted, K).logits(teacher_ids)
    full = torch.log_softmax(torch.cat(list(logits)).double(), dim=-1).numpy()
    near = np.abs(full - want["target_logprob"][:, None]) <= 2 * LOGPROB_ATOL
    assert np.all(np.abs(got["target_rank"] - want["target_rank"]) < near.sum(axis=1))
    np.testing.assert_array_equal(got["tail_logmass"], tail_logmass(got["topk_logprobs"]))
    inside = np.exp(np.take_along_axis(full, setup.perm[got["topk_ids"]], 1))
    np.testing.assert_allclose(np.exp(got["tail_logmass"]), 1 - inside.sum(axis=1), atol=2e-5)
    assert open_store(out).attrs["vocab_map"]["hash"] == open_store(ref).attrs["vocab_map"]["hash"]
