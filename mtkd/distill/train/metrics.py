"""What a run measures and records: window sums of the losses, and metrics.jsonl.

``Meter`` keeps a logging window's sums on the device (no host sync per micro-batch) and turns
them into means over every rank; ``MetricsLog`` appends the records to ``metrics.jsonl`` (and
TensorBoard when it is importable), on rank 0 only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtkd.distill.train.distributed import Dist
from mtkd.distill.train.loader import PackedBatch
from mtkd.distill.train.losses import LossOutput
from mtkd.distill.train.targets import IGNORE_INDEX


class Meter:
    """Sums of a logging window, kept on the device (no host sync per micro-batch);
    ``reduce`` adds them over ranks and turns them into means."""

    KEYS = ("loss", "ce", "n_ce", "kd", "monitor", "n_kd", "gap", "tokens", "steps")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.tokens = self.steps = 0  # host-side counts

    def add(self, out: LossOutput, batch: PackedBatch, loss_scale: float) -> None:
        """Add one micro-batch (``batch`` on the loss's device)."""
        zero = out.kd.new_zeros(())
        gap = zero
        if batch.jensen_gap is not None and batch.targets is not None:
            kd_rows = (batch.labels != IGNORE_INDEX) & (batch.targets.ids >= 0).any(-1)
            gap = batch.jensen_gap[kd_rows].sum()
        values = [out.loss.detach() * loss_scale, zero if out.ce is None else out.ce,
                  out.n_ce_rows, out.kd, zero if out.monitor is None else out.monitor,
                  out.n_kd_rows, gap]
        self.sums[:len(values)] += torch.stack([v.to(self.sums) for v in values])
        self.tokens += batch.num_tokens

    def step(self) -> None:
        """Count one optimizer step."""
        self.steps += 1

    def _window(self) -> Tensor:
        """A copy of the sums with the host-side token and step counts in their slots."""
        sums = self.sums.clone()
        sums[-2:] = torch.tensor([self.tokens, self.steps], dtype=sums.dtype)
        return sums

    def reduce(self, d: Dist, objective: str, has_targets: bool,
               has_monitor: bool) -> dict[str, float]:
        """Means over the window (all ranks); resets the sums."""
        s = dict(zip(self.KEYS, d.all_sum(self._window()).tolist(), strict=True))  # steps: × world
        self.sums.zero_()
        self.tokens = self.steps = 0
        out = {"loss": s["loss"] / max(s["steps"] / d.world, 1),
               "ce": s["ce"] / max(s["n_ce"], 1), "tokens": s["tokens"]}
        if has_targets:
            trained, other = ("l_multi", "l_mix") if objective == "multi" else ("l_mix", "l_multi")
            out[trained] = s["kd"] / max(s["n_kd"], 1)
            if has_monitor:
                out[other] = s["monitor"] / max(s["n_kd"], 1)
                out["jensen_gap"] = s["gap"] / max(s["n_kd"], 1)
        return out

    def state(self, d: Dist) -> Tensor:
        """The window summed over ranks, as one CPU tensor (for checkpoints; every rank
        calls it)."""
        total = d.all_sum(self._window()).cpu()
        total[-1] = self.steps  # the same on every rank
        return total

    def load(self, state: Tensor, main: bool = True) -> None:
        """Resume a window: the main rank takes the sums, every rank the step count."""
        self.sums.copy_(state if main else torch.zeros_like(state))
        self.tokens, self.steps = int(state[-2]) if main else 0, int(state[-1])


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when importable); rank 0 only."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed by close())
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed at once, so a killed run keeps every line written)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        """Close the file (and the TensorBoard writer)."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def records_at(out: Path, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train and eval records that ``out/metrics.jsonl`` holds for ``step`` (empty when
    none): what a run whose last checkpoint is its end reports when rerun before it wrote
    its final metrics (killed in between)."""
    path = out / "metrics.jsonl"
    found: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("step") == step:
                found[record.get("split", "train")] = record
    return found.get("train", {}), found.get("eval", {})
