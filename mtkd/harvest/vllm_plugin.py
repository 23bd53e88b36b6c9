"""vLLM general plugin: mtkd's prompt log-prob kernel inside vLLM's CPU model runner.

Registered under the ``vllm.general_plugins`` entry-point group (pyproject.toml), so vLLM calls
:func:`register` in every process it starts (front-end, engine core, workers). The plugin is
inert unless the environment variable :data:`ENV_VAR` is ``"1"`` in that process; mtkd's
:class:`~mtkd.harvest.vllm_engine.VllmEngine` sets it while it builds its ``LLM`` (see
:func:`activated`), and the engine-core and worker processes inherit it.

Active, on vLLM :data:`VERSIONS` with the V1 model runner on the CPU platform, it wraps
``GPUModelRunner._get_prompt_logprobs_dict`` (which ``CPUModelRunner`` inherits): while that
method runs, the runner's ``sampler`` is a proxy whose ``compute_logprobs`` passes the logits
through and whose ``gather_logprobs`` is :func:`~mtkd.harvest.prompt_logprobs.prompt_logprobs_fast`
(same tensors as vLLM's, see there). vLLM's chunking, buffers and output path are untouched,
and so is everything else the sampler does: generated tokens and their log-probs never reach
the wrapper. Other vLLM versions or platforms: nothing is patched, and a warning says why.

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
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: Set to "1" to activate the plugin in a process (inherited by vLLM's child processes).
ENV_VAR = "MTKD_VLLM_FAST_PROMPT_LOGPROBS"
#: vLLM versions whose ``_get_prompt_logprobs_dict`` / ``Sampler`` the patch was checked against.
VERSIONS = ("0.32.",)
#: Worker method name for ``LLM.collective_rpc``.
STATS_METHOD = "mtkd_prompt_logprobs_stats"

_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
_PATCHED = "__mtkd_fast_prompt_logprobs__"
_STATS: dict[str, float] = {}
_STATE: dict[str, Any] = {"installed": False, "patched": False, "reason": "not activated"}


def version_supported(version: str) -> bool:
    """Whether the patch was checked against this vLLM version."""
    return version.startswith(VERSIONS)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: installs the patch iff :data:`ENV_VAR` is 1."""
    if os.environ.get(ENV_VAR) == "1":
        install()


def install() -> bool:
    """Patch vLLM in this process (idempotent); False, with a warning, where unsupported."""
    if _STATE["installed"]:
        return bool(_STATE["patched"] or _hook_pending())
    _STATE["installed"] = True
    try:
        import vllm
        from vllm.platforms import current_platform
    except Exception as exc:  # vLLM unusable here: nothing to patch
        _STATE["reason"] = f"vLLM not importable: {exc}"
        log.warning("mtkd prompt log-prob plugin inactive: %s", _STATE["reason"])
        return False
    version = getattr(vllm, "__version__", "?")
    if not version_supported(version):
        _STATE["reason"] = f"vLLM {version} is not one of {VERSIONS}"
    elif not current_platform.is_cpu():
        _STATE["reason"] = "the kernel is for vLLM's CPU platform"
    else:
        _STATE["reason"] = ""
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
def activated(enable: bool, version: str) -> Iterator[bool]:
    """Set :data:`ENV_VAR` while vLLM builds an engine (its processes inherit it); yields
    whether the plugin was activated (vLLM :data:`VERSIONS` on the CPU platform only).

    With the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the patch is
    installed here too, for the life of the process (vLLM may have loaded its plugins before
    the variable was set)."""
    if not enable:
        yield False
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():  # GPU top-k is cheap: vLLM's own computation stays
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


class _PromptSampler:
    """Stands in for the runner's ``Sampler`` during ``_get_prompt_logprobs_dict`` only."""

    def __init__(self, sampler: Any) -> None:
        self._sampler = sampler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)

    @staticmethod
    def compute_logprobs(logits: Any) -> Any:
        """Deferred: ``gather_logprobs`` gets the logits and computes what it needs."""
        return logits

    @staticmethod
    def gather_logprobs(logits: Any, num_logprobs: int, token_ids: Any) -> Any:
        """vLLM's ``LogprobsTensors`` of ``Sampler.gather_logprobs(compute_logprobs(logits))``."""
        from vllm.v1.outputs import LogprobsTensors

        from mtkd.harvest.prompt_logprobs import prompt_logprobs_fast

        start = time.perf_counter()
        rows = prompt_logprobs_fast(logits, num_logprobs, token_ids, _STATS)
        _STATS["seconds"] = _STATS.get("seconds", 0.0) + time.perf_counter() - start
        return LogprobsTensors(*rows)


def _patch_runner(module: ModuleType) -> None:
    """Wrap ``GPUModelRunner._get_prompt_logprobs_dict`` (once)."""
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
        if (
            not self.num_prompt_logprobs
            or self.device.type != "cpu"
            or self.model_config.logprobs_mode not in ("raw_logprobs", "processed_logprobs")
        ):
            return original(self, *args, **kwargs)
        sampler = self.sampler
        self.sampler = _PromptSampler(sampler)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.sampler = sampler

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
