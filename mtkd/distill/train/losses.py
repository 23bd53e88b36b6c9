"""Chunked sparse knowledge-distillation losses (torch): the public entry points.

The student is given as final hidden states and the lm_head weight, never as logits; the
chunked pass (:mod:`mtkd.distill.train.chunked`) forms the logits a chunk of rows at a time
and their gradients in closed form, so the [N,V] logits of a batch never exist.

Targets are sparse (see :class:`~mtkd.distill.train.targets.SparseTargets`): per row a support
of distinct ids, their probabilities and the lumped tail mass. A loss ``kind`` is
``"<divergence>_<collapse>"`` (:data:`~mtkd.distill.train.divergences.KINDS`).

Several teacher blocks (``targets`` a sequence, ``teacher_weights [N,K]``) give
L_multi = Σ_k w_k·D(p_k, s) in the same chunk pass; one block of fused targets gives L_mix.

Loss = (1−α)·KD + α·CE, where CE is the cross-entropy of the *untempered* logits on ``labels``
(−100 = ignore). A separate CE weight λ (KD + λ·CE) is the same as α = λ/(1+λ) times a global
factor (1+λ). The KD term is not multiplied by τ². Means are over the rows that count: KD rows
have a label (when labels are given) and at least one support id in some teacher block; CE rows
have a label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mtkd.distill.train.chunked import Block, ChunkedLossFn, Plan, Sums, matmul_dtypes, run_chunks
from mtkd.distill.train.config import FUSED_MODES
from mtkd.distill.train.divergences import parse_kind
from mtkd.distill.train.targets import IGNORE_INDEX, SparseTargets

Reduction = Literal["mean", "sum"]
#: the chunk body: ``off`` the reference (the CPU's), ``compiled`` the fused functional body
#: through ``torch.compile`` (a GPU's), ``eager`` that body uncompiled (tests); ``auto``:
#: compiled on CUDA, the reference elsewhere
FusedMode = Literal["auto", "off", "eager", "compiled"]


@dataclass
class LossOutput:
    """Result of a loss call. Only ``loss`` is differentiable; the rest are detached stats.

    ``kd``: Σ_k w_k·D_k reduced over KD rows; ``ce``: cross-entropy reduced over CE rows
    (None without labels); ``kd_per_teacher [K]``: each block's unweighted reduced divergence;
    ``student_tail_mass``: reduced collapsed student tail of the first block (tail kinds);
    ``monitor``: the same objective against ``monitor`` targets (no gradient), if given.
    """

    loss: Tensor
    kd: Tensor
    ce: Tensor | None
    kd_per_teacher: Tensor
    student_tail_mass: Tensor | None
    monitor: Tensor | None
    n_kd_rows: Tensor
    n_ce_rows: Tensor


def _as_blocks(
    targets: SparseTargets | Sequence[SparseTargets],
    weights: Tensor | None,
    n_rows: int,
    train: bool,
) -> list[Block]:
    """Flatten targets and per-row weights [..., K] into blocks (K>1 default: uniform 1/K)."""
    tlist = [targets] if isinstance(targets, SparseTargets) else list(targets)
    if weights is not None:
        weights = weights.reshape(n_rows, -1)
        if weights.shape[1] != len(tlist):
            raise ValueError(
                f"teacher weights have {weights.shape[1]} columns, targets have {len(tlist)} blocks"
            )
    blocks = []
    for k, t in enumerate(tlist):
        flat = t.flatten()
        if flat.ids.shape[0] != n_rows:
            raise ValueError(f"targets have {flat.ids.shape[0]} rows, hidden has {n_rows}")
        if weights is not None:
            w: Tensor | None = weights[:, k]
        else:
            w = (
                None
                if len(tlist) == 1
                else torch.full((n_rows,), 1.0 / len(tlist), device=flat.ids.device)
            )
        blocks.append(Block(flat.ids, flat.probs, flat.tail_mass, w, train))
    return blocks


def row_weights(valid: Tensor, reduction: Reduction, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(per-row reduction weight, row count) for a validity mask."""
    count = valid.sum()
    if reduction == "mean":
        return valid.to(dtype) / count.clamp_min(1).to(dtype), count
    if reduction == "sum":
        return valid.to(dtype), count
    raise ValueError(f"unknown reduction {reduction!r}")


def _chunked_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    blocks: list[Block],
    labels: Tensor | None,
    *,
    kind: str,
    alpha: float,
    temperature: float,
    beta: float,
    chunk_size: int,
    reduction: Reduction,
    rkl_eps: float,
    fused: FusedMode,
) -> LossOutput:
    """Shared front end of every public loss: validity masks, reduction weights, autograd."""
    hdim = hidden.shape[-1]
    h2 = hidden.reshape(-1, hdim)
    n_rows = h2.shape[0]
    divergence, renorm = parse_kind(kind)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must lie in [0, 1]")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if not 0.0 < beta < 1.0:
        raise ValueError("beta must lie in (0, 1)")
    if chunk_size < 1:
        raise ValueError("chunk_size must be ≥ 1")
    if alpha > 0 and labels is None:
        raise ValueError("alpha > 0 needs labels")
    if fused not in FUSED_MODES:
        raise ValueError(f"fused must be one of {FUSED_MODES}, got {fused!r}")
    _, cdt = matmul_dtypes(h2, weight)
    dev = h2.device
    lab = labels.reshape(-1).long() if labels is not None else None
    if lab is not None and lab.shape[0] != n_rows:
        raise ValueError(f"labels have {lab.shape[0]} rows, hidden has {n_rows}")
    label_ok = (
        lab != IGNORE_INDEX if lab is not None else torch.ones(n_rows, dtype=torch.bool, device=dev)
    )
    has_support = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    for blk in blocks:
        if blk.train:
            has_support |= (blk.ids >= 0).any(-1)
    kd_rw, n_kd = row_weights(label_ok & has_support, reduction, cdt)
    ce_rw, n_ce = (
        row_weights(label_ok, reduction, cdt)
        if lab is not None
        else (None, torch.zeros((), dtype=torch.long, device=dev))
    )
    if fused == "auto":  # the compiled fused body where memory traffic is the cost
        fused = "compiled" if dev.type == "cuda" else "off"
    plan = Plan(blocks, divergence, renorm, lab, kd_rw, ce_rw, alpha, temperature, beta, rkl_eps,
                chunk_size, fused)
    need = (h2.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and any(need):
        holder: dict[str, Sums] = {}
        loss = ChunkedLossFn.apply(h2, weight, bias, plan, holder, need)
        sums = holder["sums"]
    else:
        loss, sums, _, _, _ = run_chunks(h2, weight, bias, plan, (False, False, False))
    has_train = any(b.train for b in blocks)
    has_monitor = any(not b.train for b in blocks)
    return LossOutput(
        loss=loss,
        kd=sums.kd.detach(),
        ce=sums.ce.detach() if lab is not None else None,
        kd_per_teacher=sums.per_block[: sum(b.train for b in blocks)].detach(),
        student_tail_mass=sums.tail.detach() if has_train and not renorm else None,
        monitor=sums.monitor.detach() if has_monitor else None,
        n_kd_rows=n_kd,
        n_ce_rows=n_ce,
    )


def sparse_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: SparseTargets | Sequence[SparseTargets],
    labels: Tensor | None = None,
    *,
    kind: str = "fkl_tail",
    alpha: float = 0.0,
    temperature: float = 1.0,
    beta: float = 0.5,
    teacher_weights: Tensor | None = None,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    reduction: Reduction = "mean",
    rkl_eps: float = 1e-8,
    monitor: SparseTargets | Sequence[SparseTargets] | None = None,
    monitor_weights: Tensor | None = None,
    validate: bool = False,
    fused: FusedMode = "auto",
) -> LossOutput:
    """Chunked sparse KD loss (1−α)·KD + α·CE from hidden states and the lm_head weight.

    ``hidden [..., H]``, ``weight [V, H]``; ``targets`` one :class:`SparseTargets` (L_mix) or
    a sequence of K blocks with ``teacher_weights [..., K]`` (L_multi = Σ_k w_k·D(p_k, s);
    default weights 1/K); ``labels [...]`` the actual next tokens (−100 = ignore). ``kind``
    is one of :data:`KINDS`; ``temperature`` divides the student logits of the KD term;
    ``beta`` is the JSD mixing weight; ``rkl_eps`` floors target probabilities inside log q
    for reverse KL. ``monitor`` (+ ``monitor_weights``) evaluates the same objective against
    other targets in the same pass without gradient (e.g. L_multi while training on L_mix).
    Peak extra memory is O(chunk_size·V), independent of N. ``fused`` picks the chunk body
    (:data:`FusedMode`).
    """
    n_rows = hidden.reshape(-1, hidden.shape[-1]).shape[0]
    blocks = _as_blocks(targets, teacher_weights, n_rows, train=True)
    if monitor is not None:
        blocks += _as_blocks(monitor, monitor_weights, n_rows, train=False)
    if validate:
        for blk in blocks:
            SparseTargets(blk.ids, blk.probs, blk.tail).validate(weight.shape[0])
    return _chunked_loss(
        hidden,
        weight,
        bias,
        blocks,
        labels,
        kind=kind,
        alpha=alpha,
        temperature=temperature,
        beta=beta,
        chunk_size=chunk_size,
        reduction=reduction,
        rkl_eps=rkl_eps,
        fused=fused,
    )


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    reduction: Reduction = "mean",
    fused: FusedMode = "auto",
) -> LossOutput:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` on ``labels`` with the KD loss's memory
    behaviour (same driver), so a CE-only baseline step and a KD step cost the same."""
    return _chunked_loss(
        hidden,
        weight,
        bias,
        [],
        labels,
        kind="fkl_tail",
        alpha=1.0,
        temperature=1.0,
        beta=0.5,
        chunk_size=chunk_size,
        reduction=reduction,
        rkl_eps=1e-8,
        fused=fused,
    )
