"""Sparse target distributions: what the KD losses compare the student with.

Per row a support of distinct token ids, their probabilities and the lumped tail mass (the
target store's layout); labels use :data:`IGNORE_INDEX` for positions without a next token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SparseTargets:
    """A sparse target distribution per row: support ids, their probabilities, tail mass.

    ``ids [..., m]`` (integer, padding −1; ids of a row must be distinct), ``probs [..., m]``
    (padding 0) and ``tail_mass [...]`` with Σ probs + tail_mass = 1 per row.
    """

    ids: Tensor
    probs: Tensor
    tail_mass: Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.probs.shape:
            raise ValueError(f"ids {tuple(self.ids.shape)} != probs {tuple(self.probs.shape)}")
        if self.ids.shape[:-1] != self.tail_mass.shape:
            raise ValueError(
                f"tail_mass {tuple(self.tail_mass.shape)} does not match rows "
                f"{tuple(self.ids.shape[:-1])}"
            )

    @classmethod
    def from_logprobs(
        cls, ids: Tensor, logprobs: Tensor, tail_logmass: Tensor | None = None
    ) -> SparseTargets:
        """Build from log-probs (a teacher store's rows); tail defaults to 1 − Σ probs."""
        valid = ids >= 0
        probs = torch.where(valid, logprobs.exp(), torch.zeros_like(logprobs))
        tail = (1.0 - probs.sum(-1)).clamp_min(0.0) if tail_logmass is None else tail_logmass.exp()
        return cls(ids, probs, tail)

    @property
    def support_size(self) -> int:
        """m, the padded support width."""
        return int(self.ids.shape[-1])

    def flatten(self) -> SparseTargets:
        """Rows flattened to ``[N, m]`` with int64 ids (the layout the loss uses)."""
        m = self.support_size
        return SparseTargets(
            self.ids.reshape(-1, m).long(), self.probs.reshape(-1, m), self.tail_mass.reshape(-1)
        )

    def to(self, device: torch.device | str) -> SparseTargets:
        """Copy to a device."""
        return SparseTargets(self.ids.to(device), self.probs.to(device), self.tail_mass.to(device))

    def to_dense(self, vocab_size: int) -> tuple[Tensor, Tensor]:
        """Dense ``probs [N,V]`` (tail mass not placed) and ``support [N,V]`` bool mask."""
        flat = self.flatten()
        valid = flat.ids >= 0
        idx = flat.ids.clamp_min(0)
        dense = torch.zeros(idx.shape[0], vocab_size, dtype=flat.probs.dtype, device=idx.device)
        dense.scatter_add_(1, idx, torch.where(valid, flat.probs, torch.zeros_like(flat.probs)))
        support = torch.zeros(idx.shape[0], vocab_size, dtype=torch.bool, device=idx.device)
        support.scatter_(1, torch.where(valid, idx, idx.amax(-1, keepdim=True)), True)
        support &= valid.any(-1, keepdim=True)
        return dense, support

    def validate(self, vocab_size: int, atol: float = 1e-3) -> None:
        """Raise ValueError on ids out of range, duplicate ids, negative mass or bad sums."""
        flat = self.flatten()
        valid = flat.ids >= 0
        if bool((flat.ids >= vocab_size).any()) or bool((flat.ids < -1).any()):
            raise ValueError("support ids out of range")
        ordered = torch.sort(
            torch.where(
                valid, flat.ids, -1 - torch.arange(flat.support_size, device=flat.ids.device)
            ),
            dim=-1,
        ).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("duplicate ids within a row")
        if bool((flat.probs < 0).any()) or bool((flat.tail_mass < -atol).any()):
            raise ValueError("negative probability")
        if bool((flat.probs[~valid] != 0).any()):
            raise ValueError("padding entries must have probability 0")
        total = flat.probs.sum(-1) + flat.tail_mass
        rows = valid.any(-1)
        if bool(((total - 1.0).abs()[rows] > atol).any()):
            raise ValueError("Σ probs + tail_mass differs from 1")
