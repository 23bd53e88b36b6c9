"""mtkd's prompt log-prob kernel against vLLM's computation, and the vLLM plugin that runs it.

The kernel must return vLLM's tensors: bit-identical log-probs and ranks, ids equal up to the
order of equal log-probs. The plugin must be inert by default, active in the engine's worker
processes when ``VllmEngine`` runs vLLM, and leave the engine's rows unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtkd.harvest.prompt_logprobs import (
    capacity,
    fast_supported,
    prompt_logprobs_fast,
    prompt_logprobs_reference,
)
from mtkd.harvest.vllm_plugin import ENV_VAR, STATS_METHOD

engine = pytest.mark.engine


def assert_same_rows(
    logits: torch.Tensor, k: int, targets: torch.Tensor, stats: dict[str, float] | None = None
) -> None:
    """fast == reference: dtypes, shapes, log-probs and ranks exactly; ids up to ties."""
    ids, lps, ranks = prompt_logprobs_fast(logits, k, targets, stats)
    r_ids, r_lps, r_ranks = prompt_logprobs_reference(logits, k, targets)
    assert (ids.dtype, lps.dtype, ranks.dtype) == (r_ids.dtype, r_lps.dtype, r_ranks.dtype)
    assert ids.shape == r_ids.shape == (len(logits), k + 1) and ranks.shape == (len(logits),)
    torch.testing.assert_close(lps, r_lps, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ranks, r_ranks, rtol=0, atol=0)
    assert torch.equal(ids[:, 0], r_ids[:, 0])
    # ids: where they differ the log-probs are equal (ties); each row's ids are distinct and
    # carry the log-probs reported for them
    full = logits.log_softmax(-1, dtype=torch.float32)
    got = full.gather(1, ids[:, 1:].long())
    torch.testing.assert_close(got, lps[:, 1:], rtol=0, atol=0, equal_nan=True)
    assert all(len(set(row)) == k for row in ids[:, 1:].tolist())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("vocab", [256, 512, 2048, 8191, 32000])
@pytest.mark.parametrize("k", [1, 5, 64])
def test_random_logits(vocab: int, k: int) -> None:
    gen = _gen(vocab * 7 + k)
    n = 64 if vocab > 8000 else 300
    logits = torch.randn(n, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    # half the targets inside the top-k, half anywhere (the two rank paths)
    top = torch.topk(logits, k, dim=-1).indices
    targets[::2] = top[::2, torch.randint(0, k, (1,), generator=gen)].view(-1)
    stats: dict[str, float] = {}
    assert_same_rows(logits, k, targets, stats)
    assert stats["rows"] == n and stats.get("reference_rows", 0) == 0


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda g: (torch.randn(200, 4096, generator=g) * 4).bfloat16(), id="bf16"),
        pytest.param(lambda g: torch.randn(200, 4096, generator=g).mul(2).round().div(2),
                     id="heavy-ties"),
        pytest.param(lambda g: torch.randn(200, 4096, generator=g) * 40, id="peaked"),
        pytest.param(lambda g: torch.randn(200, 4096, generator=g) * 1e-3, id="flat"),
    ],
)
def test_ties_and_shapes_of_distributions(make: Callable[[torch.Generator], torch.Tensor]) -> None:
    gen = _gen(3)
    logits = make(gen)
    targets = torch.randint(0, logits.shape[1], (len(logits),), generator=gen)
    assert_same_rows(logits, 64, targets)


def test_rows_the_kernel_hands_back() -> None:
    """NaN, ±inf, mostly −inf, constant rows: the reference recomputes them."""
    gen = _gen(5)
    vocab, k = 1024, 16
    logits = torch.randn(8, vocab, generator=gen)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2, :] = float("-inf")
    logits[3, : vocab - 5] = float("-inf")  # fewer than k finite entries
    logits[4, :] = 1.5  # every entry tied
    logits[5, ::3] = float("-inf")  # some −inf: the kernel handles these
    logits[6, 0] = 1e4  # one entry holds all the mass (log-prob 0, the rest −1e4)
    logits[7, torch.arange(vocab) % 64 < 8] = float("-inf")  # whole strided groups −inf
    targets = torch.randint(0, vocab, (8,), generator=gen)
    targets[5] = 0  # a −inf target
    stats: dict[str, float] = {}
    assert_same_rows(logits, k, targets, stats)
    assert 0 < stats["reference_rows"] < 8


@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 70),
    extra=st.integers(0, 3000),
    levels=st.sampled_from([0, 3, 50, 1000]),
    neg_inf=st.floats(0.0, 0.97),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_fast_equals_reference(
    seed: int, k: int, extra: int, levels: int, neg_inf: float, dtype: torch.dtype
) -> None:
    """Any vocabulary the kernel takes, tied values (``levels`` distinct logits; 0: continuous),
    any share of −inf entries, both dtypes."""
    gen = _gen(seed)
    vocab = 2 * capacity(k) + extra
    n = int(torch.randint(1, 12, (1,), generator=gen))
    logits = torch.randn(n, vocab, generator=gen) * 4
    if levels:
        logits = (logits * levels / 8).round() / (levels / 8)
    logits[torch.rand(n, vocab, generator=gen) < neg_inf] = float("-inf")
    logits[:, 0] = 0.0  # at least one finite entry per row
    targets = torch.randint(0, vocab, (n,), generator=gen)
    assert_same_rows(logits.to(dtype), k, targets)


def test_rows_split_over_threads_and_chunks() -> None:
    """Several threads, several cache-sized chunks each, a last partial chunk: the same rows."""
    from mtkd.harvest import prompt_logprobs as plp

    vocab = 512
    n = 2 * 2 * (plp.CHUNK_ELEMENTS // vocab) + 37
    gen = _gen(5)
    logits = (torch.randn(n, vocab, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_same_rows(logits, 64, targets)
    finally:
        torch.set_num_threads(threads)


def test_reference_only_cases() -> None:
    gen = _gen(9)
    logits = torch.randn(4, 100, generator=gen)
    targets = torch.randint(0, 100, (4,), generator=gen)
    assert not fast_supported(logits, 40)  # k large against V
    assert fast_supported(logits, 8) and capacity(8) == 16
    stats: dict[str, float] = {}
    assert_same_rows(logits, 40, targets, stats)
    assert stats["reference_calls"] == 1
    assert_same_rows(logits[:1], 8, targets[:1])  # one row


def test_matches_vllm_sampler() -> None:
    """Against vLLM's own ``Sampler.compute_logprobs`` + ``gather_logprobs``."""
    pytest.importorskip("vllm")
    from vllm.v1.sample.sampler import Sampler

    gen = _gen(11)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(257, 5000, generator=gen) * 3).to(dtype)
        targets = torch.randint(0, 5000, (257,), generator=gen)
        ids, lps, ranks = prompt_logprobs_fast(logits, 20, targets)
        v_ids, v_lps, v_ranks, *_ = Sampler.gather_logprobs(
            Sampler.compute_logprobs(logits), 20, targets
        )
        assert (ids.dtype, lps.dtype, ranks.dtype) == (v_ids.dtype, v_lps.dtype, v_ranks.dtype)
        torch.testing.assert_close(lps, v_lps, rtol=0, atol=0)
        torch.testing.assert_close(ranks, v_ranks, rtol=0, atol=0)
        top = lps[:, 1:]
        # ids whose log-prob no other entry shares (inside the top-k, or at its boundary)
        clear = ((top[:, :, None] == top[:, None, :]).sum(-1) == 1) & (top > top[:, -1:])
        assert clear.float().mean() > 0.5
        assert torch.equal(ids[:, 1:][clear], v_ids[:, 1:][clear])


# --- the vLLM plugin ---------------------------------------------------------------------------

_PROBE = f"""
import json
from importlib.metadata import entry_points
from vllm.plugins import load_general_plugins
load_general_plugins()
import vllm.v1.worker.gpu_model_runner as runner
from vllm.v1.worker.worker_base import WorkerBase
method = runner.GPUModelRunner._get_prompt_logprobs_dict
print(json.dumps({{
    "registered": any(e.value == "mtkd.harvest.vllm_plugin:register"
                      for e in entry_points(group="vllm.general_plugins")),
    "patched": bool(getattr(method, "__mtkd_fast_prompt_logprobs__", False)),
    "stats_method": hasattr(WorkerBase, "{STATS_METHOD}"),
}}))
"""


def _probe(env_value: str | None) -> dict[str, bool]:
    env = {key: v for key, v in os.environ.items() if key != ENV_VAR}
    if env_value is not None:
        env[ENV_VAR] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plugin_is_inert_unless_activated() -> None:
    """vLLM loads the entry point in every process; it patches only under ENV_VAR=1 (here
    through the import hook: plugins load before the model runner is imported)."""
    pytest.importorskip("vllm")
    assert _probe(None) == {"registered": True, "patched": False, "stats_method": False}
    assert _probe("1") == {"registered": True, "patched": True, "stats_method": True}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Llama with a 2048-entry vocabulary (the strided-group path of the kernel)."""
    from transformers import AutoTokenizer

    from mtkd.recipes.models import init_llama

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = tmp_path_factory.mktemp("wide")
    return init_llama(out, 2048, hidden=128, layers=1, heads=2, seed=3, tokenizer=tokenizer)


@engine
def test_engine_runs_the_kernel_with_unchanged_rows(wide_model: Path) -> None:
    """The same harvest with vLLM's own computation and with the plugin: equal rows, and the
    workers report the kernel ran (and nothing when it is off). The engine core runs in
    spawned processes here (the plugin is activated there through the environment); the
    other engine tests run it in-process, the CPU default. On a CPU with AMX the spawned
    workers died of an illegal instruction (exit −4) until the plugin asked for the tiles in
    every vLLM process (``vllm_plugin.allow_amx``)."""
    from mtkd.harvest.vllm_engine import VllmEngine

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 512, n) for n in (2, 40, 300, 611)]  # ids the tokenizer knows
    n_rows = sum(len(s) - 1 for s in seqs)
    rows = {}
    for fast in (False, True):
        eng = VllmEngine(
            wide_model, 64, dtype="bfloat16", max_model_len=1024, max_num_batched_tokens=256,
            fast_logprobs=fast, in_process=False, enforce_eager=True,
        )
        try:
            before = eng.prompt_logprobs_stats()
            rows[fast] = eng.harvest(seqs)
            stats = eng.prompt_logprobs_stats()
            if not fast:  # the workers were not patched: they lack the stats method
                with pytest.raises(Exception, match=STATS_METHOD):
                    eng.llm.collective_rpc(STATS_METHOD)
        finally:
            eng.close()
        if not fast:
            assert before is None and stats is None and not eng.fast_logprobs
            continue
        assert before is not None and stats is not None and len(stats) == 1
        assert stats[0]["active"] and stats[0]["pid"] != os.getpid()
        done = stats[0].get("rows", 0) - before[0].get("rows", 0)
        # one call per engine step (all requests' rows at once), a step holds <= 256 tokens
        assert done == n_rows and stats[0]["calls"] >= -(-sum(map(len, seqs)) // 256)
        assert stats[0].get("reference_rows", 0) < n_rows
    ref, got = rows[False], rows[True]
    for key in ("topk_logprobs", "target_logprob", "target_rank", "tail_logmass"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    lp = ref["topk_logprobs"]
    clear = ((lp[:, :, None] == lp[:, None, :]).sum(-1) == 1) & (lp > lp[:, -1:])
    np.testing.assert_array_equal(got["topk_ids"][clear], ref["topk_ids"][clear])
