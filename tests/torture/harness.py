"""The torture suite's machinery: real ``python -m mtkd`` processes in their own process groups,
seeded SIGKILLs at chosen instants, checks of what a kill left behind, and the session tally.

Kill instants (``KillPlan``), drawn from a seeded RNG:

* ``start``   — a random delay after launch (imports, engine start-up, reading the corpus);
* ``commit``  — the moment a temp part (``parts/.tmp-*``) or temp checkpoint appears, i.e. in
  the middle of writing or committing it;
* ``progress`` — a random delay after one more part or checkpoint has been committed.

Nothing here asserts on timings: a process that finishes before its kill instant simply counts
as a completed run, and the test goes on until it has done its kills.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtkd.store import (
    IncompleteStoreError,
    StoreError,
    open_store,
    q64_grid,
    topk_codec,
    verify_store,
)

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("MTKD_TORTURE_SEED", "20261123"))
#: CI kills per stage (24 in all); ``MTKD_TORTURE_KILLS=N`` raises the total for a soak run.
SHARES = {"tokenize": 8, "harvest": 5, "harvest-q64r": 2, "aggregate": 6, "train": 3}
#: vLLM kills (engine start-up is 20-60 s here): off in CI unless asked for.
VLLM_KILLS = int(os.environ.get("MTKD_TORTURE_VLLM_KILLS", "0"))


def kills_for(stage: str) -> int:
    """This stage's share of ``MTKD_TORTURE_KILLS`` (never below its CI share)."""
    total = int(os.environ.get("MTKD_TORTURE_KILLS", "0") or 0)
    base = SHARES[stage]
    return max(base, round(total * base / sum(SHARES.values())))


def rng_for(name: str) -> random.Random:
    """A seeded RNG per test, so each test's kill instants do not depend on the others."""
    return random.Random(f"{SEED}-{name}")


# --------------------------------------------------------------------------------- the tally


@dataclass
class Tally:
    """What the whole session did and found; printed as one line at the end."""

    kills: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)  # kill instants by kind
    runs: int = 0  # processes started
    lost: int = 0  # sequences of the uninterrupted run missing from the killed-and-rerun one
    duplicated: int = 0  # sequences present twice, or not present in the uninterrupted run
    corrupt_accepted: int = 0  # damaged or incomplete output that a reader or verify accepted
    corruptions_checked: int = 0
    used: bool = False

    def line(self) -> str:
        stages = " ".join(f"{k}={v}" for k, v in sorted(self.kills.items()))
        modes = " ".join(f"{k}={v}" for k, v in sorted(self.modes.items()))
        return (f"kills={sum(self.kills.values())} lost={self.lost} "
                f"duplicated={self.duplicated} corrupt_accepted={self.corrupt_accepted} "
                f"(by stage: {stages}; at: {modes}; runs={self.runs}; "
                f"corruptions_checked={self.corruptions_checked}; seed={SEED})")

    def killed(self, stage: str) -> None:
        self.kills[stage] += 1
        self.used = True


TALLY = Tally()


def count_sequences(expected: np.ndarray, got: np.ndarray) -> tuple[int, int]:
    """(lost, duplicated) of ``got`` against ``expected`` sequence ids; added to the tally."""
    want, have = set(expected.tolist()), got.tolist()
    lost = len(want - set(have))
    duplicated = (len(have) - len(set(have))) + len(set(have) - want)
    TALLY.lost += lost
    TALLY.duplicated += duplicated
    TALLY.used = True
    return lost, duplicated


# ------------------------------------------------------------------------------ processes

#: Process groups started and not yet known to be gone (killed on teardown).
LIVE: set[int] = set()


def child_env(**extra: str) -> dict[str, str]:
    """One thread, no network, no progress bars: runs are deterministic and logs small."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of the group and wait until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        if not group_members(pgid) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    LIVE.discard(pgid)


def kill_all_live() -> None:
    for pgid in list(LIVE):
        kill_group(pgid)


class Cli:
    """``python -m mtkd ARGS`` in a new session (its own process group), output to a log."""

    def __init__(self, args: Sequence[Any], log: Path, *, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.args = [str(a) for a in args]
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(f"\n$ mtkd {' '.join(self.args)}\n".encode())
            self.proc = subprocess.Popen([sys.executable, "-m", "mtkd", *self.args], stdout=f,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env or child_env(), cwd=REPO,
                                         start_new_session=True, preexec_fn=preexec_fn)
        self.started = time.monotonic()
        LIVE.add(self.proc.pid)
        TALLY.runs += 1

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> bool:
        """SIGKILL the whole group; True if the command was still running when killed."""
        running = self.alive
        kill_group(self.proc.pid)
        self.proc.wait()
        return running and self.proc.returncode == -signal.SIGKILL

    def wait(self, timeout: float = 300.0) -> int:
        """Wait for the command; its leftover children (if any) are killed after it."""
        try:
            rc = self.proc.wait(timeout)
        finally:
            kill_group(self.proc.pid, timeout=10)
        return rc

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return self.output()[-n:]


def run_cli(args: Sequence[Any], log: Path, timeout: float = 300.0, **kw: Any) -> Cli:
    cli = Cli(args, log, **kw)
    cli.wait(timeout)
    return cli


# ------------------------------------------------------------------------------ kill instants


Progress = tuple[int, frozenset[str]]


def store_progress(store: Path) -> Progress:
    """(committed parts, names of temp parts) of a store being written."""
    committed, temps = 0, set()
    try:
        for entry in os.scandir(store / "parts"):
            if entry.name.startswith(".tmp-"):
                temps.add(entry.name)
            elif (Path(entry.path) / "COMMIT.json").exists():
                committed += 1
    except FileNotFoundError:
        pass
    return committed, frozenset(temps)


def checkpoint_progress(out: Path) -> Progress:
    """(newest committed checkpoint step, names of temp checkpoints) of a training run."""
    newest, temps = 0, set()
    try:
        for entry in os.scandir(out / "checkpoints"):
            if entry.name.startswith(".tmp-"):
                temps.add(entry.name)
            elif entry.name.startswith("step-") and (Path(entry.path) / "state.pt").exists():
                newest = max(newest, int(entry.name.split("-")[1]))
    except FileNotFoundError:
        pass
    return newest, frozenset(temps)


@dataclass(frozen=True)
class KillPlan:
    mode: str  # start | commit | progress
    delay: float  # seconds (start: after launch; progress: after the progress seen)

    @classmethod
    def draw(cls, rng: random.Random, start_max: float, progress_max: float = 0.4,
             weights: tuple[float, float, float] = (0.2, 0.35, 0.45)) -> KillPlan:
        mode = rng.choices(("start", "commit", "progress"), weights)[0]
        delay = rng.uniform(0, start_max if mode == "start" else progress_max)
        return cls(mode, delay)


def kill_at(cli: Cli, plan: KillPlan, progress: Callable[[], Progress],
            timeout: float = 120.0) -> bool:
    """Wait for the plan's instant and SIGKILL the group there; False if the command ended
    first (then it is reaped, not killed). Temp entries left by earlier kills do not count:
    ``commit`` waits for one this run creates."""
    deadline = time.monotonic() + timeout
    base_done, stale = progress()
    if plan.mode == "start":
        end = cli.started + plan.delay
        while cli.alive and time.monotonic() < end:
            time.sleep(0.002)
    else:
        while cli.alive and time.monotonic() < deadline:
            done, temps = progress()
            if plan.mode == "commit" and temps - stale:
                break
            if done > base_done:
                if plan.mode == "progress":
                    end = time.monotonic() + plan.delay
                    while cli.alive and time.monotonic() < end:
                        time.sleep(0.002)
                break
            time.sleep(0.002)
    if not cli.alive:
        cli.wait()
        return False
    done, temps = progress()
    killed = cli.kill()
    if killed:
        TALLY.modes[plan.mode] += 1
        with open(cli.log, "a") as f:
            delay = "" if plan.mode == "commit" else f" +{plan.delay:.3f}s"
            f.write(f"\n[torture] SIGKILL at {plan.mode}{delay}, "
                    f"{time.monotonic() - cli.started:.2f}s after start: {done} done, "
                    f"{len(temps - stale)} temp entries of this run\n")
    return killed


# ------------------------------------------------------------------------------ checks


def check_store_after_kill(store: Path) -> None:
    """What a killed writer leaves: committed parts sound, nothing else claiming to be; a
    store that is not complete never opens; a store that opens verifies clean."""
    if not (store / "store.json").exists():
        return
    complete = (store / "manifest.json").exists()
    problems = verify_store(store, full=True)
    benign = [p for p in problems
              if not complete and ("missing or uncommitted" in p
                                   or p.endswith("manifest.json: missing (store not complete)"))]
    bad = [p for p in problems if p not in benign]
    try:
        open_store(store, verify="full")
        accepted = True
    except IncompleteStoreError:
        accepted = False
        assert not complete, f"{store}: complete store refused as incomplete"
    except StoreError:
        accepted = False
    if accepted and problems:
        TALLY.corrupt_accepted += 1
    TALLY.used = True
    assert not bad, f"{store}: a kill left damage behind: {bad}"
    assert not accepted or not problems, f"{store}: opened with problems {problems}"


def leftovers(store: Path) -> list[str]:
    """Temp files or directories left in a store (there should be none once it is complete)."""
    return sorted(str(p.relative_to(store)) for p in store.rglob(".tmp-*"))


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime_ns) of every file and directory under ``root``."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def assert_arrays_equal(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype.kind == "f":
        np.testing.assert_array_equal(a, b, err_msg=what)  # NaN == NaN, -inf == -inf
    else:
        assert np.array_equal(a, b), what


def compare_stores(ref_dir: Path, got_dir: Path, *, atol: float = 0.0,
                   tie_tol: float | None = None) -> None:
    """``got`` holds the sequences of ``ref`` (none lost or duplicated, same order) with equal
    arrays: exactly, or within ``atol`` for float arrays (``tie_tol``: top-k ids may swap where
    neighbouring log-probs are within it, as between two engines). Top-k log-probs coded q64
    may land one grid step apart (a value near a step's midpoint): both tolerances widen by
    the coarse step, 1/16 nat."""
    ref, got = open_store(ref_dir, verify="full"), open_store(got_dir, verify="full")
    step = q64_grid.COARSE / q64_grid.FINE if topk_codec.coding(ref.attrs) else 0.0
    lost, duplicated = count_sequences(ref.seq_ids, got.seq_ids)
    assert (lost, duplicated) == (0, 0), f"{got_dir}: {lost} lost, {duplicated} duplicated"
    assert np.array_equal(ref.seq_ids, got.seq_ids), "sequence order differs"
    assert np.array_equal(ref.seq_lengths, got.seq_lengths), "sequence lengths differ"
    assert ref.array_names == got.array_names
    for p in range(ref.num_parts):
        a, b = ref.read_part(p), got.read_part(p)
        for name in ref.array_names:
            x, y = a[name], b[name]
            if atol and x.dtype.kind == "f":
                # values stored in float16 may round to neighbouring steps: one eps relative
                rtol = float(np.finfo(x.dtype).eps) if x.dtype.itemsize < 4 else 0.0
                np.testing.assert_allclose(
                    y.astype(np.float64), x.astype(np.float64), rtol=rtol,
                    atol=atol + (step if name == "topk_logprobs" else 0.0),
                    err_msg=f"part {p} {name}")
            elif tie_tol is not None and name in ("topk_ids", "target_rank"):
                _compare_ids_up_to_ties(a, b, name, tie_tol + step, p)
            else:
                assert_arrays_equal(x, y, f"part {p} {name}")
    if ref.read_meta() is not None:
        assert ref.read_meta().equals(got.read_meta()), "meta.parquet differs"


def _compare_ids_up_to_ties(a: Any, b: Any, name: str, tol: float, part: int) -> None:
    lp = a["topk_logprobs"].astype(np.float64)
    if name == "target_rank":
        # a rank moves by the entries tied with the target within tolerance, which may lie
        # outside the top-k (not stored): exact where the target is in the top-k clear of
        # ties, elsewhere equal but for a few rows
        k = lp.shape[1]
        near = np.abs(lp - a["target_logprob"][:, None].astype(np.float64)) <= tol
        clear = (a[name] <= k) & (near.sum(axis=1) <= 1) & (lp[:, -1] < a["target_logprob"]
                                                            - tol)
        assert np.array_equal(a[name][clear], b[name][clear]), f"part {part} {name}"
        moved = a[name] != b[name]  # elsewhere: rare moves by a tied neighbour or two
        assert moved.mean() <= 0.01 and np.abs(a[name] - b[name]).max(initial=0) <= 2, \
            f"part {part} {name}"
        return
    gap = np.full(lp.shape, np.inf)
    gap[:, 1:] = lp[:, :-1] - lp[:, 1:]
    gap[:, :-1] = np.minimum(gap[:, :-1], lp[:, :-1] - lp[:, 1:])
    clear = gap > tol
    assert np.array_equal(a[name][clear], b[name][clear]), f"part {part} {name}"


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
