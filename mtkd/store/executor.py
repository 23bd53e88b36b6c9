"""The one part executor: every job (tokenize, harvest, aggregate) runs its parts through it.

*Which parts.* A worker runs ``StoreWriter.pending_parts(worker_index, num_workers)``: its
round-robin share of the store's parts (Slurm array index, Ray task, k8s completion index)
less those already committed, so a rerun resumes where a killed run stopped. Opening a part
(``StoreWriter.open_part``) clears the temp copies of its dead writers, ``finalize`` the rest.

*How.* A :class:`PartJob` splits one part's work in three: ``read`` its inputs, ``compute``
its outputs, ``write`` (commit) them. :func:`run_parts` runs the parts in order and, with
``pipeline``, reads part i+1 and writes part i−1 in background threads while part i is
computed (numpy, zarr, hashing and the engines release the GIL), so a part costs about the
larger of its I/O and its computation rather than their sum; at most two parts' inputs and
outputs are in memory at once. With ``processes > 1`` the parts are dealt round robin to a pool
of local processes, each running its share the same way.

*State.* A job is one object per process: with ``processes > 1`` it is pickled to each
process, so whatever it builds on first use (an engine, a tokenizer) is built once per process
and used for all of that process's parts. An engine that must not be forked (vLLM) runs with
``processes=1``, built once before the parts. Results never depend on ``processes`` or
``pipeline``.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from tqdm.auto import tqdm

In = TypeVar("In")
Out = TypeVar("Out")
R = TypeVar("R")


class PartJob(Protocol[In, Out, R]):
    """One stage's work on one part, in the three steps the executor overlaps."""

    def read(self, part: int) -> In:
        """The part's inputs (runs in a background thread with ``pipeline``)."""
        ...

    def compute(self, part: int, inputs: In) -> Out:
        """The part's outputs (runs in the calling thread)."""
        ...

    def write(self, part: int, outputs: Out) -> R:
        """Commit the outputs; the result is collected (background thread with ``pipeline``)."""
        ...


@dataclass(frozen=True)
class CallJob(Generic[R]):
    """A job whose whole work on a part is one call ``work(part)`` (nothing to overlap)."""

    work: Callable[[int], R]

    def read(self, part: int) -> None:
        return None

    def compute(self, part: int, inputs: None) -> R:
        return self.work(part)

    def write(self, part: int, outputs: R) -> R:
        return outputs


def run_parts(
    parts: Sequence[int],
    job: PartJob[Any, Any, R] | Callable[[int], R],
    *,
    processes: int = 1,
    pipeline: bool = True,
    desc: str = "parts",
    progress: bool = True,
) -> dict[int, R]:
    """Run ``job`` on each part; return each part's ``write`` result.

    ``job`` may be a plain function of the part (a :class:`CallJob`); it must be picklable
    when ``processes > 1``. ``desc`` names the progress bar, counted in parts.
    """
    parts = list(parts)
    work: PartJob[Any, Any, R] = job if hasattr(job, "compute") else CallJob(job)  # type: ignore[arg-type]
    with tqdm(total=len(parts), desc=desc, unit="part",
              disable=not progress or not parts) as bar:
        n = max(1, min(processes, len(parts)))
        if n == 1:
            return _run_share(work, parts, pipeline, lambda part: bar.update(), desc)
        return _run_pool(work, [parts[i::n] for i in range(n)], pipeline, bar, desc)


def _run_share(job: PartJob[Any, Any, R], parts: Sequence[int], pipeline: bool,
               done: Callable[[int], object], name: str) -> dict[int, R]:
    """This process's parts in order; ``done(part)`` once each is written."""
    results: dict[int, R] = {}
    if not pipeline:
        for part in parts:
            results[part] = job.write(part, job.compute(part, job.read(part)))
            done(part)
        return results
    with ThreadPoolExecutor(2, thread_name_prefix=f"{name}-io") as io:
        reading = io.submit(job.read, parts[0]) if parts else None
        writing: Future[R] | None = None
        for i, part in enumerate(parts):
            assert reading is not None
            inputs = reading.result()
            if i + 1 < len(parts):
                reading = io.submit(job.read, parts[i + 1])
            outputs = job.compute(part, inputs)
            del inputs
            if writing is not None:
                results[parts[i - 1]] = writing.result()
                done(parts[i - 1])
            writing = io.submit(job.write, part, outputs)
            del outputs
        if writing is not None:
            results[parts[-1]] = writing.result()
            done(parts[-1])
    return results


# ---------------------------------------------------------------------- local processes

_finished: Any = None  # in a pool process: the queue its finished parts are announced on


def _announce_to(finished: Any) -> None:
    global _finished
    _finished = finished


def _run_in_pool(job: PartJob[Any, Any, R], parts: Sequence[int], pipeline: bool,
                 name: str) -> dict[int, R]:
    return _run_share(job, parts, pipeline, _finished.put, name)


def _run_pool(job: PartJob[Any, Any, R], groups: list[list[int]], pipeline: bool,
              bar: tqdm, name: str) -> dict[int, R]:
    """One process per group; the bar advances as the processes announce finished parts."""
    ctx = mp.get_context("spawn")  # safe with torch and threads in the parent
    finished = ctx.Queue()
    results: dict[int, R] = {}
    with ProcessPoolExecutor(len(groups), mp_context=ctx, initializer=_announce_to,
                             initargs=(finished,)) as pool:
        futures = [pool.submit(_run_in_pool, job, group, pipeline, name) for group in groups]
        while not all(f.done() for f in futures):
            try:
                finished.get(timeout=0.1)
                bar.update()
            except queue.Empty:
                pass
        for f in futures:
            results.update(f.result())
    bar.update(len(results) - bar.n)  # announcements still in flight
    finished.close()
    return results
