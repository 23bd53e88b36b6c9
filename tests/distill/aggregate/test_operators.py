"""Aggregation operators against the axioms and guarantees of DESIGN.md §1.

Stacks are random teachers' distributions over shared categories (the tail bucket is just one
more category to an operator). Temperature coherence on tempered inputs is tested in
test_fuse.py, where temperatures are applied.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.distill.aggregate.diagnostics import (
    disagreement,
    effective_teachers,
    entropy,
    jensen_gap,
    kl,
)
from mtkd.distill.aggregate.operators import (
    OPERATORS,
    Geometric,
    Linear,
    PowerMean,
    Stack,
    get_operator,
)

SETTINGS = settings(deadline=None)
ALL_OPS = [
    Linear(),
    Geometric(),
    PowerMean(-1.0),
    PowerMean(-0.3),
    PowerMean(5e-4),
    PowerMean(0.5),
    PowerMean(2.0),
]
# Positive wherever any positively weighted teacher is (the others need all of them positive;
# so does α → 0⁺ in floating point: w^{1/α} underflows).
MIXING_OPS = [Linear(), PowerMean(0.1), PowerMean(0.5), PowerMean(2.0)]
# Power means with α in [0, 1] lie between geometric and linear pooling.
LOGLOSS_OPS = [Linear(), Geometric(), PowerMean(5e-4), PowerMean(0.5)]
op_ids = [f"{op.name}{getattr(op, 'alpha', '')}" for op in ALL_OPS]
all_ops = st.sampled_from(ALL_OPS)


def simplex(
    rng: np.random.Generator, shape: tuple[int, ...], zeros: bool, floor: float = 0.0
) -> np.ndarray:
    """Random distributions along the last axis; optionally with exact zeros (never a whole
    row), optionally bounded below by roughly ``floor``."""
    p = rng.gamma(rng.uniform(0.1, 2.0), size=shape) + floor
    if zeros:
        drop = rng.random(shape) < 0.35
        drop[..., 0] &= ~drop[..., 1:].all(axis=-1)  # keep one entry per row
        p = np.where(drop, 0.0, p + 1e-12)
    return p / p.sum(axis=-1, keepdims=True)


@st.composite
def cases(
    draw: st.DrawFn, zeros: bool = False, zero_weights: bool = False, floor: float = 0.0
) -> tuple[Stack, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k, n, c = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(2, 12))
    probs = simplex(rng, (k, n, c), zeros, floor)
    w = simplex(rng, (n, k), zero_weights)
    return Stack(probs), w, rng


def raise_weight(w: np.ndarray, j: int, delta: float) -> np.ndarray:
    """w + δ·e_j, renormalised (the others shrink proportionally)."""
    out = w.copy()
    out[:, j] += delta
    return out / out.sum(axis=1, keepdims=True)


def log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(x)


def tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(axis=-1)


@SETTINGS
@given(case=cases(zeros=True, zero_weights=True), op=all_ops)
def test_convexity_preservation(case, op):
    stack, w, _ = case
    q = op(stack, w)
    assert np.isfinite(q).all() and (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)


@SETTINGS
@given(case=cases(zeros=True, zero_weights=True))
def test_linear_stays_in_the_convex_hull_per_coordinate(case):
    stack, w, _ = case
    q = Linear()(stack, w)
    used = (w.T > 0)[:, :, None]
    lo = np.where(used, stack.probs, np.inf).min(axis=0)
    hi = np.where(used, stack.probs, -np.inf).max(axis=0)
    assert (q >= lo - 1e-12).all() and (q <= hi + 1e-12).all()


@SETTINGS
@given(case=cases(zeros=True, zero_weights=True), op=st.sampled_from(MIXING_OPS))
def test_positivity(case, op):
    stack, w, _ = case
    q = op(stack, w)
    supported = ((stack.probs > 0) & (w.T > 0)[:, :, None]).any(axis=0)
    assert (q[supported] > 0).all()


@SETTINGS
@given(case=cases(zeros=False, zero_weights=True), op=all_ops)
def test_positivity_when_every_teacher_is_positive(case, op):
    stack, w, _ = case
    assert (op(stack, w) > 0).all()


@SETTINGS
@given(case=cases(zeros=False, zero_weights=True), op=all_ops, delta=st.floats(1e-3, 5.0))
def test_weight_monotonicity(case, op, delta):
    stack, w, rng = case
    j = int(rng.integers(stack.n_teachers))
    before = kl(stack.probs[j], stack.logprobs[j], log(op(stack, w)))
    after = kl(stack.probs[j], stack.logprobs[j], log(op(stack, raise_weight(w, j, delta))))
    assert (after <= before + 1e-10).all()


@SETTINGS
@given(case=cases(floor=0.05), op=all_ops, eta=st.floats(1e-6, 1e-2))
def test_continuity_lipschitz(case, op, eta):
    """TV(q, q') ≤ L·η when every teacher and the weights move by η (in TV / L1).

    L is generous but fixed: with probabilities bounded away from 0 every operator is smooth.
    """
    stack, w, rng = case
    noise = simplex(rng, stack.probs.shape, zeros=False, floor=0.05)
    moved = Stack((1 - eta) * stack.probs + eta * noise)
    w2 = (1 - eta) * w + eta * simplex(rng, w.shape, zeros=False)
    change = tv(op(stack, w), op(moved, w2))
    assert (change <= 200.0 * eta).all()


@SETTINGS
@given(case=cases(zeros=True), op=all_ops)
def test_single_teacher_of_weight_one_is_returned(case, op):
    stack, _, rng = case
    j = int(rng.integers(stack.n_teachers))
    w = np.zeros((stack.probs.shape[1], stack.n_teachers))
    w[:, j] = 1.0
    np.testing.assert_allclose(op(stack, w), stack.probs[j], atol=1e-12)


@SETTINGS
@given(case=cases(zeros=True, zero_weights=True))
def test_linear_jensen_bound(case):
    """KL(q‖s) ≤ Σ w_k KL(p_k‖s) for any student s (convexity of KL in its first argument)."""
    stack, w, rng = case
    q = Linear()(stack, w)
    s = simplex(rng, q.shape, zeros=False)
    lhs = kl(q, log(q), log(s))
    rhs = sum(
        w[:, k] * kl(stack.probs[k], stack.logprobs[k], log(s)) for k in range(stack.n_teachers)
    )
    assert (lhs <= rhs + 1e-10).all()


@SETTINGS
@given(case=cases(zeros=True, zero_weights=True))
def test_linear_safety_attenuation(case):
    """q(i) ≤ (1−w*)·max_j p_j(i) + w*·p*(i) for the safety teacher * of weight w*."""
    stack, w, rng = case
    star = int(rng.integers(stack.n_teachers))
    q = Linear()(stack, w)
    others = np.delete(stack.probs, star, axis=0)
    top_other = others.max(axis=0) if len(others) else np.zeros_like(q)
    ws = w[:, star, None]
    assert (q <= (1 - ws) * top_other + ws * stack.probs[star] + 1e-12).all()


@SETTINGS
@given(case=cases(zeros=False, zero_weights=True), op=st.sampled_from(LOGLOSS_OPS))
def test_log_loss_at_most_weighted_teacher_log_loss(case, op):
    """−log q(y) ≤ Σ_k w_k (−log p_k(y)) for every category y."""
    stack, w, _ = case
    q = op(stack, w)
    teacher_loss = np.einsum("nk,knc->nc", w, -stack.logprobs)
    assert (-np.log(q) <= teacher_loss + 1e-9).all()


@SETTINGS
@given(case=cases(zeros=False, zero_weights=True))
def test_power_mean_limits(case):
    stack, w, _ = case
    geo, lin = Geometric()(stack, w), Linear()(stack, w)
    np.testing.assert_allclose(PowerMean(0.0)(stack, w), geo, atol=1e-15)
    np.testing.assert_allclose(PowerMean(1e-7)(stack, w), geo, atol=1e-5)
    np.testing.assert_allclose(PowerMean(1 - 1e-7)(stack, w), lin, atol=1e-5)
    # Both evaluation branches agree where they meet (|α| = 1e-3).
    for a in (1e-3, -1e-3):
        np.testing.assert_allclose(
            PowerMean(a * (1 - 1e-9))(stack, w), PowerMean(a)(stack, w), atol=1e-9
        )


@SETTINGS
@given(case=cases(zeros=True, zero_weights=True))
def test_power_mean_of_any_finite_alpha_tends_to_the_max_or_min(case):
    """α = ±1e308 overflowed α·log p to −inf on every category (empty targets, all mass in
    the tail); the power mean tends to the max (min) of the weighted teachers as α → ±∞."""
    stack, w, _ = case
    used = (w.T > 0)[:, :, None]
    for alpha, pick, fill in ((1e308, np.max, 0.0), (-1e308, np.min, np.inf)):
        extreme = pick(np.where(used, stack.probs, fill), axis=0)
        total = extreme.sum(axis=1, keepdims=True)
        want = np.where(total > 0, extreme / np.where(total > 0, total, 1), Linear()(stack, w))
        got = PowerMean(alpha)(stack, w)
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert np.abs(PowerMean(np.copysign(1e6, alpha))(stack, w) - got).max() < 1e-4


def test_geometric_without_common_support_falls_back_to_linear():
    probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    w = np.array([[0.25, 0.75]])
    for op in (Geometric(), PowerMean(-1.0)):
        np.testing.assert_allclose(op(Stack(probs), w), [[0.25, 0.75]])


@SETTINGS
@given(case=cases(zeros=True, zero_weights=True))
def test_diagnostics(case):
    stack, w, _ = case
    q = Linear()(stack, w)
    gap = jensen_gap(stack, w, q)
    # Information radius: H(q) − Σ w_k H(p_k).
    radius = entropy(q, log(q)) - sum(
        w[:, k] * entropy(stack.probs[k], stack.logprobs[k]) for k in range(stack.n_teachers)
    )
    np.testing.assert_allclose(gap, radius, atol=1e-10)
    assert (gap >= -1e-12).all()
    d = disagreement(stack)
    assert ((d >= -1e-12) & (d <= 1 + 1e-12)).all()
    same = Stack(np.repeat(stack.probs[:1], stack.n_teachers, axis=0))
    np.testing.assert_allclose(disagreement(same), 0.0, atol=1e-15)
    np.testing.assert_allclose(jensen_gap(same, w, Geometric()(same, w)), 0.0, atol=1e-12)
    n_eff = effective_teachers(w)
    assert ((n_eff >= 1 - 1e-12) & (n_eff <= stack.n_teachers + 1e-9)).all()


def test_jensen_gap_charges_a_finite_log_q_where_q_misses_a_teachers_mass():
    """Geometric pooling zeroes what one teacher lacks: each teacher's KL charges log q =
    ZERO_Q_LOG (−30) on its mass there, so the gap is finite and a store keeps it."""
    from mtkd.distill.aggregate.diagnostics import ZERO_Q_LOG

    probs = np.array([[[0.5, 0.5, 0.0]], [[0.0, 0.5, 0.5]]])
    w = np.array([[0.5, 0.5]])
    q = Geometric()(Stack(probs), w)
    np.testing.assert_allclose(q, [[0.0, 1.0, 0.0]])
    each = 0.5 * (np.log(0.5) - ZERO_Q_LOG) + 0.5 * np.log(0.5)  # KL(p_k‖q), either teacher
    np.testing.assert_allclose(jensen_gap(Stack(probs), w, q), [each], rtol=1e-12)


def test_registry():
    assert set(OPERATORS) == {"linear", "geometric", "power_mean"}
    assert get_operator("power_mean", alpha=0.5) == PowerMean(0.5)
    assert isinstance(get_operator("geometric"), Geometric)
    with pytest.raises(ValueError, match="unknown operator 'mean'"):
        get_operator("mean")
    with pytest.raises(ValueError, match="needs alpha"):
        get_operator("power_mean")
    with pytest.raises(ValueError, match="finite"):
        PowerMean(float("nan"))
