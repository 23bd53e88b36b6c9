"""fuse(): a worked imputation example, dense golden values, output format, temperature
coherence end to end, and argument validation — every test runs on both backends (numpy and
numba), and the two are compared directly."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.distill.aggregate.fuse import BACKENDS, fuse
from mtkd.distill.aggregate.operators import Operator, get_operator
from mtkd.distill.aggregate.tempering import TeacherRows, temper
from mtkd.distill.aggregate.union import to_union

from .cases import TAILS, dense_logprobs, fused_dense, sparse_rows, teachers_case, tempered_dense

SETTINGS = settings(deadline=None)
OPERATORS = [
    ("linear", {}),
    ("geometric", {}),
    ("power_mean", {"alpha": 0.5}),
    ("power_mean", {"alpha": -0.7}),
]
HAS_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(scope="module", autouse=True, params=["numpy", "numba"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the module once per backend (``fuse`` reads MTKD_NUMBA on every call)."""
    if request.param == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    old = os.environ.get("MTKD_NUMBA")
    os.environ["MTKD_NUMBA"] = "1" if request.param == "numba" else "0"
    yield request.param
    if old is None:
        del os.environ["MTKD_NUMBA"]
    else:
        os.environ["MTKD_NUMBA"] = old


def as_half(t: TeacherRows) -> TeacherRows:
    """The rows with float16 log-probs, as a teacher store holds them."""
    return replace(t, logprobs=t.logprobs.astype(np.float16))


def operator(name: str, params: dict) -> Operator:
    return get_operator(name, **params)


def dense_reference(
    logps: list[np.ndarray], w: np.ndarray, temps: list[float], name: str, params: dict
) -> np.ndarray:
    """The straightforward dense computation of each operator on tempered full rows."""
    p = np.stack([np.exp(tempered_dense(lp, t)) for lp, t in zip(logps, temps, strict=True)])
    wk = w.T[:, :, None]
    if name == "linear":
        return (wk * p).sum(axis=0)
    if name == "geometric":
        m = np.exp((wk * np.log(p)).sum(axis=0))
    else:
        a = params["alpha"]
        m = (wk * p**a).sum(axis=0) ** (1 / a)
    return m / m.sum(axis=1, keepdims=True)


def test_imputation_worked_example():
    """V = 10. A: ids (0, 1) probs (.5, .3), tail .2; B: ids (1, 2) probs (.6, .1), tail .3.
    A lacks id 2: v = min(.2/8, .3) = .025, tail .175. B lacks id 0: v = min(.3/8, .1) = .0375,
    tail .2625. Equal-weight linear mixture over (0, 1, 2, tail)."""

    def rows(ids, probs, tail):
        return TeacherRows(np.array([ids], np.int32), np.log([probs]), np.log([tail]))

    a, b = rows([0, 1], [0.5, 0.3], 0.2), rows([1, 2], [0.6, 0.1], 0.3)
    block = to_union([temper(t, 1.0, "lump", 10) for t in (a, b)], 10)
    np.testing.assert_array_equal(block.ids, [[0, 1, 2]])
    np.testing.assert_allclose(block.stack.probs[0], [[0.5, 0.3, 0.025, 0.175]])
    np.testing.assert_allclose(block.stack.probs[1], [[0.0375, 0.6, 0.1, 0.2625]])
    out = fuse([a, b], [0.5, 0.5], 1.0, "linear", "lump", 2, 10)
    np.testing.assert_array_equal(out["ids"], [[1, 0]])
    np.testing.assert_allclose(out["probs"], [[0.45, 0.26875]], rtol=1e-6)
    np.testing.assert_allclose(out["tail_bucket"], [0.21875], rtol=1e-6)
    np.testing.assert_allclose(out["tail_mass"], [0.21875 + 0.0625], rtol=1e-6)


@pytest.mark.parametrize(("name", "params"), OPERATORS)
@pytest.mark.parametrize("tail", TAILS)
def test_dense_golden(name, params, tail):
    """With k = V (no tail), fuse equals the dense computation to 1e-6."""
    rng = np.random.default_rng(7)
    n, vocab, temps = 40, 30, [0.7, 1.5, 3.0]
    logps = [dense_logprobs(rng, n, vocab, s) for s in (1.0, 2.5, 4.0)]
    teachers = [sparse_rows(lp, vocab, tuple(temps)) for lp in logps]
    w = rng.dirichlet(np.ones(3), size=n)
    out = fuse(teachers, w, temps, operator(name, params), tail, vocab, vocab)
    got = fused_dense(out, vocab)
    np.testing.assert_allclose(
        got[:, :vocab], dense_reference(logps, w, temps, name, params), atol=1e-6
    )
    np.testing.assert_allclose(got[:, vocab], 0.0, atol=1e-6)


@SETTINGS
@given(
    case=teachers_case(),
    op=st.sampled_from(OPERATORS),
    tail=st.sampled_from(TAILS),
    k_out=st.integers(1, 50),
    block_rows=st.integers(1, 4),
)
def test_output_format(case, op, tail, k_out, block_rows):
    teachers, _, temps, w, vocab, _ = case
    out = fuse(
        teachers,
        w,
        temps,
        operator(*op),
        tail,
        k_out,
        vocab,
        keep_teacher_blocks=True,
        block_rows=block_rows,
    )
    n, n_teachers = teachers[0].n, len(teachers)
    assert out["ids"].shape == (n, k_out) and out["ids"].dtype == np.int32
    for key in (
        "probs",
        "tail_mass",
        "jensen_gap",
        "disagreement",
        "n_eff",
        "tail_bucket",
        "weights",
    ):
        assert out[key].dtype == np.float32, key
    assert out["weights"].shape == (n, n_teachers)
    ids, probs = out["ids"], out["probs"]
    assert ((ids == -1) == (probs == 0)).all()
    assert (np.diff(probs, axis=1) <= 0).all()
    for r in range(n):
        real = ids[r][ids[r] >= 0]
        assert len(np.unique(real)) == len(real) and (real < vocab).all()
    np.testing.assert_allclose(
        probs.sum(axis=1, dtype=np.float64) + out["tail_mass"], 1.0, atol=1e-6
    )
    assert (out["tail_mass"] >= out["tail_bucket"] - 1e-6).all()
    assert (out["jensen_gap"] >= -1e-6).all()
    for j, t in enumerate(teachers):
        np.testing.assert_array_equal(out[f"teacher{j}_ids"], t.ids)
        tempered = temper(t, temps[j], tail, vocab)
        np.testing.assert_allclose(out[f"teacher{j}_probs"], tempered.probs, atol=1e-7)
        np.testing.assert_allclose(out[f"teacher{j}_tail_mass"], tempered.tail_mass, atol=1e-7)
    # Row blocks are independent: any block size gives the same answer.
    again = fuse(teachers, w, temps, operator(*op), tail, k_out, vocab)
    np.testing.assert_allclose(fused_dense(again, vocab), fused_dense(out, vocab), atol=1e-6)


@SETTINGS
@given(
    case=teachers_case(),
    op=st.sampled_from(OPERATORS),
    tail=st.sampled_from(["lump", "zipf", "exact"]),
)
def test_temperature_one_single_teacher_is_identity(case, op, tail):
    teachers, _, _, _, vocab, _ = case
    t = teachers[0]
    out = fuse([t], [1.0], 1.0, operator(*op), tail, t.k, vocab)
    np.testing.assert_array_equal(out["ids"], t.ids)
    np.testing.assert_allclose(out["probs"], np.exp(t.logprobs), atol=1e-6)
    np.testing.assert_allclose(out["tail_mass"], np.exp(t.tail_logmass), atol=1e-6)


@SETTINGS
@given(case=teachers_case(), op=st.sampled_from(OPERATORS), tail=st.sampled_from(TAILS))
def test_single_teacher_of_weight_one_returns_its_tempered_distribution(case, op, tail):
    """Among others (weight 0), teacher j's tempered top-k comes back with its ranking; the
    rest of q (its imputed mass on other ids + tail) is its tempered tail."""
    teachers, _, temps, _, vocab, rng = case
    j = int(rng.integers(len(teachers)))
    w = np.zeros(len(teachers))
    w[j] = 1.0
    t = temper(teachers[j], temps[j], tail, vocab)
    out = fuse(teachers, w, temps, operator(*op), tail, 200, vocab)
    dense = fused_dense(out, vocab)
    own = np.take_along_axis(dense, teachers[j].ids.astype(np.intp), axis=1)
    np.testing.assert_allclose(own, t.probs, atol=1e-6)
    np.testing.assert_allclose(1.0 - own.sum(axis=1), t.tail_mass, atol=1e-6)
    # Ranking preserved: the fused order of its ids is its own (up to float32 ties).
    assert (np.diff(own, axis=1) <= 1e-7).all()


@SETTINGS
@given(
    case=teachers_case(),
    op=st.sampled_from(OPERATORS),
    t1=st.floats(0.3, 4.0),
    t2=st.floats(0.3, 4.0),
)
def test_entropy_grows_with_temperature(case, op, t1, t2):
    """Full-vocabulary (k = V) inputs. Single teacher: every operator. All teachers at one
    common T: geometric pooling (the pool of tempered teachers is the tempered pool). A linear
    mixture of several tempered teachers can lose entropy as T grows, so it is not asserted."""
    _, logps, _, w, vocab, _ = case
    lo, hi = min(t1, t2), max(t1, t2)
    name = op[0]
    if name != "geometric":
        logps, w = logps[:1], np.ones(1)
    teachers = [sparse_rows(lp, vocab) for lp in logps]

    def h(temp: float) -> np.ndarray:
        q = fused_dense(fuse(teachers, w, temp, operator(*op), "lump", vocab, vocab), vocab)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(q > 0, q * np.log(q), 0).sum(axis=1)

    assert (h(hi) >= h(lo) - 1e-5).all()


def test_weight_policy_gets_tempered_entropies():
    logp = dense_logprobs(np.random.default_rng(3), 5, 20, 2.0)
    teachers = [sparse_rows(logp, 4), sparse_rows(logp, 4)]
    seen = {}

    def policy(inputs):
        seen["entropy"] = inputs.entropy
        return np.full((5, 2), 0.5)

    fuse(teachers, policy, [1.0, 2.0], "linear", "lump", 4, 20)
    np.testing.assert_allclose(
        seen["entropy"][:, 0], temper(teachers[0], 1.0, "lump", 20).entropy()
    )
    np.testing.assert_allclose(
        seen["entropy"][:, 1], temper(teachers[1], 2.0, "lump", 20).entropy()
    )


def test_empty_block():
    logp = dense_logprobs(np.random.default_rng(5), 3, 12, 1.0)
    t = sparse_rows(logp, 4)
    empty = TeacherRows(t.ids[:0], t.logprobs[:0], t.tail_logmass[:0])
    out = fuse(
        [empty, empty], [0.5, 0.5], 2.0, "geometric", "zipf", 4, 12, keep_teacher_blocks=True
    )
    assert out["ids"].shape == (0, 4) and out["weights"].shape == (0, 2)
    assert out["teacher1_probs"].shape == (0, 4)


def test_fuse_validation_errors():
    logp = dense_logprobs(np.random.default_rng(4), 3, 12, 1.0)
    t = sparse_rows(logp, 4)
    with pytest.raises(ValueError, match="unknown operator"):
        fuse([t], [1.0], 1.0, "average", "lump", 4, 12)
    with pytest.raises(ValueError, match="unknown tail model"):
        fuse([t], [1.0], 1.0, "linear", "uniform", 4, 12)
    with pytest.raises(ValueError, match="temperatures"):
        fuse([t, t], [0.5, 0.5], [1.0, 0.0], "linear", "lump", 4, 12)
    with pytest.raises(ValueError, match="temperatures"):
        fuse([t, t], [0.5, 0.5], [1.0, 2.0, 3.0], "linear", "lump", 4, 12)
    with pytest.raises(ValueError, match="sum to 1"):
        fuse([t, t], [0.5, 0.6], 1.0, "linear", "lump", 4, 12)
    with pytest.raises(ValueError, match=">= 0"):
        fuse([t, t], [1.5, -0.5], 1.0, "linear", "lump", 4, 12)
    with pytest.raises(ValueError, match="exact"):
        fuse([t], [1.0], 2.0, "linear", "exact", 4, 12)
    with pytest.raises(ValueError, match="outside"):
        fuse([t], [1.0], 1.0, "linear", "lump", 4, 10)
    short = TeacherRows(t.ids[:2], t.logprobs[:2], t.tail_logmass[:2])
    with pytest.raises(ValueError, match="rows"):
        fuse([t, short], [0.5, 0.5], 1.0, "linear", "lump", 4, 12)
    with pytest.raises(ValueError, match="k_out"):
        fuse([t], [1.0], 1.0, "linear", "lump", 0, 12)
    with pytest.raises(ValueError, match="at least one teacher"):
        fuse([], [], 1.0, "linear", "lump", 4, 12)


@SETTINGS
@given(
    case=teachers_case(),
    op=st.sampled_from(OPERATORS),
    tail=st.sampled_from(TAILS),
    imputation=st.sampled_from(["even", "rank"]),
    half=st.booleans(),
    k_out=st.integers(1, 50),
    policy=st.booleans(),
)
def test_backends_agree(case, op, tail, imputation, half, k_out, policy):
    """numba and numpy give the same targets and diagnostics (to 1e-6), float16 inputs (the
    numba table path) included."""
    if not HAS_NUMBA:
        pytest.skip("numba is not installed")
    teachers, _, temps, w, vocab, _ = case
    if half:
        teachers = [as_half(t) for t in teachers]

    def weights(inputs):  # a policy sees the entropies; use them
        z = -inputs.entropy
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    outs = [
        fuse(teachers, weights if policy else w, temps, operator(*op), tail, k_out, vocab,
             keep_teacher_blocks=True, imputation=imputation, backend=b, block_rows=3)
        for b in BACKENDS
    ]
    a, b = outs
    np.testing.assert_allclose(fused_dense(a, vocab), fused_dense(b, vocab), atol=1e-6)
    for key in a:
        if key.endswith("_ids") or key == "ids":
            continue
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(a["ids"] >= 0, b["ids"] >= 0)


def test_rank_imputation_is_identity_for_a_single_teacher():
    logp = dense_logprobs(np.random.default_rng(11), 6, 30, 2.0)
    t = sparse_rows(logp, 5)
    a = fuse([t], [1.0], 2.0, "geometric", "zipf", 5, 30, imputation="rank")
    b = fuse([t], [1.0], 2.0, "geometric", "zipf", 5, 30)
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-7)


def test_half_inputs_equal_their_float64_values():
    """Float16 log-probs give the same targets as the same values in float64."""
    rng = np.random.default_rng(12)
    teachers = [as_half(sparse_rows(dense_logprobs(rng, 20, 50, s), 6)) for s in (1.0, 3.0)]
    wide = [replace(t, logprobs=t.logprobs.astype(np.float64)) for t in teachers]
    for op in ("linear", "geometric"):
        a = fuse(teachers, [0.4, 0.6], [2.0, 1.0], op, "zipf", 8, 50)
        b = fuse(wide, [0.4, 0.6], [2.0, 1.0], op, "zipf", 8, 50)
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-7)
        np.testing.assert_allclose(a["jensen_gap"], b["jensen_gap"], atol=1e-6)


def test_geometric_rows_with_no_shared_support_fall_back_to_linear():
    """Two teachers with disjoint full supports (k = V, no tail): every geometric product is 0,
    so the row falls back to the linear mixture (as operators.Geometric does)."""
    a = TeacherRows(np.array([[0, 1]], np.int32), np.log([[0.7, 0.3]]), np.array([-np.inf]))
    b = TeacherRows(np.array([[2, 3]], np.int32), np.log([[0.6, 0.4]]), np.array([-np.inf]))
    out = fuse([a, b], [0.5, 0.5], 1.0, "geometric", "renormalise", 4, 4)
    np.testing.assert_allclose(fused_dense(out, 4)[0, :4], [0.35, 0.15, 0.3, 0.2], atol=1e-7)


def test_backend_and_imputation_validation():
    t = sparse_rows(dense_logprobs(np.random.default_rng(4), 3, 12, 1.0), 4)
    with pytest.raises(ValueError, match="unknown backend"):
        fuse([t], [1.0], 1.0, "linear", "lump", 4, 12, backend="cuda")
    with pytest.raises(ValueError, match="unknown imputation"):
        fuse([t], [1.0], 1.0, "linear", "lump", 4, 12, imputation="mean")
    bad = replace(t, ids=np.where(t.ids == t.ids[0, 0], 12, t.ids).astype(np.int32))
    for b in BACKENDS if HAS_NUMBA else ("numpy",):
        with pytest.raises(ValueError, match="outside"):
            fuse([t, bad], [0.5, 0.5], 1.0, "linear", "lump", 4, 12, backend=b)
