"""Random-sampling KD draws: the counter-based sampler, and the draws vLLM's worker makes.

The sampler is checked by G-tests against exact probabilities, pooled over many rows; vLLM's
draws (made in its worker by mtkd's plugin) against the float64 softmax of an independent
transformers forward, against the reference engine's draws, and across request splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.harvest.config import HarvestConfig
from mtkd.harvest.draws import draw, sequence_key, uniforms, unique_counts
from mtkd.harvest.engine import sample_rows
from mtkd.harvest.hf_engine import HfReferenceEngine
from mtkd.harvest.job import harvest, teacher_tokenizer_hash
from mtkd.harvest.vllm_engine import VllmEngine
from mtkd.store import StoreWriter
from mtkd.store.schema import tokens_header

from .conftest import MAX_LEN, VOCAB
from .gtest import g_statistic, g_test_p_value, two_sample_g
from .test_engines import LOGPROB_ATOL

M = 64
T_SAMPLE = 1.5
ALPHA = 1e-3  # a correct sampler fails one G-test in a thousand


def test_uniforms_are_uniform_and_depend_only_on_key_position_and_index() -> None:
    keys = torch.tensor([sequence_key(0, np.arange(5)), sequence_key(1, np.arange(5))] * 500)
    pos = torch.arange(1000)
    u = uniforms(keys, pos, 32)
    assert u.dtype == torch.float64 and u.shape == (1000, 32)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    counts = np.histogram(u.numpy(), bins=64, range=(0, 1))[0]
    g, dof = g_statistic(np.arange(64)[None], counts[None], np.full((1, 64), 1 / 64))
    assert g_test_p_value(g, dof) > ALPHA
    # a row's uniforms are the same computed alone, in another order, with more draws
    again = uniforms(keys[[7, 3]], pos[[7, 3]], 40)
    np.testing.assert_array_equal(again[:, :32].numpy(), u[[7, 3]].numpy())
    # neighbouring positions, keys and draw indices are not correlated
    flat = u.numpy()
    for a, b in ((flat[:-2, 0], flat[2:, 0]), (flat[:, 0], flat[:, 1]),
                 (flat[0::2, 5], flat[1::2, 5])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(len(a))


def test_sequence_key_is_seeded_and_content_addressed() -> None:
    seq = np.array([3, 1, 4, 1, 5])
    assert sequence_key(0, seq) == sequence_key(0, seq.astype(np.int32))
    assert sequence_key(0, seq) != sequence_key(1, seq)
    assert sequence_key(0, seq) != sequence_key(0, seq[:-1])
    assert 0 <= sequence_key(-5, seq) < 2**63


def test_a_draw_temperature_without_draws_is_refused() -> None:
    """--sample-temperature alone was ignored (a store without draws, said complete)."""
    with pytest.raises(ValueError, match=r"--sample-temperature 0\.5 needs --num-samples"):
        HarvestConfig(sample_temperature=0.5)
    assert HarvestConfig(sample_temperature=0.5, num_samples=4).sample_temperature == 0.5


@pytest.mark.parametrize(("fields", "said"), [
    ({"engine": "hf", "fast_path": "fast"}, "--fast-path configure vLLM"),
    ({"engine": "hf", "engine_args": {"enforce_eager": True}}, "--enforce-eager configure vLLM"),
    ({"engine": "vlm"}, "engine must be one of vllm, hf, got 'vlm'"),
    ({"fast_path": "quick"}, "fast_path must be one of auto, fast, public"),
])
def test_engine_options_are_checked_by_the_config(fields: dict, said: str) -> None:
    """vLLM's options under --engine hf were ignored silently, and an unknown engine or fast
    path was refused only when the engine was built (a traceback for --fast-path fast)."""
    with pytest.raises(ValueError, match=said):
        HarvestConfig(**fields)
    assert HarvestConfig(engine_args={"enforce_eager": True}, fast_path="public").engine == "vllm"


def test_a_seed_without_draws_is_refused() -> None:
    """--seed alone was ignored: a user expecting seeded targets got none, and no word."""
    with pytest.raises(ValueError, match=r"--seed 7 needs --num-samples"):
        HarvestConfig(seed=7)
    assert HarvestConfig(seed=7, num_samples=4).seed == 7


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_a_seed_beyond_the_draws_key_is_refused(seed: int) -> None:
    """The seed keys the draws' hash as a signed 64-bit integer: one beyond it was accepted and
    crashed vLLM's worker (OverflowError) after the store was begun."""
    with pytest.raises(ValueError, match="seed must be in"):
        HarvestConfig(num_samples=4, seed=seed)
    for edge in (2**63 - 1, -(2**63)):
        assert sequence_key(HarvestConfig(num_samples=4, seed=edge).seed, np.arange(3)) >= 0


def test_draws_follow_the_tempered_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 300, generator=gen, dtype=torch.float64) * 3
    keys = torch.full((400,), 12345, dtype=torch.int64)
    drawn, lps = draw(logits.float(), keys, torch.arange(400), 200, temperature=T_SAMPLE)
    assert drawn.dtype == torch.int64 and torch.all(drawn[:, 1:] >= drawn[:, :-1])
    exact = torch.log_softmax(logits, dim=-1)
    np.testing.assert_allclose(lps.numpy(), exact.gather(-1, drawn).numpy(), atol=1e-5)
    ids, counts, _ = unique_counts(drawn, lps)
    probs = torch.softmax(logits / T_SAMPLE, dim=-1).numpy()
    g, dof = g_statistic(ids.numpy(), counts.numpy(), probs)
    assert dof > 2000
    assert g_test_p_value(g, dof) > ALPHA
    # the untempered distribution is rejected: the test has power
    g1, dof1 = g_statistic(ids.numpy(), counts.numpy(), torch.softmax(logits, -1).numpy())
    assert g_test_p_value(g1, dof1) < 1e-12


@pytest.mark.parametrize("cpu", [True, False])
def test_a_low_temperature_draws_a_flat_row_from_its_top(cpu: bool) -> None:
    """At T = 0.05 a flat row (top log-prob ≈ −6.5, as at many positions of a 49,152-id
    teacher) had exp(log p / T) underflow to 0 in float32 everywhere: every draw was then the
    last id. The weights are taken relative to the row's top, so the draws follow the tempered
    distribution (both paths: the CPU walk, and a GPU's cumsum + searchsorted)."""
    from mtkd.harvest.draws import draw_torch

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(300, 4096, generator=gen, dtype=torch.float64) * 0.5
    temperature = 0.05
    assert float(torch.log_softmax(logits, -1).max()) < -5.5  # log p_max / T < −110
    keys = torch.full((300,), 54321, dtype=torch.int64)
    sampler = draw if cpu else draw_torch
    drawn, lps = sampler(logits.float(), keys, torch.arange(300), 64, temperature)
    ids, counts, _ = unique_counts(drawn, lps)
    probs = torch.softmax(logits / temperature, dim=-1).numpy()
    g, dof = g_statistic(ids.numpy(), counts.numpy(), probs)
    assert dof > 300
    assert g_test_p_value(g, dof) > ALPHA


@pytest.mark.parametrize(("vocab", "temperature", "head"), [(300, 1.0, 0), (4099, 1.5, 0),
                                                         (300, 1.0, 8), (1000, 2.0, 3)])
def test_cpu_kernel_draws_what_the_torch_path_draws(vocab: int, temperature: float,
                                                    head: int) -> None:
    """The numba walk (the CPU's) and cumsum + searchsorted (a GPU's): the same draws."""
    from mtkd.harvest.draws import draw_torch

    gen = torch.Generator().manual_seed(vocab + head)
    logits = torch.randn(700, vocab, generator=gen) * 3
    logits[:5, 100:] = -torch.inf  # rows with zero-probability entries
    keys = torch.randint(0, 2**62, (700,), generator=gen)
    exclude = logits.topk(head, dim=-1).indices if head else None
    got = draw(logits, keys, torch.arange(700), 64, temperature, exclude)
    want = draw_torch(logits, keys, torch.arange(700), 64, temperature, exclude)
    # the same up to the last bit of exp (numpy's SIMD one, torch's) at a CDF boundary
    same = got[0] == want[0]
    assert float(same.float().mean()) > 1 - 1e-4
    np.testing.assert_array_equal(got[1][same].numpy(), want[1][same].numpy())
    assert int(got[0][:5].max()) < 100


def test_zero_probability_entries_are_never_drawn() -> None:
    logits = torch.full((50, 40), -torch.inf)
    logits[:, [0, 17, 39]] = torch.tensor([0.0, 1.0, -1.0])
    drawn, _ = draw(logits, torch.arange(50), torch.zeros(50, dtype=torch.int64), 64)
    assert set(drawn.unique().tolist()) <= {0, 17, 39}
    assert set(drawn.unique().tolist()) == {0, 17, 39}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.integers(0, 2**62))
def test_unique_counts_layout(rows: int, m: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed % 2**31)
    drawn = torch.sort(torch.randint(0, 9, (rows, m), generator=gen), dim=-1)[0]
    lps = -drawn.double() / 3
    out = sample_rows(drawn.numpy(), lps.float().numpy())
    ids, counts = out["sample_ids"], out["sample_counts"]
    assert counts.dtype == np.uint16 and ids.dtype == np.int32
    np.testing.assert_array_equal(counts.sum(1), m)
    for r in range(rows):
        u, c = np.unique(drawn[r].numpy(), return_counts=True)
        np.testing.assert_array_equal(ids[r, : len(u)], u)
        np.testing.assert_array_equal(counts[r, : len(u)], c)
        assert np.all(ids[r, len(u):] == -1) and np.all(counts[r, len(u):] == 0)
        np.testing.assert_allclose(out["sample_logprobs"][r, : len(u)], -u / 3, rtol=1e-6)
        assert np.all(out["sample_logprobs"][r, len(u):] == -np.inf)


# --- vLLM's worker --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def draw_sequences() -> list[np.ndarray]:
    """Random sequences (none fills max_model_len: draws need room for one generated token)."""
    rng = np.random.default_rng(11)
    return [rng.integers(0, VOCAB, n) for n in (2, 9, 130, 300, 700, 420)]


@pytest.fixture(scope="module")
def sampling_engine(successor_dir: Path) -> Iterator[VllmEngine]:
    engine = VllmEngine(successor_dir, 8, dtype="float32", fast_path="fast",
                        max_model_len=MAX_LEN, max_num_batched_tokens=256, enforce_eager=True,
                        num_samples=M, sample_temperature=T_SAMPLE, seed=3)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def exact_logprobs(successor_dir: Path, draw_sequences: list[np.ndarray]) -> np.ndarray:
    ref = HfReferenceEngine(successor_dir, 8, batch_size=2)
    return torch.log_softmax(torch.cat(list(ref.logits(draw_sequences))).double(), -1).numpy()


@pytest.mark.engine
def test_vllm_draws(sampling_engine: VllmEngine, draw_sequences: list[np.ndarray],
                    exact_logprobs: np.ndarray, successor_dir: Path) -> None:
    rows = sampling_engine.harvest(draw_sequences)
    ids, counts, lps = rows["sample_ids"], rows["sample_counts"], rows["sample_logprobs"]
    assert ids.shape == (len(exact_logprobs), M)
    np.testing.assert_array_equal(counts.sum(1), M)
    valid = ids >= 0
    # their log-probs are the teacher's at temperature 1
    exact = np.take_along_axis(exact_logprobs, np.maximum(ids, 0), 1)
    np.testing.assert_allclose(lps[valid], exact[valid], atol=LOGPROB_ATOL)
    # they follow softmax(logits / T): a G-test pooled over every position
    tempered = torch.softmax(torch.from_numpy(exact_logprobs) / T_SAMPLE, -1).numpy()
    g, dof = g_statistic(ids, counts.astype(np.int64), tempered)
    assert dof > 1000
    assert g_test_p_value(g, dof) > ALPHA, (g, dof)
    untempered = np.exp(exact_logprobs)  # the test has power: the wrong temperature fails
    assert g_test_p_value(*g_statistic(ids, counts.astype(np.int64), untempered)) < 1e-6
    # and the reference engine's draws (torch.multinomial): one distribution, pooled over rows
    ref = HfReferenceEngine(successor_dir, 8, num_samples=M, sample_temperature=T_SAMPLE)
    other = ref.harvest(draw_sequences)
    ours, theirs = np.zeros(VOCAB), np.zeros(VOCAB)
    top = np.argsort(-tempered, axis=1)  # pool by the rank of the drawn id in its row
    rank = np.empty_like(top)
    np.put_along_axis(rank, top, np.arange(VOCAB)[None], 1)
    for out, r in ((ours, rows), (theirs, other)):
        v = r["sample_ids"] >= 0
        rr = np.take_along_axis(rank, np.maximum(r["sample_ids"], 0), 1)[v]
        np.add.at(out, rr, r["sample_counts"][v])
    g2, dof2 = two_sample_g(ours, theirs)
    assert g_test_p_value(g2, dof2) > ALPHA, (g2, dof2)
    # the top-k columns are unchanged by the draws
    top_ids = np.argsort(-exact_logprobs, axis=1, kind="stable")[:, :8]
    np.testing.assert_array_equal(np.sort(rows["topk_ids"], 1), np.sort(top_ids, 1))


@pytest.mark.engine
def test_vllm_draws_do_not_depend_on_the_split(
        sampling_engine: VllmEngine, draw_sequences: list[np.ndarray]) -> None:
    whole = sampling_engine.harvest(draw_sequences)
    parts = [sampling_engine.harvest(draw_sequences[i:i + 2]) for i in (4, 2, 0)]
    split = {key: np.concatenate([p[key] for p in parts[::-1]]) for key in whole}
    for key in ("sample_ids", "sample_counts"):
        np.testing.assert_array_equal(split[key], whole[key])
    sampling_engine.use_path("public")  # vLLM's public read-out carries the same columns
    try:
        public = sampling_engine.harvest(draw_sequences)
    finally:
        sampling_engine.use_path("fast")
    for key in whole:
        np.testing.assert_array_equal(public[key], whole[key])


@pytest.mark.engine
def test_vllm_draws_refuse_a_full_length_sequence(sampling_engine: VllmEngine) -> None:
    with pytest.raises(ValueError, match="raise --max-model-len"):
        sampling_engine.harvest([np.arange(MAX_LEN) % VOCAB])


@pytest.mark.engine
def test_a_window_without_room_for_the_draws_is_refused_before_the_store(
        tmp_path: Path, successor_dir: Path, sampling_engine: VllmEngine) -> None:
    """A tokens store of max_model_len windows cannot take draws: said before the teacher store
    is begun (its header named these tokens, so a rerun on windows cut shorter was refused)."""
    tokens = tmp_path / "tokens"
    writer = StoreWriter(tokens, tokens_header(1, {
        "tokenizer_hash": teacher_tokenizer_hash(successor_dir), "vocab_size": VOCAB,
        "eos_id": None}))
    with writer.open_part(0) as pw:
        pw.append({"token_ids": (np.arange(MAX_LEN + 9) % VOCAB).astype(np.int32)},
                  np.array([9, MAX_LEN]), np.arange(2))
    assert writer.finalize()
    out = tmp_path / "teacher"
    config = HarvestConfig(k=8, dtype="float32", num_samples=M, sample_temperature=T_SAMPLE,
                           seed=3)
    with pytest.raises(ValueError, match="one token of room"):
        harvest(tokens, successor_dir, out, config, progress=False,
                engine_factory=lambda: sampling_engine)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.engine
def test_vllm_hybrid_draws_come_from_outside_the_top_k(
        successor_dir: Path, draw_sequences: list[np.ndarray], exact_logprobs: np.ndarray) -> None:
    """--sample-rest: the draws follow the teacher renormalised outside each row's top-k."""
    engine = VllmEngine(successor_dir, 8, dtype="float32", fast_path="fast",
                        max_model_len=MAX_LEN, enforce_eager=True, num_samples=M, seed=5,
                        sample_rest=True)
    try:
        rows = engine.harvest(draw_sequences)
    finally:
        engine.close()
    ids, counts = rows["sample_ids"], rows["sample_counts"].astype(np.int64)
    valid = ids >= 0
    in_head = (ids[:, :, None] == rows["topk_ids"][:, None, :]).any(-1)
    assert not np.any(in_head & valid)
    rest = np.exp(exact_logprobs)
    np.put_along_axis(rest, rows["topk_ids"].astype(np.int64), 0.0, 1)
    rest /= rest.sum(1, keepdims=True)
    # the rest is flat-ish: pool each row's ids into buckets of its rank outside the head
    edges = np.array([0, 2, 4, 8, 16, 32, 64, 128, VOCAB])
    rank = np.empty_like(rest, dtype=np.int64)
    np.put_along_axis(rank, np.argsort(-rest, axis=1), np.arange(VOCAB)[None], 1)
    bucket = np.searchsorted(edges, rank, side="right") - 1  # [R, V]
    expected = np.zeros((len(rest), len(edges) - 1))
    np.add.at(expected, (np.arange(len(rest))[:, None], bucket), rest)
    observed = np.zeros_like(expected)
    drawn_bucket = np.take_along_axis(bucket, np.maximum(ids, 0).astype(np.int64), 1)
    np.add.at(observed, (np.nonzero(valid)[0], drawn_bucket[valid]), counts[valid])
    buckets = np.broadcast_to(np.arange(len(edges) - 1), observed.shape)
    g, dof = g_statistic(buckets, observed, expected)
    assert dof > 1000 and g_test_p_value(g, dof) > ALPHA, (g, dof)
    # the test has power: the whole distribution (head included) bucketed alike fails
    rest_rank_probs = np.zeros_like(expected)
    np.add.at(rest_rank_probs, (np.arange(len(rest))[:, None], bucket), np.exp(exact_logprobs))
    g1, dof1 = g_statistic(buckets, observed, rest_rank_probs)
    assert g_test_p_value(g1, dof1) < 1e-6
