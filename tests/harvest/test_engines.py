"""Teacher engines: vLLM (fast and public paths) against the transformers reference.

The model is a 'successor' Llama (argmax after token x is x + 1): row alignment is checked
against a known answer, not against another engine. vLLM engines are slow to start (tens of
seconds on CPU), so each path's engine is built once for the module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd.harvest.engine import (
    ROW_KEYS,
    TeacherEngine,
    check_k,
    check_sequences,
    rows_from_logprobs,
    tail_logmass,
)
from mtkd.harvest.hf_engine import HfReferenceEngine
from mtkd.harvest.vllm_engine import MAX_K, VllmEngine

from .conftest import MAX_LEN, VOCAB

K = 64
SET_NUM_THREADS = torch.set_num_threads  # at collection, before any engine is built


@pytest.fixture(scope="module")
def sequences() -> list[np.ndarray]:
    """Random sequences of assorted lengths (2 is the shortest legal one) and a counting run."""
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, VOCAB, n) for n in (2, 3, 57, 300, 700)]
    seqs.append((np.arange(200) + 450) % VOCAB)  # x, x+1, …: every target is the argmax
    # exactly max_model_len tokens: vLLM needs room for a generated token (its last row comes
    # from the sample log-probs of the forced last token)
    seqs.append(rng.integers(0, VOCAB, MAX_LEN))
    return seqs


@pytest.fixture(scope="module")
def vllm_engine(successor_dir: Path) -> Iterator[VllmEngine]:
    """The one vLLM engine of this module (both paths run on it; see ``use_path``)."""
    # 256-token steps: the 300- and 700-token prompts are prefilled in several chunks.
    engine = VllmEngine(
        successor_dir,
        K,
        dtype="float32",
        fast_path="fast",
        max_model_len=MAX_LEN,
        max_num_batched_tokens=256,
        enforce_eager=True,  # correctness, not speed: skips ~30 s of torch.compile
    )
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def fast_rows(vllm_engine: VllmEngine, sequences: list[np.ndarray]) -> dict[str, np.ndarray]:
    vllm_engine.use_path("fast")
    return vllm_engine.harvest(sequences)


@pytest.fixture(scope="module")
def public_rows(
    vllm_engine: VllmEngine, sequences: list[np.ndarray]
) -> Iterator[dict[str, np.ndarray]]:
    """Public API only: the FlatLogprobs read-out."""
    vllm_engine.use_path("public")
    try:
        yield vllm_engine.harvest(sequences)
    finally:
        vllm_engine.use_path("fast")


@pytest.fixture(scope="module")
def reference(successor_dir: Path) -> HfReferenceEngine:
    return HfReferenceEngine(
        successor_dir, K, temperatures=(1.0, 2.0), num_samples=32, batch_size=3
    )


@pytest.fixture(scope="module")
def reference_rows(
    reference: HfReferenceEngine, sequences: list[np.ndarray]
) -> dict[str, np.ndarray]:
    return reference.harvest(sequences)


@pytest.fixture(scope="module")
def full_logprobs(reference: HfReferenceEngine, sequences: list[np.ndarray]) -> np.ndarray:
    """Float64 log-probs over the whole vocabulary, all rows: the exact answer."""
    logits = torch.cat(list(reference.logits(sequences)))
    return torch.log_softmax(logits.double(), dim=-1).numpy()


# Float32 on both sides: log-probs agree to a few float32 ulps of the logits (≈ 1e-5 here).
LOGPROB_ATOL = 1e-4

engine = pytest.mark.engine


def _row_targets(sequences: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([s[1:] for s in sequences])


def _row_inputs(sequences: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([s[:-1] for s in sequences])


# --- models --------------------------------------------------------------------------------


def test_vocab_hash_is_stable_and_tells_tokenizers_apart(
    tokenizer_dir: Path, successor_dir: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from mtkd.recipes.models import train_bpe_tokenizer, vocab_hash
    from mtkd.recipes.stdlib_corpus import stdlib_texts
    from mtkd.store.schema import vocab_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.eos_token is not None
    assert vocab_hash(tokenizer_dir) == vocab_hash(tok) == vocab_hash(successor_dir)
    raw = Tokenizer.from_file(str(successor_dir / "tokenizer.json"))  # what harvest compares
    assert vocab_hash(tok) == vocab_fingerprint(raw.get_vocab(with_added_tokens=True))
    other = train_bpe_tokenizer(stdlib_texts(max_files=10), 300, tmp_path)
    assert vocab_hash(other) != vocab_hash(tok)


def test_init_llama_refuses_small_heads(tmp_path: Path) -> None:
    from mtkd.recipes.models import init_llama

    with pytest.raises(ValueError, match="head_dim"):
        init_llama(tmp_path, 512, hidden=64, layers=1, heads=4)


# --- shared helpers ------------------------------------------------------------------------


def test_tail_logmass_float64_and_empty_tail() -> None:
    lp = np.array([np.log([0.5, 0.25, 0.125]), [0.0, -np.inf, -np.inf]], dtype=np.float32)
    out = tail_logmass(lp)
    assert out.dtype == np.float32
    assert out[0] == pytest.approx(np.log(0.125), abs=1e-7)
    assert out[1] == -np.inf
    # float64 arithmetic: a tail far below float32's resolution of 1 − Σp survives.
    tiny = np.log(np.array([[1 - 1e-9, 5e-10]], dtype=np.float64)).astype(np.float32)
    expect = np.log1p(-np.exp(tiny.astype(np.float64)).sum())
    assert tail_logmass(tiny)[0] == pytest.approx(expect, rel=1e-6)


def test_tail_logmass_in_chunks_and_threads_equals_one_pass() -> None:
    from mtkd.harvest.engine import TAIL_CHUNK_ROWS

    rng = np.random.default_rng(3)
    n = 2 * TAIL_CHUNK_ROWS + 77  # two threads, chunks, a partial one
    lp = np.log(rng.dirichlet(np.ones(300), n)[:, :64]).astype(np.float32)
    one_pass = np.log1p(-np.minimum(np.exp(lp, dtype=np.float64).sum(axis=-1), 1.0))
    np.testing.assert_array_equal(tail_logmass(lp), one_pass.astype(np.float32))
    np.testing.assert_array_equal(tail_logmass(lp[:35].reshape(5, 7, 64)),
                                  one_pass[:35].astype(np.float32).reshape(5, 7))
    assert tail_logmass(np.zeros((0, 64), np.float32)).shape == (0,)


def test_rows_from_logprobs_contract() -> None:
    gen = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(20, 50, generator=gen), dim=-1)
    targets = torch.randint(0, 50, (20,), generator=gen)
    rows = rows_from_logprobs(lp, targets, 5)
    assert {k: v.dtype for k, v in rows.items()} == {
        "topk_ids": np.int32,
        "topk_logprobs": np.float32,
        "target_logprob": np.float32,
        "target_rank": np.int32,
        "tail_logmass": np.float32,
    }
    order = torch.argsort(lp, dim=-1, descending=True)
    np.testing.assert_array_equal(rows["topk_ids"], order[:, :5].numpy())
    rank = (order == targets[:, None]).int().argmax(dim=-1) + 1
    np.testing.assert_array_equal(rows["target_rank"], rank.numpy())
    np.testing.assert_array_equal(rows["target_logprob"], lp.gather(1, targets[:, None])[:, 0])


def test_check_k_and_sequences() -> None:
    assert check_k(64, 256, "e") == 64
    with pytest.raises(ValueError, match=r"k=300 is outside \[1, 256\]"):
        check_k(300, 256, "e")
    with pytest.raises(ValueError, match="no sequences"):
        check_sequences([], 10)
    with pytest.raises(ValueError, match="length >= 2"):
        check_sequences([np.array([1])], 10)
    with pytest.raises(ValueError, match="outside"):
        check_sequences([np.array([1, 10])], 10)


# --- reference engine ----------------------------------------------------------------------


def test_k_over_cap_refused(successor_dir: Path) -> None:
    with pytest.raises(ValueError, match=f"k={MAX_K + 1} is outside"):
        VllmEngine(successor_dir, MAX_K + 1)  # refused before any engine starts
    with pytest.raises(ValueError, match=f"k={VOCAB + 1} is outside"):
        HfReferenceEngine(successor_dir, VOCAB + 1)


def test_reference_rows_are_exact(
    reference_rows: dict[str, np.ndarray], full_logprobs: np.ndarray, sequences: list
) -> None:
    targets = _row_targets(sequences)
    assert len(targets) == len(reference_rows["topk_ids"]) == sum(len(s) - 1 for s in sequences)
    got = np.take_along_axis(full_logprobs, reference_rows["topk_ids"].astype(np.int64), 1)
    np.testing.assert_allclose(reference_rows["topk_logprobs"], got, atol=1e-5)
    exact_tail = 1.0 - np.exp(got).sum(axis=1)
    np.testing.assert_allclose(np.exp(reference_rows["tail_logmass"]), exact_tail, atol=1e-5)
    # tempered tails: the exact mass of softmax(logits / T) outside the top-k ids
    for j, t in enumerate((1.0, 2.0)):
        tempered = full_logprobs / t
        tempered = np.exp(tempered - np.logaddexp.reduce(tempered, axis=1, keepdims=True))
        inside = np.take_along_axis(tempered, reference_rows["topk_ids"].astype(np.int64), 1)
        expect = 1.0 - inside.sum(axis=1)
        got_t = np.exp(reference_rows["tempered_tail_logmass"][:, j].astype(np.float64))
        np.testing.assert_allclose(got_t, expect, rtol=1e-4, atol=1e-9)
    assert np.all(reference_rows["tempered_tail_logmass"][:, 1] > reference_rows["tail_logmass"])


def test_reference_samples(
    successor_dir: Path,
    reference_rows: dict[str, np.ndarray],
    full_logprobs: np.ndarray,
    sequences: list,
) -> None:
    ids, counts = reference_rows["sample_ids"], reference_rows["sample_counts"]
    assert ids.dtype == np.int32 and counts.dtype == np.uint16
    assert ids.shape == counts.shape == (len(full_logprobs), 32)
    np.testing.assert_array_equal(counts.sum(axis=1), 32)
    valid = ids >= 0
    np.testing.assert_array_equal(valid, counts > 0)
    n_valid = valid.sum(axis=1)
    np.testing.assert_array_equal(valid, np.arange(32) < n_valid[:, None])  # padding last
    assert np.all((np.diff(ids, axis=1) > 0) | ~valid[:, 1:])  # unique, ascending
    lp = np.take_along_axis(full_logprobs, np.maximum(ids, 0).astype(np.int64), 1)
    np.testing.assert_allclose(reference_rows["sample_logprobs"][valid], lp[valid], atol=1e-5)
    assert np.all(reference_rows["sample_logprobs"][~valid] == -np.inf)
    # seeded per sequence: independent of batching and of the other sequences
    again = HfReferenceEngine(successor_dir, K, num_samples=32, batch_size=1)
    one = again.harvest(sequences[-1:])
    np.testing.assert_array_equal(one["sample_ids"], ids[-len(one["sample_ids"]) :])


def test_reference_samples_follow_the_distribution(successor_dir: Path) -> None:
    eng = HfReferenceEngine(successor_dir, 4, num_samples=4000, sample_temperature=2.0)
    seq = np.array([5, 17, 33])
    rows = eng.harvest([seq])
    lp = torch.log_softmax(next(eng.logits([seq])).double() / 2.0, dim=-1).numpy()
    for r in range(2):
        ids = rows["sample_ids"][r][rows["sample_ids"][r] >= 0]
        freq = rows["sample_counts"][r][: len(ids)] / 4000
        p = np.exp(lp[r, ids])
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / 4000) + 1e-3)


# --- vLLM ----------------------------------------------------------------------------------


def test_in_process_build_hides_what_vllm_cannot_scan() -> None:
    """vLLM's kernel registration fails on llvmlite's lazy library wrapper (loaded with numba,
    which the CPU top-k kernel uses): an in-process engine build must hide that module."""
    import llvmlite.binding  # noqa: F401

    from mtkd.harvest.vllm_engine import _engine_core_in_process, _unscannable_modules

    assert "llvmlite.binding.ffi" in _unscannable_modules()
    with _engine_core_in_process(True):
        assert "llvmlite.binding.ffi" not in sys.modules
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "llvmlite.binding.ffi" in sys.modules


def test_weight_casts_to_the_asked_dtype_are_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """vLLM warns once per weight stored in another dtype than ``--dtype`` (≈ 150 lines for
    SmolLM2); the engine build says it once, with the count."""
    import logging

    from vllm.model_executor.models.utils import logger as loader_log

    from mtkd.harvest.vllm_engine import _weight_casts_summarised

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    loader_log.addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, "mtkd"), _weight_casts_summarised():
            for name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
                loader_log.warning("Attempted to load weight %s with dtype %s into parameter "
                                   "with dtype %s", name, torch.float32, torch.bfloat16)
            loader_log.warning("another warning")
        loader_log.warning("Attempted to load weight %s with dtype %s into parameter with "
                           "dtype %s", "after.weight", torch.float32, torch.bfloat16)
    finally:
        loader_log.removeHandler(handler)
    assert [r.args[0] if r.args else r.msg for r in seen] == ["another warning", "after.weight"]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("mtkd")] == [
        "vLLM cast 3 weights stored as float32 to bfloat16 (the --dtype asked)"]


@engine
def test_sequence_longer_than_max_model_len_refused(vllm_engine: VllmEngine) -> None:
    with pytest.raises(ValueError, match="does not fit the engine's max_model_len of 1024"):
        vllm_engine.harvest([np.zeros(MAX_LEN + 1, np.int64)])


@engine
def test_engine_paths(vllm_engine: VllmEngine) -> None:
    assert isinstance(vllm_engine, TeacherEngine)
    assert vllm_engine.in_process  # the CPU default: engine core and worker in this process
    # vLLM's CPU worker turns torch.set_num_threads into a no-op; the build puts it back
    assert torch.set_num_threads is SET_NUM_THREADS
    assert vllm_engine.vocab_size == VOCAB and vllm_engine.k == K
    vllm_engine.use_path("public")
    assert vllm_engine.name == "vllm-public"
    vllm_engine.use_path("fast")
    assert vllm_engine.name == "vllm-fast"


@engine
def test_requests_of_different_k_in_one_step(
    vllm_engine: VllmEngine, sequences: list[np.ndarray], full_logprobs: np.ndarray
) -> None:
    """The kernel runs once per k for all of a step's requests: each gets its own top-k."""
    from vllm import SamplingParams

    from mtkd.harvest.vllm_engine import _rows_from_flat

    seqs = sequences[:-1]  # all but the max-length one
    ks = [5, K, 1, 20, K, 5]
    params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False,
                             flat_logprobs=True) for k in ks]
    outs = vllm_engine.generate(seqs, params)
    start = 0
    for seq, k, out in zip(seqs, ks, outs, strict=True):
        n = len(seq) - 1
        ids, lps, _ = _rows_from_flat(out.prompt_logprobs, n, k)
        exact = full_logprobs[start:start + n]
        np.testing.assert_array_equal(ids[:, 0], seq[1:])
        np.testing.assert_allclose(lps[:, 0], exact[np.arange(n), seq[1:]], atol=LOGPROB_ATOL)
        np.testing.assert_allclose(lps[:, 1:], -np.sort(-exact, axis=1)[:, :k],
                                   atol=LOGPROB_ATOL)
        start += n


@engine
def test_rows_align_with_the_known_answer(
    fast_rows: dict[str, np.ndarray], sequences: list[np.ndarray]
) -> None:
    inputs, targets = _row_inputs(sequences), _row_targets(sequences)
    assert fast_rows["topk_ids"].shape == (len(targets), K)
    np.testing.assert_array_equal(fast_rows["topk_ids"][:, 0], (inputs + 1) % VOCAB)
    counting = (inputs + 1) % VOCAB == targets
    assert counting.sum() >= 199
    np.testing.assert_array_equal(fast_rows["target_rank"][counting], 1)
    np.testing.assert_array_equal(
        fast_rows["target_logprob"][counting], fast_rows["topk_logprobs"][counting, 0]
    )
    assert np.all(fast_rows["target_rank"][~counting] > 1)


@engine
def test_fast_and_public_paths_are_identical(
    fast_rows: dict[str, np.ndarray], public_rows: dict[str, np.ndarray]
) -> None:
    assert set(public_rows) == set(fast_rows) == set(ROW_KEYS)
    for key in ROW_KEYS:
        assert public_rows[key].dtype == fast_rows[key].dtype
        np.testing.assert_array_equal(public_rows[key], fast_rows[key], err_msg=key)


@engine
def test_vllm_matches_reference(
    fast_rows: dict[str, np.ndarray],
    reference_rows: dict[str, np.ndarray],
    full_logprobs: np.ndarray,
) -> None:
    got, ref = fast_rows, reference_rows
    np.testing.assert_allclose(got["topk_logprobs"], ref["topk_logprobs"], atol=LOGPROB_ATOL)
    np.testing.assert_allclose(got["target_logprob"], ref["target_logprob"], atol=LOGPROB_ATOL)
    # ids agree wherever the neighbouring log-probs are not within tolerance (near-ties swap)
    lp = ref["topk_logprobs"].astype(np.float64)
    gap = np.full(lp.shape, np.inf)
    gap[:, 1:] = lp[:, :-1] - lp[:, 1:]
    gap[:, :-1] = np.minimum(gap[:, :-1], lp[:, :-1] - lp[:, 1:])
    clear = gap > 2 * LOGPROB_ATOL
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got["topk_ids"][clear], ref["topk_ids"][clear])
    # ranks agree up to the entries tied with the target within tolerance
    near = np.abs(full_logprobs - ref["target_logprob"][:, None]) <= 2 * LOGPROB_ATOL
    assert np.all(np.abs(got["target_rank"] - ref["target_rank"]) < near.sum(axis=1))
    # the tail: float64 arithmetic on the returned log-probs, and the exact mass outside
    np.testing.assert_array_equal(got["tail_logmass"], tail_logmass(got["topk_logprobs"]))
    inside = np.exp(np.take_along_axis(full_logprobs, got["topk_ids"].astype(np.int64), 1))
    np.testing.assert_allclose(np.exp(got["tail_logmass"]), 1 - inside.sum(axis=1), atol=2e-5)


@engine
def test_hook_only_touches_flagged_requests(
    vllm_engine: VllmEngine, sequences: list[np.ndarray]
) -> None:
    from vllm import SamplingParams
    from vllm.logprobs import FlatLogprobs

    params = SamplingParams(max_tokens=1, prompt_logprobs=3, detokenize=False, flat_logprobs=True)
    out = vllm_engine.generate(sequences[2:3], params)
    assert isinstance(out[0].prompt_logprobs, FlatLogprobs)
    assert len(out[0].prompt_logprobs) == len(sequences[2])
