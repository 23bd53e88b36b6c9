"""Chunked sparse knowledge-distillation losses (torch).

The student is given as final hidden states ``hidden [N,H]`` and the lm_head ``weight [V,H]``
(optional ``bias [V]``), never as logits: the [N,V] logits of a batch are never held for
backward. One chunk driver walks the rows ``chunk_size`` at a time; per chunk it forms the
logits, the loss and the gradient w.r.t. the chunk's logits in closed form, and immediately
folds that gradient into ``grad_hidden = g @ W`` and ``grad_W += g^T @ hidden``
(the approach of Liger-Kernel's fused linear losses and of Cut Cross-Entropy). The forward pass
therefore already produces the gradients (only when a gradient is wanted: under no_grad it
just evaluates); backward only scales them by the incoming grad. Peak extra memory is three
``[chunk, V]`` softmax-dtype (≥ float32) buffers (plus transient bf16 copies of the logits and
of g under bf16 matmuls), ``grad_hidden`` and an fp32 ``grad_W`` accumulator (the latter only
when ``weight`` requires grad). Work per chunk besides the three matmuls: one softmax pass
over ``[chunk, V]`` (max, exp, sum) shared by CE and every tail block, one read pass per tail
block for its off-support mass, and one dense pass writing the gradient; everything else
touches only ``[chunk, m]`` (renorm kinds need no pass of their own). So a KD step costs about
what a CE step does (``bench/train_step.py``).

Targets are sparse (see :class:`SparseTargets`): per row a support of distinct ids, their
probabilities and the lumped tail mass. A loss ``kind`` is ``"<divergence>_<collapse>"``:

* divergence ``fkl`` = KL(q‖s), ``rkl`` = KL(s‖q), ``jsd`` = generalised Jensen–Shannon
  β·KL(q‖M) + (1−β)·KL(s‖M), M = β·q + (1−β)·s (β∈(0,1); β=0.5 is the symmetric JSD);
* collapse ``tail`` compares distributions over the support ids plus one tail category
  (student tail = Σ of the student's probabilities off the support, computed as
  logsumexp over the non-support logits − lse, so it is exact even when tiny);
  ``renorm`` renormalises both sides over the support (the biased baseline: no tail).

For any divergence D of the collapsed student ŝ (categories c), with b_c = ∂D/∂log ŝ_c and
B = Σ_c b_c, the gradient w.r.t. the tempered logits z = logits/τ is

* tail collapse:   ∂D/∂z_j = b_j − s_j·B (j in the support),
                   ∂D/∂z_j = b_tail·s_j/ŝ_tail − s_j·B (j off the support);
* renorm collapse: ∂D/∂z_j = b_j − s̃_j·B on the support, 0 elsewhere (s̃ = support softmax);

with b = −q for ``fkl``, b = ŝ·(log ŝ − log q + 1) for ``rkl`` and b = (1−β)·ŝ·(log ŝ − log M)
for ``jsd``. So every kind shares the driver and differs only in a small function on the
``[chunk, m+1]`` category tensors.

Several teacher blocks (``targets`` a sequence, ``teacher_weights [N,K]``) give
L_multi = Σ_k w_k·D(p_k, s) in the same chunk pass; one block of fused targets gives L_mix.

Loss = (1−α)·KD + α·CE, where CE is the cross-entropy of the *untempered* logits on ``labels``
(−100 = ignore). A separate CE weight λ (KD + λ·CE) is the same as α = λ/(1+λ) times a global
factor (1+λ). The KD term is not multiplied by τ². Means are over the rows that count: KD rows
have a label (when labels are given) and at least one support id in some teacher block; CE rows
have a label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
DIVERGENCES = ("fkl", "rkl", "jsd")
COLLAPSES = ("tail", "renorm")
KINDS = tuple(f"{d}_{c}" for d in DIVERGENCES for c in COLLAPSES)
Reduction = Literal["mean", "sum"]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Data classes


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


# --------------------------------------------------------------------------------------------
# Divergences on collapsed categories: (log_s [n,C], q [n,C], mask [n,C]) -> (loss [n], b [n,C])
# with b = ∂loss/∂log_s, zero where mask is False.

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


def _parse_kind(kind: str) -> tuple[DivergenceFn, bool]:
    """kind → (divergence function, renormalise?)."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    div, collapse = kind.split("_")
    return _DIVERGENCE_FNS[div], collapse == "renorm"


# --------------------------------------------------------------------------------------------
# The chunk driver


@dataclass
class _Block:
    """One teacher block in row-flattened layout."""

    ids: Tensor  # [N,m] int64
    probs: Tensor  # [N,m]
    tail: Tensor  # [N]
    weight: Tensor | None  # [N] per-row teacher weight; None means 1
    train: bool  # contributes to the loss / gradient (False: monitor only)


@dataclass
class _Plan:
    """Everything the driver needs besides the differentiable inputs."""

    blocks: list[_Block]
    divergence: DivergenceFn
    renorm: bool
    labels: Tensor | None  # [N]
    kd_rw: Tensor  # [N] reduction weight of each KD row (0 = ignored)
    ce_rw: Tensor | None  # [N] reduction weight of each CE row
    alpha: float
    temperature: float
    beta: float
    eps: float
    chunk_size: int


@dataclass
class _Sums:
    """Detached accumulators of the chunk pass."""

    kd: Tensor
    ce: Tensor
    per_block: Tensor
    tail: Tensor
    monitor: Tensor


def _mm_dtypes(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, softmax dtype): autocast's dtype when autocast is on; softmax ≥ float32."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        mm = torch.get_autocast_dtype(dev)
    else:
        mm = torch.promote_types(hidden.dtype, weight.dtype)
    return mm, torch.promote_types(mm, torch.float32)


@dataclass
class _Softmax:
    """exp(z − shift) of one chunk's logits (held in the scratch buffer) and its row stats."""

    e: Tensor  # [n,V]
    total: Tensor  # [n] Σ_j e_j
    lse: Tensor  # [n] logsumexp of z


def _softmax_into(z: Tensor, out: Tensor) -> _Softmax:
    """Row softmax statistics of z, leaving exp(z − row max) in ``out`` (one pass over V).

    Rows that are all −inf get lse −inf and e = 0.
    """
    mx = z.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, 0.0)
    torch.sub(z, mx, out=out)
    out.exp_()
    total = out.sum(dim=-1)
    return _Softmax(out, total, total.log() + mx.squeeze(-1))


@dataclass
class _Terms:
    """A gradient w.r.t. one chunk's logits: e·dense[:, None] (e = exp(z − shift) of the
    shared softmax) plus scatter-adds of ``sparse`` (idx [n,m], values [n,m])."""

    dense: Tensor | None = None
    sparse: list[tuple[Tensor, Tensor]] = field(default_factory=list)


@dataclass
class _TailGrad:
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


def _support(blk: _Block, sl: slice, cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(idx, valid, probs) of a block on a chunk.

    Padding points at a real id of the row (id 0 in empty rows), so that scatters with
    duplicate indices write identical values (or add zeros).
    """
    ids = blk.ids[sl]
    valid = ids >= 0
    idx = torch.where(valid, ids, ids.amax(-1, keepdim=True).clamp_min(0))
    return idx, valid, torch.where(valid, blk.probs[sl].to(cdt), 0.0)


def _block_coef(blk: _Block, sl: slice, plan: _Plan, kd_rw: Tensor) -> Tensor:
    """[n] factor of a block's gradient: reduction weight · (1−α)/τ · teacher weight."""
    coef = kd_rw * ((1.0 - plan.alpha) / plan.temperature)
    if blk.weight is not None:
        coef = torch.where(kd_rw > 0, coef * blk.weight[sl].to(coef.dtype), 0.0)
    return coef


def _scaled(b: Tensor, coef: Tensor) -> Tensor:
    """b·coef per row; rows with coef 0 give exact zeros (whatever garbage b holds there)."""
    return torch.where(coef[:, None] != 0, b * coef[:, None], 0.0)


def _renorm_block(
    blk: _Block, sl: slice, z: Tensor, plan: _Plan, kd_rw: Tensor, grad: bool
) -> tuple[Tensor, _Terms | None]:
    """A renormalised block: only the support's logits are touched."""
    idx, valid, probs = _support(blk, sl, z.dtype)
    z_s = z.gather(1, idx).masked_fill(~valid, _NEG_INF)
    lse_s = torch.logsumexp(z_s, -1, keepdim=True)
    log_s = z_s - torch.where(torch.isfinite(lse_s), lse_s, 0.0)
    q = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    loss, b = plan.divergence(log_s, q, valid, plan.beta, plan.eps)
    if not grad:
        return loss, None
    b = _scaled(b, _block_coef(blk, sl, plan, kd_rw))
    pi = torch.exp(log_s)
    return loss, _Terms(sparse=[(idx, torch.where(valid, b - pi * b.sum(-1, keepdim=True), 0.0))])


def _tail_block(
    blk: _Block, sl: slice, z: Tensor, sm: _Softmax, plan: _Plan, kd_rw: Tensor, grad: bool
) -> tuple[Tensor, Tensor, _TailGrad | None]:
    """A tail-collapse block on the shared softmax: returns (loss rows, ŝ_tail, gradient).

    The student's off-support mass is Σ e over the vocabulary with the support zeroed (one
    read pass, no cancellation); rows where that underflows (relative tail < 1e-20) are
    recomputed exactly from their own logits.
    """
    z_dtype = z.dtype
    tiny = torch.finfo(z_dtype).tiny
    idx, valid, probs = _support(blk, sl, z_dtype)
    z_s = z.gather(1, idx).masked_fill(~valid, _NEG_INF)
    e_on = sm.e.gather(1, idx)
    # zero the support (empty rows: rewrite the original values, i.e. zero nothing)
    sm.e.scatter_(1, idx, torch.where(valid.any(-1, keepdim=True), 0.0, e_on))
    off = sm.e.sum(dim=-1)
    sm.e.scatter_(1, idx, e_on)
    e_on = torch.where(valid, e_on, 0.0)
    partial = valid.sum(-1) < z.shape[1]
    log_tail = torch.where(partial, torch.log(off.clamp_min(tiny)) - torch.log(sm.total), _NEG_INF)
    exact = partial & (off <= 1e-20 * sm.total)
    rows = exact.nonzero().squeeze(1)
    if rows.numel():
        z_rows = z.index_select(0, rows)
        z_rows.scatter_(1, idx.index_select(0, rows), _NEG_INF)
        lse_t = torch.logsumexp(z_rows, -1)
        log_tail[rows] = lse_t - sm.lse[rows]
    log_s = torch.cat([z_s - sm.lse[:, None], log_tail[:, None]], dim=-1)
    q = torch.cat([probs, blk.tail[sl].to(z_dtype).clamp_min(0.0)[:, None]], dim=-1)
    has_tail = torch.isfinite(log_tail)  # no tail category when the support covers V
    loss, b = plan.divergence(
        log_s, q, torch.cat([valid, has_tail[:, None]], -1), plan.beta, plan.eps
    )
    s_tail = torch.exp(log_tail)
    if not grad:
        return loss, s_tail, None
    b = _scaled(b, _block_coef(blk, sl, plan, kd_rw))
    b_tail = b[:, -1]
    grad_terms = _TailGrad(
        idx,
        valid,
        b[:, :-1],
        # off the support ∂/∂z_j = b_tail·s_j/ŝ_tail − s_j·B, s_j/ŝ_tail = e_j/off, s_j = e_j/Σe
        per_off=torch.where(exact, 0.0, b_tail / off.clamp_min(tiny)),
        shared=-b.sum(-1) / sm.total,
    )
    if rows.numel():
        lse_t = torch.where(torch.isfinite(lse_t), lse_t, 0.0)
        grad_terms.rows = (rows, torch.exp(z_rows - lse_t[:, None]) * b_tail[rows, None])
    return loss, s_tail, grad_terms


def _run(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: _Plan,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, _Sums, Tensor | None, Tensor | None, Tensor | None]:
    """The chunked pass: returns (loss, sums, grad_hidden, grad_weight, grad_bias)."""
    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    mm, cdt = _mm_dtypes(hidden, weight)
    need_h, need_w, need_b = need
    with torch.autocast(dev.type, enabled=False), torch.no_grad():
        h_mm = hidden.to(mm)
        w_mm = weight.to(mm)
        b_mm = bias.to(mm) if bias is not None else None
        c = max(1, min(plan.chunk_size, n_rows))
        zbuf = torch.empty(c, vocab, dtype=cdt, device=dev)
        tbuf = torch.empty_like(zbuf)
        gbuf = torch.empty_like(zbuf) if any(need) else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(vocab, hdim, dtype=cdt, device=dev) if need_w else None
        grad_b = torch.zeros(vocab, dtype=cdt, device=dev) if need_b and bias is not None else None
        zero = torch.zeros((), dtype=cdt, device=dev)
        sums = _Sums(
            zero.clone(),
            zero.clone(),
            torch.zeros(len(plan.blocks), dtype=cdt, device=dev),
            zero.clone(),
            zero.clone(),
        )
        for start in range(0, n_rows, c):
            sl = slice(start, min(start + c, n_rows))
            n = sl.stop - start
            z, tmp = zbuf[:n], tbuf[:n]
            g = gbuf[:n] if gbuf is not None else None
            hc = h_mm[sl]
            if mm == cdt:
                torch.matmul(hc, w_mm.t(), out=z)
            else:
                z.copy_(hc @ w_mm.t())
            if b_mm is not None:
                z.add_(b_mm)
            _chunk_losses(z, tmp, g, sl, plan, sums)
            if g is None:
                continue
            g_mm = g.to(mm)
            if grad_h is not None:
                grad_h[sl] = (g_mm @ w_mm).to(grad_h.dtype)
            if grad_w is not None:
                if mm == cdt:
                    grad_w.addmm_(g_mm.t(), hc)
                else:
                    grad_w += g_mm.t() @ hc
            if grad_b is not None:
                grad_b += g.sum(0)
        kd = sums.kd
        loss = (1.0 - plan.alpha) * kd
        if plan.alpha > 0:
            loss = loss + plan.alpha * sums.ce
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
    grad_b = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None
    return loss, sums, grad_h, grad_w, grad_b


def _chunk_losses(
    z: Tensor, tmp: Tensor, g: Tensor | None, sl: slice, plan: _Plan, sums: _Sums
) -> None:
    """Loss terms of one chunk of logits ``z`` (overwritten); writes the logit gradient ``g``.

    One softmax pass over the vocabulary serves CE and every tail block (two when τ ≠ 1 and
    CE is computed); each tail block adds one read pass for its off-support mass, and the
    gradient is written with one dense pass plus sparse adds.
    """
    kd_rw = plan.kd_rw[sl]
    sm: _Softmax | None = None
    terms: list[_Terms] = []
    tails: list[_TailGrad] = []
    written = False  # g already holds values
    if plan.ce_rw is not None and plan.labels is not None:
        cw = plan.ce_rw[sl]
        lab = plan.labels[sl].clamp_min(0)[:, None]
        sm = _softmax_into(z, tmp)
        ce_rows = sm.lse - z.gather(1, lab).squeeze(1)
        sums.ce += torch.where(cw > 0, ce_rows, 0.0).mul(cw).sum()
        if g is not None and plan.alpha > 0:
            k = plan.alpha * cw
            terms.append(_Terms(dense=k / sm.total, sparse=[(lab, -k[:, None])]))
    if plan.blocks and plan.temperature != 1.0:
        # the CE gradient needs the untempered softmax: write it before it goes
        written = _write_grad(g, tmp, z, terms, [], written)
        terms = []
        z.div_(plan.temperature)
        sm = None
    if plan.blocks and not plan.renorm and sm is None:
        sm = _softmax_into(z, tmp)
    counted = kd_rw > 0
    for k, blk in enumerate(plan.blocks):
        grad = g is not None and blk.train
        tail = None
        if plan.renorm:
            loss, renorm_terms = _renorm_block(blk, sl, z, plan, kd_rw, grad)
            terms += [renorm_terms] if renorm_terms is not None else []
        else:
            assert sm is not None
            loss, tail, tail_grad = _tail_block(blk, sl, z, sm, plan, kd_rw, grad)
            tails += [tail_grad] if tail_grad is not None else []
        rows = torch.where(counted, loss, 0.0) * kd_rw
        if blk.weight is not None:
            weighted = torch.where(counted, rows * blk.weight[sl].to(rows.dtype), 0.0)
        else:
            weighted = rows
        sums.per_block[k] += rows.sum()
        if blk.train:
            sums.kd += weighted.sum()
            if tail is not None and k == 0:
                sums.tail += (tail * kd_rw).sum()
        else:
            sums.monitor += weighted.sum()
    if g is not None and not _write_grad(g, tmp, z, terms, tails, written):
        g.zero_()


def _write_grad(
    g: Tensor | None,
    e: Tensor,
    scratch: Tensor,
    terms: list[_Terms],
    tails: list[_TailGrad],
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


def _take_union(e: Tensor, tails: list[_TailGrad]) -> tuple[Tensor, Tensor]:
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


def _off_support_coef(scratch: Tensor, union: Tensor, tails: list[_TailGrad]) -> Tensor:
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


class _ChunkedLossFn(torch.autograd.Function):
    """Runs the whole chunked pass in forward, saving only the input gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: _Plan,
        out: dict[str, _Sums],
        need: tuple[bool, bool, bool],
    ) -> Tensor:
        loss, sums, gh, gw, gb = _run(hidden, weight, bias, plan, need)
        out["sums"] = sums
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        grads = []
        for t in ctx.saved_tensors:  # type: ignore[attr-defined]
            if t is None:
                grads.append(None)
            elif bool(grad_out == 1):
                grads.append(t)
            else:
                grads.append(t * grad_out.to(t.dtype))
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------------
# Public API


def _as_blocks(
    targets: SparseTargets | Sequence[SparseTargets],
    weights: Tensor | None,
    n_rows: int,
    train: bool,
) -> list[_Block]:
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
        blocks.append(_Block(flat.ids, flat.probs, flat.tail_mass, w, train))
    return blocks


def _row_weights(valid: Tensor, reduction: Reduction, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
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
    blocks: list[_Block],
    labels: Tensor | None,
    *,
    kind: str,
    alpha: float,
    temperature: float,
    beta: float,
    chunk_size: int,
    reduction: Reduction,
    rkl_eps: float,
) -> LossOutput:
    """Shared front end of every public loss: validity masks, reduction weights, autograd."""
    hdim = hidden.shape[-1]
    h2 = hidden.reshape(-1, hdim)
    n_rows = h2.shape[0]
    divergence, renorm = _parse_kind(kind)
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
    _, cdt = _mm_dtypes(h2, weight)
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
    kd_rw, n_kd = _row_weights(label_ok & has_support, reduction, cdt)
    ce_rw, n_ce = (
        _row_weights(label_ok, reduction, cdt)
        if lab is not None
        else (None, torch.zeros((), dtype=torch.long, device=dev))
    )
    plan = _Plan(
        blocks, divergence, renorm, lab, kd_rw, ce_rw, alpha, temperature, beta, rkl_eps, chunk_size
    )
    need = (h2.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and any(need):
        holder: dict[str, _Sums] = {}
        loss = _ChunkedLossFn.apply(h2, weight, bias, plan, holder, need)
        sums = holder["sums"]
    else:
        loss, sums, _, _, _ = _run(h2, weight, bias, plan, (False, False, False))
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
) -> LossOutput:
    """Chunked sparse KD loss (1−α)·KD + α·CE from hidden states and the lm_head weight.

    ``hidden [..., H]``, ``weight [V, H]``; ``targets`` one :class:`SparseTargets` (L_mix) or
    a sequence of K blocks with ``teacher_weights [..., K]`` (L_multi = Σ_k w_k·D(p_k, s);
    default weights 1/K); ``labels [...]`` the actual next tokens (−100 = ignore). ``kind``
    is one of :data:`KINDS`; ``temperature`` divides the student logits of the KD term;
    ``beta`` is the JSD mixing weight; ``rkl_eps`` floors target probabilities inside log q
    for reverse KL. ``monitor`` (+ ``monitor_weights``) evaluates the same objective against
    other targets in the same pass without gradient (e.g. L_multi while training on L_mix).
    Peak extra memory is O(chunk_size·V), independent of N.
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
    )


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    reduction: Reduction = "mean",
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
    )


# --------------------------------------------------------------------------------------------
# Dense reference (tests, and the naive-memory baseline)


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
    """Dense reference of :func:`sparse_kd_loss` on full logits, differentiated by autograd.

    ``logits [N,V]``; ``target_probs [N,V]`` or ``[K,N,V]`` (full teacher distributions);
    ``support`` (same shape, bool) marks the ids kept individually, the rest of each side's
    mass is lumped into the tail category (tail kinds) or dropped (renorm kinds); None means
    the full vocabulary. Written independently of the chunked driver (plain formulas over V)
    so it can check it; it holds several [N,V] tensors for backward.
    """
    _parse_kind(kind)
    div, collapse = kind.split("_")
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
    kd_rw, n_kd = _row_weights(valid, reduction, cdt)
    per_teacher = []
    kd_rows = torch.zeros(n_rows, dtype=cdt, device=logits.device)
    for k in range(n_teach):
        sup, q = sup_all[k], q_all[k].to(cdt)
        if collapse == "renorm":
            # rows without support keep the full softmax (they are ignored anyway): no NaNs
            sup_eff = sup | ~sup.any(-1, keepdim=True)
            s_cat = torch.softmax(logp.masked_fill(~sup_eff, _NEG_INF), dim=-1)
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
        ce_rw, n_ce = _row_weights(label_ok, reduction, cdt)
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
