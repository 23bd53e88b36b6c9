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

Row ``j`` of a sequence is vLLM's ``prompt_logprobs[j + 1]`` (entry 0 is ``None``). On CPU with
one worker the engine core runs in the caller's process (``in_process``, see
:func:`_engine_core_in_process`); elsewhere vLLM spawns it: construct engines under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mtkd.harvest import vllm_plugin
from mtkd.harvest.config import FAST_PATHS, MAX_K  # vLLM's max_logprobs is set to k
from mtkd.harvest.engine import check_k, check_sequences, finish_rows, sample_rows

log = logging.getLogger(__name__)

#: vLLM versions whose internals the fast path was tested against.
FAST_PATH_VERSIONS = ("0.32.",)
#: SamplingParams.extra_args key that routes a request's prompt log-probs to the fast path.
_KEEP_TENSORS = "mtkd_keep_prompt_logprobs_tensors"
_MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"

FastPath = Literal["auto", "fast", "public"]


def fast_path_supported(version: str) -> bool:
    """Whether the fast path was tested on this vLLM version."""
    return version.startswith(FAST_PATH_VERSIONS)


def resolve_fast_path(fast_path: str | bool, version: str) -> bool:
    """``"auto"``: fast where tested, else public; ``"fast"`` on an untested version raises."""
    choice = {True: "fast", False: "public"}.get(fast_path, fast_path)  # type: ignore[call-overload]
    if choice not in FAST_PATHS:
        raise ValueError(f"fast_path must be one of {', '.join(FAST_PATHS)}, got {fast_path!r}")
    if choice == "public":
        return False
    if fast_path_supported(version):
        return True
    if choice == "fast":
        raise ValueError(
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


@contextlib.contextmanager
def _engine_core_in_process(enable: bool) -> Iterator[None]:
    """While vLLM builds an engine: run its engine core and worker in this process.

    vLLM reads ``VLLM_ENABLE_V1_MULTIPROCESSING`` only when it builds the engine. On CPU this is
    the fast choice: it skips two process spawns (each re-imports vLLM, ≈ 8 s here) and the
    inter-process copy of every prompt log-prob tensor, and the model gets every core (the
    multi-process CPU executor pins the worker away from a core it reserves for the engine
    core). Measured on the demo's harvest: 16 s instead of 64 s, start-up included.

    vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op once it has bound its
    threads; in-process that would be the caller's, for good: it is put back after the build.
    """
    if not enable:
        yield
        return
    old = os.environ.get(_MULTIPROCESSING_ENV)
    os.environ[_MULTIPROCESSING_ENV] = "0"
    hidden = {name: sys.modules.pop(name) for name in _unscannable_modules()}
    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        sys.modules.update(hidden)
        if old is None:
            os.environ.pop(_MULTIPROCESSING_ENV, None)
        else:
            os.environ[_MULTIPROCESSING_ENV] = old


#: vLLM's logger that warns once per weight whose stored dtype is not the engine's ``dtype``.
_WEIGHT_LOADER_LOG = "vllm.model_executor.models.utils"


class _WeightCasts(logging.Filter):
    """Holds back vLLM's line per weight cast to the ``--dtype`` asked (one per tensor, ≈ 150
    lines for SmolLM2 stored in float32 and run in bfloat16), counting them by dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (str(record.msg).startswith("Attempted to load weight")
                and isinstance(args, tuple) and len(args) == 3):
            self.counts[(str(args[1]), str(args[2]))] += 1
            return False
        return True


@contextlib.contextmanager
def _weight_casts_summarised() -> Iterator[None]:
    """While vLLM loads a model in this process: its per-weight dtype casts as one line."""
    logger, casts = logging.getLogger(_WEIGHT_LOADER_LOG), _WeightCasts()
    logger.addFilter(casts)
    try:
        yield
    finally:
        logger.removeFilter(casts)
        for (stored, run), n in sorted(casts.counts.items()):
            log.warning("vLLM cast %d weights stored as %s to %s (the --dtype asked)", n,
                        stored.removeprefix("torch."), run.removeprefix("torch."))


def _unscannable_modules() -> list[str]:
    """Modules that vLLM's kernel registration cannot scan.

    While it builds a worker, vLLM (0.32) walks every loaded module's globals and reads
    ``vars(value)`` of each value that has a ``__dict__``; a lazy library wrapper such as
    llvmlite's ``ffi.lib`` (loaded with numba, e.g. by an earlier harvest's top-k kernel in
    this process) answers that with a function stub and the build fails. In-process builds
    hide such modules from ``sys.modules`` meanwhile; they hold no vLLM kernels.
    """
    found = []
    with warnings.catch_warnings():  # deprecated module attributes warn when touched
        warnings.simplefilter("ignore")
        for name, module in list(sys.modules.items()):
            if _unscannable(module):
                found.append(name)
    return found


def _unscannable(module: Any) -> bool:
    namespace = getattr(module, "__dict__", None)
    if not isinstance(namespace, dict):
        return False
    for value in list(namespace.values()):
        try:  # what vLLM reads; whatever fails here fails its scan too
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")
        except Exception:
            return True
    return False


def check_draws(num_samples: int, temperature: float, seed: int, plugin: bool,
                rest: bool = False) -> vllm_plugin.DrawSpec | None:
    """The draws a VllmEngine asks of its worker (None: none), after refusing bad values;
    ``rest``: from outside each row's top-k only (the hybrid)."""
    if num_samples == 0:
        if rest:
            raise ValueError("sample_rest needs num_samples > 0")
        return None
    if not 0 < num_samples <= np.iinfo(np.uint16).max:
        raise ValueError(f"num_samples must be in [0, 65535], got {num_samples}")
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"sample temperature must be positive and finite, got {temperature}")
    if not plugin:
        raise ValueError("draws are made by mtkd's vLLM plugin: leave fast_logprobs on")
    return vllm_plugin.DrawSpec(int(num_samples), float(temperature), int(seed), bool(rest))


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
        in_process: bool | None = None,
        num_samples: int = 0,
        sample_temperature: float = 1.0,
        seed: int = 0,
        sample_rest: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        self.k = check_k(k, MAX_K, "VllmEngine", "vLLM's max_logprobs is set to k")
        self.draws = check_draws(num_samples, sample_temperature, seed, fast_logprobs,
                                 sample_rest)
        self.num_samples = int(num_samples)  # draws per row of the next harvests (use_draws)
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform

        self.vllm_version = vllm.__version__
        fast = resolve_fast_path(fast_path, self.vllm_version)
        args: dict[str, Any] = {
            "model": str(Path(model_dir)),
            "dtype": dtype,
            "max_logprobs": self.k + self.num_samples,
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
        if in_process is None:
            in_process = (current_platform.is_cpu() and tensor_parallel_size == 1
                          and "distributed_executor_backend" not in engine_kwargs)
        if in_process:
            args["distributed_executor_backend"] = "uni"
        args.update(engine_kwargs)

        # mtkd's prompt log-prob kernel in vLLM's worker (a vLLM plugin; see vllm_plugin).
        with _engine_core_in_process(in_process), _weight_casts_summarised(), \
                vllm_plugin.activated(fast_logprobs, self.vllm_version,
                                      draws=self.draws is not None) as active:
            self.llm = LLM(**args)
        self.fast_logprobs = active
        if self.draws is not None and not active:
            self.close()
            raise ValueError(f"draws need mtkd's vLLM plugin, which is not active on vLLM "
                               f"{self.vllm_version} (checked on {vllm_plugin.VERSIONS})")
        self.in_process = in_process
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
        extra = ({_KEEP_TENSORS: True} if fast else {}) | (
            self.draws.to_args() if self.draws and self.num_samples else {})
        self._param_args = {
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.k + self.num_samples,
            "detokenize": False,
            "flat_logprobs": True,
            "extra_args": extra or None,
        }
        self._params = SamplingParams(**self._param_args)
        log.info("vLLM %s harvest path: %s", self.vllm_version, self.name)

    def use_draws(self, on: bool) -> None:
        """Harvest with or without the draws the engine was built for (same engine: the
        bench compares the two)."""
        if on and self.draws is None:
            raise RuntimeError("this engine was built without draws (num_samples=0)")
        self.num_samples = self.draws.num_samples if on and self.draws else 0
        self.use_path("fast" if self.name == "vllm-fast" else "public")

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

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    @property
    def max_sequence_len(self) -> int:
        """The longest sequence :meth:`harvest` takes: max_model_len, less the token of room
        the draws need."""
        return self.max_model_len - (1 if self.num_samples else 0)

    def _full_length_params(self, last_token: int) -> Any:
        """Parameters for a sequence of exactly max_model_len tokens, sent without its last
        token: vLLM needs room for one generated token, so the last token is forced as that
        token (``allowed_token_ids``) and its row is the sample log-probs, which vLLM takes
        from the raw logits before that mask (``logprobs_mode="raw_logprobs"``, the default):
        the same row prompt log-probs would give."""
        from vllm import SamplingParams

        return SamplingParams(**self._param_args, logprobs=self.k,
                              allowed_token_ids=[last_token])

    def generate(self, sequences: Sequence[np.ndarray], params: Any) -> list[Any]:
        """Run ``llm.generate`` on token-id sequences (no detokenisation, no progress bar);
        ``params`` is one SamplingParams or one per sequence."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=np.asarray(s).tolist()) for s in sequences]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def harvest(self, sequences: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Contract rows (see :mod:`mtkd.harvest.engine`) for ``sequences``, in input order."""
        seqs = check_sequences(sequences, self.vocab_size)
        limit = self.max_model_len
        longest = max(len(s) for s in seqs)
        if longest > limit:
            raise ValueError(f"a sequence of {longest} tokens does not fit the engine's "
                             f"max_model_len of {limit}: raise --max-model-len (up to the "
                             "model's context) or tokenize with a smaller --max-len")
        full = [len(s) == limit for s in seqs]
        if self.num_samples and any(full):
            raise ValueError(f"draws need one token of room after each sequence: a sequence "
                             f"fills max_model_len ({limit}); raise --max-model-len")
        outputs = self.generate(
            [s[:-1] if f else s for s, f in zip(seqs, full, strict=True)],
            [self._full_length_params(int(s[-1])) if f else self._params
             for s, f in zip(seqs, full, strict=True)] if any(full) else self._params)
        total = sum(len(s) - 1 for s in seqs)
        # each request's rows are copied once, straight into the contract's arrays
        width = self.k + self.num_samples
        ids = np.empty((total, width), np.int32)
        lps = np.empty((total, width), np.float32)
        target_lp = np.empty(total, np.float32)
        ranks = np.empty(total, np.int32)
        start = 0
        for seq, out, forced in zip(seqs, outputs, full, strict=True):
            stop = start + len(seq) - 1
            plp = out.prompt_logprobs
            n_prompt = stop - start - forced
            if isinstance(plp, TensorPromptLogprobs):
                part = _rows_from_tensors(plp, n_prompt)
            elif plp is not None and hasattr(plp, "start_indices"):
                part = _rows_from_flat(plp, n_prompt, width)
            else:
                raise RuntimeError(f"unexpected prompt log-probs from vLLM: {type(plp)}")
            if forced:  # the last row: the forced token's sample log-probs
                last = _rows_from_flat(out.outputs[0].logprobs, 1, self.k)
                part = tuple(np.concatenate(pair) for pair in zip(part, last, strict=True))
            if not np.array_equal(part[0][:, 0], seq[1:]):
                raise RuntimeError("vLLM prompt log-probs are not aligned with the sequence")
            ids[start:stop], lps[start:stop] = part[0][:, 1:], part[1][:, 1:]
            target_lp[start:stop], ranks[start:stop] = part[1][:, 0], part[2]
            start = stop
        rows = finish_rows(ids[:, : self.k], lps[:, : self.k], target_lp, ranks)
        if self.num_samples:
            rows |= sample_rows(ids[:, self.k :], lps[:, self.k :])
        return rows
