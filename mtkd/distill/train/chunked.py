"""The chunked pass of the sparse KD losses: logits, losses and gradients, chunk by chunk.

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

The student tail of a ``tail`` collapse (Σ of the student's probabilities off the support) is
computed as logsumexp over the non-support logits − lse, so it is exact even when tiny.
For any divergence D of the collapsed student ŝ (categories c), with b_c = ∂D/∂log ŝ_c and
B = Σ_c b_c, the gradient w.r.t. the tempered logits z = logits/τ is

* tail collapse:   ∂D/∂z_j = b_j − s_j·B (j in the support),
                   ∂D/∂z_j = b_tail·s_j/ŝ_tail − s_j·B (j off the support);
* renorm collapse: ∂D/∂z_j = b_j − s̃_j·B on the support, 0 elsewhere (s̃ = support softmax);

with b from :mod:`mtkd.distill.train.divergences`. So every kind shares the driver and differs
only in a small function on the ``[chunk, m+1]`` category tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mtkd.distill.train.divergences import DivergenceFn
from mtkd.distill.train.fused import fused_chunk
from mtkd.distill.train.logit_grad import GradTerms, TailGrad, write_grad

_NEG_INF = float("-inf")


@dataclass
class Block:
    """One teacher block in row-flattened layout."""

    ids: Tensor  # [N,m] int64
    probs: Tensor  # [N,m]
    tail: Tensor  # [N]
    weight: Tensor | None  # [N] per-row teacher weight; None means 1
    train: bool  # contributes to the loss / gradient (False: monitor only)


@dataclass
class Plan:
    """Everything the driver needs besides the differentiable inputs."""

    blocks: list[Block]
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
    fused: str = "off"  # off (the reference chunk body) | eager | compiled (mtkd...fused)


@dataclass
class Sums:
    """Detached accumulators of the chunk pass."""

    kd: Tensor
    ce: Tensor
    per_block: Tensor
    tail: Tensor
    monitor: Tensor


def matmul_dtypes(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
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


def _support(blk: Block, sl: slice, cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(idx, valid, probs) of a block on a chunk.

    Padding points at a real id of the row (id 0 in empty rows), so that scatters with
    duplicate indices write identical values (or add zeros).
    """
    ids = blk.ids[sl]
    valid = ids >= 0
    idx = torch.where(valid, ids, ids.amax(-1, keepdim=True).clamp_min(0))
    return idx, valid, torch.where(valid, blk.probs[sl].to(cdt), 0.0)


def _block_coef(blk: Block, sl: slice, plan: Plan, kd_rw: Tensor) -> Tensor:
    """[n] factor of a block's gradient: reduction weight · (1−α)/τ · teacher weight."""
    coef = kd_rw * ((1.0 - plan.alpha) / plan.temperature)
    if blk.weight is not None:
        coef = torch.where(kd_rw > 0, coef * blk.weight[sl].to(coef.dtype), 0.0)
    return coef


def _scaled(b: Tensor, coef: Tensor) -> Tensor:
    """b·coef per row; rows with coef 0 give exact zeros (whatever garbage b holds there)."""
    return torch.where(coef[:, None] != 0, b * coef[:, None], 0.0)


def _renorm_block(
    blk: Block, sl: slice, z: Tensor, plan: Plan, kd_rw: Tensor, grad: bool
) -> tuple[Tensor, GradTerms | None]:
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
    grad_s = torch.where(valid, b - pi * b.sum(-1, keepdim=True), 0.0)
    return loss, GradTerms(sparse=[(idx, grad_s)])


def _tail_block(
    blk: Block, sl: slice, z: Tensor, sm: _Softmax, plan: Plan, kd_rw: Tensor, grad: bool
) -> tuple[Tensor, Tensor, TailGrad | None]:
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
    grad_terms = TailGrad(
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


def run_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: Plan,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Sums, Tensor | None, Tensor | None, Tensor | None]:
    """The chunked pass: returns (loss, sums, grad_hidden, grad_weight, grad_bias)."""
    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    mm, cdt = matmul_dtypes(hidden, weight)
    need_h, need_w, need_b = need
    with torch.autocast(dev.type, enabled=False), torch.no_grad():
        h_mm = hidden.to(mm)
        w_mm = weight.to(mm)
        b_mm = bias.to(mm) if bias is not None else None
        c = max(1, min(plan.chunk_size, n_rows))
        fused = plan.fused != "off"  # the fused body allocates what it needs per chunk
        zbuf = torch.empty(0 if fused else c, vocab, dtype=cdt, device=dev)
        tbuf = torch.empty_like(zbuf)
        gbuf = torch.empty_like(zbuf) if any(need) else None
        grad_h = torch.empty_like(hidden) if need_h else None
        # the fused body keeps a low-precision lm_head's gradient in its own dtype (as Liger's
        # fused CE does: each chunk's GEMM accumulates in float32, the sum over chunks rounds)
        acc = weight.dtype if fused and weight.dtype in (torch.bfloat16, torch.float16) else cdt
        grad_w = torch.zeros(vocab, hdim, dtype=acc, device=dev) if need_w else None
        grad_b = torch.zeros(vocab, dtype=cdt, device=dev) if need_b and bias is not None else None
        zero = torch.zeros((), dtype=cdt, device=dev)
        sums = Sums(
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
            if fused:
                z = hc @ w_mm.t() if b_mm is None else torch.addmm(b_mm, hc, w_mm.t())
                g = fused_chunk_losses(z, sl, plan, sums, any(need))
            else:
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
                if mm == grad_w.dtype:
                    grad_w.addmm_(g_mm.t(), hc)
                else:
                    grad_w += g_mm.t() @ hc
            if grad_b is not None:
                grad_b += g.sum(0, dtype=cdt)
        kd = sums.kd
        loss = (1.0 - plan.alpha) * kd
        if plan.alpha > 0:
            loss = loss + plan.alpha * sums.ce
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
    grad_b = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None
    return loss, sums, grad_h, grad_w, grad_b


def _chunk_losses(
    z: Tensor, tmp: Tensor, g: Tensor | None, sl: slice, plan: Plan, sums: Sums
) -> None:
    """Loss terms of one chunk of logits ``z`` (overwritten); writes the logit gradient ``g``.

    One softmax pass over the vocabulary serves CE and every tail block (two when τ ≠ 1 and
    CE is computed); each tail block adds one read pass for its off-support mass, and the
    gradient is written with one dense pass plus sparse adds.
    """
    kd_rw = plan.kd_rw[sl]
    sm: _Softmax | None = None
    terms: list[GradTerms] = []
    tails: list[TailGrad] = []
    written = False  # g already holds values
    if plan.ce_rw is not None and plan.labels is not None:
        cw = plan.ce_rw[sl]
        lab = plan.labels[sl].clamp_min(0)[:, None]
        sm = _softmax_into(z, tmp)
        ce_rows = sm.lse - z.gather(1, lab).squeeze(1)
        sums.ce += torch.where(cw > 0, ce_rows, 0.0).mul(cw).sum()
        if g is not None and plan.alpha > 0:
            k = plan.alpha * cw
            terms.append(GradTerms(dense=k / sm.total, sparse=[(lab, -k[:, None])]))
    if plan.blocks and plan.temperature != 1.0:
        # the CE gradient needs the untempered softmax: write it before it goes
        written = write_grad(g, tmp, z, terms, [], written)
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
    if g is not None and not write_grad(g, tmp, z, terms, tails, written):
        g.zero_()


_COMPILED: dict[str, Any] = {}


def fused_chunk_losses(z: Tensor, sl: slice, plan: Plan, sums: Sums, grad: bool) -> Tensor | None:
    """:func:`~mtkd.distill.train.fused.fused_chunk` on one chunk (compiled once per process
    when ``plan.fused`` is "compiled"); adds its losses to ``sums``, returns the gradient."""
    body = fused_chunk
    if plan.fused == "compiled":
        body = _COMPILED.setdefault("fused_chunk", torch.compile(fused_chunk))
    kd_rw = plan.kd_rw[sl]
    blocks = plan.blocks
    coefs = [_block_coef(b, sl, plan, kd_rw) if b.train else None for b in blocks]
    ce_rw = plan.ce_rw[sl] if plan.ce_rw is not None and plan.labels is not None else None
    per_block, weighted, ce, tail, g = body(
        z, [b.ids[sl] for b in blocks], [b.probs[sl] for b in blocks],
        [b.tail[sl] for b in blocks], coefs,
        [b.weight[sl] if b.weight is not None else None for b in blocks], kd_rw,
        plan.labels[sl] if ce_rw is not None else None, ce_rw,
        divergence=plan.divergence, renorm=plan.renorm, alpha=plan.alpha,
        temperature=plan.temperature, beta=plan.beta, eps=plan.eps, grad=grad)
    train = torch.tensor([b.train for b in blocks], dtype=torch.bool, device=z.device)
    sums.per_block += per_block
    sums.kd += torch.where(train, weighted, 0.0).sum()
    sums.monitor += torch.where(train, 0.0, weighted).sum()
    sums.ce += ce
    if blocks and blocks[0].train and not plan.renorm:
        sums.tail += tail
    return g


class ChunkedLossFn(torch.autograd.Function):
    """Runs the whole chunked pass in forward, saving only the input gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: Plan,
        out: dict[str, Sums],
        need: tuple[bool, bool, bool],
    ) -> Tensor:
        loss, sums, gh, gw, gb = run_chunks(hidden, weight, bias, plan, need)
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
