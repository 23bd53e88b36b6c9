"""Tests of the chunked sparse KD losses against dense autograd references and identities."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.distill.train.dense_reference import dense_kd_loss
from mtkd.distill.train.divergences import KINDS
from mtkd.distill.train.losses import chunked_cross_entropy, sparse_kd_loss
from mtkd.distill.train.targets import SparseTargets

F64 = torch.float64


@dataclass
class Case:
    """A student (hidden, W, bias) and a teacher known in full plus its sparse top-m view."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    teacher: torch.Tensor  # [N,V] full distribution
    targets: SparseTargets
    support: torch.Tensor  # [N,V] bool
    labels: torch.Tensor

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.hidden, self.weight, self.bias

    def logits(self) -> torch.Tensor:
        return self.hidden @ self.weight.T + self.bias


def sparse_view(teacher: torch.Tensor, m: int, pad_rows: int = 0) -> SparseTargets:
    """Top-m of a full distribution with the exact tail; the first ``pad_rows`` rows keep
    only 2 ids (the rest padded) so padding is exercised."""
    top = teacher.topk(m, dim=-1)
    ids, probs = top.indices.clone(), top.values.clone()
    ids[:pad_rows, 2:] = -1
    probs[:pad_rows, 2:] = 0
    return SparseTargets(ids, probs, 1.0 - probs.sum(-1))


def make_case(
    n: int = 11,
    h: int = 5,
    v: int = 17,
    m: int = 6,
    dtype: torch.dtype = F64,
    seed: int = 0,
    sharp: float = 2.0,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    bias = (0.3 * torch.randn(v, generator=g, dtype=dtype)).requires_grad_()
    teacher = torch.softmax(sharp * torch.randn(n, v, generator=g, dtype=dtype), -1)
    targets = sparse_view(teacher, m, pad_rows=2 if m > 2 else 0)
    _, support = targets.to_dense(v)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    return Case(hidden, weight, bias, teacher, targets, support, labels)


def grads(loss: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, params)


def assert_close_all(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], tol: float):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# Against dense references


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("m", [6, 17])  # top-m with tails; the full vocabulary (tail 0)
def test_matches_dense_reference(kind: str, temperature: float, m: int) -> None:
    c = make_case(m=m)
    out = sparse_kd_loss(
        c.hidden,
        c.weight,
        c.targets,
        c.labels,
        kind=kind,
        alpha=0.3,
        temperature=temperature,
        chunk_size=4,
        bias=c.bias,
    )
    # dense teacher: exact on the support, true off-support mass lumped by the reference
    ref = dense_kd_loss(
        c.logits(),
        c.teacher,
        c.labels,
        kind=kind,
        alpha=0.3,
        temperature=temperature,
        support=c.support,
    )
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.kd, ref.kd, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.ce, ref.ce, rtol=1e-10, atol=1e-10)
    assert int(out.n_kd_rows) == 10 and int(out.n_ce_rows) == 10
    assert_close_all(grads(out.loss, c.params()), grads(ref.loss, c.params()), 1e-10)


def test_dense_reference_is_plain_kl_on_full_vocab() -> None:
    """The reference itself: fkl over the full vocabulary is torch's KL, with any support."""
    c = make_case(m=17)
    logits = c.logits()
    ref = dense_kd_loss(logits, c.teacher, kind="fkl_tail", temperature=2.0)
    plain = F.kl_div(torch.log_softmax(logits / 2.0, -1), c.teacher, reduction="batchmean")
    torch.testing.assert_close(ref.loss, plain)
    # padded rows 0,1 keep 2 ids: their tail bucket differs from plain KL, compare the rest
    rows = slice(2, None)
    sub = SparseTargets(c.targets.ids[rows], c.targets.probs[rows], c.targets.tail_mass[rows])
    sparse = sparse_kd_loss(
        c.hidden[rows], c.weight, sub, kind="fkl_tail", temperature=2.0, bias=c.bias, chunk_size=5
    )
    plain = F.kl_div(
        torch.log_softmax(logits[rows] / 2.0, -1), c.teacher[rows], reduction="batchmean"
    )
    torch.testing.assert_close(sparse.loss, plain)
    assert_close_all(grads(sparse.loss, c.params()), grads(plain, c.params()), 1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind: str) -> None:
    """Closed-form gradients against finite differences (float64)."""
    c = make_case(n=5, h=3, v=9, m=4)

    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sparse_kd_loss(
            h,
            w,
            c.targets,
            c.labels[:5],
            kind=kind,
            alpha=0.2,
            temperature=1.3,
            chunk_size=2,
            bias=b,
        ).loss

    assert torch.autograd.gradcheck(fn, c.params())


def test_cross_entropy_matches_torch() -> None:
    c = make_case()
    out = chunked_cross_entropy(c.hidden, c.weight, c.labels, chunk_size=3, bias=c.bias)
    ref = F.cross_entropy(c.logits(), c.labels, ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert_close_all(grads(out.loss, c.params()), grads(ref, c.params()), 1e-10)
    assert float(out.kd) == 0.0 and int(out.n_ce_rows) == 10


# --------------------------------------------------------------------------------------------
# Chunking, reductions, ignored rows, shapes


@pytest.mark.parametrize("kind", ["fkl_tail", "rkl_renorm", "jsd_tail"])
def test_chunk_size_invariance(kind: str) -> None:
    c = make_case(n=23, v=40, m=7, dtype=torch.float32)
    results = []
    for chunk in (1, 3, 7, 23, 64):
        out = sparse_kd_loss(
            c.hidden,
            c.weight,
            c.targets,
            c.labels,
            kind=kind,
            alpha=0.1,
            temperature=1.5,
            chunk_size=chunk,
            bias=c.bias,
        )
        results.append((out.loss.detach(), *grads(out.loss, c.params())))
    for other in results[1:]:
        assert_close_all(results[0], other, 1e-5)


def test_ignored_rows_contribute_nothing() -> None:
    c = make_case(n=12)
    keep = torch.ones(12, dtype=torch.bool)
    keep[[3, 5, 9]] = False  # 3 already has label −100
    labels = c.labels.clone()
    labels[5] = -100
    ids, probs, tail = (x.clone() for x in (c.targets.ids, c.targets.probs, c.targets.tail_mass))
    ids[9], probs[9], tail[9] = -1, 0.0, 1.0  # all-padding support
    probs[3] = float("nan")  # garbage on ignored rows must not leak
    probs[5] = float("inf")
    full = sparse_kd_loss(
        c.hidden,
        c.weight,
        SparseTargets(ids, probs, tail),
        labels,
        kind="jsd_tail",
        chunk_size=4,
        bias=c.bias,
    )
    sub = sparse_kd_loss(
        c.hidden[keep],
        c.weight,
        SparseTargets(ids[keep], probs[keep], tail[keep]),
        labels[keep],
        kind="jsd_tail",
        chunk_size=4,
        bias=c.bias,
    )
    torch.testing.assert_close(full.loss, sub.loss)
    gh, gw, gb = grads(full.loss, c.params())
    assert torch.isfinite(gh).all()
    assert float(gh[~keep].abs().max()) == 0.0
    _, gw_sub, gb_sub = grads(sub.loss, c.params())
    torch.testing.assert_close(gw, gw_sub)
    torch.testing.assert_close(gb, gb_sub)
    # CE still counts the all-padding row 9 (it has a label)
    assert int(full.n_kd_rows) == 9 and int(full.n_ce_rows) == 10


def test_sum_reduction_and_leading_dims() -> None:
    c = make_case(n=12)
    mean = sparse_kd_loss(c.hidden, c.weight, c.targets, c.labels, bias=c.bias, alpha=0.5)
    total = sparse_kd_loss(
        c.hidden.reshape(3, 4, -1),
        c.weight,
        SparseTargets(
            c.targets.ids.reshape(3, 4, -1),
            c.targets.probs.reshape(3, 4, -1),
            c.targets.tail_mass.reshape(3, 4),
        ),
        c.labels.reshape(3, 4),
        bias=c.bias,
        alpha=0.5,
        reduction="sum",
        chunk_size=5,
    )
    torch.testing.assert_close(total.kd, mean.kd * mean.n_kd_rows)
    torch.testing.assert_close(total.ce, mean.ce * mean.n_ce_rows)
    gh = grads(total.loss, (c.hidden,))[0]
    assert gh.shape == c.hidden.shape


def test_no_grad_path_and_frozen_weight() -> None:
    c = make_case()
    with_grad = sparse_kd_loss(c.hidden, c.weight, c.targets, c.labels, bias=c.bias)
    with torch.no_grad():
        no_grad = sparse_kd_loss(c.hidden, c.weight, c.targets, c.labels, bias=c.bias)
    torch.testing.assert_close(with_grad.loss.detach(), no_grad.loss)
    frozen = sparse_kd_loss(c.hidden, c.weight.detach(), c.targets, c.labels)
    (gh,) = grads(frozen.loss, (c.hidden,))
    full = sparse_kd_loss(c.hidden, c.weight, c.targets, c.labels)
    torch.testing.assert_close(gh, grads(full.loss, (c.hidden,))[0])


def test_backward_scales_with_upstream_gradient() -> None:
    c = make_case()
    out = sparse_kd_loss(c.hidden, c.weight, c.targets, bias=c.bias, kind="rkl_tail")
    g1 = grads(out.loss, c.params())
    out = sparse_kd_loss(c.hidden, c.weight, c.targets, bias=c.bias, kind="rkl_tail")
    g3 = grads(3.0 * out.loss, c.params())
    assert_close_all(tuple(3.0 * g for g in g1), g3, 1e-12)


# --------------------------------------------------------------------------------------------
# Multi-teacher


def multi_case(shared_support: bool, m: int = 6, k: int = 3, n: int = 10, v: int = 15):
    g = torch.Generator().manual_seed(7)
    c = make_case(n=n, v=v, m=m)
    teachers = torch.softmax(2.0 * torch.randn(k, n, v, generator=g, dtype=F64), -1)
    w = torch.softmax(torch.randn(n, k, generator=g, dtype=F64), -1)
    fused = (w.T[:, :, None] * teachers).sum(0)
    if shared_support:
        ids = fused.topk(m, -1).indices
        blocks = [
            SparseTargets(ids, t.gather(1, ids), 1.0 - t.gather(1, ids).sum(-1)) for t in teachers
        ]
    else:
        blocks = [sparse_view(t, m) for t in teachers]
    return c, teachers, w, fused, blocks


@pytest.mark.parametrize("kind", ["fkl_tail", "rkl_tail", "jsd_renorm"])
def test_multi_teacher_matches_dense(kind: str) -> None:
    c, teachers, w, _, blocks = multi_case(shared_support=False)
    # teacher 1 has no support on row 4 (all its mass in the tail); others do: row counts
    ids, probs, tail = (x.clone() for x in (blocks[1].ids, blocks[1].probs, blocks[1].tail_mass))
    ids[4], probs[4], tail[4] = -1, 0.0, 1.0
    blocks[1] = SparseTargets(ids, probs, tail)
    w = w.clone()
    w[3] = float("nan")  # teacher weights of an ignored row (label −100) must not leak
    support = torch.stack([b.to_dense(15)[1] for b in blocks])
    out = sparse_kd_loss(
        c.hidden,
        c.weight,
        blocks,
        c.labels,
        teacher_weights=w,
        kind=kind,
        alpha=0.25,
        chunk_size=3,
        bias=c.bias,
        temperature=1.2,
    )
    ref = dense_kd_loss(
        c.logits(),
        teachers,
        c.labels,
        kind=kind,
        alpha=0.25,
        support=support,
        teacher_weights=w,
        temperature=1.2,
    )
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.kd_per_teacher, ref.kd_per_teacher)
    assert_close_all(grads(out.loss, c.params()), grads(ref.loss, c.params()), 1e-10)


@pytest.mark.parametrize("m", [6, 15])
def test_jensen_gap_identity(m: int) -> None:
    """Σ_k w_k KL(p_k‖s) − KL(q‖s) = Σ_k w_k KL(p_k‖q) for linear q; equal fkl gradients."""
    c, _, w, _, blocks = multi_case(shared_support=True, m=m)
    ids = blocks[0].ids
    q_probs = sum(w[:, k : k + 1] * b.probs for k, b in enumerate(blocks))
    q_tail = sum(w[:, k] * b.tail_mass for k, b in enumerate(blocks))
    mix_t = SparseTargets(ids, q_probs, q_tail)
    multi = sparse_kd_loss(c.hidden, c.weight, blocks, teacher_weights=w, bias=c.bias, chunk_size=4)
    mix = sparse_kd_loss(c.hidden, c.weight, mix_t, bias=c.bias, chunk_size=4)

    def cats(t: SparseTargets) -> torch.Tensor:
        # the loss has no tail category when the support is the whole vocabulary
        return torch.cat([t.probs, t.tail_mass[:, None]], -1) if m < 15 else t.probs

    q = cats(mix_t)
    gap_rows = sum(
        w[:, k] * torch.where(cats(b) > 0, cats(b) * (cats(b) / q).log(), 0.0).sum(-1)
        for k, b in enumerate(blocks)
    )
    torch.testing.assert_close(multi.loss - mix.loss, gap_rows.mean(), rtol=1e-10, atol=1e-12)
    assert float(gap_rows.mean()) > 1e-3
    assert_close_all(grads(multi.loss, c.params()), grads(mix.loss, c.params()), 1e-10)
    # the monitor computes L_multi in the L_mix pass
    mon = sparse_kd_loss(c.hidden, c.weight, mix_t, bias=c.bias, monitor=blocks, monitor_weights=w)
    torch.testing.assert_close(mon.monitor, multi.kd)
    torch.testing.assert_close(mon.loss, mix.loss)
    # for reverse KL the two objectives are not a constant apart
    r_multi = sparse_kd_loss(c.hidden, c.weight, blocks, teacher_weights=w, kind="rkl_tail")
    r_mix = sparse_kd_loss(c.hidden, c.weight, mix_t, kind="rkl_tail")
    diff = grads(r_multi.loss, (c.hidden,))[0] - grads(r_mix.loss, (c.hidden,))[0]
    assert float(diff.abs().max()) > 1e-4


# --------------------------------------------------------------------------------------------
# Precision and dtypes


def test_bf16_autocast() -> None:
    c = make_case(n=40, h=16, v=64, m=8, dtype=torch.float32, sharp=1.0)
    ref = sparse_kd_loss(c.hidden, c.weight, c.targets, c.labels, alpha=0.2, chunk_size=16)
    g_ref = grads(ref.loss, (c.hidden, c.weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_kd_loss(c.hidden, c.weight, c.targets, c.labels, alpha=0.2, chunk_size=16)
    assert out.loss.dtype == torch.float32
    g = grads(out.loss, (c.hidden, c.weight))
    assert g[0].dtype == torch.float32 and g[1].dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref, strict=True):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    # bf16 parameters, no autocast: softmax still in float32, grads in bf16
    hb = c.hidden.detach().bfloat16().requires_grad_()
    wb = c.weight.detach().bfloat16().requires_grad_()
    out = sparse_kd_loss(hb, wb, c.targets, c.labels, alpha=0.2, chunk_size=16, kind="jsd_tail")
    gb = grads(out.loss, (hb, wb))
    assert out.loss.dtype == torch.float32 and gb[0].dtype == torch.bfloat16
    assert all(torch.isfinite(x).all() for x in gb)


def test_tiny_student_tail_is_stable() -> None:
    """Student tail ≈ e^-60 with a teacher tail of 5%: float32 loss matches float64 dense."""
    c = make_case(n=6, h=4, v=30, m=5, dtype=F64)
    boost = 60.0 * c.support.to(F64)
    hidden = torch.cat([c.hidden.detach(), boost], -1)  # ids get +60 logits via an identity
    weight = torch.cat([c.weight.detach(), torch.eye(30, dtype=F64)], -1)
    ref = dense_kd_loss(hidden @ weight.T, c.teacher, support=c.support)
    h32 = hidden.float().requires_grad_()
    out = sparse_kd_loss(h32, weight.float(), c.targets, chunk_size=4)
    assert float(out.student_tail_mass) < 1e-20
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    (g,) = grads(out.loss, (h32,))
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("kind", ["fkl_tail", "rkl_tail", "jsd_tail"])
def test_underflowing_student_tail_takes_the_exact_path(kind: str) -> None:
    """Relative student tail ≈ e^-60 (below the shared softmax's 1e-20 cut): loss and
    gradients still equal the dense float64 reference, also with labels and τ ≠ 1."""
    c = make_case(n=6, h=4, v=30, m=5, dtype=F64)
    boost = 60.0 * c.support.to(F64)
    boost[0] = 0.0  # one ordinary row in the same chunk
    hidden = torch.cat([c.hidden.detach(), boost], -1).requires_grad_()
    weight = torch.cat([c.weight.detach(), torch.eye(30, dtype=F64)], -1).requires_grad_()
    for temperature in (1.0, 1.3):
        kw = {"kind": kind, "alpha": 0.2, "temperature": temperature}
        out = sparse_kd_loss(hidden, weight, c.targets, c.labels, chunk_size=4, **kw)
        ref = dense_kd_loss(hidden @ weight.T, c.teacher, c.labels, support=c.support, **kw)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-9, atol=1e-9)
        got, want = grads(out.loss, (hidden, weight)), grads(ref.loss, (hidden, weight))
        assert_close_all(got, want, 1e-8)


@pytest.mark.parametrize("boost", [8.0, 16.0, 30.0])
def test_small_student_tail_gradient_in_float32(boost: float) -> None:
    """Relative student tail e^-boost (not small enough for the exact path): float32 gradients
    match the float64 dense reference, i.e. nothing cancels catastrophically."""
    c = make_case(n=8, h=4, v=300, m=5, dtype=F64)
    lift = boost * c.support.to(F64)
    hidden = torch.cat([c.hidden.detach(), lift], -1)
    weight = torch.cat([c.weight.detach(), torch.eye(300, dtype=F64)], -1)
    ref = dense_kd_loss(hidden @ weight.T, c.teacher, c.labels, alpha=0.1, support=c.support)
    h64 = hidden.clone().requires_grad_()
    (want,) = grads(
        dense_kd_loss(h64 @ weight.T, c.teacher, c.labels, alpha=0.1, support=c.support).loss,
        (h64,),
    )
    h32 = hidden.float().requires_grad_()
    out = sparse_kd_loss(h32, weight.float(), c.targets, c.labels, alpha=0.1, chunk_size=3)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    (got,) = grads(out.loss, (h32,))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    m=st.integers(1, 12),
    temperature=st.floats(0.5, 3.0),
    scale=st.floats(0.1, 8.0),
)
def test_nonnegative_and_zero_at_target(
    seed: int, kind: str, m: int, temperature: float, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    n, h, v = 6, 4, 12
    hidden = scale * torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64)
    teacher = torch.softmax(scale * torch.randn(n, v, generator=g, dtype=F64), -1)
    ids = torch.argsort(torch.rand(n, v, generator=g), -1)[:, :m]
    probs = teacher.gather(1, ids)
    loss = sparse_kd_loss(
        hidden,
        weight,
        SparseTargets(ids, probs, 1 - probs.sum(-1)),
        kind=kind,
        temperature=temperature,
        chunk_size=4,
    ).loss
    assert float(loss) >= -1e-12
    student = torch.softmax(hidden @ weight.T / temperature, -1)
    s_probs = student.gather(1, ids)
    at_target = sparse_kd_loss(
        hidden,
        weight,
        SparseTargets(ids, s_probs, 1 - s_probs.sum(-1)),
        kind=kind,
        temperature=temperature,
        chunk_size=4,
        rkl_eps=1e-300,
    ).loss
    assert abs(float(at_target)) < 1e-9


# --------------------------------------------------------------------------------------------
# SparseTargets


def test_sparse_targets_helpers() -> None:
    c = make_case()
    t = c.targets
    logp = torch.where(t.ids >= 0, t.probs.clamp_min(1e-300).log(), -torch.inf)
    back = SparseTargets.from_logprobs(t.ids, logp, t.tail_mass.log())
    torch.testing.assert_close(back.probs, t.probs)
    torch.testing.assert_close(back.tail_mass, t.tail_mass)
    dense, support = t.to_dense(17)
    assert int(support.sum()) == int((t.ids >= 0).sum())
    torch.testing.assert_close(dense.sum(-1) + t.tail_mass, torch.ones(11, dtype=F64))
    t.validate(17)
    dup = t.ids.clone()
    dup[4, 1] = dup[4, 0]
    with pytest.raises(ValueError, match="duplicate"):
        SparseTargets(dup, t.probs, t.tail_mass).validate(17)
    with pytest.raises(ValueError, match="duplicate"):
        sparse_kd_loss(c.hidden, c.weight, SparseTargets(dup, t.probs, t.tail_mass), validate=True)
    with pytest.raises(ValueError, match="unknown loss kind"):
        sparse_kd_loss(c.hidden, c.weight, t, kind="kl")
