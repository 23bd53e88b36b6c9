"""What a training step minimises: the loss of a batch, from the student's hidden states.

Objectives (``TrainConfig.objective``, resolved):

* ``ce`` — cross-entropy on the actual next tokens (teachers, the CE-only baseline); with a
  target store, KL to the fused targets is logged as a monitor;
* ``mix`` — L_mix = (1−α)·D(q, s) + α·CE against the fused targets q;
* ``multi`` — L_multi = (1−α)·Σ_k w_k·D(p_k, s) + α·CE against the per-teacher blocks.

With per-teacher blocks in the batch the other objective is computed too, as a monitor. The
loss is computed from the final hidden states (``model.base_model``) and the lm_head weight by
the chunked losses of :mod:`mtkd.distill.train.losses`: the ``[N, V]`` logits of a batch never
exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from mtkd.distill.train.config import TrainConfig
from mtkd.distill.train.device import CPU_CHUNK_ROWS
from mtkd.distill.train.loader import PackedBatch
from mtkd.distill.train.losses import LossOutput, chunked_cross_entropy, sparse_kd_loss
from mtkd.distill.train.targets import IGNORE_INDEX


@dataclass(frozen=True)
class LossSpec:
    """What to compute on a batch: objective, divergence kind and its parameters.

    Built from a run's options by :meth:`from_config` (training) or :meth:`held_out` (the
    fixed held-out measure); its only default is the chunk body's, ``auto`` (as
    ``TrainConfig.fused_loss``'s), for specs built by hand in tests and benches.
    """

    objective: str  # ce | mix | multi
    kind: str
    alpha: float
    temperature: float
    beta: float
    chunk_size: int
    suppress_ids: tuple[int, ...]
    suppress_weight: float
    fused: str = "auto"  # the losses' chunk body (mtkd.distill.train.losses.FusedMode)

    @classmethod
    def from_config(cls, cfg: TrainConfig, chunk_size: int | None = None) -> LossSpec:
        """The training objective of ``cfg``; ``chunk_size`` (resolved for the device, see
        :func:`~mtkd.distill.train.device.chunk_rows`) else ``cfg``'s, else the CPU's."""
        chunk = chunk_size or cfg.chunk_size or CPU_CHUNK_ROWS
        return cls(cfg.resolved_objective, cfg.loss, cfg.alpha, cfg.temperature, cfg.beta,
                   chunk, cfg.suppress_ids, cfg.suppress_weight, cfg.fused_loss)

    @classmethod
    def held_out(cls, has_targets: bool, chunk_size: int, fused: str = "auto") -> LossSpec:
        """What evaluation measures whatever the training objective: CE and, with targets,
        KL(q‖s) (``fkl_tail``, untempered, no unlikelihood term)."""
        return cls("mix" if has_targets else "ce", "fkl_tail", 0.0, 1.0, 0.5, chunk_size, (), 0.0,
                   fused)


def suppression_penalty(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                        labels: Tensor, ids: tuple[int, ...], chunk_size: int) -> Tensor:
    """Σ over labelled positions of −log(1 − Σ_{u∈ids} s_u): unlikelihood on a set of tokens.

    Used to train a *safety teacher* that gives chosen tokens low probability. It needs the
    softmax normaliser, so it forms [chunk, V] logits with autograd — meant for the small
    vocabularies of teachers trained in place, not for large students.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])[labels.reshape(-1) != IGNORE_INDEX]
    index = torch.tensor(ids, device=hidden.device)
    total = rows.new_zeros((), dtype=torch.float32)
    for chunk in rows.split(chunk_size):
        logits = (chunk @ weight.T + (0 if bias is None else bias)).float()
        lse = logits.logsumexp(-1)
        log_unsafe = logits.index_select(-1, index).logsumexp(-1) - lse
        total = total - torch.log1p(-log_unsafe.exp().clamp(max=1 - 1e-6)).sum()
    return total


def batch_loss(model: PreTrainedModel, batch: PackedBatch, spec: LossSpec) -> LossOutput:
    """Sum-reduced loss of ``spec`` on ``batch``, from hidden states and the lm_head weight.

    ``kd`` is the trained divergence (for ``ce`` with targets: KL to the fused targets, no
    gradient); ``monitor`` the other objective when the batch carries the blocks it needs.
    """
    hidden = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if spec.objective == "ce" and batch.targets is None:
        out = chunked_cross_entropy(hidden, weight, batch.labels, chunk_size=spec.chunk_size,
                                    bias=bias, reduction="sum", fused=spec.fused)
        if spec.suppress_ids and spec.suppress_weight > 0:
            penalty = suppression_penalty(hidden, weight, bias, batch.labels, spec.suppress_ids,
                                          spec.chunk_size)
            out = dataclasses.replace(out, loss=out.loss + spec.suppress_weight * penalty)
        return out
    if spec.objective == "multi":
        if batch.teachers is None:
            raise ValueError("objective 'multi' needs a target store with per-teacher blocks")
        train, train_w, mon, mon_w = batch.teachers, batch.teacher_weights, batch.targets, None
    else:
        train, train_w, mon, mon_w = batch.targets, None, batch.teachers, batch.teacher_weights
    assert train is not None
    return sparse_kd_loss(
        hidden, weight, train, batch.labels, kind=spec.kind,
        alpha=1.0 if spec.objective == "ce" else spec.alpha, temperature=spec.temperature,
        beta=spec.beta, teacher_weights=train_w, chunk_size=spec.chunk_size, bias=bias,
        reduction="sum", monitor=mon, monitor_weights=mon_w, fused=spec.fused,
    )


class StudentLoss(nn.Module):
    """The student and its objective as one module: DDP sees the lm_head used in forward, and
    as FSDP's root it holds the lm_head weight unsharded while the chunked loss reads it."""

    def __init__(self, model: PreTrainedModel, spec: LossSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, batch: PackedBatch, spec: LossSpec | None = None) -> LossOutput:
        """The loss of ``spec`` (default: the training objective) on ``batch``."""
        return batch_loss(self.model, batch, spec or self.spec)

