"""Teacher engine on vLLM's offline ``LLM``: prompt log-probs of pre-tokenised sequences.

Two read-out paths with identical output (``engine.name`` says which one runs):

* ``vllm-public``: public API only. ``SamplingParams(flat_logprobs=True)`` makes vLLM return
  ``FlatLogprobs`` (flat Python lists); they are read as whole arrays, never one object per
  position.
* ``vllm-fast`` (vLLM versions in :data:`FAST_PATH_VERSIONS` only): one hook on vLLM internals,
  on this engine's ``OutputProcessor`` instance in the front-end process (where
  ``LogprobsProcessor`` runs, whether or not the engine core is a separate process). Flagged
  requests keep the engine's ``LogprobsTensors`` (column 0 = actual next token, columns 1..k =
  top-k, plus the target's rank) as tensors instead of having them turned into Python lists
  position by position (what verl patches ``_update_prompt_logprobs`` for).

Independently of the read-out path, ``fast_logprobs=True`` (the default) activates mtkd's vLLM
plugin (:mod:`mtkd.harvest.vllm_plugin`) in the engine's processes: vLLM's worker then computes
the prompt log-probs with :func:`mtkd.harvest.prompt_logprobs.prompt_logprobs_fast` (same
tensors, several times cheaper on CPU). :meth:`VllmEngine.prompt_logprobs_stats` shows it ran.

Row ``j`` of a sequence is vLLM's ``prompt_logprobs[j + 1]`` (entry 0 is ``None``). vLLM's engine
core runs in spawned processes: construct engines under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mtkd.harvest import vllm_plugin
from mtkd.harvest.engine import check_k, check_sequences, finish_rows

log = logging.getLogger(__name__)

#: vLLM versions whose internals the fast path was tested against.
FAST_PATH_VERSIONS = ("0.32.",)
#: Largest top-k this engine accepts (vLLM's ``max_logprobs`` is set to k).
MAX_K = 256
#: SamplingParams.extra_args key that routes a request's prompt log-probs to the fast path.
_KEEP_TENSORS = "mtkd_keep_prompt_logprobs_tensors"

FastPath = Literal["auto", "fast", "public"]


def fast_path_supported(version: str) -> bool:
    """Whether the fast path was tested on this vLLM version."""
    return version.startswith(FAST_PATH_VERSIONS)


def resolve_fast_path(fast_path: str | bool, version: str) -> bool:
    """``"auto"``: fast where tested, else public; ``"fast"`` on an untested version raises."""
    choice = {True: "fast", False: "public"}.get(fast_path, fast_path)  # type: ignore[call-overload]
    if choice not in ("auto", "fast", "public"):
        raise ValueError(f"fast_path must be 'auto', 'fast' or 'public', got {fast_path!r}")
    if choice == "public":
        return False
    if fast_path_supported(version):
        return True
    if choice == "fast":
        raise RuntimeError(
            f"the fast harvest path is tested on vLLM {FAST_PATH_VERSIONS}, not {version}; "
            "use fast_path='public' (or 'auto')"
        )
    log.warning("vLLM %s is untested with the fast path; using the public path", version)
    return False


# ---------------------------------------------------------------------------------------------
# Front-end side (runs where vLLM's OutputProcessor runs).


class TensorPromptLogprobs(list):
    """``RequestOutput.prompt_logprobs`` on the fast path: the engine's ``LogprobsTensors``
    for the prompt rows (one per delivery; normally exactly one)."""


def _keep_prompt_logprobs_tensors(self: Any, prompt_logprobs_tensors: Any) -> None:
    """Replacement for ``LogprobsProcessor._update_prompt_logprobs`` (bound per request)."""
    if not isinstance(self.prompt_logprobs, TensorPromptLogprobs):
        self.prompt_logprobs = TensorPromptLogprobs()
    self.prompt_logprobs.append(prompt_logprobs_tensors)


def _install_frontend_hook(llm: Any) -> None:
    """Wrap this engine's ``OutputProcessor.add_request`` (instance only): requests flagged
    with :data:`_KEEP_TENSORS` keep their prompt log-probs as engine tensors."""
    processor = llm.llm_engine.output_processor
    if getattr(processor, "_mtkd_hooked", False):
        return
    original = processor.add_request

    def add_request(request: Any, *args: Any, **kwargs: Any) -> None:
        original(request, *args, **kwargs)
        params = request.sampling_params
        if params is not None and (params.extra_args or {}).get(_KEEP_TENSORS):
            lp = processor.request_states[request.request_id].logprobs_processor
            lp._update_prompt_logprobs = types.MethodType(_keep_prompt_logprobs_tensors, lp)

    processor.add_request = add_request
    processor._mtkd_hooked = True


# ---------------------------------------------------------------------------------------------
# Reading vLLM's outputs into rows.


def _rows_from_tensors(plp: TensorPromptLogprobs, n_rows: int) -> tuple[np.ndarray, ...]:
    """The engine's ``LogprobsTensors`` → ``[n, k+1]`` ids and log-probs, ``[n]`` ranks."""

    def cat(field: int) -> np.ndarray:
        parts = [p[field] for p in plp]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).numpy()

    ids, lps, ranks = cat(0), cat(1), cat(2)
    if ids.shape[0] != n_rows:
        raise RuntimeError(f"vLLM returned {ids.shape[0]} prompt rows, expected {n_rows}")
    return ids, lps, ranks


def _rows_from_flat(plp: Any, n_rows: int, k: int) -> tuple[np.ndarray, ...]:
    """FlatLogprobs → ``[n, k+1]`` arrays; each position holds the target then the top-k."""
    starts = np.asarray(plp.start_indices, dtype=np.int64)
    ends = np.asarray(plp.end_indices, dtype=np.int64)
    if len(starts) == n_rows + 1:  # entry 0 (the first token, no context) is empty
        if ends[0] != starts[0]:
            raise RuntimeError("vLLM prompt log-probs: entry 0 is not empty")
        starts, ends = starts[1:], ends[1:]
    if len(starts) != n_rows:
        raise RuntimeError(f"vLLM returned {len(starts)} prompt rows, expected {n_rows}")
    lo, hi = int(starts[0]), int(ends[-1])
    if np.any(ends - starts != k + 1) or hi - lo != n_rows * (k + 1):
        raise RuntimeError("vLLM prompt log-probs: expected k+1 entries per position")
    ids = np.asarray(plp.token_ids[lo:hi], dtype=np.int32).reshape(n_rows, k + 1)
    lps = np.asarray(plp.logprobs[lo:hi], dtype=np.float32).reshape(n_rows, k + 1)
    ranks = np.asarray(plp.ranks[lo : hi : k + 1], dtype=np.int64)
    return ids, lps, ranks


class VllmEngine:
    """TeacherEngine on vLLM (see the module docstring for the two read-out paths)."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        k: int,
        *,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        max_num_batched_tokens: int | None = None,
        fast_path: FastPath | bool = "auto",
        fast_logprobs: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        self.k = check_k(k, MAX_K, "VllmEngine", "vLLM's max_logprobs is set to k")
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform

        self.vllm_version = vllm.__version__
        fast = resolve_fast_path(fast_path, self.vllm_version)
        args: dict[str, Any] = {
            "model": str(Path(model_dir)),
            "dtype": dtype,
            "max_logprobs": self.k,
            "enable_prefix_caching": False,
            "tensor_parallel_size": tensor_parallel_size,
            "trust_remote_code": False,
        }
        optional = {
            "max_model_len": max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_num_batched_tokens": max_num_batched_tokens,
        }
        args.update({key: v for key, v in optional.items() if v is not None})
        if (
            current_platform.is_cpu()
            and gpu_memory_utilization is None
            and "kv_cache_memory_bytes" not in engine_kwargs
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        ):
            # On CPU the default reserves 92% of a NUMA node and fails on a busy machine.
            args["kv_cache_memory_bytes"] = 1 << 30
        args.update(engine_kwargs)

        # mtkd's prompt log-prob kernel in vLLM's worker (a vLLM plugin; see vllm_plugin).
        with vllm_plugin.activated(fast_logprobs, self.vllm_version) as self.fast_logprobs:
            self.llm = LLM(**args)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        check_k(self.k, self.vocab_size, "VllmEngine", "k must not exceed the vocabulary")
        if fast:
            _install_frontend_hook(self.llm)
        self.name = ""
        self._params: Any = None
        self.use_path("fast" if fast else "public")

    def use_path(self, path: Literal["fast", "public"]) -> None:
        """Switch a live engine between the two read-out paths (their output is identical)."""
        from vllm import SamplingParams

        if path not in ("fast", "public"):
            raise ValueError(f"path must be 'fast' or 'public', got {path!r}")
        fast = path == "fast"
        if fast and not getattr(self.llm.llm_engine.output_processor, "_mtkd_hooked", False):
            raise RuntimeError("this engine was built with the public path only")
        self.name = f"vllm-{path}"
        self._params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=self.k,
            detokenize=False,
            flat_logprobs=True,
            extra_args={_KEEP_TENSORS: True} if fast else None,
        )
        log.info("vLLM %s harvest path: %s", self.vllm_version, self.name)

    def prompt_logprobs_stats(self) -> list[dict[str, Any]] | None:
        """Per-worker state and counters of mtkd's prompt log-prob kernel (``active``,
        ``calls``, ``rows``, ``reference_rows``, …); None when it was not activated here."""
        if not self.fast_logprobs:
            return None
        try:
            return list(self.llm.collective_rpc(vllm_plugin.STATS_METHOD))
        except Exception:  # the plugin did not load in the workers (e.g. VLLM_PLUGINS)
            log.warning("vLLM workers do not answer %s", vllm_plugin.STATS_METHOD, exc_info=True)
            return None

    def close(self) -> None:
        """Shut the engine core (and its worker processes) down."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, sequences: Sequence[np.ndarray], params: Any) -> list[Any]:
        """Run ``llm.generate`` on token-id sequences (no detokenisation, no progress bar)."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=np.asarray(s).tolist()) for s in sequences]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def harvest(self, sequences: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Contract rows (see :mod:`mtkd.harvest.engine`) for ``sequences``, in input order."""
        seqs = check_sequences(sequences, self.vocab_size)
        outputs = self.generate(seqs, self._params)
        parts = []
        for seq, out in zip(seqs, outputs, strict=True):
            n_rows = len(seq) - 1
            plp = out.prompt_logprobs
            if isinstance(plp, TensorPromptLogprobs):
                parts.append(_rows_from_tensors(plp, n_rows))
            elif plp is not None and hasattr(plp, "start_indices"):
                parts.append(_rows_from_flat(plp, n_rows, self.k))
            else:
                raise RuntimeError(f"unexpected prompt log-probs from vLLM: {type(plp)}")
            if not np.array_equal(parts[-1][0][:, 0], seq[1:]):
                raise RuntimeError("vLLM prompt log-probs are not aligned with the sequence")
        ids, lps, ranks = (np.concatenate(a) for a in zip(*parts, strict=True))
        return finish_rows(ids[:, 1:], lps[:, 1:], lps[:, 0], ranks)
