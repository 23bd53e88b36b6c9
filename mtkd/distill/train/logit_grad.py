"""A chunk's gradient w.r.t. its logits, assembled from dense and sparse terms.

The chunked losses (:mod:`mtkd.distill.train.chunked`) express every loss term's logit
gradient as a multiple of the shared softmax numerators e = exp(z − shift) plus sparse
corrections on support ids; :func:`write_grad` adds them up with one dense pass. The tail
blocks' supports are zeroed in e before that pass and their entries written sparsely, so a
large off-support coefficient (a tiny student tail) never cancels against the support's own
gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class GradTerms:
    """A gradient w.r.t. one chunk's logits: e·dense[:, None] (e = exp(z − shift) of the
    shared softmax) plus scatter-adds of ``sparse`` (idx [n,m], values [n,m])."""

    dense: Tensor | None = None
    sparse: list[tuple[Tensor, Tensor]] = field(default_factory=list)


@dataclass
class TailGrad:
    """A tail-collapse block's gradient w.r.t. one chunk's (tempered) logits.

    ∂/∂z_j = e_j·(per_off·[j ∉ S] + shared) + b_j·[j ∈ S] (+ ``rows``: row-wise adds for rows
    whose tail was computed exactly; their ``per_off`` is 0).
    """

    idx: Tensor  # [n,m] support ids (padding points at a real id of the row)
    valid: Tensor  # [n,m]
    b: Tensor  # [n,m] ∂D/∂log ŝ on the support (0 on padding)
    per_off: Tensor  # [n]
    shared: Tensor  # [n] −B/Σe
    rows: tuple[Tensor, Tensor] | None = None  # (row ids, values [r,V])


def write_grad(
    g: Tensor | None,
    e: Tensor,
    scratch: Tensor,
    terms: list[GradTerms],
    tails: list[TailGrad],
    written: bool,
) -> bool:
    """Add gradient terms to g (overwriting it when nothing is written yet); returns written.

    ``e`` and ``scratch`` are clobbered. The tail blocks' supports are zeroed in ``e`` before
    the dense pass and their entries written sparsely, so a large off-support coefficient
    (a tiny student tail) never cancels against the support's own gradient.
    """
    if g is None or not (terms or tails):
        return written
    dense = [t.dense for t in terms if t.dense is not None]
    dense += [t.per_off + t.shared for t in tails]
    if tails:
        union, e_union = _take_union(e, tails)
    if dense:
        coef = torch.stack(dense).sum(0)[:, None]
        if written:
            g.addcmul_(e, coef)
        else:
            torch.mul(e, coef, out=g)
    elif not written:
        g.zero_()
    if tails:
        on_union = _off_support_coef(scratch, union, tails)
        for t in terms:
            if t.dense is not None:
                on_union += t.dense[:, None]
        for tg in tails:
            on_union += tg.shared[:, None]
        values = e_union * on_union
        if written:
            values += g.gather(1, union)
        g.scatter_(1, union, values)  # duplicate ids carry identical values
    for t in terms:
        for idx, v in t.sparse:
            g.scatter_add_(1, idx, v)
    for tg in tails:
        g.scatter_add_(1, tg.idx, torch.where(tg.valid, tg.b, 0.0))
        if tg.rows is not None:
            g.index_add_(0, *tg.rows)
    return True


def _take_union(e: Tensor, tails: list[TailGrad]) -> tuple[Tensor, Tensor]:
    """(ids [n, K·m] of the union of the supports, e there), zeroing e on the union.

    Padding points at a real id of the union (rows with no support at all zero nothing).
    """
    idx = torch.cat([t.idx for t in tails], -1)
    valid = torch.cat([t.valid for t in tails], -1)
    first = idx.gather(1, valid.to(torch.uint8).argmax(-1, keepdim=True))
    idx = torch.where(valid, idx, first)
    e_union = e.gather(1, idx)
    e.scatter_(1, idx, torch.where(valid.any(-1, keepdim=True), 0.0, e_union))
    return idx, e_union


def _off_support_coef(scratch: Tensor, union: Tensor, tails: list[TailGrad]) -> Tensor:
    """[n, K·m]: Σ over the blocks whose support misses id j of their ``per_off``.

    Built by marking each support in ``scratch``, so no large coefficient is ever subtracted.
    """
    acc = torch.zeros(union.shape, dtype=scratch.dtype, device=scratch.device)
    for t in tails:
        per_off = t.per_off[:, None]
        scratch.scatter_(1, union, per_off.expand(union.shape))
        on = torch.where(t.valid.any(-1, keepdim=True), 0.0, per_off)
        scratch.scatter_(1, t.idx, on.expand(t.idx.shape))
        acc += scratch.gather(1, union)
    return acc
