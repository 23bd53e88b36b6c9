"""The aggregate job end to end: teacher stores → target store.

Small stores built in the test (random dense teachers over a vocabulary of 40, top-8 log-probs,
default q64 top-k coding and zstd codec), checked against :func:`fuse` on the same rows, plus
refusals, resume, processes and pipelining, and q64 against float32 teacher stores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtkd.distill.aggregate.fuse import fuse
from mtkd.distill.aggregate.job import (
    TEACHER_ARRAYS,
    AggregateConfig,
    _read_part,
    aggregate,
    teacher_rows,
)
from mtkd.distill.aggregate.tempering import temper
from mtkd.distill.aggregate.weights import AdaptiveWeights, fit_mixture_weights
from mtkd.harvest.hf_engine import sample_targets
from mtkd.store import IncompleteStoreError, StoreError, StoreWriter, open_store
from mtkd.store import q64_grid as grid
from mtkd.store import topk_codec as tc
from mtkd.store.schema import TARGET, TEACHER, TOKENS, teacher_header, tokens_header

VOCAB, K = 40, 8
TASKS = ("code", "prose", "math")  # "math" has no task weights in the tests below
PARTS = 3


def make_tokens(root: Path, seed: int = 0, tokenizer_hash: str = "tok") -> Path:
    """A tokens store of 3 parts, 4 sequences each (lengths 5..12), task tags in its meta."""
    rng = np.random.default_rng(seed)
    out = root / "tokens"
    writer = StoreWriter(out, tokens_header(PARTS, {"tokenizer_hash": tokenizer_hash,
                                                    "vocab_size": VOCAB, "eos_id": None}))
    for p in range(PARTS):
        lengths = rng.integers(5, 13, size=4)
        seq_ids = (p << 32) + np.arange(4)
        tasks = [TASKS[(p + i) % 3] for i in range(4)]
        meta = pa.table({"seq_id": seq_ids, "task": tasks})
        with writer.open_part(p) as pw:
            pw.append({"token_ids": rng.integers(0, VOCAB, int(lengths.sum())).astype(np.int32)},
                      lengths, seq_ids, meta)
    assert writer.finalize()
    return out


def make_teacher(root: Path, tokens_dir: Path, name: str, seed: int, scale: float,
                 *, complete: bool = True, tokenizer_hash: str | None = None,
                 temperatures: tuple[float, ...] = (), logprob_dtype: str = "q64",
                 num_samples: int = 0, sample_rest: bool = False, stream_rows: int = 0,
                 code_scalars: bool = True, sample_temperature: float = 1.0) -> Path:
    """A teacher store over ``tokens_dir``: softmax(scale·N(0,1)) per position, top-K kept
    (float32 log-probs as engines return them, stored as ``logprob_dtype`` says), and with
    ``num_samples`` the reference engine's random-sampling targets (at ``sample_temperature``)."""
    rng = np.random.default_rng(seed)
    tokens = open_store(tokens_dir, TOKENS)
    attrs = {"tokenizer_hash": tokenizer_hash or tokens.attrs["tokenizer_hash"],
             "vocab_size": VOCAB, "tokens_fingerprint": tokens.manifest["checksum"],
             "teacher": name} | ({"sample_rest": True} if sample_rest else {}) | (
                 {"sample_temperature": sample_temperature} if num_samples else {})
    out = root / name
    writer = StoreWriter(out, teacher_header(PARTS, K, attrs, temperatures=temperatures,
                                             logprob_dtype=logprob_dtype,
                                             num_samples=num_samples, stream_rows=stream_rows,
                                             code_scalars=code_scalars))
    generator = torch.Generator().manual_seed(seed)
    for p in range(PARTS if complete else PARTS - 1):
        batch = tokens.read_part(p)
        lengths = np.diff(batch.offsets) - 1
        nxt = np.concatenate([batch["token_ids"][a + 1:b] for a, b in
                              zip(batch.offsets[:-1], batch.offsets[1:], strict=True)])
        logits = rng.standard_normal((len(nxt), VOCAB)) * scale
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        order = np.argsort(-logp, axis=1, kind="stable")
        top = np.take_along_axis(logp, order[:, :K], axis=1)
        rows = {
            "topk_ids": order[:, :K].astype(np.int32),
            "topk_logprobs": top.astype(np.float32),
            "target_logprob": logp[np.arange(len(nxt)), nxt].astype(np.float32),
            "target_rank": (1 + (logp > logp[np.arange(len(nxt)), nxt][:, None]).sum(axis=1)
                            ).astype(np.int32),
            "tail_logmass": np.log1p(-np.exp(top).sum(axis=1)).astype(np.float32),
        }
        if temperatures:
            rest = np.ones_like(logp, dtype=bool)
            np.put_along_axis(rest, order[:, :K], False, axis=1)
            cols = []
            for t in temperatures:
                lt = logp / t - np.log(np.exp(logp / t).sum(axis=1, keepdims=True))
                cols.append(np.log(np.where(rest, np.exp(lt), 0).sum(axis=1)))
            rows["tempered_tail_logmass"] = np.stack(cols, axis=1).astype(np.float32)
        if num_samples:
            head = torch.from_numpy(order[:, :K]) if sample_rest else None
            ids, counts, slp = sample_targets(torch.from_numpy(logp), num_samples,
                                              sample_temperature, generator, head)
            rows |= {"sample_ids": ids.numpy(), "sample_counts": counts.numpy().astype(np.uint16),
                     "sample_logprobs": slp.numpy()}
        with writer.open_part(p) as pw:
            pw.append(rows, lengths, batch.seq_ids)
    writer.finalize()
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("agg")
    tokens = make_tokens(root)
    teachers = [make_teacher(root, tokens, f"t{j}", seed=10 + j, scale=s)
                for j, s in enumerate((1.0, 2.0, 3.0))]
    return tokens, teachers


def read_all(path: Path) -> dict[int, dict[str, np.ndarray]]:
    store = open_store(path, TARGET, verify="full")
    return {p: {**store.read_part(p).arrays, "seq_ids": store.read_part(p).seq_ids}
            for p in range(store.num_parts)}


def assert_same_store(a: Path, b: Path) -> None:
    da, db = read_all(a), read_all(b)
    for p in da:
        assert da[p].keys() == db[p].keys()
        for name in da[p]:
            np.testing.assert_array_equal(da[p][name], db[p][name], err_msg=f"{p}/{name}")
    assert open_store(a).manifest["checksum"] == open_store(b).manifest["checksum"]


def config(teachers: list[Path], **kw: object) -> AggregateConfig:
    """The job's config; target stores raw unless said (the tests compare exact values; the
    coded default is tested against raw below); k_out the whole vocabulary (a larger one is
    refused)."""
    kw.setdefault("codec", "raw")
    kw.setdefault("k_out", VOCAB)
    return AggregateConfig(teachers=tuple(str(t) for t in teachers), **kw)  # type: ignore[arg-type]


def direct_fuse(teachers: list[Path], part: int, weights: object, cfg: AggregateConfig
                ) -> dict[str, np.ndarray]:
    rows = []
    for t in teachers:
        store = open_store(t, TEACHER)
        rows.append(teacher_rows(store.read_part(part, list(TEACHER_ARRAYS)), store.attrs))
    return fuse(rows, weights, cfg.teacher_temperatures, cfg.operator, cfg.tail_model,
                cfg.k_out, VOCAB, keep_teacher_blocks=cfg.teacher_blocks)


@pytest.mark.parametrize(("operator", "tail_model"), [
    ("linear", "zipf"), ("geometric", "zipf"),
    ("geometric", "renormalise")])  # q zeroes what a teacher's top-k lacks: a finite gap
def test_static_weights_equal_fuse_on_the_same_rows(stores, tmp_path, operator, tail_model):
    tokens, teachers = stores
    cfg = config(teachers, weights=(0.5, 0.3, 0.2), temperatures=(1.0, 2.0, 3.0),
                 operator=operator, tail_model=tail_model, k_out=12)
    summary = aggregate(tokens, tmp_path / "out", cfg, progress=False)
    assert summary.complete and summary.parts_written == PARTS
    got = read_all(tmp_path / "out")
    for p in range(PARTS):
        want = direct_fuse(teachers, p, np.array(cfg.weights), cfg)
        for name in ("ids", "probs", "tail_mass", "weights", "jensen_gap", "disagreement"):
            np.testing.assert_array_equal(got[p][name], want[name], err_msg=name)
        np.testing.assert_allclose(got[p]["probs"].sum(axis=1, dtype=np.float64)
                                   + got[p]["tail_mass"], 1.0, atol=1e-6)
        assert np.isfinite(got[p]["jensen_gap"]).all()
    assert summary.diagnostics["positions"] == sum(len(got[p]["ids"]) for p in got)
    np.testing.assert_allclose([summary.diagnostics[f"mean_weight_{j}"] for j in range(3)],
                               cfg.weights, rtol=1e-6)


def test_fitted_weights_are_the_maximum_likelihood_mixture(stores, tmp_path):
    tokens, teachers = stores
    summary = aggregate(tokens, tmp_path / "out", config(teachers, fit_weights=True),
                        progress=False)
    assert summary.complete
    stored = open_store(tmp_path / "out", TARGET).attrs["config"]
    w = np.array(stored["weights"])
    assert stored["fit_weights"] and abs(w.sum() - 1) < 1e-9
    lp = np.stack([np.concatenate([open_store(t, TEACHER).read_part(p, ["target_logprob"])
                                   ["target_logprob"] for p in range(PARTS)]).astype(np.float64)
                   for t in teachers], axis=1)
    np.testing.assert_allclose(w, fit_mixture_weights(lp), rtol=0, atol=1e-12)
    np.testing.assert_allclose([summary.diagnostics[f"mean_weight_{j}"] for j in range(3)], w,
                               rtol=1e-6)
    assert np.mean(np.log(np.exp(lp) @ w)) >= np.mean(lp, axis=0).max()


def test_adaptive_token_weights(stores, tmp_path):
    tokens, teachers = stores
    cfg = config(teachers, temperatures=(2.0, 2.0, 1.0), token="entropy", token_sharpness=2.0,
                 eps=0.05)
    aggregate(tokens, tmp_path / "out", cfg, progress=False)
    got = read_all(tmp_path / "out")
    for p in range(PARTS):
        want = direct_fuse(teachers, p, AdaptiveWeights(token="entropy", token_sharpness=2.0,
                                                        eps=0.05, base=(1 / 3,) * 3), cfg)
        np.testing.assert_array_equal(got[p]["weights"], want["weights"])
        np.testing.assert_array_equal(got[p]["probs"], want["probs"])
        w = got[p]["weights"]
        assert (w >= 0.05 - 1e-6).all() and np.ptp(w, axis=0).max() > 0.01  # they adapt


def test_task_weights_follow_the_tokens_store_tags(stores, tmp_path):
    tokens, teachers = stores
    cfg = config(teachers, weights=(0.2, 0.3, 0.5),
                 task_weights={"code": (1.0, 0.0, 0.0), "prose": (0.0, 1.0, 1.0)})
    aggregate(tokens, tmp_path / "out", cfg, progress=False)
    store = open_store(tokens, TOKENS)
    target = open_store(tmp_path / "out", TARGET)
    expected = {"code": [1.0, 0.0, 0.0], "prose": [0.0, 0.375, 0.625],  # prior × factors
                "math": [0.2, 0.3, 0.5]}  # no factors: the static prior
    for p in range(PARTS):
        tags = store.read_meta(p).column("task").to_pylist()
        batch = target.read_part(p, ["weights"])
        for s, tag in enumerate(tags):
            w = batch["weights"][batch.offsets[s]:batch.offsets[s + 1]]
            np.testing.assert_allclose(w, np.broadcast_to(expected[tag], w.shape), atol=1e-6)


def test_context_weights_use_each_sequences_loss(stores, tmp_path):
    tokens, teachers = stores
    cfg = config(teachers, context="loss", context_sharpness=1.0)
    aggregate(tokens, tmp_path / "out", cfg, progress=False)
    target = open_store(tmp_path / "out", TARGET)
    for p in range(PARTS):
        batch = target.read_part(p, ["weights"])
        for s in range(len(batch.offsets) - 1):  # constant within a sequence
            w = batch["weights"][batch.offsets[s]:batch.offsets[s + 1]]
            assert np.ptp(w, axis=0).max() < 1e-6


def test_teacher_blocks(stores, tmp_path):
    tokens, teachers = stores
    temps = (1.0, 2.0, 0.5)
    cfg = config(teachers, temperatures=temps, teacher_blocks=True)
    aggregate(tokens, tmp_path / "out", cfg, progress=False)
    got = read_all(tmp_path / "out")
    for j, t in enumerate(teachers):
        store = open_store(t, TEACHER)
        for p in range(PARTS):
            rows = teacher_rows(store.read_part(p), store.attrs)
            np.testing.assert_array_equal(got[p][f"teacher{j}_ids"], rows.ids)
            tempered = temper(rows, temps[j], "lump", VOCAB)
            np.testing.assert_allclose(got[p][f"teacher{j}_probs"], tempered.probs, atol=1e-7)
            np.testing.assert_allclose(got[p][f"teacher{j}_tail_mass"], tempered.tail_mass,
                                       atol=1e-7)
            np.testing.assert_allclose(got[p][f"teacher{j}_probs"].sum(axis=1)
                                       + got[p][f"teacher{j}_tail_mass"], 1.0, atol=1e-5)


def test_exact_tail_model_uses_the_stored_tempered_tails(tmp_path):
    tokens = make_tokens(tmp_path)
    teachers = [make_teacher(tmp_path, tokens, f"t{j}", seed=j, scale=2.0,
                             temperatures=(2.0,)) for j in range(2)]
    cfg = config(teachers, temperatures=(2.0, 1.0), tail_model="exact", teacher_blocks=True)
    aggregate(tokens, tmp_path / "out", cfg, progress=False)
    with pytest.raises(StoreError, match="exact"):
        aggregate(tokens, tmp_path / "out3", config(teachers, temperatures=(3.0, 1.0),
                                                    tail_model="exact"), progress=False)


def test_resume_after_losing_a_committed_part(stores, tmp_path):
    tokens, teachers = stores
    cfg = config(teachers, temperatures=(2.0, 1.0, 1.0), token="entropy")
    first = aggregate(tokens, tmp_path / "out", cfg, progress=False)
    shutil.copytree(tmp_path / "out", tmp_path / "ref")
    shutil.rmtree(tmp_path / "out" / "parts" / "00001")
    again = aggregate(tokens, tmp_path / "out", cfg, progress=False)
    assert again.parts_written == 1 and again.complete
    assert again.diagnostics == first.diagnostics
    assert_same_store(tmp_path / "out", tmp_path / "ref")
    # a rerun of a complete store writes nothing
    assert aggregate(tokens, tmp_path / "out", cfg, progress=False).parts_written == 0


def test_processes_and_pipelining_do_not_change_the_store(stores, tmp_path):
    tokens, teachers = stores
    cfg = config(teachers, temperatures=(2.0, 2.0, 1.0), token="entropy", operator="geometric",
                 task_weights={"code": (1.0, 2.0, 1.0)})
    aggregate(tokens, tmp_path / "seq", cfg, progress=False, pipeline=False)
    aggregate(tokens, tmp_path / "pipe", cfg, progress=False)
    aggregate(tokens, tmp_path / "two", cfg, processes=2, progress=False)
    assert_same_store(tmp_path / "seq", tmp_path / "pipe")
    assert_same_store(tmp_path / "seq", tmp_path / "two")


def test_zstd_target_store_reads_back_the_same_targets(stores, tmp_path):
    """--codec zstd changes the bytes on disk, not one value."""
    tokens, teachers = stores
    aggregate(tokens, tmp_path / "raw", config(teachers), progress=False)
    aggregate(tokens, tmp_path / "zstd", config(teachers, codec="zstd"), progress=False)
    raw, packed = read_all(tmp_path / "raw"), read_all(tmp_path / "zstd")
    for p in raw:
        for name in raw[p]:
            np.testing.assert_array_equal(raw[p][name], packed[p][name], err_msg=f"{p}/{name}")
    assert {a.codec for a in open_store(tmp_path / "zstd").header.arrays} == {"zstd"}


def test_workers_share_parts(stores, tmp_path):
    tokens, teachers = stores
    cfg = config(teachers)
    a = aggregate(tokens, tmp_path / "out", cfg, worker_index=0, num_workers=2, progress=False)
    assert not a.complete and a.parts_written == 2
    b = aggregate(tokens, tmp_path / "out", cfg, worker_index=1, num_workers=2, progress=False)
    assert b.complete and b.parts_written == 1
    aggregate(tokens, tmp_path / "one", cfg, progress=False)
    assert_same_store(tmp_path / "out", tmp_path / "one")


def test_refuses_teachers_of_another_tokens_store(stores, tmp_path):
    tokens, teachers = stores
    other = make_tokens(tmp_path, seed=1)
    stranger = make_teacher(tmp_path, other, "stranger", seed=3, scale=1.0)
    with pytest.raises(StoreError, match="different tokens store"):
        aggregate(tokens, tmp_path / "out", config([teachers[0], stranger]), progress=False)


def test_refuses_another_tokenizer(stores, tmp_path):
    tokens, teachers = stores
    odd = make_teacher(tmp_path, tokens, "odd", seed=3, scale=1.0, tokenizer_hash="other")
    with pytest.raises(StoreError, match="different tokenizer"):
        aggregate(tokens, tmp_path / "out", config([teachers[0], odd]), progress=False)


def test_refuses_an_incomplete_teacher_store(stores, tmp_path):
    tokens, teachers = stores
    partial = make_teacher(tmp_path, tokens, "partial", seed=3, scale=1.0, complete=False)
    with pytest.raises(IncompleteStoreError, match="not complete"):
        aggregate(tokens, tmp_path / "out", config([teachers[0], partial]), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kw", "match"), [
    ({"temperatures": (1.0, 0.0, 2.0)}, "temperatures"),
    ({"temperatures": (1.0, -1.0, 2.0)}, "temperatures"),
    ({"temperatures": (1.0, float("nan"), 2.0)}, "temperatures"),
    ({"temperatures": (1.0, 2.0)}, "temperatures"),
    ({"weights": (0.5, 0.5, 0.5)}, "sum to 1"),
    ({"weights": (1.5, -0.5, 0.0)}, ">= 0"),
    ({"weights": (0.5, 0.5)}, "weights"),
    ({"operator": "average"}, "unknown operator"),
    ({"tail_model": "uniform"}, "unknown tail model"),
    ({"imputation": "mean"}, "unknown imputation"),
    ({"k_out": 0}, "k_out"),
    ({"token": "confidence"}, "token-level"),
    ({"task_weights": {"code": (1.0, 1.0)}}, "task weights"),
    ({"task_weights": {"code": (0.0, 0.0, 0.0)}}, "positive"),
    ({"safety": 3}, "safety"),
    ({"source": "draws"}, "unknown source"),
    ({"source": "samples", "operator": "geometric"}, "operator geometric"),
    ({"source": "samples", "temperatures": (1.0, 2.0, 1.0)}, "temperatures other than 1"),
    ({"source": "samples", "token": "entropy"}, "adaptive"),
    ({"source": "samples", "teacher_blocks": True}, "teacher blocks"),
    ({"label_entry": True, "operator": "geometric"}, "label entry"),
    ({"codec": "lz4"}, "unknown codec"),
    ({"label_entry": True, "temperatures": (2.0, 1.0, 1.0)}, "label entry"),
])
def test_refuses_bad_settings(stores, kw, match):
    _, teachers = stores
    with pytest.raises(ValueError, match=match):
        config(teachers, **kw)


def test_refuses_no_teachers():
    with pytest.raises(ValueError, match="at least one teacher"):
        AggregateConfig(teachers=())


def dense(ids: np.ndarray, values: np.ndarray, fill: float) -> np.ndarray:
    """Rows of (id, value) pairs as ``[N, VOCAB]`` (``fill`` elsewhere): compared by id, since
    a coding may reorder entries whose values tie."""
    out = np.full((len(ids), VOCAB), fill)
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    keep = ids.reshape(-1) >= 0
    out[rows[keep], ids.reshape(-1)[keep]] = values.reshape(-1)[keep]
    return out


def test_q64_teacher_store_reaches_aggregate_within_its_error_bound(stores, tmp_path):
    """The same teacher rows in a q64 and a float32 store: aggregate's reader sees the same ids
    and log-probs within 1/128 nat where p ≥ 1e-3 (1/32 elsewhere), and the fused targets
    differ by no more than that error allows."""
    tokens, _ = stores
    exact, coded = (make_teacher(tmp_path, tokens, f"t-{dtype}", seed=5, scale=3.0,
                                 logprob_dtype=dtype) for dtype in ("float32", "q64"))
    assert open_store(coded, TEACHER).attrs["topk_coding"] == "q64"
    fine = coarse = 0.0
    for p in range(PARTS):
        a = _read_part(str(tokens), config([exact]), p).rows[0]
        b = _read_part(str(tokens), config([coded]), p).rows[0]
        assert b.ids.dtype == np.int32 and b.logprobs.dtype == np.float32
        assert (b.logprobs[:, 1:] <= b.logprobs[:, :-1]).all()  # rank order
        np.testing.assert_array_equal(np.sort(a.ids, axis=1), np.sort(b.ids, axis=1))
        want, got = dense(a.ids, a.logprobs, np.nan), dense(b.ids, b.logprobs, np.nan)
        err = np.abs(got - want)
        fine = max(fine, np.nanmax(np.where(want >= np.log(1e-3), err, np.nan)))
        coarse = max(coarse, np.nanmax(err))
        np.testing.assert_array_equal(a.tail_logmass, b.tail_logmass)
    assert 0 < fine <= grid.FINE_ERROR and coarse <= grid.COARSE_ERROR
    targets = {}
    for name, teacher in (("exact", exact), ("coded", coded)):
        aggregate(tokens, tmp_path / f"out-{name}", config([teacher], temperatures=(2.0,)),
                  progress=False)
        targets[name] = read_all(tmp_path / f"out-{name}")
    for p in range(PARTS):
        a, b = targets["exact"][p], targets["coded"][p]
        want, got = dense(a["ids"], a["probs"], 0.0), dense(b["ids"], b["probs"], 0.0)
        # each stored p moves by a factor within e^(±1/32) (e^(±1/128) where p ≥ 1e-3): at
        # T = 2 each p^(1/2) and their normaliser by e^(±1/64), a fused prob by e^(±1/32)
        np.testing.assert_allclose(got, want, rtol=np.expm1(grid.COARSE_ERROR), atol=1e-7)


def test_q64v3_and_q64r_teacher_stores_aggregate_as_their_q64v2_twin(stores, tmp_path):
    """The same rows in a q64v2, a q64v3 (ids coded against reference rows) and a q64r
    (those range-coded; a stream per sequence, or streams of ≥ 7 rows) store, sampled columns
    too: the same decoded rows, so bit-identical targets. With q64r's actual-token log-prob
    and tail coded against the top-k (within 1/128 nat), the same ids and targets within
    that bound."""
    tokens, _ = stores
    targets = {}
    variants = {tc.Q64V2: (tc.Q64V2, 0, False), tc.Q64V3: (tc.Q64V3, 0, False),
                tc.Q64R: (tc.Q64R, 0, False), "q64r-streams": (tc.Q64R, 7, False),
                "q64r-scalars": (tc.Q64R, 7, True)}
    for name, (coding, stream_rows, code_scalars) in variants.items():
        teacher = make_teacher(tmp_path, tokens, f"t-{name}", seed=5, scale=3.0,
                               logprob_dtype=coding, num_samples=8, stream_rows=stream_rows,
                               code_scalars=code_scalars)
        assert open_store(teacher, TEACHER).attrs["topk_coding"] == coding
        for source in ("topk", "samples"):
            out = tmp_path / f"out-{name}-{source}"
            aggregate(tokens, out, config([teacher], source=source), progress=False)
            targets[name, source] = read_all(out)
    for source, p, name in ((s, p, n) for s in ("topk", "samples") for p in range(PARTS)
                            for n in list(variants)[1:]):
        a, b = targets[tc.Q64V2, source][p], targets[name, source][p]
        assert a.keys() == b.keys()
        for array in a:
            if variants[name][2] and a[array].dtype.kind == "f":  # the tail moves the mass
                np.testing.assert_allclose(b[array], a[array], atol=1e-7, err_msg=name,
                                           rtol=2 * np.expm1(grid.FINE_ERROR))
            else:
                np.testing.assert_array_equal(a[array], b[array], err_msg=f"{name} {array}")


def entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)


def test_sampled_targets_are_the_linear_mixture_of_the_draws(tmp_path):
    """source="samples": q = Σ w_k c_k/N over the draws (checked densely), its top k_out with
    the rest in the tail, and the Jensen gap H(q) − Σ w_k H(p̂_k) of the empirical p̂_k."""
    tokens = make_tokens(tmp_path)
    draws = 24
    teachers = [make_teacher(tmp_path, tokens, f"t{j}", seed=20 + j, scale=s,
                             num_samples=draws) for j, s in enumerate((1.0, 2.5))]
    weights = (0.7, 0.3)
    k_out = 12  # below the union size of many rows: the rest goes to the tail
    out = tmp_path / "sampled"
    aggregate(tokens, out, config(teachers, weights=weights, k_out=k_out, source="samples"),
              progress=False)
    for p, got in read_all(out).items():
        emp = []
        for t in teachers:
            part = open_store(t, TEACHER).read_part(p, ["sample_ids", "sample_counts"])
            counts = part["sample_counts"].astype(np.float64)
            assert np.all(counts.sum(axis=1) == draws)
            emp.append(dense(part["sample_ids"], counts / draws, 0.0))
        q = weights[0] * emp[0] + weights[1] * emp[1]
        top = -np.sort(-q, axis=1)[:, :k_out]
        np.testing.assert_allclose(np.sort(got["probs"], axis=1)[:, ::-1], top, atol=1e-7)
        picked = np.take_along_axis(q, np.maximum(got["ids"], 0), axis=1)
        np.testing.assert_allclose(np.where(got["ids"] >= 0, picked, 0), got["probs"], atol=1e-7)
        np.testing.assert_allclose(got["tail_mass"], 1 - top.sum(axis=1), atol=1e-6)
        gap = entropy(q) - weights[0] * entropy(emp[0]) - weights[1] * entropy(emp[1])
        np.testing.assert_allclose(got["jensen_gap"], gap, atol=1e-5)
    with pytest.raises(StoreError, match="no sampled targets"):
        aggregate(tokens, tmp_path / "x", config([make_teacher(tmp_path, tokens, "plain", 1, 1.0)],
                                                 source="samples"), progress=False)


def test_hybrid_targets_are_the_exact_head_plus_the_rest_of_the_draws(tmp_path):
    """A store harvested with --sample-rest: q = head + tail mass · c/N (its top-k exact as
    stored, the draws from outside it), fused by --source samples like any sampled store."""
    tokens = make_tokens(tmp_path)
    draws = 16
    teacher = make_teacher(tmp_path, tokens, "hybrid", seed=31, scale=2.0, num_samples=draws,
                           sample_rest=True)
    out = tmp_path / "hybrid-targets"
    aggregate(tokens, out, config([teacher], k_out=K + draws, source="samples"),
              progress=False)
    for p, got in read_all(out).items():
        part = open_store(teacher, TEACHER).read_part(p)
        head = dense(part["topk_ids"], np.exp(part["topk_logprobs"].astype(np.float64)), 0.0)
        rest = np.exp(part["tail_logmass"].astype(np.float64))[:, None]
        drawn = dense(part["sample_ids"], part["sample_counts"] / draws, 0.0)
        assert not np.any((head > 0) & (drawn > 0))  # the draws avoid the head
        q = head + rest * drawn
        np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=0.01)  # the head is q64-coded
        q /= q.sum(axis=1, keepdims=True)
        picked = np.take_along_axis(q, np.maximum(got["ids"], 0), axis=1)
        np.testing.assert_allclose(np.where(got["ids"] >= 0, picked, 0), got["probs"], atol=1e-7)


def test_sample_head_makes_the_hybrid_from_a_plain_store(tmp_path):
    """--sample-head h on a store of plain draws: q = its exact top-h + the rest's mass
    shared by the draws outside that head (the rest in the tail where none fell outside);
    refused on a hybrid store and above the stored k."""
    tokens = make_tokens(tmp_path)
    draws, h = 16, 3
    teacher = make_teacher(tmp_path, tokens, "plain", seed=33, scale=2.0, num_samples=draws)
    out = tmp_path / "head-targets"
    aggregate(tokens, out, config([teacher], k_out=h + draws, source="samples",
                                  sample_head=h), progress=False)
    for p, got in read_all(out).items():
        part = open_store(teacher, TEACHER).read_part(p)
        head_lp = part["topk_logprobs"][:, :h].astype(np.float64)
        head = dense(part["topk_ids"][:, :h], np.exp(head_lp), 0.0)
        drawn = dense(part["sample_ids"], part["sample_counts"].astype(np.float64), 0.0)
        drawn[head > 0] = 0.0
        outside = drawn.sum(axis=1, keepdims=True)
        rest = 1.0 - np.exp(head_lp).sum(axis=1, keepdims=True)
        q = head + rest * drawn / np.maximum(outside, 1)
        q = np.where(outside > 0, q / q.sum(axis=1, keepdims=True), q)
        picked = np.take_along_axis(q, np.maximum(got["ids"], 0), axis=1)
        np.testing.assert_allclose(np.where(got["ids"] >= 0, picked, 0), got["probs"], atol=1e-6)
        np.testing.assert_allclose(got["tail_mass"], 1 - q.sum(axis=1), atol=1e-6)
    hybrid = make_teacher(tmp_path, tokens, "hybrid", seed=31, scale=2.0, num_samples=draws,
                          sample_rest=True)
    with pytest.raises(StoreError, match="drop --sample-head"):
        aggregate(tokens, tmp_path / "x", config([hybrid], source="samples", sample_head=h),
                  progress=False)
    with pytest.raises(StoreError, match="more than the top-k"):
        aggregate(tokens, tmp_path / "y", config([teacher], source="samples",
                                                 sample_head=K + 1), progress=False)
    with pytest.raises(ValueError, match="for --source samples"):
        config([teacher], sample_head=h)


def test_sample_head_refuses_draws_at_another_temperature(tmp_path):
    """--sample-head on draws made at --sample-temperature T ≠ 1 would put the exact top-h at
    T = 1 beside the rest's T = 1 mass shared by tempered draws: an estimate of neither
    distribution. Refused before a target store is begun (plain draws at T ≠ 1 still fuse)."""
    tokens = make_tokens(tmp_path)
    teacher = make_teacher(tmp_path, tokens, "hot", seed=35, scale=2.0, num_samples=16,
                           sample_temperature=0.5)
    out = tmp_path / "head-hot"
    with pytest.raises(StoreError, match=r"sample-temperature 0\.5"):
        aggregate(tokens, out, config([teacher], source="samples", sample_head=3),
                  progress=False)
    assert not out.exists()
    aggregate(tokens, tmp_path / "plain-hot", config([teacher], source="samples"),
              progress=False)


@pytest.mark.parametrize(("option", "said"), [({"tail_model": "zipf"}, "tail model zipf"),
                                               ({"imputation": "rank"}, "imputation rank")])
def test_sampled_targets_refuse_the_top_k_tail_options(option: dict, said: str) -> None:
    """Sampled targets have no tail model or imputation (the draws' support is all there is):
    asked for with --source samples they were ignored silently."""
    with pytest.raises(ValueError, match=f"not supported with: {said}"):
        config([Path("t")], source="samples", **option)


def test_label_entry_splits_the_actual_token_out_of_the_tail(stores, tmp_path):
    """--label-entry: the target is the same mixture on a finer partition: wherever the label
    is outside the fused support, one more column holds it with Σ_k w_k p_k(label) (exact from
    the teacher stores), taken from the tail; the other columns are those of the plain run."""
    tokens, teachers = stores
    weights = (0.5, 0.3, 0.2)
    plain, split = tmp_path / "plain", tmp_path / "split"
    aggregate(tokens, plain, config(teachers, weights=weights), progress=False)
    aggregate(tokens, split, config(teachers, weights=weights, label_entry=True), progress=False)
    tok = open_store(tokens, TOKENS)
    added = 0
    for p, got in read_all(split).items():
        ref = read_all(plain)[p]
        part = tok.read_part(p)
        labels = np.delete(part["token_ids"], part.offsets[:-1])
        p_label = sum(w * np.exp(open_store(t, TEACHER).read_part(p, ["target_logprob"])
                                 ["target_logprob"].astype(np.float64))
                      for w, t in zip(weights, teachers, strict=True))
        np.testing.assert_array_equal(got["ids"][:, :-1], ref["ids"])
        np.testing.assert_array_equal(got["probs"][:, :-1], ref["probs"])
        outside = ~(ref["ids"] == labels[:, None]).any(axis=1)
        np.testing.assert_array_equal(got["ids"][:, -1], np.where(outside, labels, -1))
        np.testing.assert_allclose(got["probs"][:, -1], np.where(outside, p_label, 0), rtol=1e-6)
        np.testing.assert_allclose(got["probs"].sum(axis=1) + got["tail_mass"], 1, atol=1e-5)
        added += int(outside.sum())
    assert added > 0


def test_coded_target_store_holds_the_raw_targets_within_the_bound(stores, tmp_path):
    """--codec q64v2: the same targets as raw, ids exact, log q within 1/128 nat where
    q ≥ 1e-3, L_multi blocks too, in fewer bytes."""
    from mtkd.store import bytes_on_disk

    tokens, teachers = stores
    outs = {}
    for codec in ("raw", "q64v2"):
        outs[codec] = tmp_path / codec
        aggregate(tokens, outs[codec], config(teachers, codec=codec, teacher_blocks=True),
                  progress=False)
    raw, coded = read_all(outs["raw"]), read_all(outs["q64v2"])
    for p in raw:
        for name in ("ids", "teacher1_ids"):
            probs = name.replace("ids", "probs")
            a = dense(raw[p][name], raw[p][probs].astype(np.float64), 0.0)
            b = dense(coded[p][name], coded[p][probs].astype(np.float64), 0.0)
            assert np.array_equal(a > 0, b > 0)
            big = a >= 1e-3
            assert np.abs(np.log(b[big]) - np.log(a[big])).max() <= 1 / 128 + 1e-6
        for name in ("tail_mass", "weights", "jensen_gap"):
            np.testing.assert_array_equal(coded[p][name], raw[p][name])
    assert bytes_on_disk(outs["q64v2"]) < bytes_on_disk(outs["raw"])  # tiny: overheads weigh


def test_the_cli_says_when_k_out_cuts_sampled_targets(tmp_path):
    """Two teachers' draws hold more distinct ids than --k-out 16 keeps in some rows: their
    smallest entries go to the tail (no longer the unbiased estimate), and `mtkd aggregate` says
    so, with the share of such rows; with room for every drawn id it says nothing."""
    from typer.testing import CliRunner

    from mtkd.cli import app

    tokens = make_tokens(tmp_path)
    stores = [make_teacher(tmp_path, tokens, f"s{j}", seed=40 + j, scale=1.0, num_samples=16)
              for j in range(2)]
    for k_out, noted in ((16, True), (VOCAB, False)):
        args = ["aggregate", *map(str, stores), "--tokens", str(tokens), "--out",
                str(tmp_path / f"t{k_out}"), "--source", "samples", "--k-out", str(k_out)]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        assert ("drew more ids than --k-out 16 keeps" in result.output) is noted
        if noted:  # the share of rows that lost entries, counted from the rows themselves
            tails = np.concatenate([r["tail_mass"] for r in read_all(tmp_path / "t16").values()])
            share = np.mean(tails > 1e-6)
            assert 0 < share < 1
            assert f"{share:.1%} of the rows drew more ids" in result.output
