"""The divergences of the KD losses, on collapsed categories, and the loss kinds built on them.

A loss ``kind`` is ``"<divergence>_<collapse>"``:

* divergence ``fkl`` = KL(q‖s), ``rkl`` = KL(s‖q), ``jsd`` = generalised Jensen–Shannon
  β·KL(q‖M) + (1−β)·KL(s‖M), M = β·q + (1−β)·s (β∈(0,1); β=0.5 is the symmetric JSD);
* collapse ``tail`` compares distributions over the support ids plus one tail category;
  ``renorm`` renormalises both sides over the support (the biased baseline: no tail).

Each divergence maps ``(log_s [n,C], q [n,C], mask [n,C], beta, eps)`` to ``(loss [n], b [n,C])``
with b = ∂loss/∂log_s (zero where mask is False): b = −q for ``fkl``,
b = ŝ·(log ŝ − log q + 1) for ``rkl`` and b = (1−β)·ŝ·(log ŝ − log M) for ``jsd``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from mtkd.distill.train.config import KINDS

DivergenceFn = Callable[[Tensor, Tensor, Tensor, float, float], tuple[Tensor, Tensor]]


def _fkl(log_s: Tensor, q: Tensor, mask: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """KL(q‖s); b = −q."""
    pos = mask & (q > 0)
    log_q = torch.log(torch.where(pos, q, 1.0))
    loss = torch.where(pos, q * (log_q - log_s), 0.0).sum(-1)
    return loss, torch.where(mask, -q, 0.0)


def _rkl(log_s: Tensor, q: Tensor, mask: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """KL(s‖q) with q floored at eps inside the log; b = s·(log s − log q + 1)."""
    s = torch.exp(log_s)
    pos = mask & (s > 0)
    ratio = torch.where(pos, log_s - torch.log(q.clamp_min(eps)), 0.0)
    loss = (torch.where(pos, s, 0.0) * ratio).sum(-1)
    return loss, torch.where(pos, s * (ratio + 1.0), 0.0)


def _jsd(log_s: Tensor, q: Tensor, mask: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """β·KL(q‖M) + (1−β)·KL(s‖M), M = β·q + (1−β)·s; b = (1−β)·s·(log s − log M)."""
    s = torch.exp(log_s)
    log_q = torch.log(q.clamp_min(0.0))
    log_m = torch.logaddexp(math.log(beta) + log_q, math.log1p(-beta) + log_s)
    term_q = torch.where(mask & (q > 0), q * (log_q - log_m), 0.0)
    term_s = torch.where(mask & (s > 0), s * (log_s - log_m), 0.0)
    loss = beta * term_q.sum(-1) + (1.0 - beta) * term_s.sum(-1)
    return loss, (1.0 - beta) * term_s


_DIVERGENCE_FNS: dict[str, DivergenceFn] = {"fkl": _fkl, "rkl": _rkl, "jsd": _jsd}


def split_kind(kind: str) -> tuple[str, str]:
    """kind → (divergence name, collapse name); refuses unknown kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    div, collapse = kind.split("_")
    return div, collapse


def parse_kind(kind: str) -> tuple[DivergenceFn, bool]:
    """kind → (divergence function, renormalise?)."""
    div, collapse = split_kind(kind)
    return _DIVERGENCE_FNS[div], collapse == "renorm"
