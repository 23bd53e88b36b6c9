"""The chunk body of the sparse KD losses as one functional graph, for ``torch.compile``.

Same maths as the reference chunk body (:func:`mtkd.distill.train.chunked._chunk_losses`), laid
out for a compiler that fuses element-wise work into the reductions (a GPU's memory traffic is
what a chunk costs there): no float32 ``[chunk, V]`` buffers, no in-place passes, no
data-dependent branches. Per chunk of logits ``z`` (the matmul's dtype, bfloat16 under
autocast) it reads ``z`` in

* reductions: logsumexp of z (CE) and of z/τ (KD), and per tail block the logsumexp over the
  ids off its support (``lse_off``, through a boolean support mask: exact however small the
  student's tail, where the reference sums the off-support mass and recomputes tiny tails);
* one element-wise pass writing the logit gradient in the matmul dtype:
  g_j = α·c·softmax(z)_j + Σ_k [−B_k·s_j + [j ∉ S_k]·b_tail,k·exp(z_j/τ − lse_off,k)],
  the supports' entries (+ b_k,j) and the label's (− α·c) then summed in float32 on
  ``[chunk, K·m + 1]`` gathered columns and written once.

The support mask makes the off-support coefficient vanish on the support, so a large one
(tiny tail) never cancels against the support's gradient. Between the two passes the
divergences work on ``[chunk, m+1]`` categories, with the same functions as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtkd.distill.train.divergences import DivergenceFn

_NEG_INF = float("-inf")


def _logsumexp(x: Tensor) -> Tensor:
    """Row logsumexp (−inf for rows that are all −inf)."""
    return torch.logsumexp(x, dim=-1)


def fused_chunk(
    z: Tensor,
    ids: Sequence[Tensor],
    probs: Sequence[Tensor],
    tails: Sequence[Tensor],
    coefs: Sequence[Tensor | None],
    teacher_weights: Sequence[Tensor | None],
    kd_weight: Tensor,
    labels: Tensor | None,
    ce_weight: Tensor | None,
    *,
    divergence: DivergenceFn,
    renorm: bool,
    alpha: float,
    temperature: float,
    beta: float,
    eps: float,
    grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Losses and logit gradient of one chunk of logits ``z [n, V]``.

    Per block k: support ``ids[k] [n, m]`` (−1 padding), ``probs[k]``, ``tails[k] [n]``,
    ``coefs[k] [n]`` (the gradient factor: reduction weight · (1−α)/τ · teacher weight; None
    for a block without gradient, e.g. a monitor block) and ``teacher_weights[k] [n]`` (None:
    1). ``kd_weight [n]``: KD reduction weights (0: the row does not count); ``ce_weight [n]``:
    CE reduction weights (with ``labels``), None for no CE. Returns (per-block reduced
    divergences ``[K]``, the same weighted by the teacher weights, reduced CE, the first
    block's reduced student tail, gradient ``[n, V]`` in ``z``'s dtype or None).
    """
    n, vocab = z.shape
    cdt = torch.promote_types(z.dtype, torch.float32)  # the softmax dtype, ≥ float32
    z32 = z.to(cdt)
    zt = z32 / temperature if temperature != 1.0 else z32
    lse_t = _logsumexp(zt)
    finite_t = torch.where(torch.isfinite(lse_t), lse_t, 0.0)
    ce = z32.new_zeros(())
    dense = z32.new_zeros(n)  # Σ of −B_k: the coefficient of s_j = exp(z_j/τ − lse_t)
    ce_coef = None
    sparse: list[tuple[Tensor, Tensor]] = []
    off_terms: list[tuple[Tensor, Tensor, Tensor]] = []  # (mask, coefficient, lse_off)
    if labels is not None and ce_weight is not None:
        lse_z = lse_t if temperature == 1.0 else _logsumexp(z32)
        lab = labels.clamp_min(0)[:, None]
        rows = lse_z - z32.gather(1, lab).squeeze(1)
        ce = torch.where(ce_weight > 0, rows, 0.0).mul(ce_weight).sum()
        if grad and alpha > 0:
            ce_coef = alpha * ce_weight
            sparse.append((lab, -ce_coef[:, None]))
    block_losses, weighted, tail_mass = [], [], z32.new_zeros(())
    for k, (blk_ids, blk_probs, blk_tail, coef) in enumerate(
            zip(ids, probs, tails, coefs, strict=True)):
        block_grad = grad and coef is not None
        valid = blk_ids >= 0
        idx = torch.where(valid, blk_ids, blk_ids.amax(-1, keepdim=True).clamp_min(0))
        p = torch.where(valid, blk_probs.to(cdt), 0.0)
        z_s = zt.gather(1, idx).masked_fill(~valid, _NEG_INF)
        if renorm:
            lse_s = torch.logsumexp(z_s, -1, keepdim=True)
            log_s = z_s - torch.where(torch.isfinite(lse_s), lse_s, 0.0)
            q = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
            loss, b = divergence(log_s, q, valid, beta, eps)
            if block_grad:
                b = torch.where(coef[:, None] != 0, b * coef[:, None], 0.0)
                sparse.append((idx, torch.where(valid, b - log_s.exp() * b.sum(-1, True), 0.0)))
        else:
            # padding points at a real id of its row, so every write to an id is the same
            # value (True; False everywhere in a row without support)
            on_support = torch.zeros(n, vocab, dtype=torch.bool, device=z.device).scatter(
                1, idx, valid.any(-1, keepdim=True).expand_as(idx))
            lse_off = torch.logsumexp(zt.masked_fill(on_support, _NEG_INF), dim=-1)
            log_tail = lse_off - lse_t  # −inf when the support covers the vocabulary
            log_s = torch.cat([z_s - finite_t[:, None], log_tail[:, None]], dim=-1)
            q = torch.cat([p, blk_tail.to(cdt).clamp_min(0.0)[:, None]], dim=-1)
            mask = torch.cat([valid, torch.isfinite(log_tail)[:, None]], dim=-1)
            loss, b = divergence(log_s, q, mask, beta, eps)
            if k == 0:
                tail_mass = (log_tail.exp() * kd_weight).sum()
            if block_grad:
                b = torch.where(coef[:, None] != 0, b * coef[:, None], 0.0)
                dense = dense - b.sum(-1)
                finite_off = torch.where(torch.isfinite(lse_off), lse_off, 0.0)
                off_terms.append((on_support, b[:, -1], finite_off))
                sparse.append((idx, torch.where(valid, b[:, :-1], 0.0)))
        rows = torch.where(kd_weight > 0, loss, 0.0) * kd_weight
        block_losses.append(rows.sum())
        w = teacher_weights[k]
        weighted.append(rows.sum() if w is None else
                        torch.where(kd_weight > 0, rows * w.to(cdt), 0.0).sum())
    losses = torch.stack(block_losses) if block_losses else z32.new_zeros(0)
    weighted_losses = torch.stack(weighted) if weighted else z32.new_zeros(0)
    if not grad:
        return losses, weighted_losses, ce, tail_mass, None
    lse_z = None
    if ce_coef is not None:
        lse_z = lse_t if temperature == 1.0 else _logsumexp(z32)
        lse_z = torch.where(torch.isfinite(lse_z), lse_z, 0.0)
    terms = _DenseTerms(dense, finite_t, ce_coef, lse_z)
    g = terms.at(zt, z32, [(on, coef, off) for on, coef, off in off_terms]).to(z.dtype)
    if not sparse:
        return losses, weighted_losses, ce, tail_mass, g
    # support and label entries: the dense value there plus every sparse term, summed in
    # float32 and written once (one rounding to z's dtype, as the reference's)
    idx = torch.cat([i for i, _ in sparse], dim=1)
    values = torch.cat([v.to(cdt) for _, v in sparse], dim=1)
    idx, order = torch.sort(idx, dim=1)
    values = values.gather(1, order)
    first = torch.ones_like(idx, dtype=torch.bool)
    first[:, 1:] = idx[:, 1:] != idx[:, :-1]
    group = torch.cumsum(first, dim=1) - 1
    totals = torch.zeros_like(values).scatter_add(1, group, values).gather(1, group)
    at = terms.at(zt.gather(1, idx), z32.gather(1, idx),
                  [(on.gather(1, idx), coef, off) for on, coef, off in off_terms])
    return losses, weighted_losses, ce, tail_mass, g.scatter(1, idx, (at + totals).to(z.dtype))


class _DenseTerms:
    """The dense part of the logit gradient, evaluable on all columns or on gathered ones:
    ``dense``·exp(z/τ − lse_t) + Σ_k [off S_k]·c_k·exp(z/τ − lse_off,k) + α·c·exp(z − lse_z)."""

    def __init__(self, dense: Tensor, lse_t: Tensor, ce_coef: Tensor | None,
                 lse_z: Tensor | None) -> None:
        self.dense, self.lse_t, self.ce_coef, self.lse_z = dense, lse_t, ce_coef, lse_z

    def at(self, zt: Tensor, z32: Tensor,
           off_terms: Sequence[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        g = self.dense[:, None] * torch.exp(zt - self.lse_t[:, None])
        for on_support, coef, lse_off in off_terms:
            g = g + torch.where(on_support, 0.0, coef[:, None] * torch.exp(zt - lse_off[:, None]))
        if self.ce_coef is not None and self.lse_z is not None:
            g = g + self.ce_coef[:, None] * torch.exp(z32 - self.lse_z[:, None])
        return g
