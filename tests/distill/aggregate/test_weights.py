"""Weight policies: validation, normalisation, boundedness, continuity, the safety floor, and
each policy through fuse against the axioms of DESIGN.md §1."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.distill.aggregate.diagnostics import kl
from mtkd.distill.aggregate.fuse import fuse
from mtkd.distill.aggregate.operators import get_operator
from mtkd.distill.aggregate.tempering import temper
from mtkd.distill.aggregate.union import to_union
from mtkd.distill.aggregate.weights import (
    AdaptiveWeights,
    WeightInputs,
    apply_safety_floor,
    compose,
    context_logits,
    fit_mixture_weights,
    sequence_mean_loss,
    validate_temperatures,
    validate_weights,
)

from .cases import dense_logprobs, fused_dense, sparse_rows

SETTINGS = settings(deadline=None)
KINDS = ["static", "entropy", "target", "task", "context_loss", "context_feature", "composite"]
OPERATORS = [("linear", {}), ("geometric", {}), ("power_mean", {"alpha": 0.5})]


class Signals:
    """Random per-row signals and block layout for K teachers over N rows in S sequences."""

    def __init__(self, rng: np.random.Generator, n_teachers: int) -> None:
        lengths = rng.integers(0, 5, size=rng.integers(1, 5))
        lengths[0] += 1  # at least one row
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        n = int(self.offsets[-1])
        self.inputs = WeightInputs(
            entropy=rng.uniform(0, 5, (n, n_teachers)),
            target_logprob=-rng.exponential(2.0, (n, n_teachers)),
        )
        self.feature = rng.uniform(0, 4, (len(lengths), n_teachers))
        self.table = rng.uniform(0, 1, (3, n_teachers))
        self.table[rng.random(self.table.shape) < 0.2] = 0.0
        self.table[:, 0] += 0.1  # every task keeps someone
        self.task = rng.integers(0, 3, n)


def make_policy(
    kind: str,
    sig: Signals,
    base: np.ndarray,
    sharpness: float,
    eps: float = 0.0,
    safety: int | None = None,
    floor: float | None = None,
) -> AdaptiveWeights:
    common = {"base": base, "eps": eps, "safety_index": safety, "safety_floor": floor}
    token = {"token_sharpness": sharpness}
    ctx = {"context_sharpness": sharpness, "seq_offsets": sig.offsets}
    spec = {
        "static": {},
        "entropy": {"token": "entropy", **token},
        "target": {"token": "target", **token},
        "task": {"task_table": sig.table, "task_index": sig.task},
        "context_loss": {"context": "loss", **ctx},
        "context_feature": {"context": "feature", "context_feature": sig.feature, **ctx},
        "composite": {
            "token": "entropy",
            **token,
            "task_table": sig.table,
            "task_index": sig.task,
            "context": "loss",
            **ctx,
        },
    }[kind]
    return AdaptiveWeights(**common, **spec)


@st.composite
def policy_case(draw: st.DrawFn, with_bounds: bool = True, min_eps: float = 0.0):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_teachers = draw(st.integers(1, 4))
    sig = Signals(rng, n_teachers)
    base = rng.dirichlet(np.ones(n_teachers))
    kind = draw(st.sampled_from(KINDS))
    sharpness = draw(st.floats(0.0, 20.0))
    eps = safety = floor = None
    if with_bounds:
        eps = max(draw(st.floats(0.0, 1.0)) / n_teachers * 0.5, min_eps)
        safety = draw(st.one_of(st.none(), st.integers(0, n_teachers - 1)))
        floor = draw(st.one_of(st.none(), st.floats(0.0, 1.0))) if safety is not None else None
        if floor is not None:
            floor *= 1 - (n_teachers - 1) * eps
    return kind, sig, base, sharpness, eps or 0.0, safety, floor, rng


@SETTINGS
@given(case=policy_case())
def test_normalisation_boundedness_and_safety_floor(case):
    kind, sig, base, sharpness, eps, safety, floor, _ = case
    w = make_policy(kind, sig, base, sharpness, eps, safety, floor)(sig.inputs)
    assert w.shape == sig.inputs.entropy.shape
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= eps - 1e-12).all()
    if safety is not None:
        want = min(base[safety], 1 - (len(base) - 1) * eps) if floor is None else floor
        assert (w[:, safety] >= want - 1e-12).all()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), sharpness=st.floats(1.0, 1e3), floor=st.floats(0, 1))
def test_safety_floor_holds_against_adversarial_signals(seed, sharpness, floor):
    """The safety teacher has the worst entropy and loss everywhere and 0 in the task table."""
    rng = np.random.default_rng(seed)
    sig = Signals(rng, 3)
    sig.inputs.entropy[:, 0] = 50.0
    sig.inputs.target_logprob[:, 0] = -50.0
    sig.table[:, 0] = 0.0
    sig.table[:, 1] += 0.1
    eps = 0.05
    floor *= 1 - 2 * eps
    w = make_policy("composite", sig, np.full(3, 1 / 3), sharpness, eps, 0, floor)(sig.inputs)
    assert (w[:, 0] >= floor - 1e-12).all()
    assert (w >= eps - 1e-12).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


@SETTINGS
@given(case=policy_case(), delta=st.floats(1e-7, 1e-3))
def test_continuity_in_the_signals(case, delta):
    """‖Δw‖₁ ≤ L·δ when entropies, target log-probs and sequence features move by ≤ δ."""
    kind, sig, base, sharpness, eps, safety, floor, rng = case
    policy = make_policy(kind, sig, base, sharpness, eps, safety, floor)
    w = policy(sig.inputs)
    moved = WeightInputs(
        sig.inputs.entropy + rng.uniform(-delta, delta, sig.inputs.entropy.shape),
        sig.inputs.target_logprob + rng.uniform(-delta, delta, sig.inputs.entropy.shape),
    )
    sig.feature += rng.uniform(-delta, delta, sig.feature.shape)
    w2 = make_policy(kind, sig, base, sharpness, eps, safety, floor)(moved)
    assert (np.abs(w2 - w).sum(axis=1) <= 8 * (2 * sharpness + 1) * delta + 1e-12).all()


@SETTINGS
@given(case=policy_case(), delta=st.floats(1e-3, 2.0))
def test_raising_a_teachers_base_weight_never_lowers_its_weight(case, delta):
    kind, sig, base, sharpness, eps, safety, floor, rng = case
    j = int(rng.integers(len(base)))
    raised = base.copy()
    raised[j] += delta
    raised /= raised.sum()
    if safety is not None and floor is None:
        floor = min(base[safety], 1 - (len(base) - 1) * eps)  # fixed while the base moves
    w = make_policy(kind, sig, base, sharpness, eps, safety, floor)(sig.inputs)
    w2 = make_policy(kind, sig, raised, sharpness, eps, safety, floor)(sig.inputs)
    assert (w2[:, j] >= w[:, j] - 1e-12).all()


# --- every policy through fuse, against the five axioms --------------------------------------


def fuse_case(rng: np.random.Generator, n: int, n_teachers: int):
    vocab = 30
    logps = [dense_logprobs(rng, n, vocab, s) for s in rng.uniform(0.5, 3.0, n_teachers)]
    teachers = [sparse_rows(lp, int(rng.integers(3, 8))) for lp in logps]
    teachers = [
        replace(t, target_logprob=t.logprobs[:, 0] - rng.exponential(1.0, n)) for t in teachers
    ]
    temps = list(rng.choice([1.0, 2.0], n_teachers))
    return teachers, temps, vocab


@SETTINGS
@given(case=policy_case(min_eps=0.01), op=st.sampled_from(OPERATORS), eta=st.floats(1e-6, 1e-3))
def test_each_policy_through_fuse_satisfies_the_axioms(case, op, eta):
    kind, sig, base, sharpness, eps, safety, floor, rng = case
    n, n_teachers = sig.inputs.entropy.shape
    teachers, temps, vocab = fuse_case(rng, n, n_teachers)
    policy = make_policy(kind, sig, base, sharpness, eps, safety, floor)
    out = fuse(teachers, policy, temps, get_operator(op[0], **op[1]), "zipf", 64, vocab)
    q = fused_dense(out, vocab)
    # Convexity: a distribution.
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-6)
    # Positivity: every teacher has weight ≥ ε > 0, so each of its top-k ids keeps mass.
    for t in teachers:
        assert (np.take_along_axis(q, t.ids.astype(np.intp), axis=1) > 0).all()
    # Continuity: perturbing every teacher's log-probs by ≤ η moves q by O(η) in TV.
    moved = [
        replace(t, logprobs=t.logprobs + rng.uniform(-eta, eta, t.logprobs.shape)) for t in teachers
    ]
    q2 = fused_dense(
        fuse(moved, policy, temps, get_operator(op[0], **op[1]), "zipf", 64, vocab), vocab
    )
    assert (0.5 * np.abs(q2 - q).sum(axis=1) <= 50 * (sharpness + 1) * eta + 1e-5).all()


@SETTINGS
@given(
    case=policy_case(with_bounds=False), op=st.sampled_from(OPERATORS), delta=st.floats(1e-2, 2.0)
)
def test_each_policy_is_weight_monotone_and_temperature_coherent(case, op, delta):
    """Raising a teacher's base weight does not increase KL(p_j‖q) (product-structure weights
    move the others proportionally); a one-hot base returns that teacher's tempered rows."""
    kind, sig, base, sharpness, _, _, _, rng = case
    n, n_teachers = sig.inputs.entropy.shape
    teachers, temps, vocab = fuse_case(rng, n, n_teachers)
    tempered = [temper(t, tt, "zipf", vocab) for t, tt in zip(teachers, temps, strict=True)]
    stack = to_union(tempered, vocab).stack
    inputs = WeightInputs(
        np.stack([t.entropy() for t in tempered], axis=1),
        np.stack([t.target_logprob for t in teachers], axis=1),
    )
    operator = get_operator(op[0], **op[1])
    j = int(rng.integers(n_teachers))
    sig.table[:, j] += 0.1  # the one-hot base below needs j alive on every task
    raised = base.copy()
    raised[j] += delta
    raised /= raised.sum()
    kls = []
    for b in (base, raised):
        q = operator(stack, make_policy(kind, sig, b, sharpness)(inputs))
        with np.errstate(divide="ignore"):
            kls.append(kl(stack.probs[j], stack.logprobs[j], np.log(q)))
    assert (kls[1] <= kls[0] + 1e-9).all()
    one_hot = np.zeros(n_teachers)
    one_hot[j] = 1.0
    q = fused_dense(
        fuse(
            teachers, make_policy(kind, sig, one_hot, sharpness), temps, operator, "zipf", 64, vocab
        ),
        vocab,
    )
    own = np.take_along_axis(q, teachers[j].ids.astype(np.intp), axis=1)
    np.testing.assert_allclose(own, tempered[j].probs, atol=1e-6)


# --- building blocks and validation ----------------------------------------------------------


def test_sequence_mean_loss_and_context_broadcast():
    logp = np.array([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])
    offsets = np.array([0, 2, 2, 3])
    np.testing.assert_allclose(sequence_mean_loss(logp, offsets), [[2, 3], [0, 0], [5, 6]])
    logits = context_logits(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), offsets, 2.0)
    np.testing.assert_allclose(logits, [[-2, -4], [-2, -4], [-10, -12]])
    # A zero-probability token makes that sequence's loss inf, and only that one.
    logp[0, 0] = -np.inf
    np.testing.assert_allclose(sequence_mean_loss(logp, offsets), [[np.inf, 3], [0, 0], [5, 6]])
    with pytest.raises(ValueError, match="seq_offsets"):
        sequence_mean_loss(logp, np.array([0, 2]))


def test_safety_floor_redistributes_the_others_proportionally():
    w = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    got = apply_safety_floor(w, 0, 0.4)
    np.testing.assert_allclose(got, [[0.4, 0.4, 0.2], [0.5, 0.25, 0.25]])
    got = apply_safety_floor(np.array([[0.05, 0.05, 0.9]]), 0, 0.4, eps=0.05)
    np.testing.assert_allclose(got, [[0.4, 0.05, 0.55]])


def test_validate_weights():
    np.testing.assert_allclose(validate_weights([0.25, 0.75], 2), [0.25, 0.75])
    np.testing.assert_allclose(validate_weights([1, 3], 2, normalise=True), [0.25, 0.75])
    np.testing.assert_allclose(
        validate_weights([[1, 1], [0, 2]], 2, normalise=True), [[0.5, 0.5], [0, 1]]
    )
    with pytest.raises(ValueError, match="sum to 1"):
        validate_weights([0.5, 0.6], 2)
    with pytest.raises(ValueError, match=">= 0"):
        validate_weights([1.5, -0.5], 2)
    with pytest.raises(ValueError, match="finite"):
        validate_weights([np.nan, 1.0], 2)
    with pytest.raises(ValueError, match="all 0"):
        validate_weights([0.0, 0.0], 2, normalise=True)
    with pytest.raises(ValueError, match="shape"):
        validate_weights([1.0], 2)
    with pytest.raises(ValueError, match="rows"):
        validate_weights(np.full((3, 2), 0.5), 2, n_rows=4)


def test_validate_temperatures():
    np.testing.assert_allclose(validate_temperatures(2.0, 3), [2, 2, 2])
    np.testing.assert_allclose(validate_temperatures([1, 2], 2), [1, 2])
    for bad in ([1.0, 0.0], [1.0, -2.0], [1.0, np.inf], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="finite and > 0"):
            validate_temperatures(bad, 2)
    with pytest.raises(ValueError, match="one per teacher"):
        validate_temperatures([1.0, 2.0, 3.0], 2)


def test_policy_validation_errors():
    inputs = WeightInputs(np.ones((2, 2)))
    with pytest.raises(ValueError, match="token-level"):
        AdaptiveWeights(token="loss")
    with pytest.raises(ValueError, match="task_table and task_index"):
        AdaptiveWeights(task_table=np.ones((1, 2)))
    with pytest.raises(ValueError, match="seq_offsets"):
        AdaptiveWeights(context="loss")
    with pytest.raises(ValueError, match="context_feature"):
        AdaptiveWeights(context="feature", seq_offsets=np.array([0, 2]))
    with pytest.raises(ValueError, match="target_logprob"):
        AdaptiveWeights(token="target")(inputs)
    with pytest.raises(ValueError, match="sharpness"):
        AdaptiveWeights(token="entropy", token_sharpness=-1.0)(inputs)
    with pytest.raises(ValueError, match="out of range"):
        AdaptiveWeights(task_table=np.ones((1, 2)), task_index=np.array([0, 1]))(inputs)
    with pytest.raises(ValueError, match="eps"):
        AdaptiveWeights(eps=0.6)(inputs)
    with pytest.raises(ValueError, match="safety-floor"):
        AdaptiveWeights(eps=0.2, safety_index=0, safety_floor=0.9)(inputs)
    with pytest.raises(ValueError, match="safety teacher index"):
        AdaptiveWeights(safety_index=2, safety_floor=0.1)(inputs)
    with pytest.raises(ValueError, match="vanish"):
        compose([np.full((2, 2), -np.inf)], 2, 2)


def mixture_loglik(lp: np.ndarray, w: np.ndarray) -> float:
    return float(np.mean(np.log(np.exp(lp) @ w)))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5), n=st.integers(1, 300))
def test_fitted_weights_beat_every_single_teacher_and_uniform(seed, k, n):
    rng = np.random.default_rng(seed)
    lp = np.log(rng.dirichlet(np.ones(k) * 0.5, size=n).clip(1e-12)) * rng.uniform(0.5, 3, k)
    w = fit_mixture_weights(lp)
    assert w.shape == (k,) and np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
    best = mixture_loglik(lp, w)
    for j in range(k):
        assert best >= float(np.mean(lp[:, j])) - 1e-9
    assert best >= mixture_loglik(lp, np.full(k, 1 / k)) - 1e-9
    # the optimum: no small move along the simplex improves the likelihood
    for j in range(k):
        moved = 0.99 * w + 0.01 * np.eye(k)[j]
        assert mixture_loglik(lp, moved) <= best + 1e-7


def test_fitted_weights_recover_the_generating_mixture():
    """Tokens drawn from 0.7·A + 0.3·B over a shared vocabulary: EM finds about (0.7, 0.3)."""
    rng = np.random.default_rng(0)
    vocab, n = 50, 200_000
    a, b = rng.dirichlet(np.ones(vocab) * 0.3, size=2)
    tokens = np.where(rng.random(n) < 0.7, rng.choice(vocab, n, p=a), rng.choice(vocab, n, p=b))
    lp = np.log(np.stack([a[tokens], b[tokens]], axis=1))
    np.testing.assert_allclose(fit_mixture_weights(lp), [0.7, 0.3], atol=0.01)


def test_fitted_weights_ignore_impossible_rows_and_refuse_bad_input():
    lp = np.log(np.array([[0.5, 0.1], [0.4, 0.2], [0.0, 0.0]]))
    w = fit_mixture_weights(lp)
    assert w[0] > 0.99  # teacher 0 is better on every possible row
    with pytest.raises(ValueError, match="N,K"):
        fit_mixture_weights(np.zeros(3))
    with pytest.raises(ValueError, match="no position"):
        fit_mixture_weights(np.full((2, 2), -np.inf))
