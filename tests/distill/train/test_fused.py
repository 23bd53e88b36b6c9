"""The fused chunk body against the reference body and the dense reference (on the CPU).

The fused body is the GPU path (compiled); here it runs uncompiled (``eager``, every case)
and once through ``torch.compile``'s CPU backend, so CI without a GPU checks its maths.
"""

from __future__ import annotations

import pytest
import torch

from mtkd.distill.train.dense_reference import dense_kd_loss
from mtkd.distill.train.divergences import KINDS
from mtkd.distill.train.losses import chunked_cross_entropy, sparse_kd_loss
from mtkd.distill.train.targets import SparseTargets

from .test_losses import assert_close_all, grads, make_case, sparse_view

TOL = 1e-10  # float64: the two bodies agree to rounding


def both(fn, params):  # type: ignore[no-untyped-def]
    """(loss, stats, gradients) of ``fn(fused)`` for the reference and the fused body."""
    out = {}
    for mode in ("off", "eager"):
        res = fn(mode)
        out[mode] = (res, grads(res.loss, params))
    return out["off"], out["eager"]


def assert_same(ref, got, tol: float = TOL) -> None:  # type: ignore[no-untyped-def]
    (r, rg), (g, gg) = ref, got
    for name in ("loss", "kd", "ce", "kd_per_teacher", "student_tail_mass", "monitor"):
        a, b = getattr(r, name), getattr(g, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)
    assert_close_all(gg, rg, tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("alpha", "temperature"), [(0.0, 1.0), (0.3, 1.7), (1.0, 1.0)])
@pytest.mark.parametrize("m", [6, 17])  # top-m with a tail; the full vocabulary
def test_fused_equals_reference(kind: str, alpha: float, temperature: float, m: int) -> None:
    c = make_case(m=m)
    ref, got = both(lambda mode: sparse_kd_loss(
        c.hidden, c.weight, c.targets, c.labels, kind=kind, alpha=alpha,
        temperature=temperature, chunk_size=4, bias=c.bias, fused=mode), c.params())
    assert_same(ref, got)
    if alpha == 0.0 and temperature == 1.0:  # and the dense reference
        dense = dense_kd_loss(c.logits(), c.teacher, c.labels, kind=kind, support=c.support)
        torch.testing.assert_close(got[0].loss, dense.loss, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["fkl_tail", "jsd_renorm", "rkl_tail"])
def test_fused_multi_teacher_with_weights_and_monitor(kind: str) -> None:
    c = make_case(n=13, v=19, m=5)
    g = torch.Generator().manual_seed(3)
    other = sparse_view(torch.softmax(2 * torch.randn(13, 19, generator=g, dtype=torch.float64),
                                      -1), 4, pad_rows=1)
    weights = torch.rand(13, 2, generator=g, dtype=torch.float64)
    ref, got = both(lambda mode: sparse_kd_loss(
        c.hidden, c.weight, [c.targets, other], c.labels, kind=kind, alpha=0.2,
        temperature=1.3, teacher_weights=weights, chunk_size=5, bias=c.bias,
        monitor=other, fused=mode), c.params())
    assert_same(ref, got)


def test_fused_cross_entropy() -> None:
    c = make_case()
    ref, got = both(lambda mode: chunked_cross_entropy(
        c.hidden, c.weight, c.labels, chunk_size=3, bias=c.bias, fused=mode), c.params())
    assert_same(ref, got)


def test_fused_is_exact_when_the_student_tail_is_tiny() -> None:
    """A student so sure of its support that its tail is ~1e-30: the fused body takes the
    off-support logsumexp directly (no cancellation, no recomputation)."""
    c = make_case(n=6, v=23, m=4)
    with torch.no_grad():
        logits = c.logits()
        ids = c.targets.ids
        idx = torch.where(ids >= 0, ids, ids.amax(-1, keepdim=True))  # padding: a real id
        boost = torch.zeros_like(logits).scatter_(1, idx, 80.0)
    z_bias = (c.bias + boost).detach()  # per row: not expressible by one bias; use hidden
    hidden = torch.cat([c.hidden.detach(), torch.eye(6, dtype=torch.float64)], 1)
    weight = torch.cat([c.weight.detach(), torch.zeros(23, 6, dtype=torch.float64)], 1)
    weight[:, -6:] = (z_bias - c.bias.detach()).T
    hidden.requires_grad_()
    weight.requires_grad_()
    targets = SparseTargets(c.targets.ids, c.targets.probs, c.targets.tail_mass)
    ref, got = both(lambda mode: sparse_kd_loss(
        hidden, weight, targets, kind="fkl_tail", chunk_size=4, bias=c.bias, fused=mode),
        (hidden, weight))
    tail = float(got[0].student_tail_mass)
    assert 0 < tail < 1e-25
    assert_same(ref, got, tol=1e-9)


def test_fused_bf16_autocast_matches_reference() -> None:
    """bf16 matmuls: the fused body's gradient is written in bf16 once, like the reference."""
    c = make_case(n=64, h=16, v=300, m=12, dtype=torch.float32, sharp=3.0)
    outs = {}
    for mode in ("off", "eager"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sparse_kd_loss(c.hidden, c.weight, c.targets, c.labels, kind="fkl_tail",
                                 alpha=0.1, chunk_size=16, fused=mode)
        outs[mode] = (out.loss.detach(), *grads(out.loss, (c.hidden, c.weight)))
    for a, b in zip(outs["off"], outs["eager"], strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-4)


def test_compiled_fused_body_on_the_cpu() -> None:
    """The compiled graph (inductor's CPU backend) computes what the reference does."""
    c = make_case(n=40, h=8, v=64, m=6, dtype=torch.float32)
    for kind in ("fkl_tail", "jsd_renorm"):
        outs = {}
        for mode in ("off", "compiled"):
            out = sparse_kd_loss(c.hidden, c.weight, c.targets, c.labels, kind=kind, alpha=0.2,
                                 temperature=1.5, chunk_size=16, bias=c.bias, fused=mode)
            outs[mode] = (out.loss.detach(), *grads(out.loss, c.params()))
        for a, b in zip(outs["off"], outs["compiled"], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_unknown_fused_mode_refused() -> None:
    c = make_case()
    with pytest.raises(ValueError, match="fused must be one of"):
        sparse_kd_loss(c.hidden, c.weight, c.targets, fused="yes")  # type: ignore[arg-type]


def test_fused_bf16_student_keeps_its_lm_head_gradient_in_bf16() -> None:
    """bf16 parameters: the fused body accumulates the lm_head gradient in bf16 (Liger's
    choice: one float32 GEMM per chunk, rounded as the chunks add up)."""
    c = make_case(n=96, h=16, v=300, m=12, dtype=torch.float32, sharp=3.0)
    hidden = c.hidden.detach().bfloat16().requires_grad_()
    weight = c.weight.detach().bfloat16().requires_grad_()
    outs = {}
    for mode in ("off", "eager"):
        out = sparse_kd_loss(hidden, weight, c.targets, c.labels, kind="fkl_tail", alpha=0.1,
                             chunk_size=16, fused=mode)
        outs[mode] = (out.loss.detach().float(),
                      *(g.float() for g in grads(out.loss, (hidden, weight))))
    assert outs["eager"][2].dtype == torch.float32  # compared in float32
    for a, b in zip(outs["off"], outs["eager"], strict=True):
        torch.testing.assert_close(b, a, rtol=3e-2, atol=1e-3)
