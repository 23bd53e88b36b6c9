"""Dense reference of the sparse KD losses: plain formulas over the whole vocabulary.

For the tests (it checks the chunked driver) and the naive-memory baseline of the benches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtkd.distill.train.divergences import split_kind
from mtkd.distill.train.losses import LossOutput, Reduction, row_weights
from mtkd.distill.train.targets import IGNORE_INDEX


def dense_kd_loss(
    logits: Tensor,
    target_probs: Tensor,
    labels: Tensor | None = None,
    *,
    kind: str = "fkl_tail",
    alpha: float = 0.0,
    temperature: float = 1.0,
    beta: float = 0.5,
    support: Tensor | None = None,
    teacher_weights: Tensor | None = None,
    reduction: Reduction = "mean",
    rkl_eps: float = 1e-8,
) -> LossOutput:
    """Dense reference of :func:`~mtkd.distill.train.losses.sparse_kd_loss` on full logits,
    differentiated by autograd.

    ``logits [N,V]``; ``target_probs [N,V]`` or ``[K,N,V]`` (full teacher distributions);
    ``support`` (same shape, bool) marks the ids kept individually, the rest of each side's
    mass is lumped into the tail category (tail kinds) or dropped (renorm kinds); None means
    the full vocabulary. Written independently of the chunked driver (plain formulas over V)
    so it can check it; it holds several [N,V] tensors for backward.
    """
    div, collapse = split_kind(kind)
    q_all = target_probs if target_probs.dim() == 3 else target_probs[None]
    n_teach, n_rows, _ = q_all.shape
    sup_all = (
        torch.ones_like(q_all, dtype=torch.bool)
        if support is None
        else (support if support.dim() == 3 else support[None])
    )
    w = (
        teacher_weights.reshape(n_rows, n_teach)
        if teacher_weights is not None
        else torch.full((n_rows, n_teach), 1.0 / n_teach, dtype=logits.dtype, device=logits.device)
    )
    cdt = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(cdt) / temperature, dim=-1)
    label_ok = (
        labels != IGNORE_INDEX
        if labels is not None
        else torch.ones(n_rows, dtype=torch.bool, device=logits.device)
    )
    valid = label_ok & sup_all.any(-1).any(0)
    kd_rw, n_kd = row_weights(valid, reduction, cdt)
    per_teacher = []
    kd_rows = torch.zeros(n_rows, dtype=cdt, device=logits.device)
    for k in range(n_teach):
        sup, q = sup_all[k], q_all[k].to(cdt)
        if collapse == "renorm":
            # rows without support keep the full softmax (they are ignored anyway): no NaNs
            sup_eff = sup | ~sup.any(-1, keepdim=True)
            s_cat = torch.softmax(logp.masked_fill(~sup_eff, float("-inf")), dim=-1)
            q_cat = torch.where(sup, q, 0.0)
            q_cat = q_cat / q_cat.sum(-1, keepdim=True).clamp_min(1e-30)
            mask = sup
        else:
            s = logp.exp()
            s_tail = torch.where(sup, 0.0, s).sum(-1, keepdim=True)
            q_tail = torch.where(sup, 0.0, q).sum(-1, keepdim=True)
            s_cat = torch.cat([torch.where(sup, s, 0.0), s_tail], -1)
            q_cat = torch.cat([torch.where(sup, q, 0.0), q_tail], -1)
            mask = torch.cat([sup, (~sup).any(-1, keepdim=True)], -1)
        rows = _dense_divergence(div, s_cat, q_cat, mask, beta, rkl_eps)
        rows = torch.where(valid, rows, 0.0)
        per_teacher.append((rows * kd_rw).sum())
        kd_rows = kd_rows + torch.where(valid, w[:, k].to(cdt), 0.0) * rows
    kd = (kd_rows * kd_rw).sum()
    ce = None
    n_ce = torch.zeros((), dtype=torch.long, device=logits.device)
    loss = (1.0 - alpha) * kd
    if labels is not None:
        ce_rw, n_ce = row_weights(label_ok, reduction, cdt)
        ce_rows = torch.nn.functional.cross_entropy(
            logits.to(cdt), labels.clamp_min(0), reduction="none"
        )
        ce = (torch.where(label_ok, ce_rows, 0.0) * ce_rw).sum()
        if alpha > 0:
            loss = loss + alpha * ce
    return LossOutput(
        loss,
        kd.detach(),
        ce.detach() if ce is not None else None,
        torch.stack(per_teacher).detach(),
        None,
        None,
        n_kd,
        n_ce,
    )


def _dense_divergence(
    div: str, s: Tensor, q: Tensor, mask: Tensor, beta: float, eps: float
) -> Tensor:
    """Row divergence between category distributions, plain formulas (0·log 0 = 0).

    Masked-out categories are replaced by 1 before any log so autograd never sees log 0.
    """
    s = torch.where(mask, s, 1.0)
    has_q = mask & (q > 0)
    log_q = torch.log(torch.where(has_q, q, 1.0))
    if div == "fkl":
        return torch.where(has_q, q * (log_q - torch.log(s)), 0.0).sum(-1)
    if div == "rkl":
        return torch.where(mask, s * (torch.log(s) - torch.log(q.clamp_min(eps))), 0.0).sum(-1)
    log_m = torch.log(beta * torch.where(mask, q, 0.0) + (1.0 - beta) * s)
    kl_qm = torch.where(has_q, q * (log_q - log_m), 0.0).sum(-1)
    kl_sm = torch.where(mask, s * (torch.log(s) - log_m), 0.0).sum(-1)
    return beta * kl_qm + (1.0 - beta) * kl_sm
