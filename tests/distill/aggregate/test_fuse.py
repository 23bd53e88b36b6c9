"""fuse(): union of supports, imputation, dense golden values, output format, temperature
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

from mtkd.distill.aggregate.fuse import (
    BACKENDS,
    add_label_entry,
    fuse,
    impute,
    log_rank_share,
    to_union,
    top_k,
    union_support,
)
from mtkd.distill.aggregate.operators import Operator, Stack, get_operator
from mtkd.distill.aggregate.tails import Zipf
from mtkd.distill.aggregate.tempering import TeacherRows, temper

from .test_tails import dense_logprobs, sparse_rows, tempered_dense

SETTINGS = settings(deadline=None)
OPERATORS = [
    ("linear", {}),
    ("geometric", {}),
    ("power_mean", {"alpha": 0.5}),
    ("power_mean", {"alpha": -0.7}),
]
TAILS = ["renormalise", "lump", "zipf", "exact"]
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


def fused_dense(out: dict[str, np.ndarray], vocab: int) -> np.ndarray:
    """The fused target as dense rows [N, V+1]: probs at ids, tail_mass in the last column."""
    n = out["ids"].shape[0]
    dense = np.zeros((n, vocab + 1))
    rows, cols = np.nonzero(out["ids"] >= 0)
    dense[rows, out["ids"][rows, cols]] = out["probs"][rows, cols]
    dense[:, vocab] = out["tail_mass"]
    return dense


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


@st.composite
def teachers_case(draw: st.DrawFn, max_teachers: int = 3):
    """Random dense teachers over a small vocabulary, harvested as top-k rows (k may differ)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_teachers = draw(st.integers(1, max_teachers))
    n, vocab = draw(st.integers(1, 6)), draw(st.integers(2, 40))
    temps = [draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for _ in range(n_teachers)]
    logps = [dense_logprobs(rng, n, vocab, draw(st.floats(0.3, 4.0))) for _ in range(n_teachers)]
    ks = [draw(st.integers(1, vocab)) for _ in range(n_teachers)]
    teachers = [
        sparse_rows(lp, k, tuple(sorted(set(temps)))) for lp, k in zip(logps, ks, strict=True)
    ]
    w = rng.dirichlet(np.ones(n_teachers))
    return teachers, logps, temps, w, vocab, rng


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_teachers=st.integers(1, 4), vocab=st.integers(1, 50))
def test_union_support_matches_per_row_union(seed, n_teachers, vocab):
    rng = np.random.default_rng(seed)
    n = 7
    ids = [
        np.argsort(rng.random((n, vocab)), axis=1)[:, : rng.integers(1, vocab + 1)].astype(np.int32)
        for _ in range(n_teachers)
    ]
    union, counts, cols = union_support(ids, vocab)
    for r in range(n):
        want = np.unique(np.concatenate([a[r] for a in ids]))
        assert counts[r] == len(want)
        np.testing.assert_array_equal(union[r, : counts[r]], want)
        assert (union[r, counts[r] :] == -1).all()
    np.testing.assert_array_equal(
        np.take_along_axis(union, cols.astype(np.intp), axis=1), np.concatenate(ids, axis=1)
    )


@SETTINGS
@given(case=teachers_case(), tail=st.sampled_from(TAILS))
def test_union_imputation_conserves_each_teachers_mass(case, tail):
    teachers, _, temps, _, vocab, _ = case
    tempered = [temper(t, tt, tail, vocab) for t, tt in zip(teachers, temps, strict=True)]
    block = to_union(tempered, vocab)
    probs = block.stack.probs
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, atol=1e-12)
    size = block.ids.shape[1]
    pad = np.arange(size) >= block.counts[:, None]
    assert (probs[:, :, :size][:, pad] == 0).all()
    for j, t in enumerate(tempered):
        in_union = np.searchsorted(block.ids[0, : block.counts[0]], t.ids[0])
        np.testing.assert_allclose(probs[j, 0, in_union], t.probs[0], rtol=1e-12)
        lacks = ~np.isin(block.ids, t.ids) & ~pad
        imputed = probs[j, :, :size][lacks]
        rows = np.nonzero(lacks)[0]
        # At most the k-th prob and at most the even share of the tempered tail.
        assert (imputed <= t.probs.min(axis=1)[rows] * (1 + 1e-12)).all()
        assert (imputed <= t.tail_mass[rows] / max(vocab - t.ids.shape[1], 1) * (1 + 1e-9)).all()
    # The sparse Σ p log p equals the dense one.
    np.testing.assert_allclose(block.stack.plogp, Stack(probs).plogp, atol=1e-12)


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


def test_top_k_orders_pads_and_breaks_ties_by_column():
    q = np.array([[0.1, 0.4, 0.1, 0.0, 0.4], [0.5, 0.5, 0.0, 0.0, 0.0]])
    ids = np.array([[3, 5, 7, 9, 11], [2, 4, -1, -1, -1]], dtype=np.int32)
    got_ids, got_probs = top_k(q, ids, 6)
    np.testing.assert_array_equal(got_ids, [[5, 11, 3, 7, -1, -1], [2, 4, -1, -1, -1, -1]])
    np.testing.assert_allclose(got_probs[0], [0.4, 0.4, 0.1, 0.1, 0, 0])


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


@SETTINGS
@given(case=teachers_case(), tail=st.sampled_from(TAILS))
def test_rank_imputation_conserves_mass_and_exceeds_the_even_share(case, tail):
    """Rank-based imputation: each lacking teacher still sums to 1, its imputed mass stays
    ≤ its k-th prob and ≤ its tail, and is at least the even share (the first ranks of a
    decreasing tail hold at least their even share of it)."""
    teachers, _, temps, _, vocab, _ = case
    tempered = [temper(t, tt, tail, vocab) for t, tt in zip(teachers, temps, strict=True)]
    exps = [Zipf().exponent(t.logprobs) / tt for t, tt in zip(teachers, temps, strict=True)]
    block = to_union(tempered, vocab, rank_exponents=exps)
    np.testing.assert_allclose(block.stack.probs.sum(axis=2), 1.0, atol=1e-12)
    assert (block.stack.probs >= 0).all()
    for t, s in zip(tempered, exps, strict=True):
        rank, even = impute(t, block.counts, vocab, s), impute(t, block.counts, vocab)
        missing = block.counts - t.ids.shape[1]
        lacks = missing > 0
        assert (rank.v[lacks] <= t.probs.min(axis=1)[lacks] * (1 + 1e-12)).all()
        assert (missing * rank.v <= t.tail_mass * (1 + 1e-9) + 1e-300).all()
        assert (rank.v[lacks] >= even.v[lacks] * (1 - 1e-9)).all()
        np.testing.assert_allclose(rank.tail + missing * rank.v, t.tail_mass, atol=1e-12)


@pytest.mark.parametrize("s", [0.0, 0.5, 1.0, 1.7, 3.0])
@pytest.mark.parametrize(("k", "m", "vocab"), [(16, 1, 100), (64, 20, 32000), (64, 100, 500)])
def test_rank_share_against_direct_sums(s, k, m, vocab):
    ranks = np.arange(k + 1, vocab + 1, dtype=np.float64)
    terms = ranks**-s
    want = terms[:m].sum() / terms.sum()
    got = np.exp(log_rank_share(np.array([s]), k, np.array([m]), vocab))[0]
    assert got <= 1.0
    np.testing.assert_allclose(got, want, rtol=2e-3)


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


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_label_entry_keeps_the_distribution(seed: int, k: int) -> None:
    """add_label_entry: Σ probs + tail is unchanged, the label gets min(p, tail) only where the
    support lacks it, and every other column is untouched."""
    rng = np.random.default_rng(seed)
    n, vocab = 16, 12
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    probs = rng.dirichlet(np.ones(k + 1), n)
    tail = probs[:, -1].copy()
    probs = probs[:, :k]
    labels = rng.integers(0, vocab, n)
    label_probs = tail * rng.uniform(0, 1.2, n)  # above the tail now and then: capped
    out_ids, out_probs, out_tail = add_label_entry(ids, probs, tail, labels, label_probs)
    np.testing.assert_array_equal(out_ids[:, :k], ids)
    np.testing.assert_array_equal(out_probs[:, :k], probs)
    np.testing.assert_allclose(out_probs.sum(axis=1) + out_tail, 1.0, atol=1e-12)
    outside = ~(ids == labels[:, None]).any(axis=1)
    np.testing.assert_array_equal(out_ids[:, k], np.where(outside, labels, -1))
    np.testing.assert_allclose(out_probs[:, k], np.where(outside, np.minimum(label_probs, tail), 0))
    assert np.all(out_tail >= 0)
