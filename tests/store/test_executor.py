"""The part executor: every part read, computed and written once; the next read and the previous
write overlap the computation; local processes; errors; the same results every way."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from mtkd.store.executor import run_parts

PARTS = [0, 2, 3, 5, 6, 8, 9]


@dataclass
class Squares:
    """A picklable job: part → part², with a log of the steps it ran."""

    log: list[tuple[str, int]] = field(default_factory=list)

    def read(self, part: int) -> int:
        self.log.append(("read", part))
        return part

    def compute(self, part: int, inputs: int) -> int:
        self.log.append(("compute", part))
        return inputs * inputs

    def write(self, part: int, outputs: int) -> int:
        self.log.append(("write", part))
        return outputs + 1


def square(part: int) -> int:
    return part * part + 1


@pytest.mark.parametrize("pipeline", [True, False])
def test_every_part_is_read_computed_and_written_once_in_order(pipeline: bool) -> None:
    job = Squares()
    assert run_parts(PARTS, job, pipeline=pipeline, progress=False) == \
        {p: p * p + 1 for p in PARTS}
    for step in ("read", "compute", "write"):
        assert [p for s, p in job.log if s == step] == PARTS
    for part in PARTS:  # each part's steps in their order
        assert [s for s, p in job.log if p == part] == ["read", "compute", "write"]


def test_a_plain_function_is_a_job_and_no_parts_is_nothing() -> None:
    assert run_parts(PARTS, square, progress=False) == {p: p * p + 1 for p in PARTS}
    assert run_parts([], square, processes=4) == {}


@dataclass
class Overlapping(Squares):
    """Computing part i waits until part i+1's read and part i−1's write have started."""

    started: dict[tuple[str, int], threading.Event] = field(default_factory=dict)
    parts: list[int] = field(default_factory=list)

    def _event(self, step: str, part: int) -> threading.Event:
        return self.started.setdefault((step, part), threading.Event())

    def read(self, part: int) -> int:
        self._event("read", part).set()
        return super().read(part)

    def compute(self, part: int, inputs: int) -> int:
        i = self.parts.index(part)
        if i + 1 < len(self.parts):
            assert self._event("read", self.parts[i + 1]).wait(10), "next read not started"
        if i > 0:
            assert self._event("write", self.parts[i - 1]).wait(10), "last write not started"
        return super().compute(part, inputs)

    def write(self, part: int, outputs: int) -> int:
        self._event("write", part).set()
        return super().write(part, outputs)


def test_the_next_read_and_the_last_write_overlap_the_computation() -> None:
    job = Overlapping(parts=PARTS)
    assert run_parts(PARTS, job, progress=False) == {p: p * p + 1 for p in PARTS}


@dataclass
class FailingAt(Squares):
    bad: int = 5

    def compute(self, part: int, inputs: int) -> int:
        if part == self.bad:
            raise RuntimeError(f"part {part} failed")
        return super().compute(part, inputs)


@pytest.mark.parametrize("pipeline", [True, False])
def test_an_error_stops_the_run_after_the_parts_before_it_are_written(pipeline: bool) -> None:
    job = FailingAt()
    with pytest.raises(RuntimeError, match="part 5 failed"):
        run_parts(PARTS, job, pipeline=pipeline, progress=False)
    assert [p for s, p in job.log if s == "write"] == [0, 2, 3]


def test_local_processes_give_the_same_results_and_count_every_part(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_parts(PARTS, Squares(), processes=3, desc="squares") == \
        {p: p * p + 1 for p in PARTS}
    err = capsys.readouterr().err
    assert "squares: 100%" in err and f"{len(PARTS)}/{len(PARTS)}" in err
    assert run_parts(PARTS, square, processes=2, pipeline=False, progress=False) == \
        {p: p * p + 1 for p in PARTS}
    with pytest.raises(RuntimeError, match="part 5 failed"):
        run_parts(PARTS, FailingAt(), processes=2, progress=False)
